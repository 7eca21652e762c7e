//! The running daemon: one task owns the datapath and the state; the API
//! server, signal handlers, health checks and timers talk to it through a
//! channel, so there is never a second writer to the maps.
//!
//! Runtime changes (VIPs and backends added, removed or re-weighted through
//! the API) change the running configuration but not the file. They are
//! listed by `status`, shown by `config show`, and a reload (SIGHUP or
//! `xdplb reload`) refuses to discard them unless asked to
//! (`--discard-runtime-changes`): no change is ever lost silently. Drain and
//! health are operational state, not configuration: they survive reloads
//! while the backend stays configured.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::{
    api::{self, BackendAdd, BackendRef, Health, VipAdd, WeightChange},
    config::{Config, ConfigError, RawBackend, RawVip, XdpMode},
    dataplane::{Attached, Dataplane},
    health::{self, CheckHandle, CheckSpec, HealthEvent},
    state::{vip_key, ApplySummary, BackendKey, State, SystemResolver},
};

/// A failed API request: HTTP status and a one-line message.
#[derive(Debug)]
pub struct Failure {
    pub status: u16,
    pub message: String,
}

impl Failure {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
        }
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: 404,
            message: message.into(),
        }
    }
    fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: 409,
            message: message.into(),
        }
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        Self {
            status: 500,
            message: e.to_string(),
        }
    }
}

pub type Reply = Result<Value, Failure>;

/// Shortest time between two flow-table sweeps.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(2);
/// How often `least-connections` rings follow the active connections.
pub const REBALANCE_INTERVAL: Duration = Duration::from_secs(1);

/// What the API can ask of the state owner.
#[derive(Debug)]
pub enum Request {
    Status,
    Stats,
    Vips,
    VipAdd(VipAdd),
    VipDel { vip: String },
    Backends { vip: Option<String> },
    BackendAdd(BackendAdd),
    BackendDel(BackendRef),
    Weight(WeightChange),
    Drain(BackendRef),
    Undrain(BackendRef),
    Config,
    Reload { discard_runtime_changes: bool },
}

pub enum Event {
    Api(Request, oneshot::Sender<Reply>),
    Stop,
    /// SIGHUP: reload without discarding runtime changes.
    Reload,
    Health(HealthEvent<BackendKey>),
}

pub struct Options {
    pub config_path: PathBuf,
    pub xdp_mode: Option<XdpMode>,
    pub pin_dir: Option<PathBuf>,
    pub persist: bool,
    pub neighbour_timeout: Duration,
}

/// An interface the program is attached to, and its XDP mode (`None`: a
/// link taken over whose mode `ip link` did not say).
type Attachment = (String, Option<XdpMode>);

pub struct Daemon {
    opts: Options,
    dp: Dataplane,
    state: State,
    resolver: SystemResolver,
    /// The configuration running now: the file plus runtime changes.
    running: Config,
    runtime_changes: Vec<String>,
    checks: HashMap<BackendKey, CheckHandle>,
    health_tx: mpsc::UnboundedSender<HealthEvent<BackendKey>>,
    /// Interfaces the program is attached to, the VIP interface first.
    attached: Vec<Attachment>,
    /// The VIP interface's mode as `status` shows it: `native`,
    /// `generic, adopted`, ...
    mode: String,
    started: Instant,
    /// Flow-table entries seen by the last sweep.
    flows: Option<u64>,
    /// The last `rebalance` error, logged once until it changes or clears.
    rebalance_error: Option<String>,
}

/// The mode `interface` is attached in (`how`, as `Dataplane::attach`
/// returned it). A pinned link taken over keeps the mode it was attached
/// in: read back from `ip link`, with a warning if it is not the one
/// `requested`.
fn attached_mode(interface: &str, how: Attached, requested: Option<XdpMode>) -> Option<XdpMode> {
    let actual = match how {
        Attached::Native => return Some(XdpMode::Native),
        Attached::Generic => return Some(XdpMode::Generic),
        Attached::Replaced => crate::netdev::xdp_mode(interface),
    };
    match (actual, requested) {
        (Ok(Some(have)), Some(want)) if have != want => {
            tracing::warn!(
                "xdp_mode {want} is not applied to {interface}: the pinned link taken over \
                 keeps its {have} mode; to change it, stop the daemon, remove its pins (the \
                 flow table starts empty) and start it"
            );
            Some(have)
        }
        (Ok(mode), _) => mode,
        (Err(e), _) => {
            tracing::warn!("reading the XDP mode of {interface}: {e}");
            None
        }
    }
}

/// A failed `apply_attaching`.
struct ApplyFailed {
    error: anyhow::Error,
    /// The failure came after the first map write (else it was a refusal,
    /// and nothing changed).
    writes_began: bool,
    /// Interfaces it attached and left attached: after the writes began
    /// the maps may send traffic to them; before, links taken over (which
    /// run the new program) and links that failed to detach.
    attached: Vec<Attachment>,
}

/// `State::apply_with`, attaching to `cfg`'s egress interfaces that are not
/// in `attached` just before the first map write. Returns the summary and
/// the interfaces it attached. A refusal detaches them again (links it
/// made; a link taken over keeps the new program, and stays listed as
/// attached, as does one that failed to detach).
fn apply_attaching(
    state: &mut State,
    dp: &mut Dataplane,
    resolver: &mut SystemResolver,
    cfg: &Config,
    attached: &[Attachment],
    mode: Option<XdpMode>,
) -> Result<(ApplySummary, Vec<Attachment>), ApplyFailed> {
    let mut made: Vec<Attachment> = Vec::new();
    let mut writes_began = false;
    let applied = state.apply_with(dp, cfg, resolver, &mut |dp| {
        for name in cfg.egress_interfaces() {
            if attached.iter().any(|(a, _)| a == name) {
                continue;
            }
            let how = dp.attach(name, mode)?;
            made.push((name.to_owned(), attached_mode(name, how, mode)));
        }
        writes_began = true;
        Ok(())
    });
    match applied {
        Ok(summary) => Ok((summary, made)),
        Err(error) if writes_began => Err(ApplyFailed {
            error: error.into(),
            writes_began,
            attached: made,
        }),
        Err(error) => {
            // Logged, not returned: the refusal is the error to report.
            let mut kept = Vec::new();
            for (name, mode) in made {
                match dp.detach(&name) {
                    Ok(true) => {}
                    Ok(false) => kept.push((name, mode)),
                    Err(e) => {
                        tracing::error!("detaching from {name} after the refused change: {e}");
                        kept.push((name, mode));
                    }
                }
            }
            Err(ApplyFailed {
                error: error.into(),
                writes_began,
                attached: kept,
            })
        }
    }
}

/// The interfaces' names, comma-separated.
fn names(attached: &[Attachment]) -> String {
    attached
        .iter()
        .map(|(name, _)| name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses `address:port/protocol` (IPv6 in brackets) into a VIP key.
fn parse_vip(cfg: &Config, text: &str) -> Result<usize, Failure> {
    cfg.vips
        .iter()
        .position(|v| v.label() == text || v.name.as_deref() == Some(text))
        .ok_or_else(|| {
            Failure::not_found(format!(
                "no VIP {text} (VIPs are written address:port/protocol, e.g. 10.0.0.1:80/tcp or [2001:db8::1]:53/udp, or by name)"
            ))
        })
}

fn parse_ip(field: &str, text: &str) -> Result<IpAddr, Failure> {
    text.parse()
        .map_err(|_| Failure::bad(format!("{field}: {text:?} is not an IPv4 or IPv6 address")))
}

impl Daemon {
    /// Loads (or adopts) the datapath, programs the file's configuration and
    /// attaches.
    pub fn start(
        opts: Options,
        health_tx: mpsc::UnboundedSender<HealthEvent<BackendKey>>,
    ) -> Result<Daemon> {
        let cfg = Config::load(&opts.config_path)?;
        if let Some(dir) = &opts.pin_dir {
            crate::bpffs::ensure_mounted(dir)?;
        }
        let mut dp = Dataplane::load(cfg.datapath, opts.pin_dir.as_deref()).context(
            "loading the XDP program (needs root or CAP_BPF+CAP_NET_ADMIN, and a kernel with BPF)",
        )?;
        let (state, resolver, attached, mode) = match Self::program(&opts, &mut dp, &cfg) {
            Ok(programmed) => programmed,
            // A datapath this start loaded goes with it (pins and links):
            // nothing attached is left without a daemon. An adopted one keeps
            // serving as its predecessor left it.
            Err(e) if dp.adopted() => {
                if let Err(u) = dp.abandon_migration() {
                    tracing::error!("putting the older flow table's pin back: {u}");
                }
                return Err(e.context("the adopted datapath keeps serving (attached and pinned)"));
            }
            Err(e) => {
                if let Err(u) = dp.unpin() {
                    tracing::error!("removing the pins of the failed start: {u}");
                }
                return Err(e);
            }
        };
        let mut d = Daemon {
            opts,
            dp,
            state,
            resolver,
            running: cfg,
            runtime_changes: Vec::new(),
            checks: HashMap::new(),
            health_tx,
            attached,
            mode,
            started: Instant::now(),
            flows: None,
            rebalance_error: None,
        };
        d.sync_checks();
        Ok(d)
    }

    /// The part of `start` after the load: programs the tables and
    /// attaches. Returns the state, the resolver, the attached interfaces
    /// and the VIP interface's mode (as known, and as `status` shows it).
    fn program(
        opts: &Options,
        dp: &mut Dataplane,
        cfg: &Config,
    ) -> Result<(State, SystemResolver, Vec<Attachment>, String)> {
        let mut state = State::default();
        if dp.adopted() {
            state.adopt(dp).context("adopting the pinned datapath")?;
        }
        let mut resolver = SystemResolver {
            neighbour_timeout: opts.neighbour_timeout,
        };
        let now = crate::state::monotonic_ns();
        dp.set_clock(now)?;
        state.set_clock_floor(now);
        // The egress interfaces just before the first map write (a refused
        // attach leaves an adopted datapath's maps as they were); the VIP
        // interface after the tables, so its first packet finds them.
        let mode = opts.xdp_mode.or(cfg.xdp_mode);
        let (summary, egress) = apply_attaching(&mut state, dp, &mut resolver, cfg, &[], mode)
            .map_err(|f| f.error)
            .context("programming the initial configuration")?;
        // A migrating start: the older table's latest state, just before
        // its program stops running on the VIP interface.
        let synced = dp
            .sync_migration()
            .context("bringing the migrated flow table up to date")?;
        if synced > 0 {
            tracing::info!(
                "flow table migration: {synced} flows brought up to date before the takeover"
            );
        }
        let how = dp.attach(&cfg.interface, mode)?;
        // Links an earlier daemon pinned on interfaces this configuration
        // no longer names: their older program would keep running there.
        // Before the migration is finished: that assumes every link runs
        // this program.
        match dp.remove_stale_links() {
            Ok(stale) => {
                for (name, removed) in stale {
                    match removed {
                        Ok(()) => tracing::info!(
                            "detached from {name}: its XDP link was pinned by an earlier \
                             daemon, and the configuration no longer names it"
                        ),
                        Err(e) => tracing::warn!(
                            "{name} is no longer in the configuration, but its link \
                             pinned by an earlier daemon stays: {e}"
                        ),
                    }
                }
            }
            Err(e) => tracing::warn!("removing the links of interfaces no longer configured: {e}"),
        }
        // Not fatal from here: the links run this program now, and a
        // restart goes on with the migration.
        if let Err(e) = dp.mark_taken_over() {
            tracing::warn!("recording the flow table migration's takeover: {e}");
        }
        let migration_pin = dp.migration_pin().map(Path::to_path_buf);
        match dp.finish_migration() {
            Ok(Some(m)) => tracing::info!(
                "flow table migrated: {} more flows the older program made meanwhile copied \
                 too, {} left out (both buckets full; their next packet is scheduled anew)",
                m.late,
                m.dropped
            ),
            Ok(None) => {}
            Err(e) => tracing::warn!(
                "finishing the flow table's migration: {e}; the older table stays pinned \
                 ({}) and the next start goes on with it",
                migration_pin.unwrap_or_default().display()
            ),
        }
        let actual = attached_mode(&cfg.interface, how, mode);
        let mut attached = vec![(cfg.interface.clone(), actual)];
        attached.extend(egress);
        let shown = match (actual, how) {
            (Some(m), Attached::Replaced) => format!("{m}, adopted"),
            (None, _) => "adopted".to_string(),
            (Some(m), _) => m.to_string(),
        };
        tracing::info!(
            "ready: attached to {} ({shown} mode), {} VIPs, {} backends, ring size {}{}",
            names(&attached),
            cfg.vips.len(),
            cfg.vips.iter().map(|v| v.backends.len()).sum::<usize>(),
            cfg.datapath.ring_size,
            if dp.adopted() {
                format!(
                    "; adopted the pinned datapath in {} (flows and counters kept, {} new backends)",
                    opts.pin_dir.as_ref().map_or(String::new(), |d| d.display().to_string()),
                    summary.backends_added
                )
            } else {
                String::new()
            }
        );
        Ok((state, resolver, attached, shown))
    }

    /// Starts, keeps or stops health-check tasks to match the running
    /// configuration.
    fn sync_checks(&mut self) {
        let mut wanted: HashMap<BackendKey, (IpAddr, CheckSpec)> = HashMap::new();
        for vip in &self.running.vips {
            for b in &vip.backends {
                if let Some(spec) = &b.health {
                    wanted.insert((vip_key(vip), b.address), (b.address, spec.clone()));
                }
            }
        }
        self.checks
            .retain(|k, h| wanted.get(k).is_some_and(|(_, spec)| spec == h.spec()));
        for (key, (addr, spec)) in wanted {
            // A new check starts from the backend's known health: one that
            // is down (adopted down from a restarted daemon's datapath, or
            // checked differently before a reload) must have its recovery
            // reported, or it stays out of the ring while healthy.
            let up = self
                .state
                .runtime(&key)
                .is_none_or(|rt| rt.health != Health::Down);
            self.checks
                .entry(key)
                .or_insert_with(|| health::spawn(key, addr, spec, up, self.health_tx.clone()));
        }
    }

    /// Applies `cfg` as the running configuration. A refusal (anything
    /// checked before the first map write, the egress attaches included)
    /// changes nothing; a map write failing midway is an internal error.
    fn apply(&mut self, cfg: Config) -> Result<ApplySummary, Failure> {
        let requested = self.opts.xdp_mode.or(cfg.xdp_mode);
        // `--xdp-mode` overrides the file, so only without it can the
        // file ask for another mode.
        let changed = cfg.xdp_mode != self.running.xdp_mode;
        if let (None, Some(want), true) = (self.opts.xdp_mode, cfg.xdp_mode, changed) {
            let other = self.attached.iter().find_map(|(name, have)| {
                have.filter(|have| *have != want).map(|have| (name, have))
            });
            if let Some((name, have)) = other {
                let how = match &self.opts.pin_dir {
                    Some(dir) => format!(
                        "restart the daemon; a restart that adopts the pinned link (after \
                         --persist or a crash) keeps its mode, so remove the pins in {} first \
                         (the flow table starts empty)",
                        dir.display()
                    ),
                    None => "restart the daemon to attach it anew".to_string(),
                };
                return Err(Failure::bad(format!(
                    "xdp_mode: {want} needs the program attached anew ({name} is attached in \
                     {have} mode; {how})"
                )));
            }
        }
        let applied = apply_attaching(
            &mut self.state,
            &mut self.dp,
            &mut self.resolver,
            &cfg,
            &self.attached,
            requested,
        );
        let summary = match applied {
            Ok((summary, made)) => {
                self.attached.extend(made);
                self.release_unused(&cfg);
                summary
            }
            Err(f) => {
                self.attached.extend(f.attached);
                let error = format!("{:#}", f.error);
                return Err(if f.writes_began {
                    Failure::internal(format!(
                        "{error} (failed after the map writes began: the datapath may hold \
                         part of the new configuration; apply it again)"
                    ))
                } else {
                    Failure::bad(error)
                });
            }
        };
        self.running = cfg;
        self.sync_checks();
        Ok(summary)
    }

    /// Detaches from the egress interfaces `cfg` no longer names (no
    /// backend is behind them any more), after it is applied: nothing
    /// sends traffic there now. One that fails to detach stays attached
    /// (and listed), and goes at the stop.
    fn release_unused(&mut self, cfg: &Config) {
        let wanted: Vec<&str> = std::iter::once(cfg.interface.as_str())
            .chain(cfg.egress_interfaces())
            .collect();
        let dp = &mut self.dp;
        self.attached.retain(|(name, _)| {
            if wanted.contains(&name.as_str()) {
                return true;
            }
            match dp.release(name) {
                Ok(true) => {
                    tracing::info!("detached from {name}: no backend is behind it any more");
                    false
                }
                Ok(false) => {
                    tracing::warn!(
                        "{name}, which no backend is behind any more, has no link of this \
                         daemon to detach"
                    );
                    false
                }
                Err(e) => {
                    tracing::error!("detaching from {name}, which no backend is behind: {e}");
                    true
                }
            }
        });
    }

    /// A runtime change: edit the running configuration as the file would,
    /// validate it like a file, apply it, and remember it.
    fn change(
        &mut self,
        what: String,
        edit: impl FnOnce(&mut crate::config::RawConfig) -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        let mut raw = self.running.to_raw();
        edit(&mut raw)?;
        let cfg = Config::from_raw(&raw, "runtime change").map_err(|e| match e {
            ConfigError::Invalid { field, message, .. } => {
                Failure::bad(format!("{field}: {message}"))
            }
            other => Failure::bad(other.to_string()),
        })?;
        self.apply(cfg)?;
        tracing::info!("runtime change: {what}");
        self.runtime_changes.push(what);
        Ok(())
    }

    /// SIGHUP / `xdplb reload`.
    fn reload(&mut self, discard_runtime_changes: bool) -> Result<String, Failure> {
        let path = self.opts.config_path.display().to_string();
        if !self.runtime_changes.is_empty() && !discard_runtime_changes {
            return Err(Failure::conflict(format!(
                "reload of {path} refused: {} runtime change(s) are not in the file ({}); \
                 save them with `xdplb config show > {path}` and reload, or reload with \
                 --discard-runtime-changes",
                self.runtime_changes.len(),
                self.runtime_changes.join("; ")
            )));
        }
        let cfg = Config::load(&self.opts.config_path).map_err(|e| {
            Failure::bad(format!(
                "reload of {path} rejected, running configuration unchanged: {e}"
            ))
        })?;
        let s = self.apply(cfg).map_err(|f| Failure {
            message: if f.status == 500 {
                format!("reload of {path} failed: {}", f.message)
            } else {
                format!(
                    "reload of {path} rejected, running configuration unchanged: {}",
                    f.message
                )
            },
            ..f
        })?;
        let discarded = std::mem::take(&mut self.runtime_changes);
        Ok(format!(
            "reloaded {path}: VIPs +{} -{}, backends +{} -{}, {} rings swapped{}",
            s.vips_added,
            s.vips_removed,
            s.backends_added,
            s.backends_removed,
            s.rings_swapped,
            if discarded.is_empty() {
                String::new()
            } else {
                format!("; discarded runtime changes: {}", discarded.join("; "))
            }
        ))
    }

    /// The VIP's index in the running configuration and the backend's key.
    fn backend_key(&self, vip: &str, address: &str) -> Result<(usize, BackendKey), Failure> {
        let i = parse_vip(&self.running, vip)?;
        let v = &self.running.vips[i];
        let addr = parse_ip("address", address)?;
        if !v.backends.iter().any(|b| b.address == addr) {
            return Err(Failure::not_found(format!(
                "backend {addr} is not in VIP {}",
                v.label()
            )));
        }
        Ok((i, (vip_key(v), addr)))
    }

    fn backend_json(&self, key: &BackendKey) -> Reply {
        let statuses = self
            .state
            .backend_statuses(&self.dp, Some(&key.0))
            .map_err(Failure::internal)?;
        let b = statuses
            .into_iter()
            .find(|b| b.address == key.1)
            .ok_or_else(|| Failure::not_found("backend vanished"))?;
        serde_json::to_value(b).map_err(Failure::internal)
    }

    fn vip_statuses(
        &self,
        backends: &[api::BackendStatus],
    ) -> Result<Vec<api::VipStatus>, Failure> {
        self.state
            .vip_statuses(&self.dp, backends)
            .map_err(Failure::internal)
    }

    fn vip_statuses_now(&self) -> Result<Vec<api::VipStatus>, Failure> {
        let backends = self
            .state
            .backend_statuses(&self.dp, None)
            .map_err(Failure::internal)?;
        self.vip_statuses(&backends)
    }

    pub fn stats(&self) -> Result<api::Stats, Failure> {
        let backends = self
            .state
            .backend_statuses(&self.dp, None)
            .map_err(Failure::internal)?;
        Ok(api::Stats {
            vips: self.vip_statuses(&backends)?,
            backends,
            reasons: self
                .dp
                .reason_counters()
                .map_err(Failure::internal)?
                .into_iter()
                .map(|(r, n)| (r.name().to_string(), n))
                .collect(),
            ring: self.state.ring_stats(),
        })
    }

    pub fn handle(&mut self, req: Request) -> Reply {
        match req {
            Request::Status => {
                let status = api::Status {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    pid: std::process::id(),
                    uptime_seconds: self.started.elapsed().as_secs(),
                    config_path: self.opts.config_path.display().to_string(),
                    interfaces: self.attached.iter().map(|(name, _)| name.clone()).collect(),
                    xdp_mode: self.mode.clone(),
                    adopted: self.dp.adopted(),
                    runtime_changes: self.runtime_changes.clone(),
                    vips: self.running.vips.len(),
                    backends: self.running.vips.iter().map(|v| v.backends.len()).sum(),
                    flows: self.flows,
                    ring: self.state.ring_stats(),
                };
                to_json(&status)
            }
            Request::Stats => to_json(&self.stats()?),
            Request::Vips => to_json(&self.vip_statuses_now()?),
            Request::Backends { vip } => {
                let only = match vip {
                    Some(v) => Some(vip_key(&self.running.vips[parse_vip(&self.running, &v)?])),
                    None => None,
                };
                to_json(
                    &self
                        .state
                        .backend_statuses(&self.dp, only.as_ref())
                        .map_err(Failure::internal)?,
                )
            }
            Request::VipAdd(add) => {
                let what = format!("vip add {}:{}/{}", add.address, add.port, add.protocol);
                self.change(what, |raw| {
                    raw.vips.push(RawVip {
                        name: add.name.clone(),
                        address: add.address.clone(),
                        port: add.port,
                        protocol: add.protocol.clone(),
                        affinity: add.affinity.clone(),
                        scheduler: add.scheduler.clone(),
                        health_check: None,
                        backends: Vec::new(),
                    });
                    Ok(())
                })?;
                to_json(&self.vip_statuses_now()?.last().cloned())
            }
            Request::VipDel { vip } => {
                let i = parse_vip(&self.running, &vip)?;
                let label = self.running.vips[i].label();
                self.change(format!("vip del {label}"), |raw| {
                    raw.vips.remove(i);
                    Ok(())
                })?;
                Ok(json!({}))
            }
            Request::BackendAdd(add) => {
                let i = parse_vip(&self.running, &add.vip)?;
                let addr = parse_ip("address", &add.address)?;
                let label = self.running.vips[i].label();
                self.change(format!("backend add {label} {addr}"), |raw| {
                    raw.vips[i].backends.push(RawBackend {
                        address: add.address.clone(),
                        weight: add.weight.unwrap_or(1),
                        mac: add.mac.clone(),
                        interface: None,
                        health_check: None,
                    });
                    Ok(())
                })?;
                self.backend_json(&(vip_key(&self.running.vips[i]), addr))
            }
            Request::BackendDel(r) => {
                let (i, key) = self.backend_key(&r.vip, &r.address)?;
                let label = self.running.vips[i].label();
                self.change(format!("backend del {label} {}", key.1), |raw| {
                    raw.vips[i]
                        .backends
                        .retain(|b| b.address.parse::<IpAddr>().ok() != Some(key.1));
                    Ok(())
                })?;
                Ok(json!({}))
            }
            Request::Weight(w) => {
                let (i, key) = self.backend_key(&w.vip, &w.address)?;
                let label = self.running.vips[i].label();
                self.change(
                    format!("backend weight {label} {} {}", key.1, w.weight),
                    |raw| {
                        for b in &mut raw.vips[i].backends {
                            if b.address.parse::<IpAddr>().ok() == Some(key.1) {
                                b.weight = w.weight;
                            }
                        }
                        Ok(())
                    },
                )?;
                self.backend_json(&key)
            }
            Request::Drain(r) => {
                let (_, key) = self.backend_key(&r.vip, &r.address)?;
                self.state
                    .set_runtime(&mut self.dp, &mut self.resolver, &key, |rt| {
                        if rt.draining_since.is_none() {
                            rt.draining_since = Some(Instant::now());
                            rt.drained = false;
                        }
                    })
                    .map_err(|e| Failure::internal(format!("{:#}", anyhow::Error::from(e))))?;
                tracing::info!("draining {} of {}", key.1, r.vip);
                self.backend_json(&key)
            }
            Request::Undrain(r) => {
                let (_, key) = self.backend_key(&r.vip, &r.address)?;
                self.state
                    .set_runtime(&mut self.dp, &mut self.resolver, &key, |rt| {
                        rt.draining_since = None;
                        rt.drained = false;
                    })
                    .map_err(|e| Failure::internal(format!("{:#}", anyhow::Error::from(e))))?;
                tracing::info!("undrained {} of {}", key.1, r.vip);
                self.backend_json(&key)
            }
            Request::Config => {
                let yaml =
                    serde_yaml::to_string(&self.running.to_raw()).map_err(Failure::internal)?;
                Ok(json!({ "yaml": yaml }))
            }
            Request::Reload {
                discard_runtime_changes,
            } => match self.reload(discard_runtime_changes) {
                Ok(message) => {
                    tracing::info!("{message}");
                    Ok(json!({ "message": message }))
                }
                Err(f) => {
                    tracing::error!("{}", f.message);
                    Err(f)
                }
            },
        }
    }

    pub fn on_reload_signal(&mut self) {
        match self.reload(false) {
            Ok(message) => tracing::info!("{message}"),
            Err(f) => tracing::error!("{}", f.message),
        }
    }

    pub fn on_health(&mut self, ev: HealthEvent<BackendKey>) {
        let health = if ev.up { Health::Up } else { Health::Down };
        match self
            .state
            .set_runtime(&mut self.dp, &mut self.resolver, &ev.key, |rt| {
                rt.health = health
            }) {
            Ok(true) if ev.up => tracing::info!(
                "backend {} is up, back in the ring: {}",
                ev.key.1,
                ev.reason
            ),
            Ok(true) => tracing::warn!(
                "backend {} is down, out of the ring, its flows rescheduled: {}",
                ev.key.1,
                ev.reason
            ),
            Ok(false) => {}
            Err(e) => tracing::error!(
                "applying health of {}: {:#}",
                ev.key.1,
                anyhow::Error::from(e)
            ),
        }
    }

    /// Periodic work: the datapath clock, finished drains.
    pub fn tick(&mut self) {
        if let Err(e) = self.dp.set_clock(crate::state::monotonic_ns()) {
            tracing::error!("{e}");
        }
        match self.state.finish_drains(&self.dp, Instant::now()) {
            Ok(done) => {
                for key in done {
                    tracing::info!("backend {} drained", key.1);
                }
            }
            Err(e) => tracing::error!("checking drains: {e}"),
        }
    }

    /// Periodic work (`REBALANCE_INTERVAL`): the rings of
    /// `least-connections` VIPs, from their backends' active connections.
    pub fn rebalance(&mut self) {
        match self.state.rebalance(&mut self.dp, &mut self.resolver) {
            Ok(n) => {
                if self.rebalance_error.take().is_some() {
                    tracing::info!("least-connections: rings follow the connections again");
                }
                if n > 0 {
                    tracing::debug!("least-connections: {n} rings rebuilt from active connections");
                }
            }
            Err(e) => {
                let msg = format!("{:#}", anyhow::Error::from(e));
                if self.rebalance_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(
                        "least-connections: rebuilding rings (retried every second, logged \
                         again if the error changes): {msg}"
                    );
                    self.rebalance_error = Some(msg);
                }
            }
        }
    }

    /// Periodic work: flow-table sweep. Returns how long to wait before the
    /// next one: every 2 s, or ten times the sweep's own duration when the
    /// table is large (it reads every slot of the memory-mapped table), so
    /// the sweep never takes more than a tenth of a core.
    pub fn sweep(&mut self) -> Duration {
        let started = Instant::now();
        match self.state.sweep(&mut self.dp, crate::state::monotonic_ns()) {
            Ok(s) => {
                self.flows = Some((s.scanned - s.expired - s.closed_removed) as u64);
                if s.expired + s.closed_removed > 0 {
                    tracing::debug!(
                        "sweep: {} flows scanned, {} idle expired, {} closed removed",
                        s.scanned,
                        s.expired,
                        s.closed_removed
                    );
                }
            }
            Err(e) => tracing::error!("sweeping the flow table: {e}"),
        }
        (started.elapsed() * 10).max(SWEEP_INTERVAL)
    }

    /// Stops: unpins (unless persisting) and detaches. Returns the final
    /// counters.
    pub fn shutdown(mut self) -> Result<api::Stats> {
        let stats = self.stats().map_err(|f| anyhow::anyhow!(f.message))?;
        self.checks.clear();
        if let (true, Some(dir)) = (self.opts.persist, &self.opts.pin_dir) {
            tracing::info!(
                "exiting with the datapath pinned in {} (--persist): traffic keeps flowing; \
                 the next `xdplb run` adopts it",
                dir.display()
            );
        } else {
            self.dp.unpin().context("removing pins")?;
            tracing::info!("detached from {}", names(&self.attached));
        }
        drop(self.dp);
        Ok(stats)
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Reply {
    serde_json::to_value(value).map_err(Failure::internal)
}
