//! Part 4, the reaction time: from `xdplb backend drain` to the first new
//! connection that no longer reaches the drained backend.
//!
//! A client in `xlb-client` (this binary's hidden `bench-client`) opens
//! one short HTTP connection to the VIP after another and records, per
//! connection, the CLOCK_MONOTONIC time just before `connect()` and which
//! backend answered. The coordinator reads the same clock just before it
//! starts the CLI. Definition, per run:
//!
//! - `last_b1` = start of the last connection that reached b1;
//! - *visible* = start of the first connection after `last_b1`, minus the
//!   time the CLI was started: every connection from then on avoided b1.
//!
//! So that "the next connection avoided b1" means "the change was in
//! effect" rather than luck, b1 gets weight 1000 against 1 for b2 and b3
//! first: before the drain ~99.8 % of new connections go to b1. The switch
//! then lies between `last_b1` and *visible*, one connection apart.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    process::{Child, ChildStdin, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use super::{check_interrupted, median, mono_ns, sleep, BenchDaemon, HTTP_PORT, VIP_ARG};
use crate::topology::{self, exec_in, CLIENT_NS, VIP4};

/// Weight of the backend to be drained, against 1 for the others.
const HEAVY_WEIGHT: &str = "1000";
/// Connections before and after the CLI call, per run.
const WINDOW: Duration = Duration::from_millis(250);
const CLIENT_READY_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// `IP:PORT` of an HTTP server answering its backend name (`b1`).
    #[arg(long)]
    pub target: SocketAddr,
    /// Stop after this long even if stdin stays open.
    #[arg(long, default_value_t = 10.0)]
    pub max_seconds: f64,
}

/// What `bench-client` prints as its last stdout line.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClientReport {
    /// (start ns, end ns, backend number; 0 = failed or unknown answer),
    /// CLOCK_MONOTONIC, one per connection in order.
    pub samples: Vec<(u64, u64, u8)>,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// `bench-client`: prints `ready` after the first answer, then connects
/// until stdin closes (or `--max-seconds`), then prints a [`ClientReport`].
pub fn client_main(args: ClientArgs) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            stop.store(true, Ordering::SeqCst);
        });
    }
    let deadline = Instant::now() + Duration::from_secs_f64(args.max_seconds);
    let mut report = ClientReport {
        samples: Vec::with_capacity(1 << 16),
        errors: 0,
        first_error: None,
    };
    let mut ready = false;
    let mut stdout = std::io::stdout();
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        let start = mono_ns();
        let answer = super::http::http_get(args.target, CONNECT_TIMEOUT);
        let end = mono_ns();
        let backend = match &answer {
            Ok((200, body)) => body
                .strip_prefix('b')
                .and_then(|n| n.parse::<u8>().ok())
                .unwrap_or(0),
            _ => 0,
        };
        if backend == 0 {
            report.errors += 1;
            if report.first_error.is_none() {
                report.first_error = Some(match answer {
                    Ok((code, body)) => format!("HTTP {code}: {body:?}"),
                    Err(e) => format!("{e:#}"),
                });
            }
        } else if !ready {
            ready = true;
            writeln!(stdout, "ready")?;
            stdout.flush()?;
        }
        report.samples.push((start, end, backend));
    }
    writeln!(stdout, "{}", serde_json::to_string(&report)?)?;
    Ok(())
}

/// A running `bench-client`; killed if dropped before [`Client::finish`].
struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Client {
    fn start() -> Result<Client> {
        let exe = std::env::current_exe().context("locating the xtask binary")?;
        let exe = exe.to_str().context("xtask path is not UTF-8")?;
        let target = format!("{VIP4}:{HTTP_PORT}");
        let mut cmd = exec_in(CLIENT_NS, &[exe, "bench-client", "--target", &target]);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("starting bench-client")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("bench-client stdout")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let client = Client {
            child,
            stdin,
            lines: rx,
        };
        match client.lines.recv_timeout(CLIENT_READY_TIMEOUT) {
            Ok(l) if l == "ready" => Ok(client),
            Ok(l) => bail!("bench-client said {l:?} instead of `ready`"),
            Err(_) => {
                bail!("bench-client got no answer from {target} within {CLIENT_READY_TIMEOUT:?}")
            }
        }
    }

    fn finish(mut self) -> Result<ClientReport> {
        drop(self.stdin.take());
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(5))
            .context("bench-client did not report within 5 s of its stdin closing")?;
        let status = self.child.wait().context("waiting for bench-client")?;
        if !status.success() {
            bail!("bench-client exited with {status}");
        }
        serde_json::from_str(&line).context("parsing bench-client's report")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One drain measurement; times in ms relative to the CLI's start.
#[derive(Debug, Clone)]
pub struct DrainRun {
    /// The first connection after the last one that reached b1.
    pub visible_ms: f64,
    /// The last connection that reached b1.
    pub last_b1_ms: f64,
    /// The CLI process, start to exit.
    pub cli_ms: f64,
    /// Connections that reached b1 although they started after the CLI
    /// had returned (must be 0).
    pub b1_after_cli: usize,
    pub connections: usize,
    pub errors: u64,
    /// Median time between connection starts: the resolution.
    pub gap_ms: f64,
    /// Share of connections before the CLI that went to b1.
    pub pre_b1_share: f64,
}

#[derive(Debug, Clone)]
pub struct DrainResults {
    pub runs: Vec<DrainRun>,
    pub drain_cmd: String,
}

impl DrainResults {
    pub fn med(&self, f: impl Fn(&DrainRun) -> f64) -> f64 {
        median(&self.runs.iter().map(f).collect::<Vec<_>>())
    }
    pub fn visible_ms(&self) -> f64 {
        self.med(|r| r.visible_ms)
    }
    pub fn last_b1_ms(&self) -> f64 {
        self.med(|r| r.last_b1_ms)
    }
    pub fn cli_ms(&self) -> f64 {
        self.med(|r| r.cli_ms)
    }
    pub fn gap_ms(&self) -> f64 {
        self.med(|r| r.gap_ms)
    }
    pub fn b1_after_cli(&self) -> usize {
        self.runs.iter().map(|r| r.b1_after_cli).sum()
    }
    pub fn errors(&self) -> u64 {
        self.runs.iter().map(|r| r.errors).sum()
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "nanosecond differences shown in ms"
)]
fn ms(a: u64, b: u64) -> f64 {
    (i128::from(a) - i128::from(b)) as f64 / 1e6
}

fn analyse(report: &ClientReport, t0: u64, t1: u64) -> Result<DrainRun> {
    let s = &report.samples;
    let last_b1 = s
        .iter()
        .filter(|x| x.2 == 1)
        .map(|x| x.0)
        .max()
        .context("no connection reached b1")?;
    let next = s
        .iter()
        .map(|x| x.0)
        .filter(|&start| start > last_b1)
        .min()
        .context("no connection started after the last one that reached b1")?;
    let pre: Vec<_> = s.iter().filter(|x| x.0 < t0).collect();
    if pre.is_empty() {
        bail!("no connection started before the CLI");
    }
    #[expect(clippy::cast_precision_loss, reason = "counts shown as a share")]
    let pre_b1_share = pre.iter().filter(|x| x.2 == 1).count() as f64 / pre.len() as f64;
    let gaps: Vec<f64> = s.windows(2).map(|w| ms(w[1].0, w[0].0)).collect();
    Ok(DrainRun {
        visible_ms: ms(next, t0),
        last_b1_ms: ms(last_b1, t0),
        cli_ms: ms(t1, t0),
        b1_after_cli: s.iter().filter(|x| x.2 == 1 && x.0 > t1).count(),
        connections: s.len(),
        errors: report.errors,
        gap_ms: median(&gaps),
        pre_b1_share,
    })
}

pub fn drain(daemon: &BenchDaemon, runs_wanted: u32) -> Result<DrainResults> {
    let b1 = topology::backend_addr4(1);
    let ctl = &daemon.ctl;
    ctl.ok(&["backend", "weight", VIP_ARG, &b1, HEAVY_WEIGHT])
        .context("giving b1 the heavy weight")?;
    let mut runs = Vec::new();
    for run in 1..=runs_wanted {
        check_interrupted()?;
        let client = Client::start()?;
        sleep(WINDOW)?;
        let t0 = mono_ns();
        let out = ctl.run(&["backend", "drain", VIP_ARG, &b1]);
        let t1 = mono_ns();
        let out = out?;
        if out.code != Some(0) {
            bail!("`xdplb backend drain` failed: {}", out.text());
        }
        sleep(WINDOW)?;
        let report = client.finish()?;
        ctl.ok(&["backend", "undrain", VIP_ARG, &b1])
            .context("undraining b1")?;
        let r = analyse(&report, t0, t1).with_context(|| format!("drain run {run}"))?;
        println!(
            "bench: drain run {run}/{runs_wanted}: visible after {:.2} ms (last b1 connection at \
             {:.2} ms), CLI took {:.2} ms; {} connections, one every {:.3} ms, {:.1}% to b1 \
             before; {} to b1 after the CLI returned, {} errors",
            r.visible_ms,
            r.last_b1_ms,
            r.cli_ms,
            r.connections,
            r.gap_ms,
            r.pre_b1_share * 100.0,
            r.b1_after_cli,
            r.errors
        );
        runs.push(r);
    }
    ctl.ok(&["backend", "weight", VIP_ARG, &b1, "1"])
        .context("restoring b1's weight")?;
    Ok(DrainResults {
        runs,
        drain_cmd: format!(
            "{} --socket {} backend drain {VIP_ARG} {b1}",
            ctl.exe().display(),
            ctl.socket().display()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn analysis_finds_the_switch() {
        // b1 until 1000 ns, then b2; CLI from 900 to 5000 ns.
        let samples = vec![
            (100, 150, 1),
            (400, 450, 1),
            (700, 750, 1),
            (1000, 1050, 1),
            (1300, 1350, 2),
            (1600, 1650, 3),
            (6000, 6050, 2),
        ];
        let r = analyse(
            &ClientReport {
                samples,
                errors: 0,
                first_error: None,
            },
            900,
            5000,
        )
        .unwrap();
        assert!((r.visible_ms - 400e-6).abs() < 1e-12);
        assert!((r.last_b1_ms - 100e-6).abs() < 1e-12);
        assert_eq!(r.b1_after_cli, 0);
        assert_eq!(r.pre_b1_share, 1.0);
    }
}
