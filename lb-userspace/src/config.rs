//! The YAML configuration: schema, defaults and validation.
//!
//! Parsing happens in two steps. serde_yaml checks the shape (unknown fields,
//! types) and reports the field path and line. Then `validate` checks values
//! and cross-field rules, naming the field path and the offending value, and
//! produces a `Config` whose addresses and options are typed.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::IpAddr,
    path::Path,
    str::FromStr,
    time::Duration,
};

use lb_common::{
    DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAX_VIPS, DEFAULT_RING_SIZE, MAX_BACKENDS, MAX_RING_SIZE,
};
use serde::{Deserialize, Serialize};

use crate::health::{self, CheckSpec, RawHealthCheck};

/// Largest backend weight. Weights are relative; 1000 leaves room for
/// fine-grained ratios while keeping the Maglev build cheap.
pub const MAX_WEIGHT: u32 = 1000;
/// Backends per VIP; bounded by the datapath's backend table.
pub const MAX_BACKENDS_PER_VIP: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
}

/// The file as written (after serde, before validation).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Interface whose incoming VIP traffic is load balanced.
    pub interface: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xdp_mode: Option<String>,
    #[serde(default)]
    pub datapath: RawDatapath,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default = "default_drain_timeout_s")]
    pub drain_timeout_s: u64,
    #[serde(default)]
    pub vips: Vec<RawVip>,
}

/// Flow-table entry lifetimes, enforced by the daemon's sweep.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    #[serde(default = "default_tcp_idle_s")]
    pub tcp_idle_s: u64,
    #[serde(default = "default_tcp_closed_s")]
    pub tcp_closed_s: u64,
    #[serde(default = "default_udp_idle_s")]
    pub udp_idle_s: u64,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        Self {
            tcp_idle_s: default_tcp_idle_s(),
            tcp_closed_s: default_tcp_closed_s(),
            udp_idle_s: default_udp_idle_s(),
        }
    }
}

fn default_tcp_idle_s() -> u64 {
    300
}
fn default_tcp_closed_s() -> u64 {
    10
}
fn default_udp_idle_s() -> u64 {
    30
}
fn default_drain_timeout_s() -> u64 {
    300
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawDatapath {
    #[serde(default = "default_ring_size")]
    pub ring_size: u32,
    #[serde(default = "default_flow_table_size")]
    pub flow_table_size: u32,
    #[serde(default = "default_max_vips")]
    pub max_vips: u32,
}

impl Default for RawDatapath {
    fn default() -> Self {
        Self {
            ring_size: DEFAULT_RING_SIZE,
            flow_table_size: DEFAULT_FLOW_TABLE_SIZE,
            max_vips: DEFAULT_MAX_VIPS,
        }
    }
}

fn default_ring_size() -> u32 {
    DEFAULT_RING_SIZE
}
fn default_flow_table_size() -> u32 {
    DEFAULT_FLOW_TABLE_SIZE
}
fn default_max_vips() -> u32 {
    DEFAULT_MAX_VIPS
}
fn default_weight() -> u32 {
    1
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawVip {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub address: String,
    pub port: u16,
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<RawHealthCheck>,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<RawHealthCheck>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Affinity {
    /// Each connection (5-tuple) is scheduled on its own.
    None,
    /// All connections of one client address go to one backend.
    ClientIp,
}

/// How a VIP's new flows are spread over its backends. Either way a flow
/// stays on its backend through the flow table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scheduler {
    /// Weighted Maglev: shares by weight alone, the same on every node
    /// with the same configuration.
    #[default]
    Maglev,
    /// Weighted Maglev whose weights the daemon adjusts every second by
    /// the backends' active connections on this node (`state::lc_weights`,
    /// `State::rebalance`).
    LeastConnections,
}

impl Scheduler {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Maglev => "maglev",
            Scheduler::LeastConnections => "least-connections",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// Driver (native) mode only: fail if the driver refuses.
    Native,
    /// Generic (skb) mode only: works on any interface, slower.
    Generic,
}

impl fmt::Display for XdpMode {
    /// As the configuration writes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or(())?;
            if p.len() != 2 {
                return Err(());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| ())?;
        }
        if parts.next().is_some() {
            return Err(());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Load-time datapath settings; changing them needs a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathSettings {
    pub ring_size: u32,
    pub flow_table_size: u32,
    pub max_vips: u32,
}

impl Default for DatapathSettings {
    fn default() -> Self {
        let d = RawDatapath::default();
        Self {
            ring_size: d.ring_size,
            flow_table_size: d.flow_table_size,
            max_vips: d.max_vips,
        }
    }
}

/// Flow-table entry lifetimes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_idle: Duration,
    pub tcp_closed: Duration,
    pub udp_idle: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub interface: String,
    pub xdp_mode: Option<XdpMode>,
    pub datapath: DatapathSettings,
    pub timeouts: Timeouts,
    pub drain_timeout: Duration,
    pub vips: Vec<Vip>,
    /// The VIP-level health checks as written, kept so `to_raw` gives the
    /// file back (backends keep theirs in `BackendSpec::raw_health`).
    pub raw_vip_health: Vec<Option<RawHealthCheck>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Vip {
    pub name: Option<String>,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub affinity: Affinity,
    pub scheduler: Scheduler,
    pub backends: Vec<BackendSpec>,
}

impl Config {
    /// Interfaces other than `interface` that backends sit behind (each
    /// once, in order of first use): XDP_REDIRECT sends only to interfaces
    /// with an XDP program, so the program is attached to these too.
    pub fn egress_interfaces(&self) -> impl Iterator<Item = &str> {
        let mut seen = HashSet::new();
        self.vips
            .iter()
            .flat_map(|v| &v.backends)
            .filter_map(|b| b.interface.as_deref())
            .filter(move |name| *name != self.interface && seen.insert(*name))
    }
}

impl Vip {
    /// `address:port/protocol`, the VIP's identity in logs and errors.
    pub fn label(&self) -> String {
        match self.address {
            IpAddr::V4(a) => format!("{a}:{}/{}", self.port, self.protocol),
            IpAddr::V6(a) => format!("[{a}]:{}/{}", self.port, self.protocol),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct BackendSpec {
    pub address: IpAddr,
    pub weight: u32,
    /// Known MAC; `None` means resolve from the neighbour table.
    pub mac: Option<MacAddr>,
    /// Egress interface; `None` means the VIP interface.
    pub interface: Option<String>,
    /// The resolved health check (VIP level merged with backend level).
    pub health: Option<CheckSpec>,
    /// The backend-level override as written.
    pub raw_health: Option<RawHealthCheck>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        Config::from_raw(&raw, origin)
    }

    /// Validates a configuration already in its raw form (runtime changes
    /// are made on one, then validated exactly like a file).
    pub fn from_raw(raw: &RawConfig, origin: &str) -> Result<Config, ConfigError> {
        validate(raw).map_err(|(field, message)| ConfigError::Invalid {
            file: origin.to_string(),
            field,
            message,
        })
    }

    /// The configuration as YAML that `parse` accepts again.
    pub fn to_raw(&self) -> RawConfig {
        RawConfig {
            interface: self.interface.clone(),
            xdp_mode: self.xdp_mode.map(|m| m.to_string()),
            datapath: RawDatapath {
                ring_size: self.datapath.ring_size,
                flow_table_size: self.datapath.flow_table_size,
                max_vips: self.datapath.max_vips,
            },
            timeouts: RawTimeouts {
                tcp_idle_s: self.timeouts.tcp_idle.as_secs(),
                tcp_closed_s: self.timeouts.tcp_closed.as_secs(),
                udp_idle_s: self.timeouts.udp_idle.as_secs(),
            },
            drain_timeout_s: self.drain_timeout.as_secs(),
            vips: self
                .vips
                .iter()
                .enumerate()
                .map(|(i, v)| RawVip {
                    name: v.name.clone(),
                    address: v.address.to_string(),
                    port: v.port,
                    protocol: v.protocol.to_string(),
                    affinity: match v.affinity {
                        Affinity::None => None,
                        Affinity::ClientIp => Some("client-ip".to_string()),
                    },
                    scheduler: (v.scheduler != Scheduler::Maglev)
                        .then(|| v.scheduler.as_str().to_owned()),
                    health_check: self.raw_vip_health.get(i).cloned().flatten(),
                    backends: v
                        .backends
                        .iter()
                        .map(|b| RawBackend {
                            address: b.address.to_string(),
                            weight: b.weight,
                            mac: b.mac.map(|m| m.to_string()),
                            interface: b.interface.clone(),
                            health_check: b.raw_health.clone(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

type FieldError = (String, String);

fn invalid(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    (field.into(), message.into())
}

/// Longest VIP `name`.
const MAX_VIP_NAME: usize = 64;

/// Whether `name` can name a VIP: 1 to `MAX_VIP_NAME` ASCII letters,
/// digits, `-`, `_` and `.`, and not an IP address. The CLI tells a name
/// from `address:port/protocol` by the same rule, so every name it accepts
/// reaches the daemon as a name.
pub fn is_vip_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_VIP_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.parse::<IpAddr>().is_err()
}

/// `is_vip_name`, or why `name` is not one.
pub fn check_vip_name(name: &str) -> Result<(), String> {
    if is_vip_name(name) {
        return Ok(());
    }
    Err(format!(
        "{name:?} is not a VIP name (1-{MAX_VIP_NAME} letters, digits, '-', '_' or '.', and not \
         an IP address)"
    ))
}

fn check_interface(field: &str, name: &str) -> Result<(), FieldError> {
    // IFNAMSIZ is 16 including the NUL.
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', ':']) {
        return Err(invalid(
            field,
            format!(
                "{name:?} is not a valid interface name (1-15 characters, no '/', ':' or spaces)"
            ),
        ));
    }
    Ok(())
}

fn validate(raw: &RawConfig) -> Result<Config, FieldError> {
    check_interface("interface", &raw.interface)?;
    let xdp_mode = match raw.xdp_mode.as_deref() {
        None => None,
        Some("native") => Some(XdpMode::Native),
        Some("generic") => Some(XdpMode::Generic),
        Some(other) => {
            return Err(invalid(
                "xdp_mode",
                format!("{other:?} is not one of: native, generic"),
            ))
        }
    };
    let d = &raw.datapath;
    if d.ring_size < 3 || d.ring_size > MAX_RING_SIZE || !lb_common::maglev::is_prime(d.ring_size) {
        return Err(invalid(
            "datapath.ring_size",
            format!(
                "{} must be a prime between 3 and {MAX_RING_SIZE} (e.g. 65537, 131071, 524287)",
                d.ring_size
            ),
        ));
    }
    if !(1024..=100_000_000).contains(&d.flow_table_size) {
        return Err(invalid(
            "datapath.flow_table_size",
            format!("{} is out of range (1024..=100000000)", d.flow_table_size),
        ));
    }
    if !(1..=4096).contains(&d.max_vips) {
        return Err(invalid(
            "datapath.max_vips",
            format!("{} is out of range (1..=4096)", d.max_vips),
        ));
    }
    let t = &raw.timeouts;
    for (field, value, range) in [
        ("timeouts.tcp_idle_s", t.tcp_idle_s, 1..=86_400),
        ("timeouts.tcp_closed_s", t.tcp_closed_s, 1..=3_600),
        ("timeouts.udp_idle_s", t.udp_idle_s, 1..=86_400),
        ("drain_timeout_s", raw.drain_timeout_s, 1..=86_400),
    ] {
        if !range.contains(&value) {
            return Err(invalid(
                field,
                format!(
                    "{value} is out of range ({}..={})",
                    range.start(),
                    range.end()
                ),
            ));
        }
    }
    if raw.vips.len() > d.max_vips as usize {
        return Err(invalid(
            "vips",
            format!(
                "{} VIPs configured but datapath.max_vips is {}",
                raw.vips.len(),
                d.max_vips
            ),
        ));
    }

    let mut seen_vips = HashSet::new();
    let mut seen_names = HashMap::new();
    let mut total_backends = 0usize;
    let mut vips = Vec::with_capacity(raw.vips.len());
    for (i, v) in raw.vips.iter().enumerate() {
        let at = format!("vips[{i}]");
        let address = parse_ip(&format!("{at}.address"), &v.address)?;
        if address.is_unspecified() || address.is_multicast() {
            return Err(invalid(
                format!("{at}.address"),
                format!("{:?} cannot be a VIP (unspecified or multicast)", v.address),
            ));
        }
        if let Some(name) = &v.name {
            check_vip_name(name).map_err(|message| invalid(format!("{at}.name"), message))?;
            if let Some(first) = seen_names.insert(name.as_str(), i) {
                return Err(invalid(
                    format!("{at}.name"),
                    format!("{name:?} already names vips[{first}]: the CLI finds a VIP by its name, so names are unique"),
                ));
            }
        }
        if v.port == 0 {
            return Err(invalid(
                format!("{at}.port"),
                "0 is not a valid port (1..=65535)",
            ));
        }
        let protocol = match v.protocol.as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => {
                return Err(invalid(
                    format!("{at}.protocol"),
                    format!("{other:?} is not one of: tcp, udp"),
                ))
            }
        };
        let affinity = match v.affinity.as_deref() {
            None | Some("none") => Affinity::None,
            Some("client-ip") => Affinity::ClientIp,
            Some(other) => {
                return Err(invalid(
                    format!("{at}.affinity"),
                    format!("{other:?} is not one of: none, client-ip"),
                ))
            }
        };
        let scheduler = match v.scheduler.as_deref() {
            None | Some("maglev") => Scheduler::Maglev,
            Some("least-connections") => Scheduler::LeastConnections,
            Some(other) => {
                return Err(invalid(
                    format!("{at}.scheduler"),
                    format!("{other:?} is not one of: maglev, least-connections"),
                ))
            }
        };
        if scheduler == Scheduler::LeastConnections && affinity == Affinity::ClientIp {
            return Err(invalid(
                format!("{at}.scheduler"),
                "\"least-connections\" cannot be combined with affinity: client-ip: it moves \
                 clients' new connections between backends as their loads change"
                    .to_owned(),
            ));
        }
        if !seen_vips.insert((address, v.port, protocol)) {
            return Err(invalid(
                at,
                format!(
                    "duplicate VIP {}:{}/{protocol}: each address, port and protocol may appear once",
                    v.address, v.port
                ),
            ));
        }
        if v.backends.len() > MAX_BACKENDS_PER_VIP {
            return Err(invalid(
                format!("{at}.backends"),
                format!(
                    "{} backends, at most {MAX_BACKENDS_PER_VIP} per VIP",
                    v.backends.len()
                ),
            ));
        }
        total_backends += v.backends.len();
        if total_backends > MAX_BACKENDS as usize {
            return Err(invalid(
                format!("{at}.backends"),
                format!(
                    "{total_backends} backends in the VIPs up to this one, at most {MAX_BACKENDS} in all"
                ),
            ));
        }
        // The VIP's own check, validated once whatever its backends
        // override (and even with no backend at all).
        health::resolve(v.health_check.as_ref(), &at, None, "", v.port)?;
        let mut seen_backends = HashSet::new();
        let mut backends = Vec::with_capacity(v.backends.len());
        for (j, b) in v.backends.iter().enumerate() {
            let bat = format!("{at}.backends[{j}]");
            let address = parse_ip(&format!("{bat}.address"), &b.address)?;
            if address.is_unspecified() || address.is_multicast() || address.is_loopback() {
                return Err(invalid(
                    format!("{bat}.address"),
                    format!(
                        "{:?} cannot be a backend (unspecified, multicast or loopback)",
                        b.address
                    ),
                ));
            }
            if !seen_backends.insert(address) {
                return Err(invalid(
                    format!("{bat}.address"),
                    format!("duplicate backend {address} in this VIP"),
                ));
            }
            if b.weight > MAX_WEIGHT {
                return Err(invalid(
                    format!("{bat}.weight"),
                    format!("{} is out of range (0..={MAX_WEIGHT})", b.weight),
                ));
            }
            let mac = match &b.mac {
                None => None,
                Some(text) => Some(text.parse::<MacAddr>().map_err(|()| {
                    invalid(
                        format!("{bat}.mac"),
                        format!("{text:?} is not a MAC address (expected aa:bb:cc:dd:ee:ff)"),
                    )
                })?),
            };
            if let Some(ifname) = &b.interface {
                check_interface(&format!("{bat}.interface"), ifname)?;
            }
            let health = health::resolve(
                v.health_check.as_ref(),
                &at,
                b.health_check.as_ref(),
                &bat,
                v.port,
            )?;
            backends.push(BackendSpec {
                address,
                weight: b.weight,
                mac,
                interface: b.interface.clone(),
                health,
                raw_health: b.health_check.clone(),
            });
        }
        vips.push(Vip {
            name: v.name.clone(),
            address,
            port: v.port,
            protocol,
            affinity,
            scheduler,
            backends,
        });
    }
    Ok(Config {
        interface: raw.interface.clone(),
        xdp_mode,
        datapath: DatapathSettings {
            ring_size: d.ring_size,
            flow_table_size: d.flow_table_size,
            max_vips: d.max_vips,
        },
        timeouts: Timeouts {
            tcp_idle: Duration::from_secs(t.tcp_idle_s),
            tcp_closed: Duration::from_secs(t.tcp_closed_s),
            udp_idle: Duration::from_secs(t.udp_idle_s),
        },
        drain_timeout: Duration::from_secs(raw.drain_timeout_s),
        raw_vip_health: raw.vips.iter().map(|v| v.health_check.clone()).collect(),
        vips,
    })
}

fn parse_ip(field: &str, text: &str) -> Result<IpAddr, FieldError> {
    text.parse::<IpAddr>()
        .map_err(|_| invalid(field, format!("{text:?} is not an IPv4 or IPv6 address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
interface: eth0
vips:
  - address: 10.200.100.1
    port: 8080
    protocol: tcp
    affinity: client-ip
    backends:
      - address: 10.200.0.11
        weight: 2
      - address: 10.200.0.12
        mac: 02:00:00:00:00:12
  - address: fd00:200::100
    port: 53
    protocol: udp
";

    fn err(text: &str) -> String {
        Config::parse(text, "test.yaml").unwrap_err().to_string()
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::parse(GOOD, "test.yaml").unwrap();
        assert_eq!(c.datapath, DatapathSettings::default());
        assert_eq!(c.vips.len(), 2);
        assert_eq!(c.vips[0].affinity, Affinity::ClientIp);
        assert_eq!(c.vips[0].backends[1].weight, 1);
        assert_eq!(
            c.vips[0].backends[1].mac,
            Some(MacAddr([2, 0, 0, 0, 0, 0x12]))
        );
        assert_eq!(c.vips[1].label(), "[fd00:200::100]:53/udp");
    }

    /// 5 VIPs of 1000 backends: each within the per-VIP limit, 5000 in
    /// all; the fifth VIP is the one past the table's 4096 slots.
    #[test]
    fn backends_in_all_are_limited_to_the_table() {
        let mut text = String::from("interface: eth0\ndatapath: { max_vips: 8 }\nvips:\n");
        for v in 0..5 {
            text.push_str(&format!(
                "  - {{ address: 10.200.100.{}, port: 80, protocol: tcp, backends: [",
                v + 1
            ));
            let backends: Vec<String> = (0..1000)
                .map(|b| format!("{{ address: 10.201.{}.{} }}", b / 250, b % 250 + 1))
                .collect();
            text.push_str(&backends.join(", "));
            text.push_str("] }\n");
        }
        assert_eq!(
            err(&text),
            "test.yaml: vips[4].backends: 5000 backends in the VIPs up to this one, at most 4096 in all"
        );
    }

    /// A name the CLI could not ask for (spaces, an address), or one that
    /// two VIPs share, is refused where it is written.
    #[test]
    fn vip_names_are_names_the_cli_accepts_and_unique() {
        let named = |first: &str, second: &str| {
            GOOD.replacen(
                "  - address:",
                &format!("  - name: {first}\n    address:"),
                1,
            )
            .replacen(
                "  - address: fd00",
                &format!("  - name: {second}\n    address: fd00"),
                1,
            )
        };
        let c = Config::parse(&named("web-v4", "dns_6.a"), "test.yaml").unwrap();
        assert_eq!(c.vips[0].name.as_deref(), Some("web-v4"));
        assert_eq!(c.vips[1].name.as_deref(), Some("dns_6.a"));
        for (bad, shown) in [
            ("'web front'", "\"web front\""),
            ("'10.0.0.1'", "\"10.0.0.1\""),
            ("'::1'", "\"::1\""),
            ("''", "\"\""),
        ] {
            assert_eq!(
                err(&named(bad, "dns")),
                format!(
                    "test.yaml: vips[0].name: {shown} is not a VIP name (1-64 letters, digits, \
                     '-', '_' or '.', and not an IP address)"
                )
            );
        }
        assert!(err(&named(&"a".repeat(65), "dns")).contains("vips[0].name"));
        assert_eq!(
            err(&named("web", "web")),
            "test.yaml: vips[1].name: \"web\" already names vips[0]: the CLI finds a VIP by \
             its name, so names are unique"
        );
        // Every name the configuration takes, the CLI passes on as a name.
        for name in ["web-v4", "dns_6.a", &"a".repeat(64)] {
            assert!(is_vip_name(name));
            assert_eq!(crate::cli::parse_vip(name).as_deref(), Ok(name));
        }
    }

    #[test]
    fn egress_interfaces_are_the_other_backend_interfaces_once() {
        let text = GOOD
            .replacen("weight: 2", "weight: 2\n        interface: eth1", 1)
            .replacen(
                "mac: 02:00:00:00:00:12",
                "mac: 02:00:00:00:00:12\n        interface: eth0",
                1,
            )
            .replace(
                "    protocol: udp\n",
                "    protocol: udp\n    backends:\n      - { address: 'fd00:200::11', interface: eth2 }\n      - { address: 'fd00:200::12', interface: eth1 }\n",
            );
        let c = Config::parse(&text, "test.yaml").unwrap();
        assert_eq!(c.egress_interfaces().collect::<Vec<_>>(), ["eth1", "eth2"]);
    }

    #[test]
    fn round_trips_through_yaml() {
        let c = Config::parse(GOOD, "a").unwrap();
        let text = serde_yaml::to_string(&c.to_raw()).unwrap();
        assert_eq!(Config::parse(&text, "b").unwrap(), c);
        let lc = GOOD.replace(
            "    protocol: udp\n",
            "    protocol: udp\n    scheduler: least-connections\n",
        );
        let c = Config::parse(&lc, "a").unwrap();
        assert_eq!(c.vips[0].scheduler, Scheduler::Maglev);
        assert_eq!(c.vips[1].scheduler, Scheduler::LeastConnections);
        let text = serde_yaml::to_string(&c.to_raw()).unwrap();
        assert!(text.contains("scheduler: least-connections"), "{text}");
        assert_eq!(Config::parse(&text, "b").unwrap(), c);
    }

    #[test]
    fn scheduler_values_and_combinations() {
        let e = err(&GOOD.replace(
            "    protocol: udp\n",
            "    protocol: udp\n    scheduler: lc\n",
        ));
        assert_eq!(
            e,
            "test.yaml: vips[1].scheduler: \"lc\" is not one of: maglev, least-connections"
        );
        let e = err(&GOOD.replace(
            "    affinity: client-ip\n",
            "    affinity: client-ip\n    scheduler: least-connections\n",
        ));
        assert!(
            e.starts_with(
                "test.yaml: vips[0].scheduler: \"least-connections\" cannot be combined with \
                 affinity: client-ip"
            ),
            "{e}"
        );
    }

    #[test]
    fn bad_address_names_field_and_value() {
        let e = err(&GOOD.replace("10.200.0.11", "10.200.0.x"));
        assert_eq!(
            e,
            "test.yaml: vips[0].backends[0].address: \"10.200.0.x\" is not an IPv4 or IPv6 address"
        );
    }

    #[test]
    fn unknown_field_names_path_and_line() {
        let e = err(&GOOD.replace("weight: 2", "wieght: 2"));
        assert!(e.contains("vips[0].backends[0]"), "{e}");
        assert!(e.contains("unknown field `wieght`"), "{e}");
        assert!(e.contains("line 10"), "{e}");
    }

    #[test]
    fn duplicate_vip_is_rejected() {
        let dup = format!("{GOOD}  - address: 10.200.100.1\n    port: 8080\n    protocol: tcp\n");
        let e = err(&dup);
        assert!(
            e.contains("vips[2]: duplicate VIP 10.200.100.1:8080/tcp"),
            "{e}"
        );
    }

    #[test]
    fn weight_out_of_range_is_rejected() {
        let e = err(&GOOD.replace("weight: 2", "weight: 5000"));
        assert_eq!(
            e,
            "test.yaml: vips[0].backends[0].weight: 5000 is out of range (0..=1000)"
        );
    }

    #[test]
    fn other_value_errors() {
        assert!(err(&GOOD.replace("protocol: tcp", "protocol: sctp"))
            .contains("vips[0].protocol: \"sctp\" is not one of: tcp, udp"));
        assert!(err(&GOOD.replace("client-ip", "source")).contains("vips[0].affinity: \"source\""));
        assert!(err(&GOOD.replace("02:00:00:00:00:12", "02:00:00:00:12"))
            .contains("vips[0].backends[1].mac"));
        assert!(err(&format!("{GOOD}datapath:\n  ring_size: 65536\n"))
            .contains("datapath.ring_size: 65536 must be a prime"));
        assert!(err(&GOOD.replace("port: 53", "port: 0")).contains("vips[1].port"));
        assert!(err(&GOOD.replace("interface: eth0", "interface: a/b")).contains("interface:"));
    }
}
