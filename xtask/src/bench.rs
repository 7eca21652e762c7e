//! `cargo xtask bench [--quick]`: every xdplb benchmark beside a baseline
//! measured in the same run, written to `docs/benchmarks.md` and
//! `docs/benchmarks.png` and summarised on stdout.
//!
//! 1. In-kernel cost per packet and 2. packets per second over veth:
//!    `xdplb-bench kernel` / `veth` (lb-userspace/src/bin/xdplb-bench.rs).
//! 3. End to end on the namespace topology: HTTP requests per second with a
//!    new TCP connection per request (wrk) through xdplb, straight to one
//!    backend, through HAProxy and through nftables DNAT ([`http`]).
//! 4. Control plane: Maglev build time (`xdplb-bench maglev`) and the time
//!    from `xdplb backend drain` to the first connection that no longer
//!    reaches the drained backend ([`control`]).
//!
//! Everything started here is owned by a guard that stops it on every exit
//! path, and SIGINT/SIGTERM become an error at the next step (children in
//! our process group get the terminal's SIGINT themselves), so an
//! interrupted bench still removes its topology, daemon pins, nginx,
//! HAProxy and nft table.

mod control;
mod http;
mod micro;
mod report;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::{
    daemon::{self, Ctl, Daemon, DaemonOptions, ExitStats},
    deps, topology, util,
};

pub use control::{client_main, ClientArgs};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Shorter runs (same number of runs): finishes in under 2 minutes.
    #[arg(long)]
    pub quick: bool,
}

/// Runs per case for every benchmark (medians are taken over them): full
/// and `--quick`. Quick keeps the minimum of 5 and shortens each run.
pub const RUNS_FULL: u32 = 9;
pub const RUNS_QUICK: u32 = 5;

/// Where the bench daemon pins; removed when the bench ends.
const BENCH_BPFFS: &str = "/sys/fs/bpf/xdplb-bench";
/// Directory of the bench daemon's control socket.
const BENCH_SOCKET_DIR: &str = "/run/xdplb-bench";
/// The VIP's name in the bench daemon's config.
const VIP_NAME: &str = "bench";
/// The VIP as the CLI's backend commands take it: the address form, which
/// every CLI version accepts (older ones did not take the name).
const VIP_ARG: &str = "10.200.100.1:8090/tcp";
/// Port of nginx on every backend, and of the VIP.
pub const HTTP_PORT: u16 = 8090;
/// Backends behind every load balancer of the end-to-end benchmark.
pub const BACKENDS: usize = 3;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set a flag instead of killing us, so the guards run.
fn catch_signals() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with only the handler set is valid; the
        // handler only stores to an atomic, which is async-signal-safe.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("installing a signal handler");
        }
    }
    Ok(())
}

/// Fails once SIGINT or SIGTERM arrived; called between steps.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d`, returning early with an error on SIGINT/SIGTERM.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process on the
/// machine (unlike `Instant`, whose values cannot be passed between them).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Facts about the machine and its load, read before and after the run.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    pub nproc: usize,
    pub mem_gib: f64,
    pub loadavg_before: String,
    pub loadavg_after: String,
    /// Percent of CPU time stolen by the hypervisor during the run.
    pub steal_percent: f64,
    /// Whether the kernel exposes the CPU's performance counters (a `cpu`
    /// or `cpu_*` device under /sys/bus/event_source/devices): without
    /// them `perf` and `bpftool prog profile` cannot count cycles.
    pub cpu_pmu: bool,
    #[serde(skip)]
    steal_start: (u64, u64),
}

fn read_trim(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The aggregate `cpu` line of /proc/stat (machine-wide, not per
/// namespace): jiffies in user, nice, system, idle, iowait, irq, softirq,
/// steal, ... order; empty if unreadable.
fn cpu_stat() -> Vec<u64> {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .find(|l| l.starts_with("cpu "))
        .map(|line| {
            line.split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Sum of the first eight `cpu_stat` fields: all time, steal included.
fn total_jiffies(v: &[u64]) -> u64 {
    v.iter().take(8).sum()
}

/// (steal, total) jiffies over all CPUs.
fn steal_jiffies() -> (u64, u64) {
    let v = cpu_stat();
    (v.get(7).copied().unwrap_or(0), total_jiffies(&v))
}

/// (busy, total) jiffies over all CPUs. Busy = everything but idle and
/// iowait.
fn cpu_jiffies() -> (u64, u64) {
    let v = cpu_stat();
    let total = total_jiffies(&v);
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

fn has_cpu_pmu() -> bool {
    fs::read_dir("/sys/bus/event_source/devices").is_ok_and(|dir| {
        dir.filter_map(Result::ok).any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name == "cpu" || name.starts_with("cpu_")
        })
    })
}

impl Machine {
    fn before() -> Machine {
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let mem_kib: f64 = fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Machine {
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            cpu_model,
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            mem_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            loadavg_before: read_trim("/proc/loadavg"),
            loadavg_after: String::new(),
            steal_percent: 0.0,
            cpu_pmu: has_cpu_pmu(),
            steal_start: steal_jiffies(),
        }
    }

    fn after(&mut self) {
        self.loadavg_after = read_trim("/proc/loadavg");
        let ((s0, t0), (s1, t1)) = (self.steal_start, steal_jiffies());
        #[expect(
            clippy::cast_precision_loss,
            reason = "jiffy counts, shown as a percentage"
        )]
        let pct = 100.0 * s1.saturating_sub(s0) as f64 / t1.saturating_sub(t0).max(1) as f64;
        self.steal_percent = (pct * 100.0).round() / 100.0;
    }
}

/// Everything one `cargo xtask bench` measured; each part is `Err` with
/// its message if it failed, so the others are still reported.
pub struct Results {
    pub quick: bool,
    /// Runs per case.
    pub runs: u32,
    pub machine: Machine,
    /// UTC, `YYYY-MM-DD HH:MM`.
    pub date: String,
    pub kernel: Result<micro::Kernel, String>,
    pub veth: Result<micro::Veth, String>,
    pub maglev: Result<micro::Maglev, String>,
    pub http: Result<http::HttpResults, String>,
    pub drain: Result<control::DrainResults, String>,
    /// Seconds: the whole command, and the measurements alone (no build).
    pub total_s: f64,
    pub measure_s: f64,
    /// Seconds per part, in the order they ran.
    pub part_s: Vec<(&'static str, f64)>,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `xdplb-bench`, built beside `xdplb`.
pub fn xdplb_bench_path() -> Result<PathBuf> {
    let p = daemon::xdplb_path()?.with_file_name("xdplb-bench");
    if !p.is_file() {
        bail!("{} does not exist; run `cargo xtask build`", p.display());
    }
    Ok(p)
}

pub fn run(args: BenchArgs) -> Result<()> {
    debug_assert_eq!(
        VIP_ARG,
        daemon::vip_label(topology::VIP4, HTTP_PORT, "tcp"),
        "VIP_ARG must name the bench VIP"
    );
    let started = Instant::now();
    if !is_root() {
        bail!(
            "cargo xtask bench needs root: it loads XDP programs, creates network namespaces \
             and runs servers in them"
        );
    }
    deps::run()?;
    daemon::build_release()?;
    catch_signals()?;
    refuse_busy_topology()?;

    let measure_start = Instant::now();
    let mut machine = Machine::before();
    let quick = args.quick;
    let runs = if quick { RUNS_QUICK } else { RUNS_FULL };
    println!(
        "bench{}: {} | {} | {} CPUs | {} GiB | loadavg before: {}",
        if quick { " (quick)" } else { "" },
        machine.kernel,
        machine.cpu_model,
        machine.nproc,
        machine.mem_gib,
        machine.loadavg_before
    );
    let mut part_s = Vec::new();
    let mut timed = |name: &'static str, t: Instant| {
        let s = t.elapsed().as_secs_f64();
        println!("bench: {name} done in {s:.1} s");
        part_s.push((name, s));
    };

    let t = Instant::now();
    let kernel = micro::kernel(quick, runs);
    timed("in-kernel", t);
    let t = Instant::now();
    let veth = micro::veth(quick, runs);
    timed("veth", t);
    let t = Instant::now();
    let maglev = micro::maglev(runs);
    timed("maglev", t);
    let t = Instant::now();
    let (http, drain) = match on_topology(quick, runs) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("{e:#}");
            (Err(msg.clone()), Err(msg))
        }
    };
    timed("topology (end to end + drain)", t);

    machine.after();
    let measure_s = measure_start.elapsed().as_secs_f64();
    let mut results = Results {
        quick,
        runs,
        machine,
        date: utc_now(),
        kernel: kernel.map_err(|e| format!("{e:#}")),
        veth: veth.map_err(|e| format!("{e:#}")),
        maglev: maglev.map_err(|e| format!("{e:#}")),
        http,
        drain,
        total_s: 0.0,
        measure_s,
        part_s,
    };
    results.total_s = started.elapsed().as_secs_f64();

    if INTERRUPTED.load(Ordering::SeqCst) {
        // A partial run must not replace the last complete document.
        println!("\n{}", report::summary(&results));
        bail!("interrupted; docs/benchmarks.md left as it was");
    }
    let docs = daemon::workspace_root().join("docs");
    fs::create_dir_all(&docs).with_context(|| format!("creating {}", docs.display()))?;
    let png = docs.join("benchmarks.png");
    let chart = report::chart(&results, &png);
    if let Err(e) = &chart {
        eprintln!("bench: drawing {} failed: {e:#}", png.display());
    }
    let md = docs.join("benchmarks.md");
    fs::write(&md, report::markdown(&results, chart.is_ok()))
        .with_context(|| format!("writing {}", md.display()))?;
    println!("\n{}", report::summary(&results));
    println!("wrote {} and {}", md.display(), png.display());

    let failed: Vec<&str> = [
        ("in-kernel", results.kernel.is_err()),
        ("veth", results.veth.is_err()),
        ("maglev", results.maglev.is_err()),
        ("end to end", results.http.is_err()),
        ("drain", results.drain.is_err()),
        ("chart", chart.is_err()),
    ]
    .into_iter()
    .filter(|(_, bad)| *bad)
    .map(|(n, _)| n)
    .collect();
    check_interrupted()?;
    if !failed.is_empty() {
        bail!("benchmarks failed: {}", failed.join(", "));
    }
    Ok(())
}

/// The bench builds its own topology and removes it at the end; one that is
/// already up belongs to someone else (a test or demo in progress), and
/// rebuilding it under them would break both.
fn refuse_busy_topology() -> Result<()> {
    let ours: Vec<String> = topology::our_namespaces()?.into_iter().collect();
    if !ours.is_empty() || Path::new(topology::STATE_DIR).exists() {
        bail!(
            "the test topology is already up ({}): another `cargo xtask test`, `demo` or \
             `bench` may be running. If none is, remove it with `cargo xtask topology down`",
            if ours.is_empty() {
                topology::STATE_DIR.to_owned()
            } else {
                ours.join(", ")
            }
        );
    }
    Ok(())
}

/// Tears the topology down when dropped.
struct TopologyGuard;

impl TopologyGuard {
    fn up(backends: usize) -> Result<TopologyGuard> {
        // The guard exists before `up` so a half-built topology is removed.
        let guard = TopologyGuard;
        topology::up(backends)?;
        Ok(guard)
    }
}

impl Drop for TopologyGuard {
    fn drop(&mut self) {
        if let Err(e) = topology::down() {
            eprintln!("bench: removing the topology failed: {e:#}");
        }
    }
}

/// Owns a temporary directory and removes it when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("xlb-bench-{tag}.{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The bench daemon; dropping it kills the daemon if still running and
/// removes its pins and socket directory, so no XDP program or map is left.
pub struct BenchDaemon {
    daemon: Option<Daemon>,
    pub ctl: Ctl,
    pub argv: String,
}

fn remove_pins() -> Result<()> {
    let dir = Path::new(BENCH_BPFFS);
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

impl BenchDaemon {
    fn start(config: &Path) -> Result<BenchDaemon> {
        // Stale pins of an earlier, killed bench would be adopted.
        remove_pins()?;
        fs::create_dir_all(BENCH_SOCKET_DIR)
            .with_context(|| format!("creating {BENCH_SOCKET_DIR}"))?;
        let socket = Path::new(BENCH_SOCKET_DIR).join("xdplb.sock");
        let opts = DaemonOptions {
            socket: Some(socket.clone()),
            bpffs: Some(BENCH_BPFFS.into()),
            metrics: Some("off".into()),
            no_pin: false,
        };
        let argv = format!(
            "nsenter --net=/run/netns/{} -- {} run --config {} --exit-stats json --socket {} \
             --bpffs {BENCH_BPFFS} --metrics off",
            topology::LB_NS,
            daemon::xdplb_path()?.display(),
            config.display(),
            socket.display()
        );
        let mut guard = BenchDaemon {
            daemon: None,
            ctl: Ctl::new(&socket)?,
            argv,
        };
        guard.daemon = Some(Daemon::start_with(config, &opts)?);
        Ok(guard)
    }

    /// SIGINT, wait for the daemon to detach, and its exit counters.
    fn stop(mut self) -> Result<ExitStats> {
        let daemon = self.daemon.take().context("the bench daemon was stopped")?;
        let v = daemon.stop()?;
        ExitStats::from_json(&v)
    }
}

impl Drop for BenchDaemon {
    fn drop(&mut self) {
        drop(self.daemon.take());
        if let Err(e) = remove_pins() {
            eprintln!("bench: {e:#}");
        }
        let _ = fs::remove_dir_all(BENCH_SOCKET_DIR);
    }
}

fn daemon_config() -> String {
    let backends: String = (1..=BACKENDS)
        .map(|i| format!("      - address: {}\n", topology::backend_addr4(i)))
        .collect();
    format!(
        "# Written by `cargo xtask bench`.\ninterface: {}\nvips:\n  - name: {VIP_NAME}\n    \
         address: {}\n    port: {HTTP_PORT}\n    protocol: tcp\n    backends:\n{backends}",
        topology::LB_IF,
        topology::VIP4
    )
}

/// Parts 3 and 4: on one topology with one daemon.
fn on_topology(
    quick: bool,
    runs: u32,
) -> Result<(
    Result<http::HttpResults, String>,
    Result<control::DrainResults, String>,
)> {
    let dir = TempDir::new("run")?;
    let t = Instant::now();
    let _topology = TopologyGuard::up(BACKENDS)?;
    topology::add_forwarder_host(BACKENDS).context("adding way E's forwarder host")?;
    println!(
        "bench: topology with {BACKENDS} backends up in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    check_interrupted()?;
    // One client opens tens of thousands of connections per second. Where
    // it closes first (C: HAProxy's FIN trails the response) its 28k
    // ephemeral ports sit in TIME_WAIT for 60 s and connect() soon spins
    // looking for a free one: C fell to ~400 requests/s after ~15 s of
    // load. Reusing TIME_WAIT ports for new connections (timestamps keep it
    // safe) is what load generators do; it changes nothing where the server
    // closes first (A, B, D). The namespace goes away with the topology.
    util::sysctl(topology::CLIENT_NS, &[("net.ipv4.tcp_tw_reuse", "1")])?;
    let mut servers = http::Servers::start(&dir.0)?;
    let config = dir.0.join("xdplb-bench.yaml");
    fs::write(&config, daemon_config()).context("writing the daemon config")?;
    let bench_daemon = BenchDaemon::start(&config)?;
    println!("bench: xdplb running: {}", bench_daemon.argv);

    let http = http::run(quick, runs, &mut servers, &bench_daemon).map_err(|e| format!("{e:#}"));
    let drain = if INTERRUPTED.load(Ordering::SeqCst) {
        Err("interrupted".to_owned())
    } else {
        control::drain(&bench_daemon, runs).map_err(|e| format!("{e:#}"))
    };
    let exit = bench_daemon.stop();
    let http = match (http, exit) {
        (Ok(mut h), Ok(stats)) => {
            h.set_exit_stats(&stats);
            Ok(h)
        }
        (Ok(_), Err(e)) => Err(format!("stopping the bench daemon: {e:#}")),
        (Err(e), _) => Err(e),
    };
    servers.stop();
    Ok((http, drain))
}

/// The current UTC time as `YYYY-MM-DD HH:MM UTC`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Runs `cmd` to completion with SIGINT/SIGTERM checked afterwards.
pub fn run_checked(cmd: &mut Command) -> Result<String> {
    let out = util::run(cmd);
    check_interrupted()?;
    out
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
