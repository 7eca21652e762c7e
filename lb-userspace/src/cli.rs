//! The client side of the `xdplb` binary: subcommands that ask a running
//! daemon over its control socket (HTTP/1.1 and JSON, the types of
//! [`crate::api`]) and print the answer as a table or as JSON.

use std::{
    fmt::Write as _,
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::api::{
    ApiError, BackendAdd, BackendRef, BackendStatus, Health, Stats, Status, VipAdd, VipStatus,
    WeightChange,
};

/// How long one request may take, connection included. Generous: a reload
/// or a backend add can wait for neighbour resolution and ring rebuilds.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Client subcommands: they talk to a running `xdplb run` daemon.
#[derive(Debug, PartialEq, Eq, clap::Subcommand)]
pub enum ClientCommand {
    /// Daemon status: version, uptime, interfaces, XDP mode, VIPs, backends,
    /// ring rebuilds, runtime changes.
    ///
    /// Runtime changes are the VIP and backend changes made with this CLI
    /// since the configuration file was last loaded; the file itself is never
    /// written. `reload` refuses to run while there are any, unless told to
    /// discard them.
    Status,
    /// Per-VIP and per-backend counters and pass/drop reasons.
    ///
    /// Pass/drop reasons count the packets the datapath did not load balance:
    /// passed to the kernel stack (not a VIP, fragment, ...) or dropped (no
    /// backend, ...).
    Stats,
    /// Manage VIPs: list, add, del.
    ///
    /// A VIP is written `address:port/protocol`, e.g. `203.0.113.10:443/tcp`
    /// or `[2001:db8::10]:443/tcp`, or by its configured name. Changes apply at once and are runtime
    /// changes: the configuration file is not modified.
    #[command(subcommand)]
    Vip(VipCommand),
    /// Manage backends: list, add, del, weight, drain, undrain.
    ///
    /// A backend is named by its VIP (`address:port/protocol`) and its
    /// address. Changes apply at once and are runtime changes: the
    /// configuration file is not modified.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Show the running configuration as YAML (`config show`).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Re-read the configuration file (like SIGHUP). Refused while runtime
    /// changes are not in the file, unless --discard-runtime-changes.
    ///
    /// A file that does not validate is rejected and the running state kept.
    Reload {
        /// Reload even though runtime changes (see `xdplb status`) are not in
        /// the file: they are lost, the file wins.
        #[arg(long)]
        discard_runtime_changes: bool,
    },
}

#[derive(Debug, PartialEq, Eq, clap::Subcommand)]
pub enum VipCommand {
    /// List the VIPs with their backends and traffic counters.
    #[command(visible_alias = "ls")]
    List,
    /// Add a VIP (with no backends yet: add them with `backend add`).
    Add {
        /// The VIP's address, IPv4 or IPv6 (no brackets here).
        #[arg(value_name = "ADDRESS")]
        address: IpAddr,
        /// The VIP's port.
        #[arg(value_name = "PORT")]
        port: u16,
        /// The VIP's protocol.
        #[arg(value_name = "PROTOCOL", value_enum)]
        protocol: ProtocolArg,
        /// A name for the VIP, shown in listings and metrics and accepted in
        /// place of `address:port/protocol`: 1-64 letters, digits, `-`, `_`
        /// or `.`, not an IP address, unique among the VIPs.
        #[arg(long, value_name = "N", value_parser = parse_vip_name)]
        name: Option<String>,
        /// How new connections are spread. Default: none.
        #[arg(long, value_enum)]
        affinity: Option<AffinityArg>,
        /// How new connections are shared among the backends. Default:
        /// maglev.
        /// Not with `--affinity client-ip` (the daemon refuses it).
        #[arg(long, value_enum)]
        scheduler: Option<SchedulerArg>,
    },
    /// Delete a VIP and its backends: its traffic is no longer load balanced.
    #[command(visible_alias = "delete")]
    Del {
        /// The VIP: `address:port/protocol` (IPv6 as `[address]:port/protocol`), or its name.
        #[arg(value_name = "VIP", value_parser = parse_vip)]
        vip: String,
    },
}

#[derive(Debug, PartialEq, Eq, clap::Subcommand)]
pub enum BackendCommand {
    /// List backends: weight, state, health, connections and counters.
    #[command(visible_alias = "ls")]
    List {
        /// Only the backends of this VIP (`address:port/protocol`, or its name).
        #[arg(long, value_name = "VIP", value_parser = parse_vip)]
        vip: Option<String>,
    },
    /// Add a backend to a VIP; it takes new flows at once.
    Add {
        /// The VIP: `address:port/protocol` (IPv6 as `[address]:port/protocol`), or its name.
        #[arg(value_name = "VIP", value_parser = parse_vip)]
        vip: String,
        /// The backend's address. It must be on the load balancer's L2
        /// segment and accept the VIP's traffic (VIP on lo, see README).
        #[arg(value_name = "ADDRESS")]
        address: IpAddr,
        /// Relative share of new flows, 0..=1000. Default: 1.
        #[arg(long, value_name = "W")]
        weight: Option<u32>,
        /// The backend's MAC address, aa:bb:cc:dd:ee:ff. Default: resolved
        /// from the load balancer's neighbour table.
        #[arg(long, value_name = "MAC")]
        mac: Option<String>,
    },
    /// Remove a backend from a VIP at once: its flows are moved to others.
    /// To let them finish first, `drain` it and delete it once drained.
    #[command(visible_alias = "delete")]
    Del {
        /// The VIP: `address:port/protocol` (IPv6 as `[address]:port/protocol`), or its name.
        #[arg(value_name = "VIP", value_parser = parse_vip)]
        vip: String,
        /// The backend's address.
        #[arg(value_name = "ADDRESS")]
        address: IpAddr,
    },
    /// Change a backend's weight (its share of new flows; established flows
    /// stay where they are).
    Weight {
        /// The VIP: `address:port/protocol` (IPv6 as `[address]:port/protocol`), or its name.
        #[arg(value_name = "VIP", value_parser = parse_vip)]
        vip: String,
        /// The backend's address.
        #[arg(value_name = "ADDRESS")]
        address: IpAddr,
        /// The new weight, 0..=1000.
        #[arg(value_name = "WEIGHT")]
        weight: u32,
    },
    /// Take a backend out of the ring: no new flows, established ones
    /// continue. It shows `drained` once its connections are gone or the
    /// drain timeout passed.
    Drain {
        /// The VIP: `address:port/protocol` (IPv6 as `[address]:port/protocol`), or its name.
        #[arg(value_name = "VIP", value_parser = parse_vip)]
        vip: String,
        /// The backend's address.
        #[arg(value_name = "ADDRESS")]
        address: IpAddr,
    },
    /// Put a draining or drained backend back in the ring.
    Undrain {
        /// The VIP: `address:port/protocol` (IPv6 as `[address]:port/protocol`), or its name.
        #[arg(value_name = "VIP", value_parser = parse_vip)]
        vip: String,
        /// The backend's address.
        #[arg(value_name = "ADDRESS")]
        address: IpAddr,
    },
}

#[derive(Debug, PartialEq, Eq, clap::Subcommand)]
pub enum ConfigCommand {
    /// Print the running configuration, runtime changes included, as YAML
    /// that `xdplb run --config` accepts (-o does not apply).
    Show,
}

/// Options of every client subcommand.
#[derive(Debug, PartialEq, Eq, clap::Args)]
pub struct ClientOptions {
    /// Control socket of the daemon.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "XDPLB_SOCKET",
        default_value = crate::api::DEFAULT_SOCKET
    )]
    pub socket: PathBuf,
    /// Output format of listings.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns, human units.
    Table,
    /// The API's JSON, pretty-printed: exact counters, for scripts.
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtocolArg {
    Tcp,
    Udp,
}

impl ProtocolArg {
    fn as_str(self) -> &'static str {
        match self {
            ProtocolArg::Tcp => "tcp",
            ProtocolArg::Udp => "udp",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AffinityArg {
    /// Each connection is scheduled on its own.
    None,
    /// All connections of one client address go to one backend.
    ClientIp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SchedulerArg {
    /// Shares by weight (weighted Maglev), the same on every node.
    Maglev,
    /// Weighted Maglev with the weights adjusted every second by each
    /// backend's active connections on this node: up to about twice its
    /// weight's share for an idle backend, less for one above the average.
    LeastConnections,
}

impl SchedulerArg {
    fn as_str(self) -> &'static str {
        match self {
            SchedulerArg::Maglev => crate::config::Scheduler::Maglev.as_str(),
            SchedulerArg::LeastConnections => crate::config::Scheduler::LeastConnections.as_str(),
        }
    }
}

impl AffinityArg {
    fn as_str(self) -> &'static str {
        match self {
            AffinityArg::None => "none",
            AffinityArg::ClientIp => "client-ip",
        }
    }
}

/// Runs one client subcommand against the daemon at `opts.socket` and
/// prints its result on stdout.
pub fn run(cmd: ClientCommand, opts: &ClientOptions) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let client = Client::new(&opts.socket);
    let text = rt.block_on(execute(&client, cmd, opts.output))?;
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        // `xdplb backend list | head` is not an error.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to standard output"),
    }
}

/// Performs `cmd` and returns what to print.
async fn execute(client: &Client, cmd: ClientCommand, output: Output) -> anyhow::Result<String> {
    Ok(match cmd {
        ClientCommand::Status => {
            let status: Status = client.get("/v1/status").await?;
            render(output, &status, render_status)?
        }
        ClientCommand::Stats => {
            let stats: Stats = client.get("/v1/stats").await?;
            render(output, &stats, render_stats)?
        }
        ClientCommand::Vip(VipCommand::List) => {
            let vips: Vec<VipStatus> = client.get("/v1/vips").await?;
            render(output, &vips, |v| render_vips(v))?
        }
        ClientCommand::Vip(VipCommand::Add {
            address,
            port,
            protocol,
            name,
            affinity,
            scheduler,
        }) => {
            let body = VipAdd {
                address: address.to_string(),
                port,
                protocol: protocol.as_str().to_owned(),
                name,
                affinity: affinity.map(|a| a.as_str().to_owned()),
                scheduler: scheduler.map(|s| s.as_str().to_owned()),
            };
            let vip: VipStatus = client.post("/v1/vips", &body).await?;
            render(output, &vip, |v| render_vips(std::slice::from_ref(v)))?
        }
        ClientCommand::Vip(VipCommand::Del { vip }) => {
            let done: serde_json::Value = client
                .post("/v1/vips/delete", &serde_json::json!({ "vip": vip }))
                .await?;
            render(output, &done, |_| format!("deleted VIP {vip}\n"))?
        }
        ClientCommand::Backend(BackendCommand::List { vip }) => {
            let path = match &vip {
                Some(vip) => format!("/v1/backends?vip={}", query_escape(vip)),
                None => "/v1/backends".to_owned(),
            };
            let backends: Vec<BackendStatus> = client.get(&path).await?;
            render(output, &backends, |b| render_backends(b))?
        }
        ClientCommand::Backend(BackendCommand::Add {
            vip,
            address,
            weight,
            mac,
        }) => {
            let body = BackendAdd {
                vip,
                address: address.to_string(),
                weight,
                mac,
            };
            let backend: BackendStatus = client.post("/v1/backends", &body).await?;
            render_backend(output, &backend)?
        }
        ClientCommand::Backend(BackendCommand::Del { vip, address }) => {
            let body = BackendRef {
                vip,
                address: address.to_string(),
            };
            let done: serde_json::Value = client.post("/v1/backends/delete", &body).await?;
            render(output, &done, |_| {
                format!("deleted backend {} from VIP {}\n", body.address, body.vip)
            })?
        }
        ClientCommand::Backend(BackendCommand::Weight {
            vip,
            address,
            weight,
        }) => {
            let body = WeightChange {
                vip,
                address: address.to_string(),
                weight,
            };
            let backend: BackendStatus = client.post("/v1/backends/weight", &body).await?;
            render_backend(output, &backend)?
        }
        ClientCommand::Backend(BackendCommand::Drain { vip, address }) => {
            let body = BackendRef {
                vip,
                address: address.to_string(),
            };
            let backend: BackendStatus = client.post("/v1/backends/drain", &body).await?;
            render_backend(output, &backend)?
        }
        ClientCommand::Backend(BackendCommand::Undrain { vip, address }) => {
            let body = BackendRef {
                vip,
                address: address.to_string(),
            };
            let backend: BackendStatus = client.post("/v1/backends/undrain", &body).await?;
            render_backend(output, &backend)?
        }
        ClientCommand::Config(ConfigCommand::Show) => {
            let config: ConfigYaml = client.get("/v1/config").await?;
            with_newline(config.yaml)
        }
        ClientCommand::Reload {
            discard_runtime_changes,
        } => {
            let reloaded: Message = client
                .post(
                    "/v1/reload",
                    &serde_json::json!({ "discard_runtime_changes": discard_runtime_changes }),
                )
                .await?;
            with_newline(reloaded.message)
        }
    })
}

/// `GET /v1/config`.
#[derive(Deserialize)]
struct ConfigYaml {
    yaml: String,
}

/// `POST /v1/reload`.
#[derive(Deserialize)]
struct Message {
    message: String,
}

fn with_newline(mut s: String) -> String {
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

fn render<T: Serialize + ?Sized>(
    output: Output,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> anyhow::Result<String> {
    match output {
        Output::Table => Ok(table(value)),
        Output::Json => {
            let json = serde_json::to_string_pretty(value).context("encoding JSON")?;
            Ok(with_newline(json))
        }
    }
}

fn render_backend(output: Output, backend: &BackendStatus) -> anyhow::Result<String> {
    render(output, backend, |b| {
        render_backends(std::slice::from_ref(b))
    })
}

/// Why a request to the daemon failed. The `Display` of each is the one line
/// an operator sees.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no xdplb daemon at {} (is `xdplb run` running? --socket / XDPLB_SOCKET to use another)",
        .socket.display()
    )]
    NoDaemon { socket: PathBuf },
    #[error("permission denied on {}: the control socket is root-only", .socket.display())]
    PermissionDenied { socket: PathBuf },
    #[error("cannot connect to {}", .socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the daemon at {} did not answer within {}s", .socket.display(), .timeout.as_secs())]
    Timeout { socket: PathBuf, timeout: Duration },
    #[error("building the request for {path}")]
    Request {
        path: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("HTTP exchange with the daemon failed")]
    Http(#[from] hyper::Error),
    /// The daemon refused the request; `message` is its `error` text.
    #[error("{message}")]
    Api { status: StatusCode, message: String },
    /// A non-2xx answer without an `ApiError` body.
    #[error("the daemon answered {status}: {body}")]
    UnexpectedResponse { status: StatusCode, body: String },
    #[error("cannot parse the daemon's answer to {path} (is this xdplb the same version as the daemon?)")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Maps a failed `connect` on the control socket to what the operator
/// should do about it.
pub fn connect_error(socket: &Path, error: io::Error) -> ClientError {
    let socket = socket.to_owned();
    match error.kind() {
        // Refused: a socket file left by a daemon that is gone.
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ClientError::NoDaemon { socket }
        }
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied { socket },
        _ => ClientError::Connect {
            socket,
            source: error,
        },
    }
}

/// A client of the daemon's control API: one connection per request.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: REQUEST_TIMEOUT,
        }
    }

    /// `GET path` and decode the JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let body = self.request(Method::GET, path, None).await?;
        decode(path, &body)
    }

    /// `POST path` with a JSON body and decode the JSON answer.
    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        // Serializing the API's own types cannot fail; keep the error anyway.
        let json = serde_json::to_vec(body).map_err(|source| ClientError::Decode {
            path: path.to_owned(),
            source,
        })?;
        let answer = self.request(Method::POST, path, Some(json)).await?;
        decode(path, &answer)
    }

    /// One request; the body of a 2xx answer, or the error it stands for.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        match tokio::time::timeout(self.timeout, self.exchange(method, path, body)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(ClientError::Timeout {
                socket: self.socket.clone(),
                timeout: self.timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "localhost")
            .header(header::ACCEPT, "application/json")
            // One request per connection: the connection task ends with it.
            .header(header::CONNECTION, "close");
        let body = match body {
            Some(json) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(json))
            }
            None => Full::new(Bytes::new()),
        };
        let request = builder.body(body).map_err(|source| ClientError::Request {
            path: path.to_owned(),
            source,
        })?;

        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| connect_error(&self.socket, e))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let exchange = async move {
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            // Dropping the sender here lets `connection` finish.
            Ok::<_, hyper::Error>((status, body))
        };
        let (connection, exchange) = tokio::join!(connection, exchange);
        // A failed exchange carries the connection's error; a connection
        // error after a complete answer changes nothing.
        let (status, body) = exchange.or_else(|e| connection.and(Err(e)))?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(error_response(status, &body))
        }
    }
}

fn decode<T: DeserializeOwned>(path: &str, body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|source| ClientError::Decode {
        path: path.to_owned(),
        source,
    })
}

/// The error a non-2xx answer stands for: the daemon's own text if it sent
/// an `ApiError`, else the status and (the start of) whatever it sent.
fn error_response(status: StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ApiError>(body) {
        Ok(ApiError { error }) => ClientError::Api {
            status,
            message: error,
        },
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            let body = match text.char_indices().nth(200) {
                Some((cut, _)) => format!("{}...", &text[..cut]),
                None if text.is_empty() => "(no body)".to_owned(),
                None => text.to_owned(),
            };
            ClientError::UnexpectedResponse { status, body }
        }
    }
}

/// Percent-encodes a query parameter value (everything but RFC 3986's
/// unreserved characters).
fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Checks a VIP argument, `address:port/protocol` with IPv6 in brackets, and
/// returns it in the daemon's spelling (lower-case protocol, canonical
/// address); a bare name (`web`) is passed on for the daemon to resolve.
pub fn parse_vip(s: &str) -> Result<String, String> {
    const FORMAT: &str = "expected address:port/protocol, e.g. 203.0.113.10:443/tcp or \
         [2001:db8::10]:443/tcp, or the VIP's name from the configuration";
    // A name (`name:` in the configuration): the daemon resolves it.
    if crate::config::is_vip_name(s) {
        return Ok(s.to_owned());
    }
    let (addr_port, protocol) = s.rsplit_once('/').ok_or(FORMAT)?;
    let protocol = protocol.to_ascii_lowercase();
    if protocol != "tcp" && protocol != "udp" {
        return Err(format!("protocol must be tcp or udp, not {protocol:?}"));
    }
    let addr: SocketAddr = addr_port.parse().map_err(|_| FORMAT)?;
    Ok(format_vip(addr.ip(), addr.port(), &protocol))
}

/// Checks `vip add --name` before anything is sent.
fn parse_vip_name(s: &str) -> Result<String, String> {
    crate::config::check_vip_name(s).map(|()| s.to_owned())
}

/// A VIP as the API writes it: `address:port/protocol`, IPv6 in brackets.
pub fn format_vip(address: IpAddr, port: u16, protocol: &str) -> String {
    format!("{}/{protocol}", SocketAddr::new(address, port))
}

/// Bytes in binary units with one decimal: `512 B`, `1.5 KiB`, `3.0 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Step up when one decimal would round to 1024.0.
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Whole seconds as `42s`, `5m03s`, `1h02m03s`, `2d03h04m05s`.
pub fn human_duration(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    if d > 0 {
        format!("{d}d{h:02}h{m:02}m{s:02}s")
    } else if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// A short time such as a ring rebuild: `850µs`, `1.25ms`, `2.50s`.
fn human_seconds(seconds: f64) -> String {
    if seconds < 1e-3 {
        format!("{:.0}µs", seconds * 1e6)
    } else if seconds < 1.0 {
        format!("{:.2}ms", seconds * 1e3)
    } else {
        format!("{seconds:.2}s")
    }
}

fn health_name(health: Health) -> &'static str {
    match health {
        Health::Unchecked => "-",
        Health::Up => "up",
        Health::Down => "down",
    }
}

#[derive(Clone, Copy)]
enum Align {
    Left,
    Right,
}

/// Columns padded to their widest cell, two spaces apart; numbers right
/// aligned.
struct Table {
    header: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[(&'static str, Align)]) -> Self {
        Self {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|(h, _)| h.len()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header = self.header.iter().map(|(h, _)| (*h).to_owned()).collect();
        for cells in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, ((cell, width), (_, align))) in
                cells.iter().zip(&widths).zip(&self.header).enumerate()
            {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = width - cell.chars().count();
                match align {
                    Align::Left => {
                        line.push_str(cell);
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn render_backends(backends: &[BackendStatus]) -> String {
    if backends.is_empty() {
        return "no backends\n".to_owned();
    }
    use Align::{Left as L, Right as R};
    let mut table = Table::new(&[
        ("VIP", L),
        ("BACKEND", L),
        ("WEIGHT", R),
        ("SHARE", R),
        ("STATE", L),
        ("HEALTH", L),
        ("ACTIVE", R),
        ("PACKETS", R),
        ("BYTES", R),
        ("NEW FLOWS", R),
    ]);
    for b in backends {
        table.row(vec![
            b.vip.clone(),
            b.address.to_string(),
            b.weight.to_string(),
            format!("{:.1}%", b.ring_share * 100.0),
            b.state.as_str().to_owned(),
            health_name(b.health).to_owned(),
            b.active_connections.to_string(),
            b.packets.to_string(),
            human_bytes(b.bytes),
            b.new_flows.to_string(),
        ]);
    }
    table.render()
}

fn render_vips(vips: &[VipStatus]) -> String {
    if vips.is_empty() {
        return "no VIPs\n".to_owned();
    }
    use Align::{Left as L, Right as R};
    let mut table = Table::new(&[
        ("VIP", L),
        ("NAME", L),
        ("AFFINITY", L),
        ("SCHEDULER", L),
        ("BACKENDS", R),
        ("IN RING", R),
        ("ACTIVE", R),
        ("PACKETS", R),
        ("BYTES", R),
        ("NEW FLOWS", R),
    ]);
    for v in vips {
        table.row(vec![
            v.vip.clone(),
            v.name.clone().unwrap_or_else(|| "-".to_owned()),
            v.affinity.clone(),
            v.scheduler.clone(),
            v.backends.to_string(),
            v.active_backends.to_string(),
            v.active_connections.to_string(),
            v.packets.to_string(),
            human_bytes(v.bytes),
            v.new_flows.to_string(),
        ]);
    }
    table.render()
}

fn render_ring(ring: &crate::api::RingStats) -> String {
    if ring.rebuilds == 0 {
        return "0".to_owned();
    }
    format!(
        "{} (last {}, total {})",
        ring.rebuilds,
        human_seconds(ring.last_rebuild_seconds),
        human_seconds(ring.rebuild_seconds_total)
    )
}

fn render_status(s: &Status) -> String {
    let mut fields = vec![
        ("version", s.version.clone()),
        ("pid", s.pid.to_string()),
        ("uptime", human_duration(s.uptime_seconds)),
        ("config", s.config_path.clone()),
        ("interfaces", s.interfaces.join(", ")),
        ("xdp mode", s.xdp_mode.clone()),
        (
            "datapath",
            if s.adopted {
                "adopted from the previous daemon".to_owned()
            } else {
                "loaded by this daemon".to_owned()
            },
        ),
        ("vips", s.vips.to_string()),
        ("backends", s.backends.to_string()),
        (
            "flows",
            s.flows
                .map_or_else(|| "unknown".to_owned(), |f| f.to_string()),
        ),
        ("ring rebuilds", render_ring(&s.ring)),
    ];
    fields.push((
        "runtime changes",
        if s.runtime_changes.is_empty() {
            "none".to_owned()
        } else {
            format!(
                "{}, not in the config file (`xdplb reload` needs --discard-runtime-changes)",
                s.runtime_changes.len()
            )
        },
    ));
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (key, value) in fields {
        let _ = writeln!(out, "{:<width$} {value}", format!("{key}:"));
    }
    for change in &s.runtime_changes {
        let _ = writeln!(out, "  - {change}");
    }
    out
}

fn render_stats(s: &Stats) -> String {
    let mut out = String::from("VIPs\n");
    out.push_str(&render_vips(&s.vips));
    out.push_str("\nBackends\n");
    out.push_str(&render_backends(&s.backends));
    out.push_str("\nPackets not load balanced\n");
    if s.reasons.is_empty() {
        out.push_str("none\n");
    } else {
        let mut table = Table::new(&[("REASON", Align::Left), ("PACKETS", Align::Right)]);
        for (reason, packets) in &s.reasons {
            table.row(vec![reason.clone(), packets.to_string()]);
        }
        out.push_str(&table.render());
    }
    let _ = writeln!(out, "\nMaglev ring rebuilds: {}", render_ring(&s.ring));
    out
}

#[cfg(test)]
mod tests {
    use crate::api::BackendState;

    use std::{
        io::{BufRead as _, BufReader, Read as _},
        os::unix::net::UnixListener,
        sync::mpsc,
    };

    use clap::{CommandFactory as _, Parser as _};

    use super::*;

    #[derive(Debug, clap::Parser)]
    #[command(name = "xdplb")]
    struct TestCli {
        #[command(flatten)]
        opts: ClientOptions,
        #[command(subcommand)]
        cmd: ClientCommand,
    }

    fn parse(args: &[&str]) -> Result<TestCli, clap::Error> {
        TestCli::try_parse_from(std::iter::once("xdplb").chain(args.iter().copied()))
    }

    fn backend(address: &str, state: BackendState, health: Health) -> BackendStatus {
        BackendStatus {
            vip: "10.200.100.1:8080/tcp".to_owned(),
            address: address.parse().unwrap(),
            port: 8080,
            weight: 2,
            state,
            health,
            active_connections: 3,
            packets: 1234,
            bytes: 1_536_000,
            new_flows: 42,
            closed_flows: 39,
            mac: "02:00:00:00:00:11".to_owned(),
            ring_share: 0.5,
        }
    }

    #[test]
    fn backend_table_header_and_row() {
        let table = render_backends(&[backend("10.200.0.11", BackendState::Active, Health::Up)]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines,
            [
                "VIP                    BACKEND      WEIGHT  SHARE  STATE   HEALTH  ACTIVE  PACKETS    BYTES  NEW FLOWS",
                "10.200.100.1:8080/tcp  10.200.0.11       2  50.0%  active  up           3     1234  1.5 MiB         42",
            ]
        );
        assert!(table.ends_with('\n'));
    }

    #[test]
    fn backend_table_aligns_wider_cells() {
        let mut wide = backend("fd00:200::11", BackendState::Draining, Health::Unchecked);
        wide.vip = "[fd00:200::100]:8080/tcp".to_owned();
        wide.packets = 12_345_678_901;
        let table = render_backends(&[
            backend("10.200.0.11", BackendState::Active, Health::Up),
            wide,
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        // Every column starts at the same offset on every line.
        let col = |line: &str, needle: &str| line.find(needle).unwrap();
        assert_eq!(col(lines[0], "BACKEND"), col(lines[1], "10.200.0.11"));
        assert_eq!(col(lines[0], "BACKEND"), col(lines[2], "fd00:200::11"));
        assert_eq!(col(lines[0], "STATE"), col(lines[2], "draining"));
        assert!(lines[2].contains("draining  -  "));
        // Right-aligned numbers end where their header ends.
        let end = |line: &str, needle: &str| line.find(needle).unwrap() + needle.len();
        assert_eq!(end(lines[0], "PACKETS"), end(lines[2], "12345678901"));
        assert_eq!(end(lines[0], "NEW FLOWS"), lines[1].len());
    }

    #[test]
    fn empty_listings_say_so() {
        assert_eq!(render_backends(&[]), "no backends\n");
        assert_eq!(render_vips(&[]), "no VIPs\n");
    }

    #[test]
    fn status_table_lists_runtime_changes() {
        let status = Status {
            version: "0.1.0".to_owned(),
            pid: 4242,
            uptime_seconds: 3723,
            config_path: "/etc/xdplb/xdplb.yaml".to_owned(),
            interfaces: vec!["eth0".to_owned(), "eth1".to_owned()],
            xdp_mode: "native".to_owned(),
            adopted: true,
            runtime_changes: vec!["backend 10.200.0.14 added to 10.200.100.1:8080/tcp".to_owned()],
            vips: 2,
            backends: 7,
            flows: None,
            ring: crate::api::RingStats {
                rebuilds: 3,
                rebuild_seconds_total: 0.0042,
                last_rebuild_seconds: 0.0015,
            },
        };
        let text = render_status(&status);
        assert!(text.contains("uptime:          1h02m03s\n"), "{text}");
        assert!(text.contains("interfaces:      eth0, eth1\n"), "{text}");
        assert!(text.contains("flows:           unknown\n"), "{text}");
        assert!(
            text.contains("ring rebuilds:   3 (last 1.50ms, total 4.20ms)\n"),
            "{text}"
        );
        assert!(
            text.contains("runtime changes: 1, not in the config file"),
            "{text}"
        );
        assert!(text.ends_with("\n  - backend 10.200.0.14 added to 10.200.100.1:8080/tcp\n"));
    }

    #[test]
    fn json_output_is_the_api_json() {
        let list = vec![backend("10.200.0.11", BackendState::Down, Health::Down)];
        let text = render(Output::Json, &list, |_| unreachable!()).unwrap();
        assert!(text.starts_with("[\n  {\n    \"vip\": \"10.200.100.1:8080/tcp\","));
        assert!(text.contains("\"state\": \"down\""));
        let back: Vec<BackendStatus> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, list);
    }

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1_048_575), "1.0 MiB");
        assert_eq!(human_bytes(10 * 1024 * 1024), "10.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_bytes(5 << 40), "5.0 TiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(60), "1m00s");
        assert_eq!(human_duration(303), "5m03s");
        assert_eq!(human_duration(3723), "1h02m03s");
        assert_eq!(human_duration(86_399), "23h59m59s");
        assert_eq!(
            human_duration(2 * 86_400 + 3 * 3600 + 4 * 60 + 5),
            "2d03h04m05s"
        );
        assert_eq!(human_seconds(0.000_85), "850µs");
        assert_eq!(human_seconds(0.001_25), "1.25ms");
        assert_eq!(human_seconds(2.5), "2.50s");
    }

    #[test]
    fn vip_strings() {
        assert_eq!(
            parse_vip("10.200.100.1:8080/tcp").as_deref(),
            Ok("10.200.100.1:8080/tcp")
        );
        assert_eq!(
            parse_vip("[FD00:200:0::100]:53/UDP").as_deref(),
            Ok("[fd00:200::100]:53/udp")
        );
        assert_eq!(parse_vip("web-v4").as_deref(), Ok("web-v4"), "a name");
        assert_eq!(
            format_vip("2001:db8::10".parse().unwrap(), 443, "tcp"),
            "[2001:db8::10]:443/tcp"
        );
        assert_eq!(
            format_vip("203.0.113.10".parse().unwrap(), 53, "udp"),
            "203.0.113.10:53/udp"
        );
        for bad in [
            "10.200.100.1:8080",
            "10.200.100.1/tcp",
            "10.200.100.1:8080/sctp",
            "fd00::1:8080/tcp",
            "10.200.100.1:70000/tcp",
            "web/tcp",
            "10.200.100.1",
            "",
        ] {
            assert!(parse_vip(bad).is_err(), "{bad} was accepted");
        }
        assert!(parse_vip("fd00::1:8080/tcp")
            .unwrap_err()
            .contains("[2001:db8::10]:443/tcp"));
        assert_eq!(
            query_escape("[fd00::1]:80/tcp"),
            "%5Bfd00%3A%3A1%5D%3A80%2Ftcp"
        );
    }

    #[test]
    fn clap_definitions_are_consistent() {
        TestCli::command().debug_assert();
    }

    #[test]
    fn parses_command_lines() {
        let cli = parse(&[
            "backend",
            "add",
            "10.200.100.1:8080/TCP",
            "10.200.0.14",
            "--weight",
            "5",
            "-o",
            "json",
            "--socket",
            "/tmp/x.sock",
        ])
        .unwrap();
        assert_eq!(
            cli.cmd,
            ClientCommand::Backend(BackendCommand::Add {
                vip: "10.200.100.1:8080/tcp".to_owned(),
                address: "10.200.0.14".parse().unwrap(),
                weight: Some(5),
                mac: None,
            })
        );
        assert_eq!(cli.opts.output, Output::Json);
        assert_eq!(cli.opts.socket, Path::new("/tmp/x.sock"));

        let cli = parse(&[
            "vip",
            "add",
            "2001:db8::10",
            "443",
            "udp",
            "--name",
            "dns",
            "--affinity",
            "client-ip",
        ])
        .unwrap();
        assert_eq!(
            cli.cmd,
            ClientCommand::Vip(VipCommand::Add {
                address: "2001:db8::10".parse().unwrap(),
                port: 443,
                protocol: ProtocolArg::Udp,
                name: Some("dns".to_owned()),
                affinity: Some(AffinityArg::ClientIp),
                scheduler: None,
            })
        );
        let cli = parse(&[
            "vip",
            "add",
            "10.0.0.1",
            "80",
            "tcp",
            "--scheduler",
            "least-connections",
        ])
        .unwrap();
        assert!(matches!(
            cli.cmd,
            ClientCommand::Vip(VipCommand::Add {
                scheduler: Some(SchedulerArg::LeastConnections),
                ..
            })
        ));

        assert_eq!(cli.opts.output, Output::Table);
        let bad = parse(&["vip", "add", "10.0.0.1", "80", "tcp", "--name", "web front"])
            .unwrap_err()
            .to_string();
        assert!(bad.contains("\"web front\" is not a VIP name"), "{bad}");
        if std::env::var_os("XDPLB_SOCKET").is_none() {
            assert_eq!(cli.opts.socket, Path::new(crate::api::DEFAULT_SOCKET));
        }

        let cli = parse(&["reload", "--discard-runtime-changes"]).unwrap();
        assert_eq!(
            cli.cmd,
            ClientCommand::Reload {
                discard_runtime_changes: true
            }
        );
        let cli = parse(&["-o", "json", "backend", "list", "--vip", "[fd00::1]:80/tcp"]).unwrap();
        assert_eq!(
            cli.cmd,
            ClientCommand::Backend(BackendCommand::List {
                vip: Some("[fd00::1]:80/tcp".to_owned())
            })
        );
        assert_eq!(cli.opts.output, Output::Json);
        assert_eq!(
            parse(&["config", "show"]).unwrap().cmd,
            ClientCommand::Config(ConfigCommand::Show)
        );
        assert_eq!(
            parse(&[
                "backend",
                "weight",
                "10.200.100.1:8080/udp",
                "10.200.0.11",
                "0"
            ])
            .unwrap()
            .cmd,
            ClientCommand::Backend(BackendCommand::Weight {
                vip: "10.200.100.1:8080/udp".to_owned(),
                address: "10.200.0.11".parse().unwrap(),
                weight: 0,
            })
        );

        // Bad input is refused before anything is sent.
        assert!(parse(&["backend", "drain", "10.200.100.1:8080", "10.200.0.11"]).is_err());
        assert!(parse(&["backend", "drain", "10.200.100.1:8080/tcp", "backend-1"]).is_err());
        assert!(parse(&["vip", "add", "203.0.113.10", "443", "sctp"]).is_err());
        assert!(parse(&["-o", "yaml", "status"]).is_err());
    }

    #[test]
    fn connect_errors_tell_what_to_do() {
        let socket = Path::new(crate::api::DEFAULT_SOCKET);
        let e = connect_error(socket, io::ErrorKind::PermissionDenied.into());
        assert_eq!(
            e.to_string(),
            "permission denied on /run/xdplb/xdplb.sock: the control socket is root-only"
        );
        let e = connect_error(socket, io::ErrorKind::NotFound.into());
        assert_eq!(
            e.to_string(),
            "no xdplb daemon at /run/xdplb/xdplb.sock (is `xdplb run` running? \
             --socket / XDPLB_SOCKET to use another)"
        );
        let e = connect_error(socket, io::ErrorKind::ConnectionRefused.into());
        assert!(matches!(e, ClientError::NoDaemon { .. }));
        let e = anyhow::Error::from(connect_error(socket, io::Error::other("boom")));
        assert_eq!(
            format!("{e:#}"),
            "cannot connect to /run/xdplb/xdplb.sock: boom"
        );
    }

    fn temp_socket(name: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("xdplb-cli-test-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn missing_socket_means_no_daemon() {
        let socket = temp_socket("missing");
        let opts = ClientOptions {
            socket: socket.clone(),
            output: Output::Table,
        };
        let e = run(ClientCommand::Status, &opts).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            format!(
                "no xdplb daemon at {} (is `xdplb run` running? --socket / XDPLB_SOCKET to use another)",
                socket.display()
            )
        );

        // A socket file whose daemon is gone.
        drop(UnixListener::bind(&socket).unwrap());
        let e = run(ClientCommand::Stats, &opts).unwrap_err();
        assert!(format!("{e:#}").starts_with("no xdplb daemon at "), "{e:#}");
        std::fs::remove_file(&socket).unwrap();
    }

    /// One request as the test server saw it.
    #[derive(Debug)]
    struct Seen {
        method: String,
        target: String,
        host: Option<String>,
        body: String,
    }

    /// Answers `connections` connections on `socket` (one request each),
    /// reporting each request on the returned channel.
    fn serve(socket: &Path, connections: usize) -> mpsc::Receiver<Seen> {
        let listener = UnixListener::bind(socket).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(connections) {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap().to_owned();
                let target = parts.next().unwrap().to_owned();
                let (mut host, mut length) = (None, 0);
                loop {
                    line.clear();
                    reader.read_line(&mut line).unwrap();
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    let (name, value) = line.split_once(':').unwrap();
                    match name.to_ascii_lowercase().as_str() {
                        "host" => host = Some(value.trim().to_owned()),
                        "content-length" => length = value.trim().parse().unwrap(),
                        _ => {}
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let (status, answer) = match (method.as_str(), target.as_str()) {
                    ("GET", "/v1/backends?vip=10.200.100.1%3A8080%2Ftcp") => (
                        "200 OK",
                        serde_json::to_string(&[backend(
                            "10.200.0.11",
                            BackendState::Active,
                            Health::Up,
                        )])
                        .unwrap(),
                    ),
                    ("POST", "/v1/backends/drain") => (
                        "404 Not Found",
                        r#"{"error":"backend 10.200.0.99 is not in VIP 10.200.100.1:8080/tcp"}"#
                            .to_owned(),
                    ),
                    _ => ("500 Internal Server Error", "unexpected request".to_owned()),
                };
                write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                )
                .unwrap();
                tx.send(Seen {
                    method,
                    target,
                    host,
                    body: String::from_utf8(body).unwrap(),
                })
                .unwrap();
            }
        });
        rx
    }

    #[test]
    fn talks_to_a_daemon_over_its_socket() {
        let socket = temp_socket("e2e");
        let seen = serve(&socket, 3);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = Client::new(&socket);

        let list = ClientCommand::Backend(BackendCommand::List {
            vip: Some("10.200.100.1:8080/tcp".to_owned()),
        });
        let table = rt.block_on(execute(&client, list, Output::Table)).unwrap();
        assert_eq!(
            table,
            render_backends(&[backend("10.200.0.11", BackendState::Active, Health::Up)])
        );
        let request = seen.recv().unwrap();
        assert_eq!(request.method, "GET");
        assert_eq!(request.target, "/v1/backends?vip=10.200.100.1%3A8080%2Ftcp");
        assert_eq!(request.host.as_deref(), Some("localhost"));

        let drain = ClientCommand::Backend(BackendCommand::Drain {
            vip: "10.200.100.1:8080/tcp".to_owned(),
            address: "10.200.0.99".parse().unwrap(),
        });
        let e = rt
            .block_on(execute(&client, drain, Output::Table))
            .unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "backend 10.200.0.99 is not in VIP 10.200.100.1:8080/tcp"
        );
        match e.downcast_ref::<ClientError>() {
            Some(ClientError::Api { status, .. }) => assert_eq!(*status, StatusCode::NOT_FOUND),
            other => panic!("not an API error: {other:?}"),
        }
        let request = seen.recv().unwrap();
        assert_eq!(request.method, "POST");
        assert_eq!(request.target, "/v1/backends/drain");
        let body: BackendRef = serde_json::from_str(&request.body).unwrap();
        assert_eq!(
            body,
            BackendRef {
                vip: "10.200.100.1:8080/tcp".to_owned(),
                address: "10.200.0.99".to_owned(),
            }
        );

        // A non-API error answer still gives one readable line.
        let e = rt.block_on(client.get::<Status>("/v1/status")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the daemon answered 500 Internal Server Error: unexpected request"
        );
        seen.recv().unwrap();
        std::fs::remove_file(&socket).unwrap();
    }
}
