//! The daemon's view of what is programmed, and how a configuration plus
//! the runtime state of each backend (health, drain) is applied to the
//! datapath without a packet ever seeing a half-made change.
//!
//! Order of an apply:
//! 1. resolve everything that can fail outside the maps (interfaces, MACs,
//!    Maglev tables): a failure here leaves the datapath untouched;
//! 2. write backend entries (new ids get a new generation), except entries
//!    that are going down;
//! 3. per VIP, write the ring the datapath is not reading, then flip the
//!    VIP entry to it in one map update;
//! 4. mark backends that went down (their flows are now rescheduled on the
//!    new rings, which no longer contain them);
//! 5. remove VIPs that are gone, then clear backend slots no ring uses
//!    (what a cleared backend counted goes to its VIP's retired counters,
//!    if the VIP stays: `vip_counters`).
//!
//! Ids are stable across applies and across daemon restarts (adoption): a
//! VIP (address, port, protocol) and a backend (VIP, address) keep their
//! ids and generations, so established flows keep their backend.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::{
    maglev, Backend, Counters, FlowKey, VipInfo, VipKey, BACKEND_F_DOWN, BACKEND_F_DRAINING,
    FAMILY_V4, FLOW_F_CLOSED, MAX_BACKENDS, MAX_TX_PORTS, PROTO_TCP, VIP_FILTER_WORDS,
    VIP_F_AFFINITY_CLIENT_IP,
};

use crate::{
    api::{self, BackendState, Health},
    config::{Affinity, Config, MacAddr, Scheduler, Vip},
    dataplane::{Dataplane, DataplaneError},
    netdev::{self, Interface, NetError},
};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("VIP {vip}: building the Maglev table")]
    Maglev {
        vip: String,
        source: maglev::TableError,
    },
    #[error("{what} exhausted (limit {limit})")]
    Exhausted { what: &'static str, limit: u32 },
    #[error("{0} cannot change while running; restart the daemon to apply it")]
    NeedsRestart(&'static str),
}

/// Finds interfaces and backend MACs. Swappable so tests can run without a
/// neighbour table.
pub trait Resolver {
    fn interface(&mut self, name: &str) -> Result<Interface, NetError>;
    fn mac(&mut self, address: IpAddr, interface: &str) -> Result<MacAddr, NetError>;
}

/// The real resolver: iproute2 and the kernel's neighbour table.
pub struct SystemResolver {
    pub neighbour_timeout: Duration,
}

impl Resolver for SystemResolver {
    fn interface(&mut self, name: &str) -> Result<Interface, NetError> {
        netdev::interface(name)
    }
    fn mac(&mut self, address: IpAddr, interface: &str) -> Result<MacAddr, NetError> {
        netdev::resolve_mac(address, interface, self.neighbour_timeout)
    }
}

#[derive(Clone, Debug)]
struct VipSlot {
    info: VipInfo,
    table: Vec<u32>,
    /// What `table` was built from; None when adopted (the first apply
    /// builds and writes the ring).
    members: Option<Vec<maglev::Member>>,
    /// Slots of `table` per backend id.
    slots: HashMap<u32, u32>,
}

/// Slots of a Maglev table per backend id.
fn slot_counts(table: &[u32]) -> HashMap<u32, u32> {
    let mut counts = HashMap::new();
    for &id in table {
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

/// A backend's runtime state, kept across applies while it stays in the
/// configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Runtime {
    /// Set while draining: when it started.
    pub draining_since: Option<Instant>,
    /// Draining finished (no connection left, or the drain timeout).
    pub drained: bool,
    pub health: Health,
}

impl Runtime {
    fn in_ring(&self, weight: u32) -> bool {
        weight > 0 && self.draining_since.is_none() && self.health != Health::Down
    }

    fn flags(&self) -> u32 {
        let mut f = 0;
        if self.health == Health::Down {
            f |= BACKEND_F_DOWN;
        }
        if self.draining_since.is_some() {
            f |= BACKEND_F_DRAINING;
        }
        f
    }

    pub fn state(&self) -> BackendState {
        if self.health == Health::Down {
            BackendState::Down
        } else if self.drained {
            BackendState::Drained
        } else if self.draining_since.is_some() {
            BackendState::Draining
        } else {
            BackendState::Active
        }
    }
}

#[derive(Clone, Debug)]
struct BackendSlot {
    id: u32,
    entry: Backend,
    runtime: Runtime,
}

/// A backend of the new configuration, resolved but not yet given an id.
struct Planned {
    address: IpAddr,
    weight: u32,
    /// Has a health check (checked backends start up).
    checked: bool,
    entry: Backend,
}

/// What `apply` changed, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub vips_added: usize,
    pub vips_removed: usize,
    pub rings_swapped: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
}

/// Identifies a backend: its VIP and address.
pub type BackendKey = (VipKey, IpAddr);

#[derive(Default)]
pub struct State {
    config: Option<Config>,
    vips: HashMap<VipKey, VipSlot>,
    backends: HashMap<BackendKey, BackendSlot>,
    free_vip_ids: Vec<u32>,
    next_vip_id: u32,
    free_backend_ids: Vec<u32>,
    next_backend_id: u32,
    next_generation: u32,
    tx_ports: BTreeMap<u32, u32>,
    /// Interfaces backends are reached through, other than the VIP one.
    egress: BTreeMap<String, Interface>,
    ring: api::RingStats,
    /// `XLB_VIP_FILTER` as written.
    filter: Vec<u64>,
    /// Flows last seen before this (CLOCK_MONOTONIC ns) count as seen at
    /// it: the datapath clock stands still while no daemon runs, so a flow
    /// adopted from pins is not expired for the time nobody was watching.
    clock_floor: u64,
    /// Active connections of the backends of `least-connections` VIPs as
    /// `rebalance` last read them (absent: 0); their rings are built from
    /// these (`lc_weights`).
    loads: HashMap<BackendKey, u64>,
    /// The last `rebalance` re-apply failed: the next one re-applies even
    /// if the weights look unchanged (some rings may have flipped to them,
    /// others not).
    lc_retry: bool,
}

/// Steps per unit of weight in `lc_weights`: a backend's factor is rounded
/// to quarters, so a ring is rebuilt only when a share moves by that much,
/// not at every connection.
const LC_STEPS: f64 = 4.0;
/// Connections that damp `lc_weights` at low counts: with a handful of
/// connections in all, one more or less moves no factor by a quarter.
const LC_DAMPING: f64 = 8.0;

/// The Maglev weights of a `least-connections` VIP's backends in the ring,
/// from their configured weights and active connections (`(weight,
/// active)`, weights > 0). With `L` a backend's connections scaled to the
/// average weight (`active * mean weight / weight`), `M` the average
/// connections per backend and `D` = `LC_DAMPING`, a backend's weight is
/// multiplied by `(2M + D) / (L + M + D)`: 1 when each backend's
/// connections are in proportion to its weight (then the ring is the one
/// `maglev` builds: a common factor leaves a Maglev table unchanged),
/// towards 2 for an idle backend and 2/3 for one at twice the average as
/// the counts grow past `D`, never 0 (each backend keeps some new flows,
/// so its count stays current), and the same for weights 1:1 as for
/// 100:100. Bounded rather than "always the least loaded": the counts are
/// up to a second old, and sending every new flow to one backend for a
/// second would overshoot.
pub fn lc_weights(members: &[(u32, u64)]) -> Vec<u32> {
    if members.is_empty() {
        return Vec::new();
    }
    #[expect(clippy::cast_precision_loss, reason = "backend and connection counts")]
    let (n, total) = (
        members.len() as f64,
        members.iter().map(|&(_, a)| a as f64).sum::<f64>(),
    );
    let mean_weight = members.iter().map(|&(w, _)| f64::from(w)).sum::<f64>() / n;
    let mean = total / n;
    members
        .iter()
        .map(|&(w, a)| {
            #[expect(clippy::cast_precision_loss, reason = "connection counts")]
            let load = a as f64 * mean_weight / f64::from(w.max(1));
            let factor = (2.0 * mean + LC_DAMPING) / (load + mean + LC_DAMPING);
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "factor is in (0, 2): at most 2 * LC_STEPS"
            )]
            let steps = ((factor * LC_STEPS).round() as u32).max(1);
            w.saturating_mul(steps)
        })
        .collect()
}

fn filter_bitmap<'a>(keys: impl Iterator<Item = &'a VipKey>) -> Vec<u64> {
    let mut words = vec![0u64; VIP_FILTER_WORDS as usize];
    for k in keys {
        let bit = k.filter_slot();
        words[(bit / 64) as usize] |= 1 << (bit % 64);
    }
    words
}

pub fn vip_key(vip: &Vip) -> VipKey {
    VipKey::new(vip.address, vip.port, vip.protocol.number())
}

fn ip_of(addr: [u32; 4], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from(addr[0].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        for (i, w) in addr.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What the periodic sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepSummary {
    pub scanned: usize,
    pub expired: usize,
    pub closed_removed: usize,
}

impl State {
    pub fn config(&self) -> Option<&Config> {
        self.config.as_ref()
    }

    /// See `clock_floor`: call when the daemon starts.
    pub fn set_clock_floor(&mut self, now_ns: u64) {
        self.clock_floor = now_ns;
    }

    pub fn ring_stats(&self) -> api::RingStats {
        self.ring.clone()
    }

    /// Rebuilds the id allocation from maps a previous daemon pinned, so the
    /// next `apply` keeps every VIP id, backend id, generation and drain.
    pub fn adopt(&mut self, dp: &Dataplane) -> Result<(), DataplaneError> {
        let vips = dp.vip_entries()?;
        let by_id: HashMap<u32, VipKey> = vips.iter().map(|(k, i)| (i.id, *k)).collect();
        for (key, info) in vips {
            // An empty table forces the first apply to write and flip the
            // ring once, so the daemon's view and the map agree.
            self.vips.insert(
                key,
                VipSlot {
                    info,
                    table: Vec::new(),
                    members: None,
                    slots: HashMap::new(),
                },
            );
            self.next_vip_id = self.next_vip_id.max(info.id + 1);
        }
        for id in 0..MAX_BACKENDS {
            let entry = dp.backend(id)?;
            if entry.generation == 0 {
                continue;
            }
            let Some(vip) = by_id.get(&entry.vip_id) else {
                continue;
            };
            let draining = entry.flags & BACKEND_F_DRAINING != 0;
            self.backends.insert(
                (*vip, ip_of(entry.addr, entry.family)),
                BackendSlot {
                    id,
                    entry,
                    runtime: Runtime {
                        draining_since: draining.then(Instant::now),
                        drained: false,
                        health: if entry.flags & BACKEND_F_DOWN != 0 {
                            Health::Down
                        } else {
                            Health::Unchecked
                        },
                    },
                },
            );
            self.next_backend_id = self.next_backend_id.max(id + 1);
            self.next_generation = self.next_generation.max(entry.generation);
        }
        let used_vips: Vec<u32> = self.vips.values().map(|v| v.info.id).collect();
        self.free_vip_ids = (0..self.next_vip_id)
            .filter(|i| !used_vips.contains(i))
            .collect();
        let used: Vec<u32> = self.backends.values().map(|b| b.id).collect();
        self.free_backend_ids = (0..self.next_backend_id)
            .filter(|i| !used.contains(i))
            .collect();
        self.tx_ports = dp
            .tx_port_entries()
            .into_iter()
            .map(|(port, ifindex)| (ifindex, port))
            .collect();
        Ok(())
    }

    /// Applies a configuration (with every backend's runtime state).
    pub fn apply(
        &mut self,
        dp: &mut Dataplane,
        cfg: &Config,
        resolver: &mut dyn Resolver,
    ) -> Result<ApplySummary, ApplyError> {
        self.apply_with(dp, cfg, resolver, &mut |_| Ok(()))
    }

    /// `apply`, running `before_writes` once everything that can refuse the
    /// configuration (restart-only changes, interfaces, MACs, slots, Maglev
    /// tables) has passed, just before the first map write: an error there
    /// leaves every map as it was.
    pub fn apply_with(
        &mut self,
        dp: &mut Dataplane,
        cfg: &Config,
        resolver: &mut dyn Resolver,
        before_writes: &mut dyn FnMut(&mut Dataplane) -> Result<(), DataplaneError>,
    ) -> Result<ApplySummary, ApplyError> {
        if let Some(old) = &self.config {
            if old.datapath != cfg.datapath {
                return Err(ApplyError::NeedsRestart("datapath settings"));
            }
            if old.interface != cfg.interface {
                return Err(ApplyError::NeedsRestart("interface"));
            }
        }
        let settings = dp.settings();

        // 1. Resolve: no map is touched until everything below succeeded.
        let main_if = resolver.interface(&cfg.interface)?;
        let mut egress = BTreeMap::new();
        let mut macs: HashMap<(IpAddr, String), MacAddr> = HashMap::new();
        let mut planned: Vec<(VipKey, &Vip, Vec<Planned>)> = Vec::new();
        for vip in &cfg.vips {
            let key = vip_key(vip);
            let mut members = Vec::new();
            for b in &vip.backends {
                let out_if = match &b.interface {
                    Some(name) if *name != cfg.interface => {
                        if !egress.contains_key(name) {
                            egress.insert(name.clone(), resolver.interface(name)?);
                        }
                        egress[name].clone()
                    }
                    _ => main_if.clone(),
                };
                // A backend already programmed keeps its MAC unless the file
                // gives another: reloads do not wait on the neighbour table.
                let known = self
                    .backends
                    .get(&(key, b.address))
                    .filter(|s| s.entry.ifindex == out_if.ifindex)
                    .map(|s| MacAddr(s.entry.dst_mac));
                let mac = match (b.mac, known) {
                    (Some(mac), _) | (None, Some(mac)) => mac,
                    (None, None) => {
                        let k = (b.address, out_if.name.clone());
                        match macs.get(&k) {
                            Some(m) => *m,
                            None => {
                                let m = resolver.mac(b.address, &out_if.name)?;
                                macs.insert(k, m);
                                m
                            }
                        }
                    }
                };
                let (addr, family) = lb_common::addr_words(b.address);
                let entry = Backend {
                    dst_mac: mac.0,
                    src_mac: out_if.mac.0,
                    ifindex: out_if.ifindex,
                    addr,
                    family,
                    ..Backend::default()
                };
                members.push(Planned {
                    address: b.address,
                    weight: b.weight,
                    checked: b.health.is_some(),
                    entry,
                });
            }
            planned.push((key, vip, members));
        }

        // Tx ports for every egress interface (the VIP interface uses XDP_TX
        // when traffic arrives there, but gets a port too for traffic that
        // arrives on another attached interface).
        let mut tx_ports = self.tx_ports.clone();
        for ifindex in std::iter::once(main_if.ifindex).chain(egress.values().map(|i| i.ifindex)) {
            if !tx_ports.contains_key(&ifindex) {
                let port = (0..MAX_TX_PORTS)
                    .find(|p| !tx_ports.values().any(|used| used == p))
                    .ok_or(ApplyError::Exhausted {
                        what: "egress interfaces",
                        limit: MAX_TX_PORTS,
                    })?;
                tx_ports.insert(ifindex, port);
            }
        }

        // Ring rebuild time: Maglev builds and map writes, not resolution.
        let started = Instant::now();
        // Ids: keep existing ones, allocate the rest.
        let mut next_vip_id = self.next_vip_id;
        let mut free_vip_ids = self.free_vip_ids.clone();
        let mut next_backend_id = self.next_backend_id;
        let mut free_backend_ids = self.free_backend_ids.clone();
        let mut next_generation = self.next_generation;
        let mut new_backends: HashMap<BackendKey, BackendSlot> = HashMap::new();
        let mut new_vips: HashMap<VipKey, VipSlot> = HashMap::new();
        let mut summary = ApplySummary::default();
        // (id, entry, fresh id?)
        let mut writes_before = Vec::new();
        let mut writes_after = Vec::new();
        let mut to_swap = Vec::new();
        for (key, vip, members) in &planned {
            let vip_id = match self.vips.get(key) {
                Some(old) => old.info.id,
                None => match free_vip_ids.pop() {
                    Some(id) => id,
                    None if next_vip_id < settings.max_vips => {
                        next_vip_id += 1;
                        next_vip_id - 1
                    }
                    None => {
                        return Err(ApplyError::Exhausted {
                            what: "VIP slots (datapath.max_vips)",
                            limit: settings.max_vips,
                        })
                    }
                },
            };
            let mut maglev_members = Vec::with_capacity(members.len());
            // `least-connections`: (member, weight, active) of the backends
            // in the ring.
            let mut lc: Vec<(usize, u32, u64)> = Vec::new();
            for Planned {
                address,
                weight,
                checked,
                entry,
            } in members
            {
                let mut entry = *entry;
                entry.tx_port = tx_ports[&entry.ifindex];
                entry.vip_id = vip_id;
                let slot = match self.backends.get(&(*key, *address)) {
                    Some(old) => {
                        // Health follows the configuration: a check added (or
                        // an adopted backend) starts up, a check removed
                        // clears the health state.
                        let mut runtime = old.runtime;
                        runtime.health = match (*checked, runtime.health) {
                            (true, Health::Unchecked) => Health::Up,
                            (false, _) => Health::Unchecked,
                            (true, h) => h,
                        };
                        entry.generation = old.entry.generation;
                        entry.flags = runtime.flags();
                        if old.entry != entry {
                            let going_down = entry.flags & BACKEND_F_DOWN != 0
                                && old.entry.flags & BACKEND_F_DOWN == 0;
                            if going_down {
                                writes_after.push((old.id, entry));
                            } else {
                                writes_before.push((old.id, entry, false));
                            }
                        }
                        BackendSlot {
                            id: old.id,
                            entry,
                            runtime,
                        }
                    }
                    None => {
                        let id = match free_backend_ids.pop() {
                            Some(id) => id,
                            None if next_backend_id < MAX_BACKENDS => {
                                next_backend_id += 1;
                                next_backend_id - 1
                            }
                            None => {
                                return Err(ApplyError::Exhausted {
                                    what: "backend slots",
                                    limit: MAX_BACKENDS,
                                })
                            }
                        };
                        next_generation = next_generation.wrapping_add(1).max(1);
                        entry.generation = next_generation;
                        let runtime = Runtime {
                            draining_since: None,
                            drained: false,
                            // Checked backends start up (see health.rs).
                            health: if *checked {
                                Health::Up
                            } else {
                                Health::Unchecked
                            },
                        };
                        entry.flags = runtime.flags();
                        writes_before.push((id, entry, true));
                        summary.backends_added += 1;
                        BackendSlot { id, entry, runtime }
                    }
                };
                let effective = if slot.runtime.in_ring(*weight) {
                    *weight
                } else {
                    0
                };
                if vip.scheduler == Scheduler::LeastConnections && effective > 0 {
                    lc.push((
                        maglev_members.len(),
                        effective,
                        self.loads.get(&(*key, *address)).copied().unwrap_or(0),
                    ));
                }
                maglev_members.push(maglev::Member {
                    identity: address.to_string().into_bytes(),
                    weight: effective,
                    id: slot.id,
                });
                new_backends.insert((*key, *address), slot);
            }
            let inputs: Vec<(u32, u64)> = lc.iter().map(|&(_, w, a)| (w, a)).collect();
            for ((i, _, _), w) in lc.iter().zip(lc_weights(&inputs)) {
                maglev_members[*i].weight = w;
            }
            // The same members build the same table: a change elsewhere
            // (another VIP, a `least-connections` rebalance) rebuilds only
            // the rings it touches.
            let (table, slots) = match self.vips.get(key) {
                Some(old) if old.members.as_ref() == Some(&maglev_members) => {
                    (old.table.clone(), old.slots.clone())
                }
                _ => {
                    let table =
                        maglev::build(&maglev_members, settings.ring_size).map_err(|source| {
                            ApplyError::Maglev {
                                vip: vip.label(),
                                source,
                            }
                        })?;
                    let slots = slot_counts(&table);
                    (table, slots)
                }
            };
            let flags = match vip.affinity {
                Affinity::None => 0,
                Affinity::ClientIp => VIP_F_AFFINITY_CLIENT_IP,
            };
            let slot = match self.vips.get(key) {
                Some(old) => {
                    let ring_changed = old.table != table;
                    let info = VipInfo {
                        flags,
                        active_ring: if ring_changed {
                            old.info.active_ring ^ 1
                        } else {
                            old.info.active_ring
                        },
                        ..old.info
                    };
                    if ring_changed || info != old.info {
                        to_swap.push((*key, info, ring_changed.then(|| table.clone())));
                    }
                    VipSlot {
                        info,
                        slots,
                        table,
                        members: Some(maglev_members),
                    }
                }
                None => {
                    let info = VipInfo {
                        id: vip_id,
                        flags,
                        active_ring: 0,
                        _pad: 0,
                    };
                    summary.vips_added += 1;
                    to_swap.push((*key, info, Some(table.clone())));
                    VipSlot {
                        info,
                        slots,
                        table,
                        members: Some(maglev_members),
                    }
                }
            };
            new_vips.insert(*key, slot);
        }

        before_writes(dp)?;

        // 2. Backends and tx ports.
        for (&ifindex, &port) in &tx_ports {
            if self.tx_ports.get(&ifindex) != Some(&port) {
                dp.set_tx_port(port, ifindex)?;
            }
        }
        for (id, entry, fresh) in &writes_before {
            if *fresh {
                dp.reset_counters(None, Some(*id))?;
            }
            dp.set_backend(*id, entry)?;
        }

        // The VIP filter lets traffic of new VIPs in before their entries
        // exist (a miss there just passes), and keeps removed VIPs' bits
        // until their entries are gone.
        let filter = filter_bitmap(new_vips.keys());
        self.filter.resize(VIP_FILTER_WORDS as usize, 0);
        for (i, (old, new)) in self.filter.iter().zip(&filter).enumerate() {
            if old | new != *old {
                dp.set_vip_filter_word(i as u32, old | new)?;
            }
        }

        // 3. Rings: write the inactive ring, then flip.
        for (key, info, table) in &to_swap {
            let is_new = !self.vips.contains_key(key);
            if is_new {
                dp.reset_counters(Some(info.id), None)?;
            }
            if let Some(table) = table {
                dp.write_ring(info.id, info.active_ring, table)?;
                summary.rings_swapped += 1;
            }
            dp.set_vip(key, info)?;
            // Flipped: if a later write fails, the next apply must see this
            // ring as the live one, or it would write its next table into
            // the ring the datapath reads. A new VIP is not recorded (its id
            // and backend ids are not taken from the free lists until the
            // apply succeeds): if a write after its entry fails and the
            // configuration that added it is not applied again, its entry
            // stays in the maps until a restart adopts and removes it.
            if !is_new {
                self.vips.insert(*key, new_vips[key].clone());
            }
        }

        // 4. Backends that went down: only now, with rings that exclude them.
        for (id, entry) in &writes_after {
            dp.set_backend(*id, entry)?;
        }

        // 5. Removals: VIP entries first, then the backend slots.
        for (key, slot) in &self.vips {
            if !new_vips.contains_key(key) {
                dp.remove_vip(key)?;
                free_vip_ids.push(slot.info.id);
                summary.vips_removed += 1;
            }
        }
        for (k, slot) in &self.backends {
            if !new_backends.contains_key(k) {
                // The VIP keeps what the backend counted, read after the
                // entry is gone (the datapath counts nothing more on it but
                // packets already past their lookup). Only if this apply
                // cleared the entry: one that failed after clearing it (the
                // backend is still in `self`, and the VIP counts it twice
                // until an apply succeeds) added it already. A crash
                // between the two writes loses its counts from the VIP's.
                let cleared_here = dp.backend(slot.id)?.generation != 0;
                dp.set_backend(slot.id, &Backend::default())?;
                if let (true, Some(vip)) = (cleared_here, new_vips.get(&k.0)) {
                    dp.add_vip_retired(vip.info.id, &dp.backend_counters(slot.id)?)?;
                }
                free_backend_ids.push(slot.id);
                summary.backends_removed += 1;
            }
        }

        for (i, (old, new)) in self.filter.iter().zip(&filter).enumerate() {
            if old | new != *new {
                dp.set_vip_filter_word(i as u32, *new)?;
            }
        }
        self.filter = filter;

        if summary.rings_swapped > 0 {
            let took = started.elapsed().as_secs_f64();
            self.ring.rebuilds += summary.rings_swapped as u64;
            self.ring.rebuild_seconds_total += took;
            self.ring.last_rebuild_seconds = took;
        }
        self.vips = new_vips;
        self.backends = new_backends;
        self.free_vip_ids = free_vip_ids;
        self.next_vip_id = next_vip_id;
        self.free_backend_ids = free_backend_ids;
        self.next_backend_id = next_backend_id;
        self.next_generation = next_generation;
        self.tx_ports = tx_ports;
        self.egress = egress;
        self.config = Some(cfg.clone());
        Ok(summary)
    }

    /// Re-applies the current configuration after a runtime state change.
    fn reapply(
        &mut self,
        dp: &mut Dataplane,
        resolver: &mut dyn Resolver,
    ) -> Result<ApplySummary, ApplyError> {
        let cfg = self
            .config
            .clone()
            .expect("applied before any runtime change");
        self.apply(dp, &cfg, resolver)
    }

    /// `least-connections`: reads the active connections of those VIPs'
    /// backends and, where that changes their Maglev weights
    /// (`lc_weights`), re-applies, which swaps the rings that changed.
    /// Established flows stay where the flow table has them. Returns the
    /// rings swapped.
    pub fn rebalance(
        &mut self,
        dp: &mut Dataplane,
        resolver: &mut dyn Resolver,
    ) -> Result<usize, ApplyError> {
        let Some(cfg) = &self.config else {
            return Ok(0);
        };
        let mut loads = HashMap::new();
        let mut before = Vec::new();
        let mut after = Vec::new();
        for vip in cfg
            .vips
            .iter()
            .filter(|v| v.scheduler == Scheduler::LeastConnections)
        {
            let key = vip_key(vip);
            let mut old = Vec::new();
            let mut new = Vec::new();
            for b in &vip.backends {
                let Some(slot) = self.backends.get(&(key, b.address)) else {
                    continue;
                };
                if !slot.runtime.in_ring(b.weight) {
                    continue;
                }
                let c = dp.backend_counters(slot.id).map_err(ApplyError::from)?;
                let active = self.active(dp, slot.id, &c).map_err(ApplyError::from)?;
                loads.insert((key, b.address), active);
                let was = self.loads.get(&(key, b.address)).copied().unwrap_or(0);
                old.push((b.weight, was));
                new.push((b.weight, active));
            }
            before.push(lc_weights(&old));
            after.push(lc_weights(&new));
        }
        // Keep the counts current for the next comparison, and for any
        // apply in between.
        self.loads = loads;
        if before == after && !self.lc_retry {
            return Ok(0);
        }
        let result = self.reapply(dp, resolver);
        self.lc_retry = result.is_err();
        Ok(result?.rings_swapped)
    }

    pub fn runtime(&self, key: &BackendKey) -> Option<Runtime> {
        self.backends.get(key).map(|s| s.runtime)
    }

    /// Sets a backend's runtime state and reprograms. Returns false if the
    /// backend does not exist.
    pub fn set_runtime(
        &mut self,
        dp: &mut Dataplane,
        resolver: &mut dyn Resolver,
        key: &BackendKey,
        update: impl FnOnce(&mut Runtime),
    ) -> Result<bool, ApplyError> {
        let Some(slot) = self.backends.get_mut(key) else {
            return Ok(false);
        };
        let before = slot.runtime;
        update(&mut slot.runtime);
        if slot.runtime != before {
            if let Err(e) = self.reapply(dp, resolver) {
                if let Some(slot) = self.backends.get_mut(key) {
                    slot.runtime = before;
                }
                return Err(e);
            }
        }
        Ok(true)
    }

    /// Active connections of a backend: flows opened minus flows closed in
    /// the datapath minus flows the daemon expired.
    fn active(&self, dp: &Dataplane, id: u32, c: &Counters) -> Result<u64, DataplaneError> {
        let expired = dp.backend_expired(id)?;
        Ok(c.new_flows
            .saturating_sub(c.closed_flows)
            .saturating_sub(expired))
    }

    /// Draining backends with no connection left (or past the drain
    /// timeout) become drained. Returns the ones that did.
    pub fn finish_drains(
        &mut self,
        dp: &Dataplane,
        now: Instant,
    ) -> Result<Vec<BackendKey>, DataplaneError> {
        let timeout = self
            .config
            .as_ref()
            .map_or(Duration::from_secs(300), |c| c.drain_timeout);
        let mut done = Vec::new();
        let keys: Vec<BackendKey> = self.backends.keys().copied().collect();
        for key in keys {
            let (id, runtime) = {
                let s = &self.backends[&key];
                (s.id, s.runtime)
            };
            let Some(since) = runtime.draining_since else {
                continue;
            };
            if runtime.drained {
                continue;
            }
            let c = dp.backend_counters(id)?;
            if self.active(dp, id, &c)? == 0 || now.duration_since(since) >= timeout {
                if let Some(s) = self.backends.get_mut(&key) {
                    s.runtime.drained = true;
                }
                done.push(key);
            }
        }
        Ok(done)
    }

    /// Expires idle flows and removes closed ones past their grace time.
    /// An expired flow that was still open is counted against its backend's
    /// active connections (once: only a successful delete counts).
    pub fn sweep(
        &mut self,
        dp: &mut Dataplane,
        now_ns: u64,
    ) -> Result<SweepSummary, DataplaneError> {
        let Some(cfg) = &self.config else {
            return Ok(SweepSummary::default());
        };
        let t = cfg.timeouts;
        let generations: HashMap<u32, u32> = self
            .backends
            .values()
            .map(|s| (s.id, s.entry.generation))
            .collect();
        let mut summary = SweepSummary::default();
        let mut expired: BTreeMap<u32, u64> = BTreeMap::new();
        let flows: Vec<(FlowKey, lb_common::FlowValue)> = dp.flows();
        summary.scanned = flows.len();
        for (key, value) in flows {
            let seen = value.last_seen_ns.max(self.clock_floor);
            let idle = Duration::from_nanos(now_ns.saturating_sub(seen));
            let closed = value.flags & FLOW_F_CLOSED != 0;
            let limit = if closed {
                t.tcp_closed
            } else if key.proto == PROTO_TCP {
                t.tcp_idle
            } else {
                t.udp_idle
            };
            // last_seen is refreshed at most once a second.
            if idle <= limit + Duration::from_secs(1) || !dp.remove_flow(&key)? {
                continue;
            }
            if closed {
                summary.closed_removed += 1;
            } else {
                summary.expired += 1;
                if generations.get(&value.backend_id()) == Some(&value.generation) {
                    *expired.entry(value.backend_id()).or_default() += 1;
                }
            }
        }
        for (id, n) in expired {
            let total = dp.backend_expired(id)? + n;
            dp.set_backend_expired(id, total)?;
        }
        Ok(summary)
    }

    /// Status of every backend, in configuration order, optionally of one VIP.
    pub fn backend_statuses(
        &self,
        dp: &Dataplane,
        only: Option<&VipKey>,
    ) -> Result<Vec<api::BackendStatus>, DataplaneError> {
        let Some(cfg) = &self.config else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for vip in &cfg.vips {
            let key = vip_key(vip);
            if only.is_some_and(|o| *o != key) {
                continue;
            }
            let ring = &self.vips[&key];
            for b in &vip.backends {
                let slot = &self.backends[&(key, b.address)];
                let c = dp.backend_counters(slot.id)?;
                let slots = ring.slots.get(&slot.id).copied().unwrap_or(0);
                out.push(api::BackendStatus {
                    vip: vip.label(),
                    address: b.address,
                    port: vip.port,
                    weight: b.weight,
                    state: slot.runtime.state(),
                    health: slot.runtime.health,
                    active_connections: self.active(dp, slot.id, &c)?,
                    packets: c.packets,
                    bytes: c.bytes,
                    new_flows: c.new_flows,
                    closed_flows: c.closed_flows + dp.backend_expired(slot.id)?,
                    mac: MacAddr(slot.entry.dst_mac).to_string(),
                    ring_share: f64::from(slots) / (ring.table.len().max(1) as f64),
                });
            }
        }
        Ok(out)
    }

    /// Status of every VIP; `backends` is `backend_statuses(dp, None)`,
    /// which the caller usually has already.
    pub fn vip_statuses(
        &self,
        dp: &Dataplane,
        backends: &[api::BackendStatus],
    ) -> Result<Vec<api::VipStatus>, DataplaneError> {
        let Some(cfg) = &self.config else {
            return Ok(Vec::new());
        };
        cfg.vips
            .iter()
            .map(|vip| {
                let key = vip_key(vip);
                let label = vip.label();
                let mine: Vec<&api::BackendStatus> =
                    backends.iter().filter(|b| b.vip == label).collect();
                // `vip_counters`, from the backend rows already read: the
                // VIP's total and its rows come from one read of each
                // backend's counters.
                let mut c = dp.vip_retired(self.vips[&key].info.id)?;
                for b in &mine {
                    c.packets += b.packets;
                    c.bytes += b.bytes;
                    c.new_flows += b.new_flows;
                }
                Ok(api::VipStatus {
                    vip: label.clone(),
                    name: vip.name.clone(),
                    address: vip.address,
                    port: vip.port,
                    protocol: vip.protocol.to_string(),
                    affinity: match vip.affinity {
                        Affinity::None => "none".into(),
                        Affinity::ClientIp => "client-ip".into(),
                    },
                    scheduler: vip.scheduler.as_str().to_owned(),
                    backends: mine.len(),
                    active_backends: vip
                        .backends
                        .iter()
                        .filter(|b| self.backends[&(key, b.address)].runtime.in_ring(b.weight))
                        .count(),
                    active_connections: mine.iter().map(|b| b.active_connections).sum(),
                    packets: c.packets,
                    bytes: c.bytes,
                    new_flows: c.new_flows,
                })
            })
            .collect()
    }

    /// The counters of the VIP `key` (zero if it has none): the sums of its
    /// backends' and of what its former backends counted (the datapath
    /// counts each packet on its backend only).
    pub fn vip_counters(&self, dp: &Dataplane, key: &VipKey) -> Result<Counters, DataplaneError> {
        let Some(vip) = self.vips.get(key) else {
            return Ok(Counters::default());
        };
        let mut total = dp.vip_retired(vip.info.id)?;
        for ((vip_key, _), slot) in &self.backends {
            if vip_key == key {
                total.add(&dp.backend_counters(slot.id)?);
            }
        }
        Ok(total)
    }

    /// Backend id and generation for a VIP's backend (tests and debugging).
    pub fn backend_id(&self, vip: &Vip, address: IpAddr) -> Option<(u32, u32)> {
        self.backends
            .get(&(vip_key(vip), address))
            .map(|s| (s.id, s.entry.generation))
    }
}

#[cfg(test)]
mod tests {
    use super::lc_weights;

    #[test]
    fn loads_in_proportion_keep_the_weighted_shares() {
        // A common factor of LC_STEPS: the same Maglev table as the
        // weights themselves.
        assert_eq!(lc_weights(&[(1, 0), (1, 0), (2, 0)]), [4, 4, 8]);
        assert_eq!(lc_weights(&[(1, 50), (1, 50), (2, 100)]), [4, 4, 8]);
    }

    #[test]
    fn fewer_connections_get_more_of_the_new_flows() {
        // b3 just added beside two backends holding 20 connections each.
        let w = lc_weights(&[(1, 20), (1, 20), (1, 0)]);
        assert_eq!(w, [3, 3, 7]);
        // Bounded: an idle backend gets less than twice its weight's
        // factor, one at twice the average about 2/3 of it.
        assert_eq!(lc_weights(&[(1, 0), (1, 1_000_000)]), [8, 3]);
        // Never 0: all of 20 backends' connections on one.
        let mut m = vec![(1, 0); 19];
        m.push((1, 1_000_000));
        assert_eq!(lc_weights(&m).last(), Some(&1));
        // Per unit of weight: 10 connections on weight 1 load it as much as
        // 20 on weight 2.
        let w = lc_weights(&[(1, 10), (2, 20), (1, 0)]);
        assert_eq!(w[1], 2 * w[0]);
    }

    #[test]
    fn the_weights_scale_does_not_matter() {
        let base = lc_weights(&[(1, 20), (1, 20), (1, 0)]);
        for k in [10, 100, 1000] {
            let scaled = lc_weights(&[(k, 20), (k, 20), (k, 0)]);
            assert_eq!(scaled, base.iter().map(|w| w * k).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_few_connections_move_nothing() {
        for loads in [[1, 0, 0], [1, 1, 0], [2, 1, 1], [2, 2, 2]] {
            let m: Vec<(u32, u64)> = loads.iter().map(|&a| (1, a)).collect();
            assert_eq!(lc_weights(&m), [4, 4, 4], "{loads:?}");
        }
    }

    #[test]
    fn one_backend_and_none() {
        assert_eq!(lc_weights(&[(5, 123)]), [20]);
        assert!(lc_weights(&[]).is_empty());
    }
}
