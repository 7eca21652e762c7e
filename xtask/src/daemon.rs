//! Building and driving the `xdplb` daemon for the demo and the end-to-end
//! tests: start it in the LB namespace, reload it, stop it and read the
//! counters it prints on exit.
//!
//! A [`Daemon`] only ever signals the one process it spawned (by PID), and
//! kills it when dropped, so a failing test never leaves an XDP program
//! attached.

use std::{
    collections::BTreeMap,
    fmt,
    io::{BufRead, BufReader, Read},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::{topology, util};

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// After a reload is acknowledged, how long the daemon must stay up for the
/// reload to count: a daemon that also treats SIGHUP as "stop" exits within
/// milliseconds of logging the reload.
const RELOAD_SETTLE: Duration = Duration::from_millis(300);
/// How long a daemon that closed its stderr may take to exit.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// Lines of daemon stderr quoted in error messages.
const LOG_TAIL: usize = 15;

/// Root of the workspace this xtask was built from.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
}

/// The `cargo` that runs us (set by `cargo run`), else the one in PATH.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// `cargo build --release -p lb-userspace`, output shown as it happens.
pub fn build_release() -> Result<()> {
    eprintln!("building xdplb: cargo build --release -p lb-userspace");
    let mut cmd = cargo();
    cmd.args(["build", "--release", "-p", "lb-userspace"]);
    let status = cmd
        .status()
        .with_context(|| format!("starting `{}`", util::display(&cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", util::display(&cmd));
    }
    Ok(())
}

/// Path of the release `xdplb` binary, from cargo's idea of the target
/// directory (which `CARGO_TARGET_DIR` or a config file may move).
pub fn xdplb_path() -> Result<PathBuf> {
    #[derive(Deserialize)]
    struct Metadata {
        target_directory: PathBuf,
    }
    let mut cmd = cargo();
    cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
    let out = util::run(&mut cmd).context("asking cargo for the target directory")?;
    let meta: Metadata = serde_json::from_str(&out).context("parsing `cargo metadata` output")?;
    let path = meta.target_directory.join("release").join("xdplb");
    if !path.is_file() {
        bail!(
            "{} does not exist; run `cargo xtask build` first",
            path.display()
        );
    }
    Ok(path)
}

/// Everything the daemon wrote to stderr so far, one entry per line, filled
/// by a reader thread so the pipe never blocks the daemon.
#[derive(Default)]
struct Log {
    lines: Mutex<(Vec<String>, bool)>,
    changed: Condvar,
}

impl Log {
    fn push(&self, line: String) {
        let mut g = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        g.0.push(line);
        self.changed.notify_all();
    }

    fn close(&self) {
        let mut g = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        g.1 = true;
        self.changed.notify_all();
    }

    fn is_closed(&self) -> bool {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).1
    }

    fn len(&self) -> usize {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).0.len()
    }

    /// Waits until a line at index >= `from` satisfies `pred`, the stream
    /// closes, or `timeout` passes. Returns the matching line, if any.
    fn wait_for(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = from;
        loop {
            if let Some(l) = g.0.iter().skip(seen).find(|l| pred(l)) {
                return Some(l.clone());
            }
            seen = g.0.len();
            let now = Instant::now();
            if g.1 || now >= deadline {
                return None;
            }
            g = self
                .changed
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn tail(&self) -> String {
        let g = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let start = g.0.len().saturating_sub(LOG_TAIL);
        g.0[start..].join("\n")
    }
}

/// The `rejected` line of a reload the daemon refused; `reload` returns it as
/// the error so callers can tell a refusal from a broken daemon.
#[derive(Debug)]
pub struct Rejected(pub String);

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the daemon rejected the reload: {}", self.0)
    }
}

impl std::error::Error for Rejected {}

/// Where a daemon keeps its control socket, pins and metrics endpoint.
/// `None` leaves the daemon's own default.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// `--socket`: control socket path (a file in the root namespace's
    /// filesystem, so the CLI reaches it without entering the namespace).
    pub socket: Option<PathBuf>,
    /// `--bpffs`: where maps and the XDP link are pinned.
    pub bpffs: Option<PathBuf>,
    /// `--metrics`: address (inside the LB namespace) or `off`.
    pub metrics: Option<String>,
    /// `--no-pin` (and no `--bpffs`): the datapath lives and dies with the
    /// process.
    pub no_pin: bool,
}

/// A running `xdplb run` inside the LB namespace.
pub struct Daemon {
    child: Option<Child>,
    pid: i32,
    log: Arc<Log>,
    stderr_thread: Option<JoinHandle<()>>,
    stdout_thread: Option<JoinHandle<String>>,
}

impl Daemon {
    /// Starts `xdplb run --config CONFIG --exit-stats json` in the LB
    /// namespace and waits until it reports that it is attached.
    pub fn start(config: &Path) -> Result<Daemon> {
        Daemon::start_with(config, &DaemonOptions::default())
    }

    /// [`Daemon::start`] with a socket, pin directory or metrics address of
    /// the caller's choosing.
    pub fn start_with(config: &Path, opts: &DaemonOptions) -> Result<Daemon> {
        let exe = xdplb_path()?;
        let exe = exe.to_str().context("xdplb path is not valid UTF-8")?;
        let config = config.to_str().context("config path is not valid UTF-8")?;
        let mut argv = vec![exe, "run", "--config", config, "--exit-stats", "json"];
        if let Some(s) = &opts.socket {
            argv.extend(["--socket", s.to_str().context("socket path is not UTF-8")?]);
        }
        if opts.no_pin {
            argv.push("--no-pin");
        } else if let Some(d) = &opts.bpffs {
            argv.extend(["--bpffs", d.to_str().context("bpffs path is not UTF-8")?]);
        }
        if let Some(m) = &opts.metrics {
            argv.extend(["--metrics", m.as_str()]);
        }
        let mut cmd = topology::exec_in(topology::LB_NS, &argv);
        // Same process group as us on purpose: a Ctrl-C at the terminal
        // reaches the daemon too, which then detaches cleanly.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting `{}`", util::display(&cmd)))?;
        // nsenter with only --net execs the target without forking, so this
        // is the daemon's own PID.
        let pid = i32::try_from(child.id()).context("PID out of range")?;
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().context("daemon stderr not piped")?;
        let stdout = child.stdout.take().context("daemon stdout not piped")?;
        let stderr_thread = {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    match line {
                        Ok(l) => log.push(l),
                        Err(_) => break,
                    }
                }
                log.close();
            })
        };
        let stdout_thread = thread::spawn(move || {
            let mut s = String::new();
            let _ = BufReader::new(stdout).read_to_string(&mut s);
            s
        });
        let mut daemon = Daemon {
            child: Some(child),
            pid,
            log,
            stderr_thread: Some(stderr_thread),
            stdout_thread: Some(stdout_thread),
        };
        let ready = daemon
            .log
            .wait_for(0, READY_TIMEOUT, |l| l.contains("ready:"));
        if ready.is_none() {
            if let Some(status) = daemon.exited()? {
                bail!(
                    "xdplb exited ({status}) before it was ready:\n{}",
                    daemon.log.tail()
                );
            }
            bail!(
                "xdplb (pid {pid}) did not report `ready:` within {READY_TIMEOUT:?}:\n{}",
                daemon.log.tail()
            );
        }
        Ok(daemon)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The first line of the daemon's log (stderr) so far that satisfies
    /// `pred`.
    pub fn find_log(&self, pred: impl Fn(&str) -> bool) -> Option<String> {
        self.log.wait_for(0, Duration::ZERO, pred)
    }

    /// The last lines of the daemon's log, for error messages.
    pub fn log_tail(&self) -> String {
        self.log.tail()
    }

    /// SIGKILLs the daemon (no chance to detach or unpin, like a crash) and
    /// waits until it is gone.
    pub fn kill(mut self) -> Result<()> {
        let mut child = self.child.take().context("xdplb was already stopped")?;
        if child.try_wait()?.is_some() {
            self.join_readers();
            bail!(
                "xdplb (pid {}) had already exited before SIGKILL. Its log:\n{}",
                self.pid,
                self.log.tail()
            );
        }
        self.signal(libc::SIGKILL)?;
        child.wait().context("waiting for the killed xdplb")?;
        self.join_readers();
        Ok(())
    }

    /// The daemon's exit status if it exits within `within`.
    fn exit_within(&mut self, within: Duration) -> Result<Option<ExitStatus>> {
        let child = self.child.as_mut().context("xdplb was already stopped")?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = child.try_wait().context("waiting for xdplb")? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The daemon's exit status if it has exited. A closed stderr means it
    /// is exiting, so then wait a little for the status to be available.
    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        let grace = if self.log.is_closed() {
            EXIT_GRACE
        } else {
            Duration::ZERO
        };
        self.exit_within(grace)
    }

    fn signal(&self, sig: libc::c_int) -> Result<()> {
        if !util::signal(self.pid, sig) {
            bail!(
                "cannot signal xdplb (pid {}): {}",
                self.pid,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Sends SIGHUP and waits for the daemon to acknowledge the new file.
    /// A refused file is returned as a [`Rejected`] error.
    pub fn reload(&mut self) -> Result<()> {
        let from = self.log.len();
        self.signal(libc::SIGHUP)?;
        let line = self.log.wait_for(from, RELOAD_TIMEOUT, |l| {
            l.contains("reloaded") || (l.contains("reload of") && l.contains("rejected"))
        });
        let outcome = match line {
            Some(l) if l.contains("reloaded") => Ok(()),
            Some(l) => Err(Rejected(l)),
            None => {
                if let Some(status) = self.exited()? {
                    bail!(
                        "xdplb exited ({status}) after SIGHUP without reloading:\n{}",
                        self.log.tail()
                    );
                }
                bail!(
                    "xdplb logged neither `reloaded` nor `rejected` within {RELOAD_TIMEOUT:?} \
                     of SIGHUP:\n{}",
                    self.log.tail()
                );
            }
        };
        // SIGHUP must not also stop the daemon.
        if let Some(status) = self.exit_within(RELOAD_SETTLE)? {
            bail!(
                "xdplb handled SIGHUP ({}) but then exited ({status}): SIGHUP must reload, \
                 not stop. Its log:\n{}",
                if outcome.is_ok() {
                    "reloaded"
                } else {
                    "rejected"
                },
                self.log.tail()
            );
        }
        outcome.map_err(anyhow::Error::new)
    }

    /// Sends SIGINT, waits for the daemon to detach and exit, and returns the
    /// JSON counters it printed.
    pub fn stop(mut self) -> Result<serde_json::Value> {
        let mut child = self.child.take().context("xdplb was already stopped")?;
        // The process may have died on its own; then there is nothing to
        // signal, and the exit status below tells the story.
        if child.try_wait()?.is_none() {
            self.signal(libc::SIGINT)?;
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait().context("waiting for xdplb")? {
                break s;
            }
            if Instant::now() > deadline {
                util::signal(self.pid, libc::SIGKILL);
                let _ = child.wait();
                self.join_readers();
                bail!(
                    "xdplb (pid {}) did not exit within {STOP_TIMEOUT:?} of SIGINT; killed it. \
                     Its log:\n{}",
                    self.pid,
                    self.log.tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        let stdout = self.join_readers();
        if !status.success() {
            bail!("xdplb exited with {status}. Its log:\n{}", self.log.tail());
        }
        serde_json::from_str(stdout.trim()).with_context(|| {
            format!(
                "parsing xdplb's exit counters {:?}. Its log:\n{}",
                stdout.trim(),
                self.log.tail()
            )
        })
    }

    fn join_readers(&mut self) -> String {
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        self.stdout_thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                eprintln!("killing xdplb (pid {}) left running", self.pid);
                util::signal(self.pid, libc::SIGKILL);
            }
            let _ = child.wait();
            self.join_readers();
        }
    }
}

/// The `xdplb` CLI talking to one daemon's control socket. Runs in the root
/// namespace: the socket is a file, no namespace needs entering.
#[derive(Debug, Clone)]
pub struct Ctl {
    exe: PathBuf,
    socket: PathBuf,
}

/// What one `xdplb` CLI invocation did.
#[derive(Debug, Clone)]
pub struct CtlOutput {
    /// The exit code; `None` if a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    /// stdout and stderr together, trimmed, for checks on messages.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr).trim().to_owned()
    }
}

/// One row of `xdplb backend list -o json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BackendRow {
    pub vip: String,
    pub address: String,
    pub port: u16,
    pub weight: u32,
    /// active, draining, drained or down.
    pub state: String,
    /// unchecked, up or down.
    pub health: String,
    pub active_connections: u64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub closed_flows: u64,
    pub mac: String,
    /// Share of the VIP's ring slots, 0 to 1.
    #[serde(default)]
    pub ring_share: f64,
}

impl BackendRow {
    /// `b2` for a topology backend, else the address.
    pub fn name(&self) -> String {
        backend_name_of(&self.address).unwrap_or_else(|| self.address.clone())
    }
}

impl Ctl {
    pub fn new(socket: &Path) -> Result<Ctl> {
        Ok(Ctl {
            exe: xdplb_path()?,
            socket: socket.to_owned(),
        })
    }

    pub fn exe(&self) -> &Path {
        &self.exe
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `xdplb --socket S ARGS...`, whatever its exit status.
    pub fn run(&self, args: &[&str]) -> Result<CtlOutput> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--socket").arg(&self.socket).args(args);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running `{}`", util::display(&cmd)))?;
        Ok(CtlOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// `xdplb --socket S ARGS...`, which must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        if out.code != Some(0) {
            bail!(
                "`xdplb {}` failed (exit {:?}): {}",
                args.join(" "),
                out.code,
                out.text()
            );
        }
        Ok(out.stdout)
    }

    /// `xdplb backend list --vip VIP -o json`.
    pub fn backends(&self, vip: &str) -> Result<Vec<BackendRow>> {
        let out = self.ok(&["backend", "list", "--vip", vip, "-o", "json"])?;
        serde_json::from_str(out.trim())
            .with_context(|| format!("parsing `xdplb backend list -o json`: {:?}", out.trim()))
    }
}

/// The counters `xdplb run --exit-stats json` prints on exit.
#[derive(Debug, Clone, Deserialize)]
pub struct ExitStats {
    pub vips: Vec<VipStats>,
    pub reasons: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VipStats {
    /// e.g. `10.200.100.1:8080/tcp`, `[fd00:200::100]:8080/udp`.
    pub vip: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub backends: Vec<BackendStats>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BackendStats {
    pub address: String,
    pub weight: u32,
    pub mac: String,
    pub packets: u64,
    pub new_flows: u64,
}

impl ExitStats {
    pub fn from_json(v: &serde_json::Value) -> Result<ExitStats> {
        ExitStats::deserialize(v).with_context(|| format!("unexpected xdplb exit counters: {v}"))
    }

    /// The VIP with label `label` (see [`vip_label`]).
    pub fn vip(&self, label: &str) -> Result<&VipStats> {
        self.vips.iter().find(|v| v.vip == label).with_context(|| {
            let have: Vec<&str> = self.vips.iter().map(|v| v.vip.as_str()).collect();
            format!("xdplb's counters have no VIP {label} (it has {have:?})")
        })
    }

    /// Non-zero pass/drop reasons.
    pub fn nonzero_reasons(&self) -> Vec<(&str, u64)> {
        self.reasons
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| (k.as_str(), *n))
            .collect()
    }
}

impl VipStats {
    /// Counters per backend name (`b1`…), for backends of the topology.
    pub fn by_backend(&self) -> BTreeMap<String, &BackendStats> {
        self.backends
            .iter()
            .map(|b| {
                (
                    backend_name_of(&b.address).unwrap_or_else(|| b.address.clone()),
                    b,
                )
            })
            .collect()
    }
}

/// The daemon's label for a VIP: `ADDR:PORT/PROTO` with IPv6 in brackets.
pub fn vip_label(vip: &str, port: u16, proto: &str) -> String {
    match vip.parse::<IpAddr>() {
        Ok(IpAddr::V6(a)) => format!("[{a}]:{port}/{proto}"),
        _ => format!("{vip}:{port}/{proto}"),
    }
}

/// `b3` for `10.200.0.13` or `fd00:200::13`.
pub fn backend_name_of(address: &str) -> Option<String> {
    let ip: IpAddr = address.parse().ok()?;
    (1..=topology::MAX_BACKENDS)
        .find(|&i| {
            [topology::backend_addr4(i), topology::backend_addr6(i)]
                .iter()
                .any(|a| a.parse::<IpAddr>().ok() == Some(ip))
        })
        .map(topology::backend_name)
}
