//! The daemon's view of what is programmed, and how a configuration is
//! applied to the datapath without a packet ever seeing a half-made change.
//!
//! Order of an apply:
//! 1. resolve everything that can fail outside the maps (interfaces, MACs,
//!    Maglev tables): a failure here leaves the datapath untouched;
//! 2. write backend entries (new ids get a new generation);
//! 3. per VIP, write the ring the datapath is not reading, then flip the
//!    VIP entry to it in one map update;
//! 4. remove VIPs that are gone, then clear backend slots no ring uses.
//!
//! Ids are stable across applies: a VIP (address, port, protocol) and a
//! backend (VIP, address) keep their ids, so established flows keep
//! matching their backend's generation.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::Duration,
};

use lb_common::{
    maglev, Backend, Counters, VipInfo, VipKey, MAX_BACKENDS, MAX_TX_PORTS,
    VIP_F_AFFINITY_CLIENT_IP,
};

use crate::{
    config::{Affinity, Config, MacAddr, Vip},
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
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct BackendSlot {
    id: u32,
    entry: Backend,
}

/// Counters of one backend of one VIP, for reports.
#[derive(Clone, Debug)]
pub struct BackendReport {
    pub address: IpAddr,
    pub weight: u32,
    pub mac: MacAddr,
    pub counters: Counters,
}

#[derive(Clone, Debug)]
pub struct VipReport {
    pub label: String,
    pub counters: Counters,
    pub backends: Vec<BackendReport>,
}

#[derive(Default)]
pub struct State {
    config: Option<Config>,
    vips: HashMap<VipKey, VipSlot>,
    backends: HashMap<(VipKey, IpAddr), BackendSlot>,
    free_vip_ids: Vec<u32>,
    next_vip_id: u32,
    free_backend_ids: Vec<u32>,
    next_backend_id: u32,
    next_generation: u32,
    tx_ports: BTreeMap<u32, u32>,
    /// Interfaces backends are reached through, other than the VIP one.
    egress: BTreeMap<String, Interface>,
}

/// A backend of the new configuration, resolved but not yet given an id.
struct Planned {
    address: IpAddr,
    weight: u32,
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

pub fn vip_key(vip: &Vip) -> VipKey {
    VipKey::new(vip.address, vip.port, vip.protocol.number())
}

impl State {
    pub fn config(&self) -> Option<&Config> {
        self.config.as_ref()
    }

    /// Interfaces other than the VIP interface that backends sit behind; the
    /// program must be attached there too (veth delivers XDP_REDIRECT only
    /// to interfaces with an XDP program).
    pub fn egress_interfaces(&self) -> impl Iterator<Item = &str> {
        self.egress.keys().map(String::as_str)
    }

    pub fn apply(
        &mut self,
        dp: &mut Dataplane,
        cfg: &Config,
        resolver: &mut dyn Resolver,
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
                let mac = match b.mac {
                    Some(mac) => mac,
                    None => {
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
                let entry = Backend {
                    dst_mac: mac.0,
                    src_mac: out_if.mac.0,
                    ifindex: out_if.ifindex,
                    tx_port: 0,
                    generation: 0,
                };
                members.push(Planned {
                    address: b.address,
                    weight: b.weight,
                    entry,
                });
            }
            planned.push((vip_key(vip), vip, members));
        }

        // Tx ports for every egress interface (the VIP interface uses XDP_TX
        // when traffic arrives there, but gets a port too for traffic that
        // arrives on another attached interface).
        let mut tx_ports = self.tx_ports.clone();
        for ifindex in std::iter::once(main_if.ifindex).chain(egress.values().map(|i| i.ifindex)) {
            if !tx_ports.contains_key(&ifindex) {
                let port = tx_ports.len() as u32;
                if port >= MAX_TX_PORTS {
                    return Err(ApplyError::Exhausted {
                        what: "egress interfaces",
                        limit: MAX_TX_PORTS,
                    });
                }
                tx_ports.insert(ifindex, port);
            }
        }

        // Ids: keep existing ones, allocate the rest.
        let mut next_vip_id = self.next_vip_id;
        let mut free_vip_ids = self.free_vip_ids.clone();
        let mut next_backend_id = self.next_backend_id;
        let mut free_backend_ids = self.free_backend_ids.clone();
        let mut next_generation = self.next_generation;
        let mut new_backends: HashMap<(VipKey, IpAddr), BackendSlot> = HashMap::new();
        let mut new_vips: HashMap<VipKey, VipSlot> = HashMap::new();
        let mut summary = ApplySummary::default();
        let mut to_write_backends = Vec::new();
        let mut to_swap = Vec::new();
        for (key, vip, members) in &planned {
            let mut maglev_members = Vec::with_capacity(members.len());
            for Planned {
                address,
                weight,
                entry,
            } in members
            {
                let mut entry = *entry;
                entry.tx_port = tx_ports[&entry.ifindex];
                let slot = match self.backends.get(&(*key, *address)) {
                    Some(old) => {
                        entry.generation = old.entry.generation;
                        if old.entry != entry {
                            to_write_backends.push((old.id, entry, false));
                        }
                        BackendSlot { id: old.id, entry }
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
                        to_write_backends.push((id, entry, true));
                        summary.backends_added += 1;
                        BackendSlot { id, entry }
                    }
                };
                maglev_members.push(maglev::Member {
                    identity: address.to_string().into_bytes(),
                    weight: *weight,
                    id: slot.id,
                });
                new_backends.insert((*key, *address), slot);
            }
            let table = maglev::build(&maglev_members, settings.ring_size).map_err(|source| {
                ApplyError::Maglev {
                    vip: vip.label(),
                    source,
                }
            })?;
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
                    VipSlot { info, table }
                }
                None => {
                    let id = match free_vip_ids.pop() {
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
                    };
                    let info = VipInfo {
                        id,
                        flags,
                        active_ring: 0,
                        _pad: 0,
                    };
                    summary.vips_added += 1;
                    to_swap.push((*key, info, Some(table.clone())));
                    VipSlot { info, table }
                }
            };
            new_vips.insert(*key, slot);
        }

        // 2. Backends and tx ports.
        for (&ifindex, &port) in &tx_ports {
            if self.tx_ports.get(&ifindex) != Some(&port) {
                dp.set_tx_port(port, ifindex)?;
            }
        }
        for (id, entry, fresh) in &to_write_backends {
            if *fresh {
                dp.reset_counters(None, Some(*id))?;
            }
            dp.set_backend(*id, entry)?;
        }

        // 3. Rings: write the inactive ring, then flip.
        for (key, info, table) in &to_swap {
            let is_new = !self.vips.contains_key(key);
            if is_new {
                dp.reset_counters(Some(info.id), None)?;
            }
            if let Some(table) = table {
                dp.write_ring(info.id, info.active_ring, table)?;
                summary.rings_swapped += usize::from(!is_new);
            }
            dp.set_vip(key, info)?;
        }

        // 4. Removals: VIP entries first, then the backend slots.
        for (key, slot) in &self.vips {
            if !new_vips.contains_key(key) {
                dp.remove_vip(key)?;
                free_vip_ids.push(slot.info.id);
                summary.vips_removed += 1;
            }
        }
        for (k, slot) in &self.backends {
            if !new_backends.contains_key(k) {
                dp.set_backend(slot.id, &Backend::default())?;
                free_backend_ids.push(slot.id);
                summary.backends_removed += 1;
            }
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

    /// Counters per VIP and backend, in configuration order.
    pub fn report(&self, dp: &Dataplane) -> Result<Vec<VipReport>, DataplaneError> {
        let Some(cfg) = &self.config else {
            return Ok(Vec::new());
        };
        cfg.vips
            .iter()
            .map(|vip| {
                let key = vip_key(vip);
                let counters = dp.vip_counters(self.vips[&key].info.id)?;
                let backends = vip
                    .backends
                    .iter()
                    .map(|b| {
                        let slot = &self.backends[&(key, b.address)];
                        Ok(BackendReport {
                            address: b.address,
                            weight: b.weight,
                            mac: MacAddr(slot.entry.dst_mac),
                            counters: dp.backend_counters(slot.id)?,
                        })
                    })
                    .collect::<Result<_, DataplaneError>>()?;
                Ok(VipReport {
                    label: vip.label(),
                    counters,
                    backends,
                })
            })
            .collect()
    }

    /// Backend id and generation for a VIP's backend (tests and debugging).
    pub fn backend_id(&self, vip: &Vip, address: IpAddr) -> Option<(u32, u32)> {
        self.backends
            .get(&(vip_key(vip), address))
            .map(|s| (s.id, s.entry.generation))
    }
}
