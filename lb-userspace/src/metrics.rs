//! Prometheus endpoint: renders a [`Stats`] snapshot as OpenMetrics text and
//! serves it over HTTP.
//!
//! The counters are absolute values read from the BPF maps, so every scrape
//! builds a fresh registry from one snapshot instead of keeping live metric
//! objects in sync with the datapath.

use std::{fmt, io, sync::Arc};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use prometheus_client::{
    collector::Collector,
    encoding::{text, DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder},
    metrics::{counter::ConstCounter, gauge::ConstGauge, TypedMetric},
    registry::{Registry, Unit},
};
use thiserror::Error;
use tokio::net::TcpListener;

use crate::api::{BackendState, BackendStatus, Stats, VipStatus};

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("binding the metrics endpoint {addr}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("serving the metrics endpoint")]
    Serve(#[source] io::Error),
}

/// Binds the metrics endpoint, e.g. [`crate::api::DEFAULT_METRICS_ADDR`].
pub async fn bind(addr: &str) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind {
            addr: addr.to_owned(),
            source,
        })
}

type Source = Arc<dyn Fn() -> Result<Stats, String> + Send + Sync>;

/// Serves `GET /metrics` until the task is dropped or aborted; it only returns
/// if the listener fails for good.
///
/// `source` is called once per scrape on the blocking pool, so it may wait on
/// the state owner; its `Err` becomes a 503 with the message as the body.
pub async fn serve(
    listener: TcpListener,
    source: impl Fn() -> Result<Stats, String> + Send + Sync + 'static,
) -> Result<(), MetricsError> {
    let source: Source = Arc::new(source);
    let app = Router::new()
        .route("/", get(root))
        .route("/metrics", get(scrape))
        .with_state(source);
    axum::serve(listener, app)
        .await
        .map_err(MetricsError::Serve)
}

async fn root() -> &'static str {
    "xdplb: Prometheus metrics are at /metrics\n"
}

async fn scrape(State(source): State<Source>) -> Response {
    let rendered = tokio::task::spawn_blocking(move || source().map(|stats| encode(&stats))).await;
    match rendered {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Ok(Err(message)) => (StatusCode::SERVICE_UNAVAILABLE, message + "\n").into_response(),
        Err(join) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("collecting the stats failed: {join}\n"),
        )
            .into_response(),
    }
}

/// Renders `stats` in the OpenMetrics text format, `# EOF` included.
pub fn encode(stats: &Stats) -> String {
    let mut registry = Registry::with_prefix("xdplb");
    registry.register_collector(Box::new(Snapshot(stats.clone())));
    let mut out = String::new();
    text::encode(&mut out, &registry).expect("encoding into a String cannot fail");
    out
}

/// One scrape's worth of values; a collector (rather than registered metric
/// families) keeps the series in snapshot order, so scrapes diff cleanly.
#[derive(Debug)]
struct Snapshot(Stats);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Stats {
            vips,
            backends,
            reasons,
            ring,
        } = &self.0;
        let e = &mut encoder;

        family(
            e,
            "vip_packets",
            "Packets load balanced for the VIP",
            None,
            per_vip(vips, |v| ConstCounter::new(v.packets)),
        )?;
        family(
            e,
            "vip",
            "Bytes load balanced for the VIP",
            Some(&Unit::Bytes),
            per_vip(vips, |v| ConstCounter::new(v.bytes)),
        )?;
        family(
            e,
            "vip_new_flows",
            "Flows to the VIP assigned a backend",
            None,
            per_vip(vips, |v| ConstCounter::new(v.new_flows)),
        )?;
        family(
            e,
            "vip_active_connections",
            "Flows to the VIP currently tracked",
            None,
            per_vip(vips, |v| ConstGauge::new(v.active_connections)),
        )?;
        family(
            e,
            "vip_backends_active",
            "Backends of the VIP currently in its ring",
            None,
            per_vip(vips, |v| ConstGauge::new(v.active_backends)),
        )?;

        family(
            e,
            "backend_packets",
            "Packets sent to the backend",
            None,
            per_backend(backends, |b| ConstCounter::new(b.packets)),
        )?;
        family(
            e,
            "backend",
            "Bytes sent to the backend",
            Some(&Unit::Bytes),
            per_backend(backends, |b| ConstCounter::new(b.bytes)),
        )?;
        family(
            e,
            "backend_new_flows",
            "Flows assigned to the backend",
            None,
            per_backend(backends, |b| ConstCounter::new(b.new_flows)),
        )?;
        family(
            e,
            "backend_closed_flows",
            "Flows of the backend that ended (FIN/RST, idle expiry, or moved off a down backend)",
            None,
            per_backend(backends, |b| ConstCounter::new(b.closed_flows)),
        )?;
        family(
            e,
            "backend_active_connections",
            "Flows to the backend currently tracked",
            None,
            per_backend(backends, |b| ConstGauge::new(b.active_connections)),
        )?;
        family(
            e,
            "backend_weight",
            "Configured weight of the backend in the VIP's ring",
            None,
            per_backend(backends, |b| ConstGauge::new(b.weight)),
        )?;
        family(
            e,
            "backend_ring_share",
            "Share of the VIP's ring slots the backend holds (0 to 1), the share of new flows \
             it gets; 0 out of the ring",
            None,
            per_backend(backends, |b| ConstGauge::new(b.ring_share)),
        )?;
        family(
            e,
            "backend_up",
            "Whether the backend is up (0 only when its health check failed)",
            None,
            per_backend(backends, |b| {
                ConstGauge::new(u32::from(b.state != BackendState::Down))
            }),
        )?;
        family(
            e,
            "backend_state",
            "Backend state: 1 for the current state, 0 for the others",
            None,
            backends.iter().flat_map(|b| {
                STATES.map(|state| {
                    let labels = StateLabels {
                        backend: BackendLabels::of(b),
                        state: state.as_str(),
                    };
                    (labels, ConstGauge::new(u32::from(b.state == state)))
                })
            }),
        )?;

        family(
            e,
            "packets_not_balanced",
            "Packets the datapath passed to the kernel or dropped instead of balancing, by reason",
            None,
            reasons.iter().map(|(reason, &count)| {
                let labels = ReasonLabels {
                    reason: reason.clone(),
                    action: action(reason),
                };
                (labels, ConstCounter::new(count))
            }),
        )?;

        single(
            e,
            "ring_rebuilds",
            "Maglev rings rebuilt and swapped in since the daemon started",
            None,
            ConstCounter::new(ring.rebuilds),
        )?;
        single(
            e,
            "ring_rebuild",
            "Time spent rebuilding and writing Maglev rings",
            Some(&Unit::Seconds),
            ConstCounter::new(ring.rebuild_seconds_total),
        )?;
        single(
            e,
            "ring_last_rebuild",
            "Duration of the last Maglev ring rebuild",
            Some(&Unit::Seconds),
            ConstGauge::new(ring.last_rebuild_seconds),
        )
    }
}

/// Writes one metric family; a family without series is left out, as the
/// registry does for empty metric families. The encoder appends the unit and,
/// for counters, `_total` to `name`: `("vip", Bytes)` is `xdplb_vip_bytes_total`.
fn family<L: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut series = series.into_iter().peekable();
    if series.peek().is_none() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, unit, M::TYPE)?;
    for (labels, value) in series {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes a metric without labels; `name` as for [`family`].
fn single<M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: M,
) -> fmt::Result {
    value.encode(encoder.encode_descriptor(name, help, unit, M::TYPE)?)
}

fn per_vip<'s, M>(
    vips: &'s [VipStatus],
    value: impl Fn(&VipStatus) -> M + 's,
) -> impl Iterator<Item = (VipLabels, M)> + 's {
    vips.iter().map(move |v| (VipLabels::of(v), value(v)))
}

fn per_backend<'s, M>(
    backends: &'s [BackendStatus],
    value: impl Fn(&BackendStatus) -> M + 's,
) -> impl Iterator<Item = (BackendLabels, M)> + 's {
    backends
        .iter()
        .map(move |b| (BackendLabels::of(b), value(b)))
}

#[derive(Debug, EncodeLabelSet)]
struct VipLabels {
    /// `address:port/protocol`, as everywhere in the API.
    vip: String,
    #[prometheus(flatten)]
    name: VipName,
}

impl VipLabels {
    fn of(vip: &VipStatus) -> Self {
        Self {
            vip: vip.vip.clone(),
            name: VipName(vip.name.clone()),
        }
    }
}

/// The VIP's `name` label, left out for an unnamed VIP rather than written as
/// `name=""`.
#[derive(Debug)]
struct VipName(Option<String>);

impl EncodeLabelSet for VipName {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        match &self.0 {
            Some(name) => [("name", name.as_str())].encode(encoder),
            None => Ok(()),
        }
    }
}

#[derive(Debug, EncodeLabelSet)]
struct BackendLabels {
    vip: String,
    /// The address only: the port is the VIP's (L2 DSR).
    backend: String,
}

impl BackendLabels {
    fn of(backend: &BackendStatus) -> Self {
        Self {
            vip: backend.vip.clone(),
            backend: backend.address.to_string(),
        }
    }
}

#[derive(Debug, EncodeLabelSet)]
struct StateLabels {
    #[prometheus(flatten)]
    backend: BackendLabels,
    state: &'static str,
}

#[derive(Debug, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
    action: &'static str,
}

const STATES: [BackendState; 4] = [
    BackendState::Active,
    BackendState::Draining,
    BackendState::Drained,
    BackendState::Down,
];

/// What the datapath did with a packet counted under `reason`; reason names
/// carry it as their prefix (`lb_common::Reason::name`).
fn action(reason: &str) -> &'static str {
    if reason.starts_with("pass_") {
        "pass"
    } else if reason.starts_with("drop_") {
        "drop"
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        io::{Read, Write},
        net::{IpAddr, SocketAddr},
    };

    use tokio::task::JoinHandle;

    use super::*;
    use crate::api::{Health, RingStats};

    const VIP4: &str = "10.200.100.1:8080/tcp";
    const VIP6: &str = "[fd00::100]:53/udp";

    fn backend(vip: &str, address: &str, state: BackendState, n: u64) -> BackendStatus {
        BackendStatus {
            vip: vip.to_owned(),
            address: address.parse().unwrap(),
            port: 0,
            weight: 100 + u32::try_from(n).unwrap(),
            state,
            health: match state {
                BackendState::Down => Health::Down,
                _ => Health::Up,
            },
            active_connections: n + 1,
            packets: 120 + n,
            bytes: 1000 + n,
            new_flows: 10 + n,
            closed_flows: 5 + n,
            mac: "02:00:00:00:00:01".to_owned(),
            ring_share: 0.25,
        }
    }

    fn vip(vip: &str, name: Option<&str>, address: &str, port: u16, proto: &str) -> VipStatus {
        VipStatus {
            vip: vip.to_owned(),
            name: name.map(str::to_owned),
            address: address.parse::<IpAddr>().unwrap(),
            port,
            protocol: proto.to_owned(),
            affinity: "flow".to_owned(),
            scheduler: "maglev".to_owned(),
            backends: 2,
            active_backends: 1,
            active_connections: 7,
            packets: 500,
            bytes: 64_000,
            new_flows: 42,
        }
    }

    fn sample() -> Stats {
        Stats {
            vips: vec![
                vip(VIP4, Some("web"), "10.200.100.1", 8080, "tcp"),
                vip(VIP6, None, "fd00::100", 53, "udp"),
            ],
            backends: vec![
                backend(VIP4, "10.200.0.11", BackendState::Active, 3),
                backend(VIP4, "10.200.0.12", BackendState::Down, 0),
                backend(VIP6, "fd00::11", BackendState::Draining, 1),
                backend(VIP6, "fd00::12", BackendState::Active, 2),
            ],
            reasons: BTreeMap::from([
                ("drop_no_backend".to_owned(), 4),
                ("pass_not_vip".to_owned(), 17),
            ]),
            ring: RingStats {
                rebuilds: 3,
                rebuild_seconds_total: 0.75,
                last_rebuild_seconds: 0.25,
            },
        }
    }

    fn assert_has(text: &str, line: &str) {
        assert!(
            text.lines().any(|l| l == line),
            "missing line {line:?} in:\n{text}"
        );
    }

    #[test]
    fn encode_exports_every_metric() {
        let text = encode(&sample());
        let b4 = format!(r#"vip="{VIP4}",backend="10.200.0.11""#);
        let down = format!(r#"vip="{VIP4}",backend="10.200.0.12""#);
        let draining = format!(r#"vip="{VIP6}",backend="fd00::11""#);

        for line in [
            format!(r#"xdplb_vip_packets_total{{vip="{VIP4}",name="web"}} 500"#),
            format!(r#"xdplb_vip_packets_total{{vip="{VIP6}"}} 500"#),
            format!(r#"xdplb_vip_bytes_total{{vip="{VIP4}",name="web"}} 64000"#),
            format!(r#"xdplb_vip_new_flows_total{{vip="{VIP6}"}} 42"#),
            format!(r#"xdplb_vip_active_connections{{vip="{VIP4}",name="web"}} 7"#),
            format!(r#"xdplb_vip_backends_active{{vip="{VIP6}"}} 1"#),
            format!("xdplb_backend_packets_total{{{b4}}} 123"),
            format!("xdplb_backend_bytes_total{{{b4}}} 1003"),
            format!("xdplb_backend_new_flows_total{{{b4}}} 13"),
            format!("xdplb_backend_closed_flows_total{{{b4}}} 8"),
            format!("xdplb_backend_active_connections{{{b4}}} 4"),
            format!("xdplb_backend_weight{{{b4}}} 103"),
            format!("xdplb_backend_ring_share{{{b4}}} 0.25"),
            format!("xdplb_backend_up{{{b4}}} 1"),
            format!("xdplb_backend_up{{{down}}} 0"),
            format!("xdplb_backend_up{{{draining}}} 1"),
            format!(r#"xdplb_backend_state{{{b4},state="active"}} 1"#),
            format!(r#"xdplb_backend_state{{{b4},state="down"}} 0"#),
            format!(r#"xdplb_backend_state{{{down},state="active"}} 0"#),
            format!(r#"xdplb_backend_state{{{down},state="draining"}} 0"#),
            format!(r#"xdplb_backend_state{{{down},state="drained"}} 0"#),
            format!(r#"xdplb_backend_state{{{down},state="down"}} 1"#),
            format!(r#"xdplb_backend_state{{{draining},state="draining"}} 1"#),
            format!(r#"xdplb_backend_state{{{draining},state="active"}} 0"#),
            r#"xdplb_packets_not_balanced_total{reason="drop_no_backend",action="drop"} 4"#
                .to_owned(),
            r#"xdplb_packets_not_balanced_total{reason="pass_not_vip",action="pass"} 17"#
                .to_owned(),
            "xdplb_ring_rebuilds_total 3".to_owned(),
            "xdplb_ring_rebuild_seconds_total 0.75".to_owned(),
            "xdplb_ring_last_rebuild_seconds 0.25".to_owned(),
            "# TYPE xdplb_vip_packets counter".to_owned(),
            "# TYPE xdplb_backend_state gauge".to_owned(),
            "# UNIT xdplb_backend_bytes bytes".to_owned(),
            "# TYPE xdplb_ring_last_rebuild_seconds gauge".to_owned(),
            "# UNIT xdplb_ring_rebuild_seconds seconds".to_owned(),
            "# HELP xdplb_packets_not_balanced Packets the datapath passed to the kernel or \
             dropped instead of balancing, by reason"
                .to_owned(),
        ] {
            assert_has(&text, &line);
        }
        assert!(text.ends_with("\n# EOF\n"), "no EOF marker:\n{text}");

        // 4 backends x 4 states, exactly one of them set per backend.
        let states: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("xdplb_backend_state{"))
            .collect();
        assert_eq!(states.len(), 16, "{text}");
        assert_eq!(states.iter().filter(|l| l.ends_with(" 1")).count(), 4);
    }

    #[test]
    fn every_family_has_a_help_line() {
        let text = encode(&sample());
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        assert_eq!(types.len(), 18, "{text}");
        for name in types {
            let help = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("# HELP {name} ")))
                .unwrap_or_else(|| panic!("no HELP for {name}"));
            assert!(!help.is_empty(), "empty HELP for {name}");
        }
        // Every sample line belongs to a declared family.
        for sample in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(sample.starts_with("xdplb_"), "{sample}");
        }
    }

    #[test]
    fn encode_without_vips_keeps_the_global_metrics() {
        let stats = Stats {
            vips: Vec::new(),
            backends: Vec::new(),
            reasons: BTreeMap::new(),
            ring: RingStats::default(),
        };
        let text = encode(&stats);
        assert_has(&text, "xdplb_ring_rebuilds_total 0");
        assert_has(&text, "xdplb_ring_last_rebuild_seconds 0.0");
        assert!(!text.contains("xdplb_vip_"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn action_follows_the_reason_prefix() {
        assert_eq!(action("pass_ipv4_fragment"), "pass");
        assert_eq!(action("drop_redirect_failed"), "drop");
        assert_eq!(action("future_reason"), "other");
    }

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// A blocking HTTP/1.1 client on the blocking pool, so the server keeps
    /// the (current-thread) runtime.
    async fn get(addr: SocketAddr, path: &str) -> Reply {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        let raw = tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            let mut raw = String::new();
            stream.read_to_string(&mut raw).unwrap();
            raw
        })
        .await
        .unwrap();

        let (head, body) = raw.split_once("\r\n\r\n").expect("no end of headers");
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("no status line");
        let headers = lines
            .map(|l| {
                let (n, v) = l.split_once(':').expect("malformed header");
                (n.trim().to_owned(), v.trim().to_owned())
            })
            .collect();
        Reply {
            status,
            headers,
            body: body.to_owned(),
        }
    }

    async fn start(
        source: impl Fn() -> Result<Stats, String> + Send + Sync + 'static,
    ) -> (SocketAddr, JoinHandle<Result<(), MetricsError>>) {
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, tokio::spawn(serve(listener, source)))
    }

    #[tokio::test]
    async fn serve_metrics() {
        let (addr, server) = start(|| Ok(sample())).await;

        let reply = get(addr, "/metrics").await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.header("content-type"), Some(CONTENT_TYPE));
        assert_has(
            &reply.body,
            r#"xdplb_packets_not_balanced_total{reason="drop_no_backend",action="drop"} 4"#,
        );
        assert!(reply.body.ends_with("# EOF\n"));

        let reply = get(addr, "/").await;
        assert_eq!(reply.status, 200);
        assert!(reply.body.contains("/metrics"), "{}", reply.body);

        let reply = get(addr, "/nope").await;
        assert_eq!(reply.status, 404);

        server.abort();
        assert!(server.await.unwrap_err().is_cancelled());
    }

    #[tokio::test]
    async fn serve_reports_an_unavailable_source() {
        let (addr, server) = start(|| Err("the daemon state is not ready".to_owned())).await;

        let reply = get(addr, "/metrics").await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.body, "the daemon state is not ready\n");

        server.abort();
    }

    #[tokio::test]
    async fn bind_names_the_address() {
        let taken = bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap().to_string();

        let err = bind(&addr).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("binding the metrics endpoint {addr}")
        );
        let source = std::error::Error::source(&err).expect("no source");
        let io = source
            .downcast_ref::<io::Error>()
            .expect("not an io::Error");
        assert_eq!(io.kind(), io::ErrorKind::AddrInUse);
    }
}
