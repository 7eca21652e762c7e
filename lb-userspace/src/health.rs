//! Backend health checks.
//!
//! One task per backend probes the backend's own address (never the VIP)
//! every `interval`: a TCP connect, an HTTP `GET` whose status must match, or
//! a UDP datagram that must be answered. A [`Tracker`] turns the results into
//! Up/Down transitions, and only transitions are sent to the daemon, which
//! owns the state and updates the datapath.
//!
//! # Timing
//!
//! With interval I and timeout T (always less than I), a backend that stops
//! answering is Down within fall×I + T, and one that comes back is Up again
//! within rise×I plus one probe's round trip (longer while flap damping is in
//! effect, see below). Probes never overlap: each one ends within T.
//!
//! # Initial state
//!
//! A new [`Tracker`] starts Up. Starting Down would take every backend out of
//! service for rise×I after each daemon start or configuration reload, even
//! though nearly all of them are healthy; starting Up costs at most fall×I of
//! traffic to a backend that was already broken.
//!
//! # Flap damping
//!
//! A backend that keeps going down and coming back should not get traffic
//! back at the first sign of life. Every Up→Down transition less than
//! [`FLAP_WINDOW`] (60 s) after the previous Up→Down doubles the number of
//! consecutive successes needed for the next recovery: rise, 2·rise, 4·rise,
//! capped at [`MAX_RISE_MULTIPLIER`]·rise. Once the backend has stayed Up for
//! [`FLAP_WINDOW`], the requirement is back to rise.

use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    sync::mpsc::UnboundedSender,
    task::JoinHandle,
    time::{self, MissedTickBehavior},
};

/// Probe period when `interval_ms` is not set.
pub const DEFAULT_INTERVAL_MS: u64 = 1000;
/// Allowed `interval_ms`. Below 100 ms probes become load on the backends;
/// above a minute a dead backend keeps traffic for minutes.
pub const INTERVAL_MS_RANGE: RangeInclusive<u64> = 100..=60_000;
/// Probe timeout when `timeout_ms` is not set.
pub const DEFAULT_TIMEOUT_MS: u64 = 500;
/// Allowed `timeout_ms`; it must also be less than the interval so that
/// probes never overlap.
pub const TIMEOUT_MS_RANGE: RangeInclusive<u64> = 1..=59_999;
const _: () = assert!(DEFAULT_TIMEOUT_MS < DEFAULT_INTERVAL_MS);
/// Consecutive successes that bring a Down backend Up, when `rise` is not set.
pub const DEFAULT_RISE: u32 = 2;
/// Consecutive failures that take an Up backend Down, when `fall` is not set.
pub const DEFAULT_FALL: u32 = 3;
/// Allowed `rise` and `fall`.
pub const RISE_FALL_RANGE: RangeInclusive<u32> = 1..=100;
/// Flap damping window: see the module documentation.
pub const FLAP_WINDOW: Duration = Duration::from_secs(60);
/// Largest factor flap damping applies to `rise`.
pub const MAX_RISE_MULTIPLIER: u32 = 8;

const DEFAULT_HTTP_PATH: &str = "/";
const DEFAULT_EXPECT_STATUS: u16 = 200;
const EXPECT_STATUS_RANGE: RangeInclusive<u16> = 100..=599;
const DEFAULT_UDP_PAYLOAD: &str = "ping";
/// Largest UDP payload that fits one IPv4 datagram.
const MAX_UDP_PAYLOAD: usize = 65_507;
/// A status line is ~20 bytes; anything this long is not an HTTP server.
const MAX_STATUS_LINE: usize = 1024;
/// How much of a malformed status line an error message quotes.
const QUOTED_RESPONSE_LEN: usize = 64;

/// A health check as written in YAML, at VIP level (`health_check:`) or per
/// backend, where each field set overrides the VIP's.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    /// `tcp` (the default), `http`, `udp`, or `none` to disable checking.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Port probed on the backend; default: the VIP port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// http: request path, starting with '/'; default "/".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// http: the status code that counts as healthy; default 200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<u16>,
    /// http: Host header; default the backend address (and port unless 80).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// udp: datagram sent; default "ping".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// udp: text the reply must contain; default: any reply is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
    /// Probe period in milliseconds; default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// Probe timeout in milliseconds; default 500, less than the interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Consecutive successes to come back Up; default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    /// Consecutive failures to go Down; default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
}

/// A resolved, validated check for one backend.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckSpec {
    pub kind: CheckKind,
    /// Port probed on the backend's own address.
    pub port: u16,
    pub interval: Duration,
    /// Bound on one whole probe (connect, request and reply).
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum CheckKind {
    /// Healthy when a TCP connection is established.
    Tcp,
    /// Healthy when `GET path` is answered with `expect_status`.
    Http {
        path: String,
        expect_status: u16,
        /// Host header; `None` means the probed address.
        host: Option<String>,
    },
    /// Healthy when `payload` is answered by a datagram (containing `expect`).
    Udp {
        payload: Vec<u8>,
        expect: Option<Vec<u8>>,
    },
}

/// The `type` values, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KindName {
    Tcp,
    Http,
    Udp,
    None,
}

impl KindName {
    const ALL: [Self; 4] = [Self::Tcp, Self::Http, Self::Udp, Self::None];

    fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
            Self::Udp => "udp",
            Self::None => "none",
        }
    }
}

impl fmt::Display for KindName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// (field path, message), as the config module reports it.
type Invalid = (String, String);

/// One level of configuration and the YAML path of the object holding it.
#[derive(Clone, Copy)]
struct Level<'a> {
    raw: &'a RawHealthCheck,
    owner: &'a str,
    is_backend: bool,
}

impl Level<'_> {
    fn invalid(&self, name: &str, message: impl Into<String>) -> Invalid {
        (
            format!("{}.health_check.{name}", self.owner),
            message.into(),
        )
    }

    fn kind(&self) -> Result<Option<KindName>, Invalid> {
        let Some(name) = &self.raw.kind else {
            return Ok(None);
        };
        match KindName::ALL.into_iter().find(|k| k.as_str() == name) {
            Some(kind) => Ok(Some(kind)),
            None => Err(self.invalid(
                "type",
                format!("{name:?} is not one of: tcp, http, udp, none"),
            )),
        }
    }

    /// Checks each value set at this level on its own, so a bad value is
    /// reported where it was written even if every backend overrides it.
    fn check_values(&self) -> Result<(), Invalid> {
        let raw = self.raw;
        self.kind()?;
        if raw.port == Some(0) {
            return Err(self.invalid("port", "0 is out of range (1..=65535)"));
        }
        if let Some(path) = &raw.path {
            if !path.starts_with('/') {
                return Err(self.invalid("path", format!("{path:?} must start with '/'")));
            }
            self.check_header_text("path", path)?;
        }
        self.check_range("expect_status", raw.expect_status, EXPECT_STATUS_RANGE)?;
        if let Some(host) = &raw.host {
            if host.is_empty() {
                return Err(self.invalid("host", "\"\" is not a host name"));
            }
            self.check_header_text("host", host)?;
        }
        if let Some(payload) = &raw.payload {
            if payload.len() > MAX_UDP_PAYLOAD {
                return Err(self.invalid(
                    "payload",
                    format!(
                        "{} bytes is too long (at most {MAX_UDP_PAYLOAD})",
                        payload.len()
                    ),
                ));
            }
        }
        if raw.expect.as_deref() == Some("") {
            return Err(self.invalid("expect", "\"\" matches any reply; leave expect out instead"));
        }
        self.check_range("interval_ms", raw.interval_ms, INTERVAL_MS_RANGE)?;
        self.check_range("timeout_ms", raw.timeout_ms, TIMEOUT_MS_RANGE)?;
        self.check_range("rise", raw.rise, RISE_FALL_RANGE)?;
        self.check_range("fall", raw.fall, RISE_FALL_RANGE)
    }

    fn check_range<T: PartialOrd + fmt::Display>(
        &self,
        name: &str,
        value: Option<T>,
        range: RangeInclusive<T>,
    ) -> Result<(), Invalid> {
        match value {
            Some(v) if !range.contains(&v) => Err(self.invalid(
                name,
                format!("{v} is out of range ({}..={})", range.start(), range.end()),
            )),
            _ => Ok(()),
        }
    }

    /// Values that go into the request line or a header: a space or a line
    /// break would change the request's meaning.
    fn check_header_text(&self, name: &str, value: &str) -> Result<(), Invalid> {
        if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.invalid(
                name,
                format!("{value:?} must not contain spaces or control characters"),
            ));
        }
        Ok(())
    }

    /// Rejects fields meant for another type of check than `kind`, the type
    /// this level's own fields are used with.
    fn check_fields_apply(&self, kind: KindName) -> Result<(), Invalid> {
        if kind == KindName::None {
            // A disabled level may carry settings for backends that enable
            // a check; nothing here is used by it either way.
            return Ok(());
        }
        let raw = self.raw;
        let typed = [
            ("path", KindName::Http, raw.path.is_some()),
            ("expect_status", KindName::Http, raw.expect_status.is_some()),
            ("host", KindName::Http, raw.host.is_some()),
            ("payload", KindName::Udp, raw.payload.is_some()),
            ("expect", KindName::Udp, raw.expect.is_some()),
        ];
        for (name, owner, set) in typed {
            if set && owner != kind {
                return Err(self.invalid(
                    name,
                    format!("{name} is for {owner} checks; this check is {kind}"),
                ));
            }
        }
        Ok(())
    }
}

/// The most specific level that sets a field, and its value.
fn pick<'a, T>(
    vip: Option<Level<'a>>,
    backend: Option<Level<'a>>,
    get: impl Fn(&'a RawHealthCheck) -> Option<T>,
) -> Option<(T, Level<'a>)> {
    backend
        .into_iter()
        .chain(vip)
        .find_map(|level| get(level.raw).map(|v| (v, level)))
}

/// Merges the backend level over the VIP level (field by field), applies the
/// defaults and validates.
///
/// `vip_field` and `backend_field` are the YAML paths of the VIP and of the
/// backend (e.g. "vips[0]" and "vips[0].backends[2]"); errors name
/// "<path>.health_check.<field>" at the level where the bad value was
/// written. Returns `Ok(None)` when neither level configures a check or the
/// merged type is "none". When the backend sets a different type than the
/// VIP, the VIP's fields for its own type are not inherited.
pub fn resolve(
    vip_level: Option<&RawHealthCheck>,
    vip_field: &str,
    backend_level: Option<&RawHealthCheck>,
    backend_field: &str,
    vip_port: u16,
) -> Result<Option<CheckSpec>, (String, String)> {
    let vip = vip_level.map(|raw| Level {
        raw,
        owner: vip_field,
        is_backend: false,
    });
    let backend = backend_level.map(|raw| Level {
        raw,
        owner: backend_field,
        is_backend: true,
    });
    let Some(innermost) = backend.or(vip) else {
        return Ok(None);
    };
    for level in vip.iter().chain(backend.iter()) {
        level.check_values()?;
    }

    let vip_kind = match vip {
        Some(level) => level.kind()?,
        None => None,
    };
    let backend_kind = match backend {
        Some(level) => level.kind()?,
        None => None,
    };
    let kind = backend_kind.or(vip_kind).unwrap_or(KindName::Tcp);
    if let Some(level) = vip {
        level.check_fields_apply(vip_kind.unwrap_or(KindName::Tcp))?;
    }
    if let Some(level) = backend {
        level.check_fields_apply(kind)?;
    }
    let kind = match kind {
        KindName::None => return Ok(None),
        KindName::Tcp => CheckKind::Tcp,
        KindName::Http => CheckKind::Http {
            path: pick(vip, backend, |r| r.path.as_deref())
                .map_or(DEFAULT_HTTP_PATH, |(v, _)| v)
                .to_owned(),
            expect_status: pick(vip, backend, |r| r.expect_status)
                .map_or(DEFAULT_EXPECT_STATUS, |(v, _)| v),
            host: pick(vip, backend, |r| r.host.clone()).map(|(v, _)| v),
        },
        KindName::Udp => CheckKind::Udp {
            payload: pick(vip, backend, |r| r.payload.as_deref())
                .map_or(DEFAULT_UDP_PAYLOAD, |(v, _)| v)
                .as_bytes()
                .to_vec(),
            expect: pick(vip, backend, |r| r.expect.as_deref()).map(|(v, _)| v.as_bytes().to_vec()),
        },
    };

    let interval = pick(vip, backend, |r| r.interval_ms);
    let timeout = pick(vip, backend, |r| r.timeout_ms);
    let interval_ms = interval.map_or(DEFAULT_INTERVAL_MS, |(v, _)| v);
    let timeout_ms = timeout.map_or(DEFAULT_TIMEOUT_MS, |(v, _)| v);
    if timeout_ms >= interval_ms {
        // Blame the most specific level involved: that is where the
        // combination was made (e.g. a backend shortening the VIP's interval).
        let timeout_level = timeout.map(|(_, level)| level);
        let interval_level = interval.map(|(_, level)| level);
        let (level, name) = match (timeout_level, interval_level) {
            (Some(t), Some(i)) if i.is_backend && !t.is_backend => (i, "interval_ms"),
            (Some(t), _) => (t, "timeout_ms"),
            (None, Some(i)) => (i, "interval_ms"),
            // Not reached: the defaults are consistent (asserted where
            // they are defined).
            (None, None) => (innermost, "timeout_ms"),
        };
        let default = if timeout.is_none() { " (default)" } else { "" };
        return Err(level.invalid(
            name,
            format!("timeout_ms {timeout_ms}{default} must be less than interval_ms {interval_ms}"),
        ));
    }

    Ok(Some(CheckSpec {
        kind,
        port: pick(vip, backend, |r| r.port).map_or(vip_port, |(v, _)| v),
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_millis(timeout_ms),
        rise: pick(vip, backend, |r| r.rise).map_or(DEFAULT_RISE, |(v, _)| v),
        fall: pick(vip, backend, |r| r.fall).map_or(DEFAULT_FALL, |(v, _)| v),
    }))
}

/// Why one probe failed. The `Display` text is the short reason carried in
/// [`HealthEvent::reason`] and the logs.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("timeout after {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("bind: {}", io_reason(.0))]
    Bind(io::Error),
    #[error("connect: {}", io_reason(.0))]
    Connect(io::Error),
    #[error("send: {}", io_reason(.0))]
    Send(io::Error),
    #[error("recv: {}", io_reason(.0))]
    Recv(io::Error),
    #[error("connection closed before the status line")]
    Closed,
    #[error("status line longer than {MAX_STATUS_LINE} bytes")]
    StatusLineTooLong,
    #[error("malformed status line {0:?}")]
    BadStatusLine(String),
    #[error("status {got}, expected {expected}")]
    Status { got: u16, expected: u16 },
    #[error("reply of {len} bytes does not contain the expected text")]
    UnexpectedReply { len: usize },
}

/// "Connection refused (os error 111)" → "connection refused": the reason
/// follows "connect: " in a log line, where the errno number adds nothing.
fn io_reason(err: &io::Error) -> String {
    let text = err.to_string();
    let text = match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => &text[..at],
        _ => &text,
    };
    let mut chars = text.chars();
    match (chars.next(), chars.clone().next()) {
        // Lower-case "Connection", keep "IPv6".
        (Some(first), Some(second)) if first.is_uppercase() && second.is_lowercase() => {
            first.to_lowercase().chain(chars).collect()
        }
        _ => text.to_owned(),
    }
}

/// Probes `target` once; the whole probe (connect, request, reply) is bounded
/// by `timeout`.
pub async fn probe(
    target: SocketAddr,
    kind: &CheckKind,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let attempt = async {
        match kind {
            CheckKind::Tcp => TcpStream::connect(target)
                .await
                .map(drop)
                .map_err(ProbeError::Connect),
            CheckKind::Http {
                path,
                expect_status,
                host,
            } => probe_http(target, path, *expect_status, host.as_deref()).await,
            CheckKind::Udp { payload, expect } => {
                probe_udp(target, payload, expect.as_deref()).await
            }
        }
    };
    match time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_elapsed) => Err(ProbeError::Timeout(timeout)),
    }
}

async fn probe_http(
    target: SocketAddr,
    path: &str,
    expect_status: u16,
    host: Option<&str>,
) -> Result<(), ProbeError> {
    let mut stream = TcpStream::connect(target)
        .await
        .map_err(ProbeError::Connect)?;
    let host = host.map_or_else(|| default_host(target), str::to_owned);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n\
         Connection: close\r\nUser-Agent: xdplb-health\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(ProbeError::Send)?;
    let line = read_status_line(&mut stream).await?;
    let got = parse_status_line(&line).ok_or_else(|| {
        let quoted = &line[..line.len().min(QUOTED_RESPONSE_LEN)];
        ProbeError::BadStatusLine(String::from_utf8_lossy(quoted).into_owned())
    })?;
    if got != expect_status {
        return Err(ProbeError::Status {
            got,
            expected: expect_status,
        });
    }
    Ok(())
}

/// The Host header for a backend: its address, and the port unless it is
/// HTTP's default (RFC 9110, section 7.2).
fn default_host(target: SocketAddr) -> String {
    match (target.ip(), target.port()) {
        (IpAddr::V4(ip), 80) => ip.to_string(),
        (IpAddr::V6(ip), 80) => format!("[{ip}]"),
        _ => target.to_string(),
    }
}

/// Reads up to the first line break and returns the line without it.
async fn read_status_line(stream: &mut TcpStream) -> Result<Vec<u8>, ProbeError> {
    let mut line = Vec::with_capacity(128);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await.map_err(ProbeError::Recv)?;
        if n == 0 {
            return Err(ProbeError::Closed);
        }
        let start = line.len();
        line.extend_from_slice(&chunk[..n]);
        if let Some(end) = line[start..].iter().position(|&b| b == b'\n') {
            line.truncate(start + end);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(line);
        }
        if line.len() > MAX_STATUS_LINE {
            return Err(ProbeError::StatusLineTooLong);
        }
    }
}

/// The status code of "HTTP/1.x NNN[ reason]", or `None` for anything else.
fn parse_status_line(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/1.")?;
    match *rest {
        [minor, b' ', d0, d1, d2, ref tail @ ..]
            if minor.is_ascii_digit()
                && [d0, d1, d2].iter().all(u8::is_ascii_digit)
                && tail.first().is_none_or(|&b| b == b' ') =>
        {
            Some(u16::from(d0 - b'0') * 100 + u16::from(d1 - b'0') * 10 + u16::from(d2 - b'0'))
        }
        _ => None,
    }
}

async fn probe_udp(
    target: SocketAddr,
    payload: &[u8],
    expect: Option<&[u8]>,
) -> Result<(), ProbeError> {
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(ProbeError::Bind)?;
    // Connected, so only the backend's replies are accepted and an ICMP
    // port unreachable comes back as an error on recv.
    socket.connect(target).await.map_err(ProbeError::Connect)?;
    socket.send(payload).await.map_err(ProbeError::Send)?;
    let mut reply = vec![0u8; usize::from(u16::MAX)];
    let len = socket.recv(&mut reply).await.map_err(ProbeError::Recv)?;
    match expect {
        Some(expect) if !contains(&reply[..len], expect) => {
            Err(ProbeError::UnexpectedReply { len })
        }
        _ => Ok(()),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// A change of a backend's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
}

/// Turns probe results into transitions with rise/fall counts and flap
/// damping, for one backend. Pure: time is passed in.
///
/// A new tracker is Up, so that starting the daemon or reloading the
/// configuration does not take healthy backends out while the first probes
/// run; a broken backend goes Down after `fall` consecutive failures. A Down
/// backend comes back after `rise` consecutive successes, multiplied by the
/// flap damping factor (see the module documentation). A tracker for a
/// backend already known Down (`Tracker::starting`) starts Down, so that
/// its recovery is reported.
#[derive(Clone, Debug)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    up: bool,
    /// Consecutive results that disagree with the current state.
    streak: u32,
    /// Flap damping factor applied to `rise`: 1, 2, 4 or 8.
    multiplier: u32,
    /// The last Up→Down transition.
    last_down: Option<Instant>,
    /// The last Down→Up transition; `None` while Up since creation.
    up_since: Option<Instant>,
}

impl Tracker {
    /// `rise` and `fall` of 0 are treated as 1.
    pub fn new(rise: u32, fall: u32) -> Self {
        Self::starting(rise, fall, true)
    }

    /// A tracker that starts Up or Down: a check that takes over a backend
    /// whose state is known (adopted from a restarted daemon's datapath, or
    /// kept across a reload that changed the check) starts from that state.
    /// Starting Down, it reports Up after `rise` consecutive successes (no
    /// flap damping: no transition was seen).
    pub fn starting(rise: u32, fall: u32, up: bool) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            up,
            streak: 0,
            multiplier: 1,
            last_down: None,
            up_since: None,
        }
    }

    /// Records one probe result at `now`; returns the transition it causes.
    pub fn record(&mut self, ok: bool, now: Instant) -> Option<Transition> {
        if self.up {
            if self.stable_at(now) {
                self.multiplier = 1;
            }
            if ok {
                self.streak = 0;
                return None;
            }
            self.streak += 1;
            if self.streak < self.fall {
                return None;
            }
            let flapping = self
                .last_down
                .is_some_and(|last| now.saturating_duration_since(last) < FLAP_WINDOW);
            if flapping {
                self.multiplier = (self.multiplier * 2).min(MAX_RISE_MULTIPLIER);
            }
            self.up = false;
            self.streak = 0;
            self.last_down = Some(now);
            Some(Transition::Down)
        } else {
            if !ok {
                self.streak = 0;
                return None;
            }
            self.streak += 1;
            if self.streak < self.rise_required() {
                return None;
            }
            self.up = true;
            self.streak = 0;
            self.up_since = Some(now);
            Some(Transition::Up)
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Consecutive successes the next recovery needs, flap damping included.
    pub fn rise_required(&self) -> u32 {
        self.rise * self.multiplier
    }

    /// The flap damping factor currently applied to rise (1, 2, 4 or 8).
    pub fn rise_multiplier(&self) -> u32 {
        self.multiplier
    }

    fn stable_at(&self, now: Instant) -> bool {
        self.up_since
            .is_none_or(|since| now.saturating_duration_since(since) >= FLAP_WINDOW)
    }
}

/// A transition of one backend, as sent to the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent<K> {
    pub key: K,
    pub up: bool,
    /// For Down, why the last probe failed; for Up, what it took.
    pub reason: String,
}

/// A running check. Dropping it (or [`CheckHandle::abort`]) stops the check.
#[derive(Debug)]
#[must_use = "dropping the handle stops the check"]
pub struct CheckHandle {
    spec: CheckSpec,
    target: SocketAddr,
    task: JoinHandle<()>,
}

impl CheckHandle {
    /// The spec the check runs with, e.g. to keep it across a reload when
    /// unchanged (a new check starts Up again).
    pub fn spec(&self) -> &CheckSpec {
        &self.spec
    }

    /// The probed address: the backend's address and the check's port.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for CheckHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Spawns a task probing `target` (the backend's address, at `spec.port`)
/// every `spec.interval`, and sends a [`HealthEvent`] on every transition,
/// only then, starting from `up` (see [`Tracker::starting`]). The task
/// also ends when `tx`'s receiver is gone.
///
/// # Panics
///
/// Outside a Tokio runtime, like [`tokio::spawn`].
pub fn spawn<K>(
    key: K,
    target: IpAddr,
    spec: CheckSpec,
    up: bool,
    tx: UnboundedSender<HealthEvent<K>>,
) -> CheckHandle
where
    K: Clone + Send + Sync + 'static + fmt::Debug,
{
    let target = SocketAddr::new(target, spec.port);
    let task = tokio::spawn(run(key, target, spec.clone(), up, tx));
    CheckHandle { spec, target, task }
}

async fn run<K>(
    key: K,
    target: SocketAddr,
    spec: CheckSpec,
    up: bool,
    tx: UnboundedSender<HealthEvent<K>>,
) where
    K: Clone + fmt::Debug,
{
    let mut tracker = Tracker::starting(spec.rise, spec.fall, up);
    // `interval` panics on a zero period; a resolved spec is at least 100 ms.
    let mut ticks = time::interval(spec.interval.max(Duration::from_millis(1)));
    // After a stall (suspended host, busy runtime) probe once and keep the
    // period, rather than a burst of probes that could flip the state.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if tx.is_closed() {
            return;
        }
        let result = probe(target, &spec.kind, spec.timeout).await;
        let now = time::Instant::now().into_std();
        let Some(transition) = tracker.record(result.is_ok(), now) else {
            continue;
        };
        let up = transition == Transition::Up;
        let reason = match result {
            Err(err) => err.to_string(),
            Ok(()) if tracker.rise_multiplier() > 1 => format!(
                "{} consecutive checks passed (rise x{} after flapping)",
                tracker.rise_required(),
                tracker.rise_multiplier()
            ),
            Ok(()) => format!("{} consecutive checks passed", tracker.rise_required()),
        };
        // The receiver logs the transition with what it means for traffic.
        tracing::debug!(backend = ?key, %target, %reason, up, "health transition");
        let event = HealthEvent {
            key: key.clone(),
            up,
            reason,
        };
        if tx.send(event).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::{
        net::TcpListener,
        sync::mpsc,
        time::{sleep, timeout},
    };

    use super::*;

    const VIP: &str = "vips[0]";
    const BACKEND: &str = "vips[0].backends[2]";

    fn raw(yaml: &str) -> RawHealthCheck {
        serde_yaml::from_str(yaml).expect("valid health_check YAML")
    }

    fn resolve_ok(vip: Option<&str>, backend: Option<&str>) -> Option<CheckSpec> {
        let vip = vip.map(raw);
        let backend = backend.map(raw);
        resolve(vip.as_ref(), VIP, backend.as_ref(), BACKEND, 8080).expect("valid check")
    }

    fn resolve_err(vip: Option<&str>, backend: Option<&str>) -> (String, String) {
        let vip = vip.map(raw);
        let backend = backend.map(raw);
        match resolve(vip.as_ref(), VIP, backend.as_ref(), BACKEND, 8080) {
            Ok(spec) => panic!("expected an error, got {spec:?}"),
            Err(err) => err,
        }
    }

    fn err(field: &str, message: &str) -> (String, String) {
        (field.to_owned(), message.to_owned())
    }

    fn tcp_spec(port: u16) -> CheckSpec {
        CheckSpec {
            kind: CheckKind::Tcp,
            port,
            interval: Duration::from_millis(DEFAULT_INTERVAL_MS),
            timeout: Duration::from_millis(DEFAULT_TIMEOUT_MS),
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
        }
    }

    #[test]
    fn raw_check_parses_yaml_and_rejects_unknown_fields() {
        assert_eq!(
            raw("type: http\npath: /healthz\ninterval_ms: 200\ntimeout_ms: 100"),
            RawHealthCheck {
                kind: Some("http".into()),
                path: Some("/healthz".into()),
                interval_ms: Some(200),
                timeout_ms: Some(100),
                ..RawHealthCheck::default()
            }
        );
        let unknown = serde_yaml::from_str::<RawHealthCheck>("type: tcp\nintervall_ms: 200");
        assert!(unknown.is_err());
        let yaml = serde_yaml::to_string(&raw("type: udp\nfall: 4")).expect("serializes");
        assert_eq!(yaml, "type: udp\nfall: 4\n");
    }

    #[test]
    fn resolve_without_a_check_or_with_type_none_is_none() {
        assert_eq!(resolve_ok(None, None), None);
        assert_eq!(resolve_ok(Some("type: none"), None), None);
        assert_eq!(resolve_ok(Some("type: http"), Some("type: none")), None);
        assert_eq!(resolve_ok(None, Some("type: none\ninterval_ms: 200")), None);
    }

    #[test]
    fn resolve_applies_defaults() {
        assert_eq!(resolve_ok(Some("{}"), None), Some(tcp_spec(8080)));
        assert_eq!(resolve_ok(None, Some("type: tcp")), Some(tcp_spec(8080)));
        let http = resolve_ok(Some("type: http"), None).expect("a check");
        assert_eq!(
            http.kind,
            CheckKind::Http {
                path: "/".into(),
                expect_status: 200,
                host: None,
            }
        );
        let udp = resolve_ok(Some("type: udp"), None).expect("a check");
        assert_eq!(
            udp.kind,
            CheckKind::Udp {
                payload: b"ping".to_vec(),
                expect: None,
            }
        );
        assert_eq!(udp.port, 8080);
        assert_eq!(udp.interval, Duration::from_millis(1000));
        assert_eq!(udp.timeout, Duration::from_millis(500));
        assert_eq!((udp.rise, udp.fall), (2, 3));
    }

    #[test]
    fn resolve_merges_backend_over_vip_field_by_field() {
        let vip =
            "type: http\npath: /health\nhost: example.org\ninterval_ms: 2000\nrise: 5\nfall: 6";
        let backend = "port: 9090\npath: /ready\ntimeout_ms: 1500\nfall: 1";
        assert_eq!(
            resolve_ok(Some(vip), Some(backend)),
            Some(CheckSpec {
                kind: CheckKind::Http {
                    path: "/ready".into(),
                    expect_status: 200,
                    host: Some("example.org".into()),
                },
                port: 9090,
                interval: Duration::from_millis(2000),
                timeout: Duration::from_millis(1500),
                rise: 5,
                fall: 1,
            })
        );
        // The backend enables a check the VIP disabled, using its settings.
        let spec = resolve_ok(
            Some("type: none\npayload: hello\nrise: 4"),
            Some("type: udp"),
        );
        let spec = spec.expect("a check");
        assert_eq!(
            spec.kind,
            CheckKind::Udp {
                payload: b"hello".to_vec(),
                expect: None,
            }
        );
        assert_eq!(spec.rise, 4);
    }

    #[test]
    fn resolve_backend_changing_the_type_drops_the_vips_type_fields() {
        let spec = resolve_ok(
            Some("type: http\npath: /h\ninterval_ms: 300\ntimeout_ms: 100"),
            Some("type: tcp"),
        );
        let spec = spec.expect("a check");
        assert_eq!(spec.kind, CheckKind::Tcp);
        assert_eq!(spec.interval, Duration::from_millis(300));
    }

    #[test]
    fn resolve_reports_bad_values_where_they_were_written() {
        let cases = [
            (
                Some("fall: 0"),
                None,
                "vips[0].health_check.fall",
                "0 is out of range (1..=100)",
            ),
            (
                None,
                Some("rise: 101"),
                "vips[0].backends[2].health_check.rise",
                "101 is out of range (1..=100)",
            ),
            // A bad VIP value is reported even when the backend overrides it.
            (
                Some("rise: 0"),
                Some("rise: 2"),
                "vips[0].health_check.rise",
                "0 is out of range (1..=100)",
            ),
            (
                None,
                Some("type: icmp"),
                "vips[0].backends[2].health_check.type",
                "\"icmp\" is not one of: tcp, http, udp, none",
            ),
            (
                Some("type: TCP"),
                None,
                "vips[0].health_check.type",
                "\"TCP\" is not one of: tcp, http, udp, none",
            ),
            (
                Some("port: 0"),
                None,
                "vips[0].health_check.port",
                "0 is out of range (1..=65535)",
            ),
            (
                Some("interval_ms: 99"),
                None,
                "vips[0].health_check.interval_ms",
                "99 is out of range (100..=60000)",
            ),
            (
                Some("interval_ms: 60001"),
                None,
                "vips[0].health_check.interval_ms",
                "60001 is out of range (100..=60000)",
            ),
            (
                Some("timeout_ms: 0"),
                None,
                "vips[0].health_check.timeout_ms",
                "0 is out of range (1..=59999)",
            ),
            (
                Some("type: http\npath: health"),
                None,
                "vips[0].health_check.path",
                "\"health\" must start with '/'",
            ),
            (
                Some("type: http\npath: /a b"),
                None,
                "vips[0].health_check.path",
                "\"/a b\" must not contain spaces or control characters",
            ),
            (
                Some("type: http\nhost: \"a\\r\\nX: y\""),
                None,
                "vips[0].health_check.host",
                "\"a\\r\\nX: y\" must not contain spaces or control characters",
            ),
            (
                Some("type: http\nhost: \"\""),
                None,
                "vips[0].health_check.host",
                "\"\" is not a host name",
            ),
            (
                Some("type: http\nexpect_status: 99"),
                None,
                "vips[0].health_check.expect_status",
                "99 is out of range (100..=599)",
            ),
            (
                Some("type: http\nexpect_status: 600"),
                None,
                "vips[0].health_check.expect_status",
                "600 is out of range (100..=599)",
            ),
            (
                Some("type: udp\nexpect: \"\""),
                None,
                "vips[0].health_check.expect",
                "\"\" matches any reply; leave expect out instead",
            ),
        ];
        for (vip, backend, field, message) in cases {
            assert_eq!(
                resolve_err(vip, backend),
                err(field, message),
                "vip {vip:?}, backend {backend:?}"
            );
        }
        let long = format!("type: udp\npayload: {}", "x".repeat(MAX_UDP_PAYLOAD + 1));
        assert_eq!(
            resolve_err(Some(&long), None),
            err(
                "vips[0].health_check.payload",
                "65508 bytes is too long (at most 65507)"
            )
        );
    }

    #[test]
    fn resolve_requires_timeout_less_than_interval_and_blames_the_innermost_level() {
        let cases = [
            (
                Some("interval_ms: 500\ntimeout_ms: 800"),
                None,
                "vips[0].health_check.timeout_ms",
                "timeout_ms 800 must be less than interval_ms 500",
            ),
            (
                Some("timeout_ms: 1000"),
                None,
                "vips[0].health_check.timeout_ms",
                "timeout_ms 1000 must be less than interval_ms 1000",
            ),
            (
                Some("interval_ms: 200"),
                None,
                "vips[0].health_check.interval_ms",
                "timeout_ms 500 (default) must be less than interval_ms 200",
            ),
            // The backend shortened the VIP's interval: that is the mistake.
            (
                Some("timeout_ms: 800"),
                Some("interval_ms: 500"),
                "vips[0].backends[2].health_check.interval_ms",
                "timeout_ms 800 must be less than interval_ms 500",
            ),
            (
                Some("interval_ms: 500"),
                Some("timeout_ms: 800"),
                "vips[0].backends[2].health_check.timeout_ms",
                "timeout_ms 800 must be less than interval_ms 500",
            ),
        ];
        for (vip, backend, field, message) in cases {
            assert_eq!(
                resolve_err(vip, backend),
                err(field, message),
                "vip {vip:?}, backend {backend:?}"
            );
        }
        assert!(resolve_ok(Some("interval_ms: 500\ntimeout_ms: 499"), None).is_some());
    }

    #[test]
    fn resolve_rejects_fields_for_another_type() {
        let cases = [
            (
                Some("type: tcp\npath: /"),
                None,
                "vips[0].health_check.path",
                "path is for http checks; this check is tcp",
            ),
            // No type means tcp.
            (
                Some("expect_status: 204"),
                None,
                "vips[0].health_check.expect_status",
                "expect_status is for http checks; this check is tcp",
            ),
            (
                Some("type: udp\nhost: a"),
                None,
                "vips[0].health_check.host",
                "host is for http checks; this check is udp",
            ),
            (
                Some("type: http"),
                Some("payload: x"),
                "vips[0].backends[2].health_check.payload",
                "payload is for udp checks; this check is http",
            ),
            (
                None,
                Some("type: tcp\nexpect: pong"),
                "vips[0].backends[2].health_check.expect",
                "expect is for udp checks; this check is tcp",
            ),
        ];
        for (vip, backend, field, message) in cases {
            assert_eq!(
                resolve_err(vip, backend),
                err(field, message),
                "vip {vip:?}, backend {backend:?}"
            );
        }
    }

    fn feed(tracker: &mut Tracker, results: &[bool], now: Instant) -> Vec<Option<Transition>> {
        results.iter().map(|&ok| tracker.record(ok, now)).collect()
    }

    #[test]
    fn tracker_starts_up_and_goes_down_after_exactly_fall_failures() {
        let now = Instant::now();
        let mut tracker = Tracker::new(2, 3);
        assert!(tracker.is_up());
        assert_eq!(feed(&mut tracker, &[false, false], now), [None, None]);
        assert!(tracker.is_up());
        assert_eq!(tracker.record(false, now), Some(Transition::Down));
        assert!(!tracker.is_up());
        assert_eq!(tracker.record(false, now), None);
    }

    #[test]
    fn tracker_counts_only_consecutive_results() {
        let now = Instant::now();
        let mut tracker = Tracker::new(2, 3);
        let results = [false, false, true, false, false, true];
        assert_eq!(feed(&mut tracker, &results, now), [None; 6]);
        assert!(tracker.is_up());
        assert_eq!(
            feed(&mut tracker, &[false; 3], now)[2],
            Some(Transition::Down)
        );
        assert_eq!(feed(&mut tracker, &[true, false, true], now), [None; 3]);
        assert_eq!(tracker.record(true, now), Some(Transition::Up));
    }

    #[test]
    fn tracker_comes_back_after_exactly_rise_successes() {
        let now = Instant::now();
        let mut tracker = Tracker::new(4, 1);
        assert_eq!(tracker.record(false, now), Some(Transition::Down));
        assert_eq!(feed(&mut tracker, &[true; 3], now), [None; 3]);
        assert_eq!(tracker.record(true, now), Some(Transition::Up));
        assert!(tracker.is_up());
        assert_eq!(tracker.record(true, now), None);
    }

    /// Takes an Up tracker Down at `at` and back Up, counting the successes
    /// the recovery took.
    fn flap(tracker: &mut Tracker, at: Instant) -> u32 {
        assert!(tracker.is_up());
        let fall = feed(tracker, &[false; 3], at);
        assert_eq!(fall.last(), Some(&Some(Transition::Down)));
        let mut successes = 0;
        while tracker.record(true, at).is_none() {
            successes += 1;
            assert!(successes < 1000, "never came back");
        }
        successes + 1
    }

    #[test]
    fn damping_doubles_rise_for_flaps_within_a_minute_and_caps_at_8x() {
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut tracker = Tracker::new(2, 3);
        assert_eq!(flap(&mut tracker, at(0)), 2);
        assert_eq!(flap(&mut tracker, at(10)), 4);
        assert_eq!(flap(&mut tracker, at(20)), 8);
        assert_eq!(flap(&mut tracker, at(30)), 16);
        assert_eq!(tracker.rise_multiplier(), MAX_RISE_MULTIPLIER);
        assert_eq!(flap(&mut tracker, at(40)), 16);
        // 59 s after the previous down still counts as flapping.
        assert_eq!(flap(&mut tracker, at(99)), 16);
    }

    #[test]
    fn damping_resets_after_a_minute_up() {
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut tracker = Tracker::new(2, 3);
        assert_eq!(flap(&mut tracker, at(0)), 2);
        assert_eq!(flap(&mut tracker, at(5)), 4);
        assert_eq!(flap(&mut tracker, at(10)), 8);
        // Up since 10 s; at 69 s not yet a minute.
        assert_eq!(tracker.record(true, at(69)), None);
        assert_eq!(tracker.rise_multiplier(), 4);
        assert_eq!(tracker.record(true, at(70)), None);
        assert_eq!(tracker.rise_multiplier(), 1);
        assert_eq!(tracker.rise_required(), 2);
        assert_eq!(flap(&mut tracker, at(75)), 2);
        // A failure-only minute up also resets it, seen at the next down.
        assert_eq!(flap(&mut tracker, at(80)), 4);
        assert_eq!(
            feed(&mut tracker, &[false; 3], at(140))[2],
            Some(Transition::Down)
        );
        assert_eq!(tracker.rise_required(), 2);
    }

    #[test]
    fn damping_ignores_downs_more_than_a_minute_apart() {
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut tracker = Tracker::new(3, 3);
        // Down for long stretches, up only briefly: no flapping as defined.
        let mut down_at = 0;
        for _ in 0..4 {
            assert_eq!(
                feed(&mut tracker, &[false; 3], at(down_at))[2],
                Some(Transition::Down)
            );
            assert_eq!(
                feed(&mut tracker, &[true; 3], at(down_at + 59))[2],
                Some(Transition::Up)
            );
            down_at += 60;
        }
        assert_eq!(tracker.rise_required(), 3);
    }

    #[test]
    fn tracker_treats_zero_rise_and_fall_as_one() {
        let now = Instant::now();
        let mut tracker = Tracker::new(0, 0);
        assert_eq!(tracker.record(false, now), Some(Transition::Down));
        assert_eq!(tracker.record(true, now), Some(Transition::Up));
    }

    fn localhost(port: u16) -> SocketAddr {
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)
    }

    /// An address on localhost where nothing listens (TCP and UDP).
    async fn closed_port() -> SocketAddr {
        let socket = UdpSocket::bind(localhost(0)).await.expect("bind udp");
        let addr = socket.local_addr().expect("local addr");
        drop(socket);
        addr
    }

    async fn probe_reason(target: SocketAddr, kind: &CheckKind, timeout_ms: u64) -> String {
        match probe(target, kind, Duration::from_millis(timeout_ms)).await {
            Ok(()) => panic!("probe of {target} succeeded, expected a failure"),
            Err(err) => err.to_string(),
        }
    }

    #[tokio::test]
    async fn tcp_probe_succeeds_when_listening() {
        let listener = TcpListener::bind(localhost(0)).await.expect("bind");
        let target = listener.local_addr().expect("local addr");
        probe(target, &CheckKind::Tcp, Duration::from_millis(500))
            .await
            .expect("tcp probe");
    }

    #[tokio::test]
    async fn tcp_probe_fails_when_refused() {
        let target = closed_port().await;
        assert_eq!(
            probe_reason(target, &CheckKind::Tcp, 500).await,
            "connect: connection refused"
        );
    }

    /// Serves one HTTP connection with `response` and returns the request.
    async fn http_server(response: &'static [u8]) -> (SocketAddr, JoinHandle<String>) {
        let listener = TcpListener::bind(localhost(0)).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.expect("accept");
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                let n = conn.read(&mut chunk).await.expect("read request");
                assert_ne!(n, 0, "request ended early: {request:?}");
                request.extend_from_slice(&chunk[..n]);
            }
            if !response.is_empty() {
                conn.write_all(response).await.expect("write response");
            } else {
                // Silent server: hold the connection open.
                sleep(Duration::from_secs(2)).await;
            }
            String::from_utf8(request).expect("ASCII request")
        });
        (addr, server)
    }

    fn http(path: &str, expect_status: u16, host: Option<&str>) -> CheckKind {
        CheckKind::Http {
            path: path.into(),
            expect_status,
            host: host.map(str::to_owned),
        }
    }

    #[tokio::test]
    async fn http_probe_succeeds_on_the_expected_status() {
        let (target, server) = http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        probe(
            target,
            &http("/healthz?full=1", 200, None),
            Duration::from_millis(500),
        )
        .await
        .expect("http probe");
        let request = server.await.expect("server");
        assert_eq!(
            request,
            format!(
                "GET /healthz?full=1 HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\
                 Connection: close\r\nUser-Agent: xdplb-health\r\n\r\n",
                target.port()
            )
        );

        let (target, server) = http_server(b"HTTP/1.0 204\r\n\r\n").await;
        probe(
            target,
            &http("/", 204, Some("svc.example")),
            Duration::from_millis(500),
        )
        .await
        .expect("http probe");
        assert!(server
            .await
            .expect("server")
            .contains("\r\nHost: svc.example\r\n"));
    }

    #[tokio::test]
    async fn http_probe_fails_on_another_status() {
        let (target, _server) = http_server(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        assert_eq!(
            probe_reason(target, &http("/", 200, None), 500).await,
            "status 503, expected 200"
        );
    }

    #[tokio::test]
    async fn http_probe_fails_on_garbage() {
        let (target, _server) = http_server(b"SSH-2.0-OpenSSH_9.6\r\n").await;
        assert_eq!(
            probe_reason(target, &http("/", 200, None), 500).await,
            "malformed status line \"SSH-2.0-OpenSSH_9.6\""
        );
        let (target, _server) = http_server(b"HTTP/1.1 200OK\r\n").await;
        assert_eq!(
            probe_reason(target, &http("/", 200, None), 500).await,
            "malformed status line \"HTTP/1.1 200OK\""
        );
    }

    #[tokio::test]
    async fn http_probe_times_out_on_a_silent_server() {
        let (target, _server) = http_server(b"").await;
        assert_eq!(
            probe_reason(target, &http("/", 200, None), 200).await,
            "timeout after 200 ms"
        );
    }

    #[tokio::test]
    async fn http_probe_fails_when_refused() {
        let target = closed_port().await;
        assert_eq!(
            probe_reason(target, &http("/", 200, None), 500).await,
            "connect: connection refused"
        );
    }

    #[test]
    fn status_line_parsing_is_strict() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503"), Some(503));
        assert_eq!(parse_status_line(b"HTTP/1.1 404 Not Found"), Some(404));
        for bad in [
            &b""[..],
            b"HTTP/1.1",
            b"HTTP/1.1 20",
            b"HTTP/1.1 2000",
            b"HTTP/1.1  200",
            b"HTTP/2 200",
            b"HTTP/1.x 200",
            b"http/1.1 200",
            b"HTTP/1.1 2x0",
            b"ICY 200 OK",
        ] {
            assert_eq!(
                parse_status_line(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn default_host_brackets_ipv6_and_omits_port_80() {
        let v6: IpAddr = "2001:db8::1".parse().expect("address");
        assert_eq!(default_host(localhost(80)), "127.0.0.1");
        assert_eq!(default_host(localhost(8080)), "127.0.0.1:8080");
        assert_eq!(default_host(SocketAddr::new(v6, 80)), "[2001:db8::1]");
        assert_eq!(
            default_host(SocketAddr::new(v6, 8080)),
            "[2001:db8::1]:8080"
        );
    }

    #[test]
    fn io_reasons_are_short() {
        let refused = io::Error::from_raw_os_error(111);
        assert_eq!(io_reason(&refused), "connection refused");
        assert_eq!(io_reason(&io::Error::other("IPv6 is off")), "IPv6 is off");
    }

    /// Answers every datagram with `reply` until dropped.
    async fn udp_server(reply: &'static [u8]) -> (SocketAddr, JoinHandle<()>) {
        let socket = UdpSocket::bind(localhost(0)).await.expect("bind udp");
        let addr = socket.local_addr().expect("local addr");
        let server = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let (len, from) = socket.recv_from(&mut buf).await.expect("recv");
                assert_eq!(&buf[..len], b"ping");
                socket.send_to(reply, from).await.expect("send");
            }
        });
        (addr, server)
    }

    fn udp(expect: Option<&str>) -> CheckKind {
        CheckKind::Udp {
            payload: b"ping".to_vec(),
            expect: expect.map(|e| e.as_bytes().to_vec()),
        }
    }

    #[tokio::test]
    async fn udp_probe_succeeds_on_a_reply() {
        let (target, server) = udp_server(b"+pong\n").await;
        let timeout = Duration::from_millis(500);
        probe(target, &udp(None), timeout).await.expect("any reply");
        probe(target, &udp(Some("pong")), timeout)
            .await
            .expect("reply with pong");
        server.abort();
    }

    #[tokio::test]
    async fn udp_probe_fails_on_a_reply_without_the_expected_text() {
        let (target, server) = udp_server(b"nope").await;
        assert_eq!(
            probe_reason(target, &udp(Some("pong")), 500).await,
            "reply of 4 bytes does not contain the expected text"
        );
        server.abort();
    }

    #[tokio::test]
    async fn udp_probe_times_out_without_a_reply() {
        let silent = UdpSocket::bind(localhost(0)).await.expect("bind udp");
        let target = silent.local_addr().expect("local addr");
        assert_eq!(
            probe_reason(target, &udp(None), 200).await,
            "timeout after 200 ms"
        );
    }

    #[tokio::test]
    async fn udp_probe_fails_on_port_unreachable() {
        let target = closed_port().await;
        assert_eq!(
            probe_reason(target, &udp(None), 1000).await,
            "recv: connection refused"
        );
    }

    async fn next_event<K>(
        rx: &mut mpsc::UnboundedReceiver<HealthEvent<K>>,
        within: Duration,
    ) -> HealthEvent<K> {
        match timeout(within, rx.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => panic!("check task ended"),
            Err(_) => panic!("no event within {within:?}"),
        }
    }

    /// A TCP check fast enough for a test: every 100 ms, rise 2, fall 3.
    fn quick_tcp_spec(port: u16) -> CheckSpec {
        CheckSpec {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(50),
            rise: 2,
            fall: 3,
            ..tcp_spec(port)
        }
    }

    /// The event of `key` coming back after `quick_tcp_spec`'s rise.
    fn came_up(key: &str) -> HealthEvent<&str> {
        HealthEvent {
            key,
            up: true,
            reason: "2 consecutive checks passed".into(),
        }
    }

    #[tokio::test]
    async fn spawned_check_reports_down_once_then_up() {
        let listener = TcpListener::bind(localhost(0)).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let spec = quick_tcp_spec(addr.port());
        let slack = Duration::from_millis(150);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let handle = spawn("web-1", addr.ip(), spec.clone(), true, tx);
        assert_eq!(handle.spec(), &spec);
        assert_eq!(handle.target(), addr);

        // Healthy from the start: no event.
        sleep(Duration::from_millis(250)).await;
        assert!(rx.try_recv().is_err());

        drop(listener);
        let down = next_event(&mut rx, spec.interval * spec.fall + spec.timeout + slack).await;
        assert_eq!(
            down,
            HealthEvent {
                key: "web-1",
                up: false,
                reason: "connect: connection refused".into(),
            }
        );
        // Still failing, but only transitions are reported.
        assert!(timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err());

        let _listener = TcpListener::bind(addr).await.expect("rebind the same port");
        let up = next_event(&mut rx, spec.interval * spec.rise + slack).await;
        assert_eq!(up, came_up("web-1"));
    }

    #[test]
    fn tracker_starting_down_reports_up_after_rise_successes() {
        let now = Instant::now();
        let mut tracker = Tracker::starting(3, 2, false);
        assert!(!tracker.is_up());
        assert_eq!(feed(&mut tracker, &[true, true], now), [None, None]);
        // A failure restarts the count.
        assert_eq!(tracker.record(false, now), None);
        assert_eq!(
            feed(&mut tracker, &[true, true, true], now),
            [None, None, Some(Transition::Up)]
        );
        // No transition was seen before: no flap damping.
        assert_eq!(tracker.rise_multiplier(), 1);
        assert_eq!(
            feed(&mut tracker, &[false, false], now),
            [None, Some(Transition::Down)]
        );
    }

    /// A check taking over a backend known to be down (a restarted daemon
    /// adopting the datapath, a reload that changed the check) reports the
    /// recovery of a backend that is healthy by now; a check that started
    /// Up would never report it.
    #[tokio::test]
    async fn spawned_check_starting_down_reports_a_healthy_backend_up() {
        let listener = TcpListener::bind(localhost(0)).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let spec = quick_tcp_spec(addr.port());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _handle = spawn("web-1", addr.ip(), spec.clone(), false, tx);
        let up = next_event(
            &mut rx,
            spec.interval * spec.rise + Duration::from_millis(150),
        )
        .await;
        assert_eq!(up, came_up("web-1"));
        drop(listener);
    }

    #[tokio::test]
    async fn dropping_the_handle_stops_the_check() {
        let target = closed_port().await;
        let mut spec = tcp_spec(target.port());
        spec.interval = Duration::from_millis(100);
        spec.timeout = Duration::from_millis(50);
        let (tx, mut rx) = mpsc::unbounded_channel::<HealthEvent<u32>>();
        let handle = spawn(7, target.ip(), spec, true, tx);
        drop(handle);
        // The task, and with it the only sender, is gone before any event.
        assert_eq!(
            timeout(Duration::from_millis(500), rx.recv()).await,
            Ok(None)
        );
    }
}
