//! Part 3: HTTP requests per second end to end, one new TCP connection per
//! request, five ways on the same topology in the same run:
//!
//! - A: through xdplb (the VIP, L2 DSR: replies go straight to the client);
//! - B: straight to backend b1, no load balancer (the ceiling);
//! - C: through HAProxy in TCP mode on the LB (a full proxy: two
//!   connections per request);
//! - D: through nftables DNAT + SNAT on the LB (the kernel's NAT path,
//!   replies come back through the LB);
//! - E: through a bare XDP forwarder (`xdplb-bench fwd`) on a host of its
//!   own on the same bridge: A's path and L2 DSR without xdplb's work (no
//!   flow table, no Maglev, no counters), which tells what A's extra hop
//!   costs apart from xdplb.
//!
//! The backends run nginx on [`HTTP_PORT`], each answering its name. wrk
//! runs in the client namespace; the ways are interleaved (A B C D E A B C
//! D E …) so a drift in the machine's load affects all of them alike.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    check_interrupted, cpu_jiffies, run_checked, BenchDaemon, BACKENDS, HTTP_PORT, VIP_ARG,
};
use crate::{
    daemon::ExitStats,
    topology::{self, exec_in, CLIENT_NS, FWD_NS, FWD_VIP4, LB4, LB_NS, VIP4},
    util,
};

/// HAProxy's listening port on the LB.
pub const HAPROXY_PORT: u16 = 8091;
/// The nftables DNAT's port on the LB.
pub const NFT_PORT: u16 = 8092;
/// The nft table of way D, created in the LB namespace for each D run only.
const NFT_TABLE: &str = "xlb_bench";
/// Way D's SNAT address, added to the LB's eth0 for each D run only. Not
/// LB4: HAProxy's connections to the backends come from LB4 with ports of
/// the same ephemeral range as the client's, which D's SNAT preserves. The
/// backends close first and keep those 4-tuples in TIME_WAIT for 60 s; a
/// SYN that reuses one with a sequence number and timestamp from another
/// sender is refused about half the time, and the client waits 1 s to
/// retry. With LB4 that cost D (and C) half or more of their rate. With
/// an address of its own, D's translated 4-tuples only ever follow D's own,
/// whose sequence numbers increase (same client 4-tuple), as TIME_WAIT
/// reuse requires.
pub const NAT_SNAT4: &str = "10.200.0.3";

const WRK_THREADS: u32 = 2;
const WRK_CONNECTIONS: u32 = 32;
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_GRACE: Duration = Duration::from_secs(3);

/// How a way is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    Xdplb,
    Direct,
    Haproxy,
    Nft,
    Fwd,
}

impl Way {
    pub const ALL: [Way; 5] = [Way::Xdplb, Way::Direct, Way::Haproxy, Way::Nft, Way::Fwd];

    pub fn letter(self) -> &'static str {
        match self {
            Way::Xdplb => "A",
            Way::Direct => "B",
            Way::Haproxy => "C",
            Way::Nft => "D",
            Way::Fwd => "E",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Way::Xdplb => "xdplb (VIP, L2 DSR)",
            Way::Direct => "direct to b1 (no LB)",
            Way::Haproxy => "HAProxy TCP mode",
            Way::Nft => "nftables DNAT+SNAT",
            Way::Fwd => "bare XDP forwarder (L2 DSR)",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Way::Xdplb => "xdplb",
            Way::Direct => "direct",
            Way::Haproxy => "HAProxy",
            Way::Nft => "nft DNAT",
            Way::Fwd => "XDP fwd",
        }
    }

    pub fn addr(self) -> String {
        match self {
            Way::Xdplb => format!("{VIP4}:{HTTP_PORT}"),
            Way::Direct => format!("{}:{HTTP_PORT}", topology::backend_addr4(1)),
            Way::Haproxy => format!("{LB4}:{HAPROXY_PORT}"),
            Way::Nft => format!("{LB4}:{NFT_PORT}"),
            Way::Fwd => format!("{FWD_VIP4}:{HTTP_PORT}"),
        }
    }

    pub fn url(self) -> String {
        format!("http://{}/", self.addr())
    }
}

/// A server we spawned inside a namespace. Dropping it stops it: SIGTERM,
/// then SIGKILL after a grace period. Only our own, unreaped child is ever
/// signalled, so a recycled PID cannot be hit.
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: String, ns: &str, argv: &[&str], log: PathBuf) -> Result<Proc> {
        let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = exec_in(ns, argv);
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().context("duplicating a log handle")?)
            .stderr(file);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: `{}`", util::display(&cmd)))?;
        Ok(Proc {
            name,
            child: Some(child),
            log,
        })
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .trim_end()
            .to_owned()
    }

    /// Fails if the process has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{} exited ({status}); its log {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.log_text()
                );
            }
        }
        Ok(())
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        let pid = i32::try_from(child.id()).unwrap_or(0);
        util::signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "bench: {} (pid {pid}) ignored SIGTERM; killing it",
            self.name
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One HTTP/1.1 GET with `Connection: close` on a new connection from the
/// calling thread's namespace. Returns the status code and the body.
pub fn http_get(addr: SocketAddr, timeout: Duration) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::with_capacity(512);
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status code in {head:?}"))?;
    Ok((status, body.trim().to_owned()))
}

/// `n` sequential GETs to `addr` from the client namespace: answers per
/// body (backend name), and errors as `error: ...` entries.
fn gets_from_client(addr: &str, n: usize) -> Result<BTreeMap<String, usize>> {
    let addr: SocketAddr = addr.parse().context("parsing a target address")?;
    util::in_netns(CLIENT_NS, move || {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let key = match http_get(addr, Duration::from_secs(1)) {
                Ok((200, body)) => body,
                Ok((code, body)) => format!("HTTP {code} {body}"),
                Err(e) => format!("error: {e:#}"),
            };
            *seen.entry(key).or_insert(0) += 1;
        }
        seen
    })
}

/// Waits until one of `n` GETs to `addr` from the client namespace is
/// answered 200 with a body in `want`, or `proc` dies.
fn wait_answers(proc: &mut Proc, addr: &str, n: usize, want: &[String]) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        check_interrupted()?;
        proc.check_alive()?;
        let seen = gets_from_client(addr, n)?;
        if seen.keys().any(|k| want.contains(k)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not answer {want:?} on {addr} within {READY_TIMEOUT:?} (got {seen:?}); \
                 its log:\n{}",
                proc.name,
                proc.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn nginx_conf(i: usize, dir: &Path) -> String {
    let d = dir.display();
    let name = topology::backend_name(i);
    format!(
        "# Written by `cargo xtask bench` for backend {name}.
# One process (no master), so it is one PID to stop; it stays root, which
# is fine inside the test namespace.
master_process off;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type text/plain;
    server {{
        # 0.0.0.0 includes the VIP on lo, which xdplb's DSR traffic is for.
        listen 0.0.0.0:{HTTP_PORT} backlog=4096;
        listen [::]:{HTTP_PORT} backlog=4096;
        location / {{ return 200 \"{name}\\n\"; }}
    }}
}}
"
    )
}

fn haproxy_conf() -> String {
    let servers: String = (1..=BACKENDS)
        .map(|i| {
            format!(
                "    server {} {}:{HTTP_PORT}\n",
                topology::backend_name(i),
                topology::backend_addr4(i)
            )
        })
        .collect();
    format!(
        "# Written by `cargo xtask bench`. nbthread: HAProxy's default (one
# thread per CPU).
global
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend xlb_bench
    bind {LB4}:{HAPROXY_PORT}
    default_backend nginx
backend nginx
    balance roundrobin
{servers}"
    )
}

fn nft_ruleset() -> String {
    let map: Vec<String> = (1..=BACKENDS)
        .map(|i| format!("{} : {}", i - 1, topology::backend_addr4(i)))
        .collect();
    let addrs: Vec<String> = (1..=BACKENDS).map(topology::backend_addr4).collect();
    format!(
        "table ip {NFT_TABLE} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {LB4} tcp dport {NFT_PORT} dnat to numgen inc mod {BACKENDS} map {{ {} }} : {HTTP_PORT}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        # The backends share the client's L2 segment: without SNAT they
        # would answer the client directly and the NAT could not be undone.
        # To an LB address HAProxy does not use (see benchmarks.md).
        ct status dnat ip daddr {{ {} }} tcp dport {HTTP_PORT} snat to {NAT_SNAT4}
    }}
}}
",
        map.join(", "),
        addrs.join(", ")
    )
}

/// nginx on every backend and HAProxy on the LB, for the whole topology
/// part; stopped when dropped.
pub struct Servers {
    nginx: Vec<Proc>,
    haproxy: Proc,
    fwd: Proc,
    pub nginx_conf_b1: String,
    pub nginx_argv_b1: String,
    pub haproxy_conf: String,
    pub haproxy_argv: String,
    pub fwd_argv: String,
    dir: PathBuf,
}

impl Servers {
    pub fn start(dir: &Path) -> Result<Servers> {
        let mut nginx = Vec::new();
        let mut nginx_argv_b1 = String::new();
        for i in 1..=BACKENDS {
            let d = dir.join(format!("nginx-{}", topology::backend_name(i)));
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            let conf = d.join("nginx.conf");
            fs::write(&conf, nginx_conf(i, &d))
                .with_context(|| format!("writing {}", conf.display()))?;
            let (conf_s, prefix, errlog) = (
                conf.to_str().context("temp path is not UTF-8")?.to_owned(),
                format!("{}/", d.display()),
                format!("{}/error.log", d.display()),
            );
            let argv = ["nginx", "-c", &conf_s, "-p", &prefix, "-e", &errlog];
            if i == 1 {
                nginx_argv_b1 = format!(
                    "nsenter --net=/run/netns/{} -- {}",
                    topology::backend_ns(i),
                    argv.join(" ")
                );
            }
            nginx.push(Proc::spawn(
                format!("nginx in {}", topology::backend_ns(i)),
                &topology::backend_ns(i),
                &argv,
                d.join("stdout.log"),
            )?);
        }
        let hdir = dir.join("haproxy");
        fs::create_dir_all(&hdir).with_context(|| format!("creating {}", hdir.display()))?;
        let hconf = hdir.join("haproxy.cfg");
        fs::write(&hconf, haproxy_conf()).context("writing haproxy.cfg")?;
        let hconf_s = hconf.to_str().context("temp path is not UTF-8")?.to_owned();
        let hargv = ["haproxy", "-f", &hconf_s, "-db"];
        let haproxy_argv = format!("nsenter --net=/run/netns/{LB_NS} -- {}", hargv.join(" "));
        let haproxy = Proc::spawn(
            "haproxy in xlb-lb".into(),
            LB_NS,
            &hargv,
            hdir.join("haproxy.log"),
        )?;
        let (fwd, fwd_argv) = spawn_forwarder(dir)?;
        let mut servers = Servers {
            nginx,
            haproxy,
            fwd,
            nginx_conf_b1: nginx_conf(1, Path::new("$TMP/nginx-b1")),
            nginx_argv_b1,
            haproxy_conf: haproxy_conf(),
            haproxy_argv,
            fwd_argv,
            dir: dir.to_owned(),
        };
        for (k, p) in servers.nginx.iter_mut().enumerate() {
            let i = k + 1;
            let addr = format!("{}:{HTTP_PORT}", topology::backend_addr4(i));
            wait_answers(p, &addr, 1, &[topology::backend_name(i)])?;
        }
        // Round robin: one of the first few answers is b1.
        let haproxy = Way::Haproxy.addr();
        wait_answers(
            &mut servers.haproxy,
            &haproxy,
            BACKENDS,
            &[topology::backend_name(1)],
        )?;
        let all: Vec<String> = (1..=BACKENDS).map(topology::backend_name).collect();
        wait_answers(&mut servers.fwd, &Way::Fwd.addr(), 1, &all)?;
        println!(
            "bench: nginx on {BACKENDS} backends (:{HTTP_PORT}), HAProxy on {haproxy} and the \
             bare XDP forwarder on {} up (configs in {})",
            Way::Fwd.addr(),
            servers.dir.display()
        );
        Ok(servers)
    }

    fn check_alive(&mut self) -> Result<()> {
        for p in &mut self.nginx {
            p.check_alive()?;
        }
        self.fwd.check_alive()?;
        self.haproxy.check_alive()
    }

    pub fn stop(mut self) {
        self.fwd.stop();
        self.haproxy.stop();
        for p in &mut self.nginx {
            p.stop();
        }
    }
}

/// Starts way E's forwarder (`xdplb-bench fwd`) on the forwarder host's
/// eth0, for the backends' MACs; returns it and its command line as the
/// document shows it.
fn spawn_forwarder(dir: &Path) -> Result<(Proc, String)> {
    let bench = super::xdplb_bench_path()?;
    let bench = bench.to_str().context("xdplb-bench path is not UTF-8")?;
    let vip = Way::Fwd.addr();
    let src_mac = topology::mac_of(FWD_NS)?;
    let mut argv = vec![
        bench.to_owned(),
        "fwd".into(),
        "--iface".into(),
        topology::LB_IF.into(),
        "--vip".into(),
        vip,
        "--src-mac".into(),
        src_mac,
    ];
    for i in 1..=BACKENDS {
        argv.push("--backend-mac".into());
        argv.push(topology::mac_of(&topology::backend_ns(i))?);
    }
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let shown = format!("nsenter --net=/run/netns/{FWD_NS} -- {}", argv.join(" "));
    let proc = Proc::spawn(
        format!("the XDP forwarder in {FWD_NS}"),
        FWD_NS,
        &argv,
        dir.join("fwd.log"),
    )?;
    Ok((proc, shown))
}

/// Way D's NAT for the length of one run: the SNAT address, the nft table
/// and IPv4 forwarding in the LB namespace, all removed when dropped.
/// Outside D runs the LB must not route (xdplb's DSR relies on it), and a
/// NAT table would turn on connection tracking for HAProxy's traffic too.
struct NatGuard {
    addr: bool,
    table: bool,
}

fn snat_cidr() -> String {
    format!("{NAT_SNAT4}/24")
}

impl NatGuard {
    fn on(ruleset_file: &Path) -> Result<NatGuard> {
        let mut guard = NatGuard {
            addr: false,
            table: false,
        };
        util::ip(&[
            "-n",
            LB_NS,
            "addr",
            "add",
            &snat_cidr(),
            "dev",
            topology::LB_IF,
        ])
        .context("adding way D's SNAT address to the LB")?;
        guard.addr = true;
        let file = ruleset_file.to_str().context("temp path is not UTF-8")?;
        util::run(&mut exec_in(LB_NS, &["nft", "-f", file]))
            .context("creating the nft DNAT table in xlb-lb")?;
        guard.table = true;
        util::sysctl(LB_NS, &[("net.ipv4.ip_forward", "1")])?;
        Ok(guard)
    }
}

impl Drop for NatGuard {
    fn drop(&mut self) {
        if let Err(e) = util::sysctl(LB_NS, &[("net.ipv4.ip_forward", "0")]) {
            eprintln!("bench: restoring net.ipv4.ip_forward=0 in {LB_NS}: {e:#}");
        }
        if self.table {
            if let Err(e) = util::run(&mut exec_in(
                LB_NS,
                &["nft", "delete", "table", "ip", NFT_TABLE],
            )) {
                eprintln!("bench: deleting nft table {NFT_TABLE} in {LB_NS}: {e:#}");
            }
        }
        if self.addr {
            if let Err(e) = util::ip(&[
                "-n",
                LB_NS,
                "addr",
                "del",
                &snat_cidr(),
                "dev",
                topology::LB_IF,
            ]) {
                eprintln!("bench: removing {NAT_SNAT4} from {LB_NS}: {e:#}");
            }
        }
    }
}

/// What one wrk run reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Wrk {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    pub connect_errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    pub timeouts: u64,
    pub non_2xx: u64,
    /// SYNs the client retransmitted during the run (its TcpExt
    /// TCPSynRetrans): a refused or lost handshake costs a 1 s timeout that
    /// wrk reports as neither an error nor latency.
    pub syn_retrans: u64,
    /// Busy share of all the machine's CPUs during the run (0..=1).
    pub cpu_busy: f64,
    /// Busy CPU time of the whole machine per request, µs: wrk, the
    /// servers, the load balancer and all softirq work together.
    pub cpu_us_per_request: f64,
}

impl Wrk {
    pub fn errors(&self) -> u64 {
        self.connect_errors + self.read_errors + self.write_errors + self.timeouts + self.non_2xx
    }
}

/// `1.23ms`, `456.00us`, `1.50s`, `2.00m` -> milliseconds.
fn wrk_time_ms(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let factor = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => return None,
    };
    Some(v * factor)
}

/// Parses `wrk --latency` output.
pub fn parse_wrk(out: &str) -> Result<Wrk> {
    let mut w = Wrk {
        rps: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        ..Wrk::default()
    };
    let mut in_distribution = false;
    for line in out.lines() {
        let l = line.trim();
        if l.starts_with("Latency Distribution") {
            in_distribution = true;
            continue;
        }
        if in_distribution {
            if let Some((pct, t)) = l.split_once(char::is_whitespace) {
                match pct {
                    "50%" => w.p50_ms = wrk_time_ms(t.trim()).unwrap_or(f64::NAN),
                    "99%" => w.p99_ms = wrk_time_ms(t.trim()).unwrap_or(f64::NAN),
                    "75%" | "90%" => {}
                    _ => in_distribution = false,
                }
            } else {
                in_distribution = false;
            }
        }
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().unwrap_or(f64::NAN);
        } else if let Some(v) = l.strip_prefix("Socket errors:") {
            for part in v.split(',') {
                let mut it = part.split_whitespace();
                let (Some(k), Some(n)) = (it.next(), it.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match k {
                    "connect" => w.connect_errors = n,
                    "read" => w.read_errors = n,
                    "write" => w.write_errors = n,
                    "timeout" => w.timeouts = n,
                    _ => {}
                }
            }
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            w.non_2xx = v.trim().parse().unwrap_or(0);
        } else if l.contains(" requests in ") {
            w.requests = l
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    if w.rps.is_nan() || w.p50_ms.is_nan() || w.p99_ms.is_nan() {
        bail!("wrk output lacks Requests/sec or the 50%/99% latency lines:\n{out}");
    }
    Ok(w)
}

fn wrk_argv(seconds: f64, url: &str) -> Vec<String> {
    vec![
        "wrk".into(),
        format!("-t{WRK_THREADS}"),
        format!("-c{WRK_CONNECTIONS}"),
        format!("-d{seconds}s"),
        "--latency".into(),
        "-H".into(),
        "Connection: close".into(),
        url.into(),
    ]
}

/// The client namespace's TcpExt TCPSynRetrans counter.
fn client_syn_retrans() -> Result<u64> {
    let text = util::in_netns(CLIENT_NS, || {
        // thread-self: /proc/self/net would show the process's namespace.
        fs::read_to_string("/proc/thread-self/net/netstat")
    })?
    .context("reading the client's /proc/net/netstat")?;
    tcpext(&text, "TCPSynRetrans").context("no TcpExt TCPSynRetrans in /proc/net/netstat")
}

/// A TcpExt counter from /proc/net/netstat (a line of names, then a line
/// of values).
fn tcpext(netstat: &str, name: &str) -> Option<u64> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?;
    let values = lines.next()?;
    let i = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

fn run_wrk(seconds: f64, way: Way) -> Result<Wrk> {
    let argv = wrk_argv(seconds, &way.url());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let syn_before = client_syn_retrans()?;
    let (busy0, total0) = cpu_jiffies();
    let out = run_checked(&mut exec_in(CLIENT_NS, &argv))
        .with_context(|| format!("wrk for way {} ({})", way.letter(), way.name()))?;
    let (busy1, total1) = cpu_jiffies();
    let mut w = parse_wrk(&out).with_context(|| format!("way {}", way.letter()))?;
    w.syn_retrans = client_syn_retrans()?.saturating_sub(syn_before);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    #[expect(clippy::cast_precision_loss, reason = "jiffy counts and rates")]
    {
        let busy = busy1.saturating_sub(busy0) as f64;
        w.cpu_busy = busy / total1.saturating_sub(total0).max(1) as f64;
        w.cpu_us_per_request = busy / hz as f64 * 1e6 / (w.rps * seconds).max(1.0);
    }
    Ok(w)
}

/// Results of one way over all runs.
#[derive(Debug, Clone)]
pub struct WayResult {
    pub way: Way,
    pub runs: Vec<Wrk>,
    /// Answers of the sequential GETs made before measuring: which
    /// backends this way reaches.
    pub preflight: BTreeMap<String, usize>,
}

impl WayResult {
    pub fn rps(&self) -> f64 {
        super::median(&self.runs.iter().map(|r| r.rps).collect::<Vec<_>>())
    }
    pub fn p50(&self) -> f64 {
        super::median(&self.runs.iter().map(|r| r.p50_ms).collect::<Vec<_>>())
    }
    pub fn p99(&self) -> f64 {
        super::median(&self.runs.iter().map(|r| r.p99_ms).collect::<Vec<_>>())
    }
    pub fn errors(&self) -> u64 {
        self.runs.iter().map(Wrk::errors).sum()
    }
    pub fn syn_retrans(&self) -> u64 {
        self.runs.iter().map(|r| r.syn_retrans).sum()
    }
    pub fn cpu_busy(&self) -> f64 {
        super::median(&self.runs.iter().map(|r| r.cpu_busy).collect::<Vec<_>>())
    }
    pub fn cpu_us_per_request(&self) -> f64 {
        super::median(
            &self
                .runs
                .iter()
                .map(|r| r.cpu_us_per_request)
                .collect::<Vec<_>>(),
        )
    }
    pub fn requests(&self) -> u64 {
        self.runs.iter().map(|r| r.requests).sum()
    }
}

#[derive(Debug, Clone)]
pub struct HttpResults {
    pub seconds: f64,
    pub warmup_s: f64,
    pub runs: u32,
    pub ways: Vec<WayResult>,
    pub wrk_example: String,
    /// New flows per backend that xdplb counted during the A runs (from
    /// `xdplb backend list -o json`, after minus before).
    pub a_new_flows: Vec<(String, u64)>,
    /// Non-zero pass/drop reasons in the daemon's exit counters.
    pub exit_reasons: Vec<(String, u64)>,
    /// New flows per backend over the daemon's life, from its exit counters.
    pub exit_new_flows: Vec<(String, u64)>,
    /// The VIP's packets and new flows over the daemon's life.
    pub exit_vip_packets: u64,
    pub exit_vip_new_flows: u64,
    pub nginx_conf_b1: String,
    pub nginx_argv_b1: String,
    pub haproxy_conf: String,
    pub haproxy_argv: String,
    pub fwd_argv: String,
    pub nft_ruleset: String,
    pub daemon_config: String,
    pub daemon_argv: String,
}

impl HttpResults {
    pub fn way(&self, w: Way) -> Option<&WayResult> {
        self.ways.iter().find(|r| r.way == w)
    }

    /// requests/s of `a` over `b` (medians).
    pub fn ratio(&self, a: Way, b: Way) -> f64 {
        match (self.way(a), self.way(b)) {
            (Some(x), Some(y)) => x.rps() / y.rps(),
            _ => f64::NAN,
        }
    }

    pub fn set_exit_stats(&mut self, stats: &ExitStats) {
        self.exit_reasons = stats
            .nonzero_reasons()
            .into_iter()
            .map(|(k, n)| (k.to_owned(), n))
            .collect();
        let label = crate::daemon::vip_label(VIP4, HTTP_PORT, "tcp");
        if let Ok(vip) = stats.vip(&label) {
            self.exit_vip_packets = vip.packets;
            self.exit_vip_new_flows = vip.new_flows;
            self.exit_new_flows = vip
                .by_backend()
                .into_iter()
                .map(|(name, b)| (name, b.new_flows))
                .collect();
        }
    }
}

fn new_flows(daemon: &BenchDaemon) -> Result<BTreeMap<String, u64>> {
    Ok(daemon
        .ctl
        .backends(VIP_ARG)?
        .into_iter()
        .map(|r| (r.name(), r.new_flows))
        .collect())
}

pub fn run(
    quick: bool,
    n_runs: u32,
    servers: &mut Servers,
    daemon: &BenchDaemon,
) -> Result<HttpResults> {
    let seconds = if quick { 2.0 } else { 5.0 };
    // Paths as the document shows them: the run's temp dir and the
    // workspace are the reader's own.
    let tmp = servers.dir.display().to_string();
    let clean = |s: &str| super::report::clean(&s.replace(&tmp, "$TMP"));
    let warmup_s = 1.0;
    let dir = super::TempDir::new("nft")?;
    let ruleset_file = dir.0.join("xlb_bench.nft");
    fs::write(&ruleset_file, nft_ruleset()).context("writing the nft ruleset")?;

    let forwarding = util::in_netns(LB_NS, || {
        fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default()
    })?;
    if forwarding.trim() != "0" {
        bail!("net.ipv4.ip_forward is {forwarding:?} in {LB_NS}; the topology sets it to 0");
    }

    // Which backends each way reaches, by sequential GETs.
    let mut preflight = BTreeMap::new();
    for way in Way::ALL {
        let n = match way {
            Way::Xdplb | Way::Fwd => 30,
            Way::Direct => 3,
            Way::Haproxy | Way::Nft => 6,
        };
        let seen = {
            let _nat = (way == Way::Nft)
                .then(|| NatGuard::on(&ruleset_file))
                .transpose()?;
            gets_from_client(&way.addr(), n)?
        };
        let want: Vec<String> = match way {
            Way::Direct => vec![topology::backend_name(1)],
            _ => (1..=BACKENDS).map(topology::backend_name).collect(),
        };
        let bad: Vec<&String> = seen.keys().filter(|k| !want.contains(k)).collect();
        let missing: Vec<&String> = want.iter().filter(|k| !seen.contains_key(*k)).collect();
        if !bad.is_empty() || !missing.is_empty() {
            bail!(
                "way {} ({}) at {}: {n} GETs answered {seen:?}, expected only and all of {want:?}",
                way.letter(),
                way.name(),
                way.addr()
            );
        }
        println!(
            "bench: way {} {} via {}: {seen:?}",
            way.letter(),
            way.name(),
            way.addr()
        );
        preflight.insert(way.letter(), seen);
    }

    // One untimed round first: caches, the flow table, conntrack, nginx.
    for way in Way::ALL {
        let _nat = (way == Way::Nft)
            .then(|| NatGuard::on(&ruleset_file))
            .transpose()?;
        run_wrk(warmup_s, way).context("warm-up")?;
    }

    let mut runs: BTreeMap<&str, Vec<Wrk>> = BTreeMap::new();
    let mut a_new_flows: BTreeMap<String, u64> = BTreeMap::new();
    for run in 1..=n_runs {
        let mut line = Vec::new();
        for way in Way::ALL {
            check_interrupted()?;
            let before = (way == Way::Xdplb).then(|| new_flows(daemon)).transpose()?;
            let result = {
                let _nat = (way == Way::Nft)
                    .then(|| NatGuard::on(&ruleset_file))
                    .transpose()?;
                run_wrk(seconds, way)?
            };
            if let Some(before) = before {
                for (name, n) in new_flows(daemon)? {
                    *a_new_flows.entry(name.clone()).or_insert(0) +=
                        n.saturating_sub(before.get(&name).copied().unwrap_or(0));
                }
            }
            line.push(format!(
                "{} {:.0} req/s p50 {:.2} ms p99 {:.2} ms CPU {:.0}% {:.0} us/req{}{}",
                way.letter(),
                result.rps,
                result.p50_ms,
                result.p99_ms,
                result.cpu_busy * 100.0,
                result.cpu_us_per_request,
                if result.errors() > 0 {
                    format!(" ERRORS {}", result.errors())
                } else {
                    String::new()
                },
                if result.syn_retrans > 0 {
                    format!(" SYN-retransmits {}", result.syn_retrans)
                } else {
                    String::new()
                }
            ));
            runs.entry(way.letter()).or_default().push(result);
        }
        println!("bench: http run {run}/{n_runs}: {}", line.join(" | "));
        // A server that died mid-run would explain errors; it must not go
        // unnoticed.
        servers.check_alive()?;
    }

    let ways = Way::ALL
        .into_iter()
        .map(|w| WayResult {
            way: w,
            runs: runs.remove(w.letter()).unwrap_or_default(),
            preflight: preflight.remove(w.letter()).unwrap_or_default(),
        })
        .collect();
    Ok(HttpResults {
        seconds,
        warmup_s,
        runs: n_runs,
        ways,
        wrk_example: format!(
            "nsenter --net=/run/netns/{CLIENT_NS} -- wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} \
             -d{seconds}s --latency -H 'Connection: close' URL"
        ),
        a_new_flows: a_new_flows.into_iter().collect(),
        exit_reasons: Vec::new(),
        exit_new_flows: Vec::new(),
        exit_vip_packets: 0,
        exit_vip_new_flows: 0,
        nginx_conf_b1: servers.nginx_conf_b1.clone(),
        nginx_argv_b1: clean(&servers.nginx_argv_b1),
        haproxy_conf: servers.haproxy_conf.clone(),
        haproxy_argv: clean(&servers.haproxy_argv),
        fwd_argv: clean(&servers.fwd_argv),
        nft_ruleset: nft_ruleset(),
        daemon_config: super::daemon_config(),
        daemon_argv: clean(&daemon.argv),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "Running 5s test @ http://10.200.100.1:8090/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.41ms    1.10ms  21.33ms   80.12%
    Req/Sec     6.70k   412.31     7.50k    72.00%
  Latency Distribution
     50%    2.21ms
     75%  800.00us
     90%    3.51ms
     99%    1.20s
  66691 requests in 5.00s, 9.73MB read
  Socket errors: connect 3, read 4, write 0, timeout 7
  Non-2xx or 3xx responses: 2
Requests/sec:  13330.25
Transfer/sec:      1.95MB
";

    #[test]
    fn parses_wrk_output() {
        let w = parse_wrk(OUT).unwrap();
        assert_eq!(w.rps, 13330.25);
        assert!((w.p50_ms - 2.21).abs() < 1e-9);
        assert!((w.p99_ms - 1200.0).abs() < 1e-9);
        assert_eq!(w.requests, 66691);
        assert_eq!(
            (
                w.connect_errors,
                w.read_errors,
                w.write_errors,
                w.timeouts,
                w.non_2xx
            ),
            (3, 4, 0, 7, 2)
        );
        assert_eq!(w.errors(), 16);
    }

    #[test]
    fn wrk_without_errors_has_none() {
        let clean: String = OUT
            .lines()
            .filter(|l| !l.contains("errors") && !l.contains("Non-2xx"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse_wrk(&clean).unwrap().errors(), 0);
        assert!(parse_wrk("Requests/sec: 1\n").is_err());
    }

    #[test]
    fn reads_tcpext_counters() {
        let netstat = "TcpExt: SyncookiesSent TCPSynRetrans Other\nTcpExt: 1 42 7\n\
                       IpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(tcpext(netstat, "TCPSynRetrans"), Some(42));
        assert_eq!(tcpext(netstat, "Missing"), None);
    }

    #[test]
    fn wrk_time_units() {
        assert_eq!(wrk_time_ms("456.00us"), Some(0.456));
        assert_eq!(wrk_time_ms("2.00m"), Some(120_000.0));
        assert_eq!(wrk_time_ms("3"), None);
    }
}
