//! Types of the control API (HTTP/JSON on the daemon's unix socket), shared
//! by the daemon, the CLI client and the metrics endpoint.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

/// Default control socket (created mode 0600: root only).
pub const DEFAULT_SOCKET: &str = "/run/xdplb/xdplb.sock";
/// Default Prometheus endpoint.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9469";

/// What `backend list` reports for a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// In the ring, takes new flows.
    Active,
    /// Out of the ring; established flows continue until they end.
    Draining,
    /// Draining finished (no active connection left, or the drain timeout).
    Drained,
    /// Failed its health check: out of the ring, its flows are rescheduled.
    Down,
}

impl BackendState {
    /// As the API (JSON) and metrics labels spell it.
    pub const fn as_str(self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Draining => "draining",
            BackendState::Drained => "drained",
            BackendState::Down => "down",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// No health check configured.
    Unchecked,
    Up,
    Down,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// The VIP, `address:port/protocol` (IPv6 in brackets).
    pub vip: String,
    pub address: IpAddr,
    /// The port traffic reaches the backend on (L2 DSR keeps the VIP port).
    pub port: u16,
    pub weight: u32,
    pub state: BackendState,
    pub health: Health,
    pub active_connections: u64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Flows that ended: FIN/RST seen, idle expiry, or moved off a down backend.
    pub closed_flows: u64,
    pub mac: String,
    /// Share of the VIP's ring slots (0 to 1): of the VIP's new flows, the
    /// share this backend gets (by weight, or with `least-connections` by
    /// weight and connections); 0 out of the ring.
    #[serde(default)]
    pub ring_share: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipStatus {
    pub vip: String,
    pub name: Option<String>,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub affinity: String,
    /// `maglev` or `least-connections`.
    #[serde(default = "default_scheduler")]
    pub scheduler: String,
    pub backends: usize,
    /// Backends currently in the ring.
    pub active_backends: usize,
    pub active_connections: u64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RingStats {
    /// Maglev tables rebuilt and swapped in since the daemon started.
    pub rebuilds: u64,
    /// Seconds spent building and writing them, in total.
    pub rebuild_seconds_total: f64,
    /// The last rebuild, in seconds.
    pub last_rebuild_seconds: f64,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub config_path: String,
    pub interfaces: Vec<String>,
    pub xdp_mode: String,
    /// Whether this daemon adopted a pinned datapath left by a previous one.
    pub adopted: bool,
    /// Runtime changes (CLI) not in the config file; see README.
    pub runtime_changes: Vec<String>,
    pub vips: usize,
    pub backends: usize,
    /// Flow-table entries after the last sweep (every 2 s).
    pub flows: Option<u64>,
    pub ring: RingStats,
}

/// `GET /v1/stats`: everything the metrics endpoint exports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub vips: Vec<VipStatus>,
    pub backends: Vec<BackendStatus>,
    /// Packets not load balanced, by reason name (`lb_common::Reason::name`).
    pub reasons: BTreeMap<String, u64>,
    pub ring: RingStats,
}

/// Body of every error response, and what the CLI prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// `POST /v1/vips`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipAdd {
    pub address: String,
    pub port: u16,
    pub protocol: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub affinity: Option<String>,
    #[serde(default)]
    pub scheduler: Option<String>,
}

fn default_scheduler() -> String {
    crate::config::Scheduler::Maglev.as_str().to_owned()
}

/// `POST /v1/backends`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendAdd {
    /// VIP as `address:port/protocol`.
    pub vip: String,
    pub address: String,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub mac: Option<String>,
}

/// Identifies a backend in requests: `vip` as `address:port/protocol`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendRef {
    pub vip: String,
    pub address: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightChange {
    pub vip: String,
    pub address: String,
    pub weight: u32,
}
