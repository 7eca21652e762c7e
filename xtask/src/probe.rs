//! Traffic client for the namespace topology. Runs inside `xlb-client` and
//! prints exactly one JSON object on stdout; failures of individual
//! connections are data in that object, not a non-zero exit.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Condvar, Mutex,
    },
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::{topology, util};

/// How many error strings a report keeps; the rest are only counted.
const MAX_ERRORS: usize = 5;
/// Extra sends of a UDP request after a reply timed out (same socket, so the
/// same flow).
const UDP_RETRIES: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

/// Worker threads of a `--count` run unless `--concurrency` says.
pub const DEFAULT_CONCURRENCY: usize = 16;

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Destination, `IP:PORT` or `[IPv6]:PORT`.
    #[arg(long)]
    pub target: SocketAddr,
    #[arg(long, value_enum, default_value = "tcp")]
    pub proto: Proto,
    /// Number of separate flows (each a new socket, so a new source port).
    #[arg(long, required_unless_present = "long", conflicts_with = "long")]
    pub count: Option<usize>,
    /// Worker threads for `--count`.
    #[arg(long, default_value_t = DEFAULT_CONCURRENCY)]
    pub concurrency: usize,
    /// Timeout for connect and for each reply, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
    /// Long-lived mode: open this many TCP connections and keep them busy.
    #[arg(long)]
    pub long: Option<usize>,
    /// Long-lived mode: request/reply rounds per connection.
    #[arg(long, default_value_t = 10, requires = "long")]
    pub rounds: usize,
    /// Long-lived mode: pause between rounds, in milliseconds.
    #[arg(long, default_value_t = 100, requires = "long")]
    pub interval_ms: u64,
    /// Long-lived mode: create this (empty) file once every connection has
    /// finished its first round, so a coordinator knows they are established.
    #[arg(long, requires = "long")]
    pub start_file: Option<PathBuf>,
}

/// Output of `probe --count N`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShortReport {
    pub proto: Proto,
    pub target: String,
    pub count: usize,
    pub ok: usize,
    pub failed: usize,
    /// Backend name -> number of flows it answered.
    pub per_backend: BTreeMap<String, usize>,
    /// The first few error strings, in completion order.
    pub errors: Vec<String>,
}

/// Output of `probe --long N`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LongReport {
    /// Always `"long"`.
    pub mode: String,
    pub target: String,
    pub rounds: usize,
    pub connections: Vec<LongConnection>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LongConnection {
    pub rounds_ok: usize,
    /// Distinct backend names in order of first appearance; a connection that
    /// stayed on one backend has exactly one.
    pub backends: Vec<String>,
    pub error: Option<String>,
}

/// `nsenter` into the client namespace running this binary's `probe` with
/// `args`; for demo and e2e code that parse the JSON it prints.
pub fn client_command(args: &[&str]) -> Result<Command> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let exe = exe
        .to_str()
        .context("xtask binary path is not valid UTF-8")?
        .to_owned();
    let mut argv = vec![exe.as_str(), "probe"];
    argv.extend_from_slice(args);
    Ok(topology::exec_in(topology::CLIENT_NS, &argv))
}

/// Runs `probe` in the client namespace and parses its report.
pub fn run_in_client<T: serde::de::DeserializeOwned>(args: &[&str]) -> Result<T> {
    let mut cmd = client_command(args)?;
    let stdout = util::run(&mut cmd)?;
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("parsing probe output {:?}", stdout.trim()))
}

pub fn run(args: ProbeArgs) -> Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let json = if let Some(n) = args.long {
        if args.proto != Proto::Tcp {
            bail!("--long only supports --proto tcp");
        }
        let report = run_long(
            args.target,
            n,
            args.rounds,
            Duration::from_millis(args.interval_ms),
            timeout,
            args.start_file.as_deref(),
        )?;
        serde_json::to_string(&report)?
    } else {
        let count = args.count.context("--count is required without --long")?;
        let report = run_short(args.target, args.proto, count, args.concurrency, timeout);
        serde_json::to_string(&report)?
    };
    println!("{json}");
    Ok(())
}

fn run_short(
    target: SocketAddr,
    proto: Proto,
    count: usize,
    concurrency: usize,
    timeout: Duration,
) -> ShortReport {
    let next = AtomicUsize::new(0);
    let report = Mutex::new(ShortReport {
        proto,
        target: target.to_string(),
        count,
        ok: 0,
        failed: 0,
        per_backend: BTreeMap::new(),
        errors: Vec::new(),
    });
    thread::scope(|s| {
        for _ in 0..concurrency.clamp(1, count.max(1)) {
            s.spawn(|| {
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    let result = match proto {
                        Proto::Tcp => tcp_once(target, timeout),
                        Proto::Udp => udp_once(target, timeout),
                    };
                    // A poisoned lock only means another worker panicked; the
                    // counts are still consistent, so keep going.
                    let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
                    match result {
                        Ok(name) => {
                            r.ok += 1;
                            *r.per_backend.entry(name).or_default() += 1;
                        }
                        Err(e) => {
                            r.failed += 1;
                            if r.errors.len() < MAX_ERRORS {
                                r.errors.push(format!("{e:#}"));
                            }
                        }
                    }
                }
            });
        }
    });
    report.into_inner().unwrap_or_else(|p| p.into_inner())
}

fn tcp_connect(target: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends one line and returns the reply line without its newline.
fn tcp_exchange(
    stream: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    msg: &str,
) -> Result<String> {
    stream.write_all(msg.as_bytes()).context("sending")?;
    let mut line = String::new();
    let n = reader.read_line(&mut line).map_err(|e| {
        if is_timeout(&e) {
            anyhow::anyhow!("timed out waiting for reply")
        } else {
            anyhow::Error::new(e).context("receiving")
        }
    })?;
    if n == 0 {
        bail!("connection closed before reply");
    }
    let name = line.trim_end_matches(['\n', '\r']);
    if name.is_empty() {
        bail!("empty reply");
    }
    Ok(name.to_owned())
}

fn tcp_once(target: SocketAddr, timeout: Duration) -> Result<String> {
    let mut stream = tcp_connect(target, timeout)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    tcp_exchange(&mut stream, &mut reader, "hello\n").with_context(|| format!("TCP {target}"))
}

fn udp_once(target: SocketAddr, timeout: Duration) -> Result<String> {
    let local: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(local).context("binding UDP socket")?;
    socket
        .connect(target)
        .with_context(|| format!("connecting UDP socket to {target}"))?;
    socket.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 512];
    for _ in 0..=UDP_RETRIES {
        socket
            .send(b"hello")
            .with_context(|| format!("UDP send to {target}"))?;
        match socket.recv(&mut buf) {
            Ok(n) => {
                let name = String::from_utf8_lossy(&buf[..n]);
                let name = name.trim_end_matches(['\n', '\r']);
                if name.is_empty() {
                    bail!("UDP {target}: empty reply");
                }
                return Ok(name.to_owned());
            }
            Err(e) if is_timeout(&e) => continue,
            // e.g. ECONNREFUSED from an ICMP port unreachable: retrying the
            // same flow would get the same answer.
            Err(e) => return Err(e).with_context(|| format!("UDP receive from {target}")),
        }
    }
    bail!("UDP {target}: no reply after {} sends", UDP_RETRIES + 1)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Counts connections that are past their first round (or gave up before
/// it), so the start file appears only once all of them are established.
struct FirstRounds {
    done: Mutex<usize>,
    cv: Condvar,
}

impl FirstRounds {
    fn arrive(&self) {
        let mut d = self.done.lock().unwrap_or_else(|p| p.into_inner());
        *d += 1;
        self.cv.notify_all();
    }

    fn wait_for(&self, n: usize) {
        let mut d = self.done.lock().unwrap_or_else(|p| p.into_inner());
        while *d < n {
            d = self.cv.wait(d).unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn run_long(
    target: SocketAddr,
    connections: usize,
    rounds: usize,
    interval: Duration,
    timeout: Duration,
    start_file: Option<&std::path::Path>,
) -> Result<LongReport> {
    let first = FirstRounds {
        done: Mutex::new(0),
        cv: Condvar::new(),
    };
    let (results, start_err) = thread::scope(|s| {
        let handles: Vec<_> = (0..connections)
            .map(|_| {
                let first = &first;
                s.spawn(move || long_connection(target, rounds, interval, timeout, first))
            })
            .collect();
        first.wait_for(connections);
        let start_err = start_file.and_then(|p| {
            std::fs::File::create(p)
                .with_context(|| format!("creating start file {}", p.display()))
                .err()
        });
        let results: Vec<LongConnection> = handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| LongConnection {
                    error: Some("connection thread panicked".into()),
                    ..Default::default()
                })
            })
            .collect();
        (results, start_err)
    });
    if let Some(e) = start_err {
        // The report still goes out; the coordinator will notice the
        // missing file on its own.
        eprintln!("{e:#}");
    }
    Ok(LongReport {
        mode: "long".into(),
        target: target.to_string(),
        rounds,
        connections: results,
    })
}

fn long_connection(
    target: SocketAddr,
    rounds: usize,
    interval: Duration,
    timeout: Duration,
    first: &FirstRounds,
) -> LongConnection {
    let mut conn = LongConnection::default();
    let mut arrived = false;
    let result = (|| -> Result<()> {
        let mut stream = tcp_connect(target, timeout)?;
        let mut reader = BufReader::new(stream.try_clone()?);
        for k in 0..rounds {
            let name = tcp_exchange(&mut stream, &mut reader, &format!("round {k}\n"))
                .with_context(|| format!("round {k}"))?;
            conn.rounds_ok += 1;
            if !conn.backends.contains(&name) {
                conn.backends.push(name);
            }
            if k == 0 {
                first.arrive();
                arrived = true;
            }
            if k + 1 < rounds {
                thread::sleep(interval);
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        conn.error = Some(format!("{e:#}"));
    }
    if !arrived {
        first.arrive();
    }
    conn
}
