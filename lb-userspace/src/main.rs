use std::{
    io::IsTerminal as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use xdplb::{
    api, cli,
    config::{Config, XdpMode},
    daemon::{self, Daemon, Event},
    metrics, server,
};

/// xdplb: an XDP layer-4 load balancer (L2 direct server return).
///
/// Packets to a VIP (address, port, protocol) are hashed to a backend with
/// Maglev consistent hashing, pinned to it in a connection table, and sent
/// to the backend's MAC; backends answer clients directly.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    client: cli::ClientOptions,
}

#[derive(Subcommand)]
enum Command {
    /// Run the load balancer: load (or adopt) the XDP program, program the
    /// VIPs of a config file, attach, and serve the control API until
    /// Ctrl-C / SIGTERM. SIGHUP re-reads the file; a bad file is rejected and
    /// the running state is kept.
    Run {
        /// YAML configuration (see README, "Configuration").
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Force an XDP mode. Default: the file's `xdp_mode`, else native
        /// with a fallback to generic when the driver refuses.
        #[arg(long, value_enum)]
        xdp_mode: Option<XdpMode>,
        /// Control socket (HTTP/JSON, created mode 0600 in a 0700 directory;
        /// removed on exit, with the directory if the daemon made it).
        #[arg(long, env = "XDPLB_SOCKET", default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Prometheus endpoint address, or `off`.
        #[arg(long, default_value = api::DEFAULT_METRICS_ADDR)]
        metrics: String,
        /// bpffs directory where the program's maps and links are pinned, so
        /// a restart (or a crash) drops no flow; a daemon started with pins
        /// present adopts them.
        #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/xdplb")]
        bpffs: PathBuf,
        /// Pin nothing: the datapath lives and dies with this process.
        #[arg(long, conflicts_with_all = ["persist", "bpffs"])]
        no_pin: bool,
        /// On exit, leave the datapath pinned and attached (traffic keeps
        /// flowing; the next `xdplb run` adopts it). Without it, exit
        /// detaches and removes the pins.
        #[arg(long)]
        persist: bool,
        /// How to print the per-VIP and per-backend counters on exit.
        #[arg(long, value_enum, default_value_t = ExitStats::Table)]
        exit_stats: ExitStats,
        /// How long to wait for a backend's MAC in the neighbour table.
        #[arg(long, value_name = "MS", default_value_t = 3000)]
        neighbour_timeout_ms: u64,
    },
    /// Validate a configuration file and exit (needs no privileges).
    Check {
        /// The YAML configuration to validate (see README: Configuration).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    #[command(flatten)]
    Client(cli::ClientCommand),
}

#[derive(Clone, Copy, ValueEnum)]
enum ExitStats {
    Table,
    Json,
    None,
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XDPLB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Client(cmd) => cli::run(cmd, &cli.client),
        Command::Run {
            config,
            xdp_mode,
            socket,
            metrics,
            bpffs,
            no_pin,
            persist,
            exit_stats,
            neighbour_timeout_ms,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")
            .and_then(|rt| {
                rt.block_on(run(
                    daemon::Options {
                        config_path: config,
                        xdp_mode,
                        pin_dir: (!no_pin).then_some(bpffs),
                        persist,
                        neighbour_timeout: Duration::from_millis(neighbour_timeout_ms),
                    },
                    socket,
                    metrics,
                    exit_stats,
                ))
            }),
    };
    if let Err(e) = result {
        eprintln!("xdplb: error: {e:#}");
        std::process::exit(1);
    }
}

fn check(path: &Path) -> Result<()> {
    let cfg = Config::load(path)?;
    let backends: usize = cfg.vips.iter().map(|v| v.backends.len()).sum();
    println!(
        "{}: ok ({} VIPs, {backends} backends, interface {})",
        path.display(),
        cfg.vips.len(),
        cfg.interface
    );
    Ok(())
}

async fn run(
    opts: daemon::Options,
    socket: PathBuf,
    metrics_addr: String,
    exit_stats: ExitStats,
) -> Result<()> {
    let (health_tx, mut health_rx) = mpsc::unbounded_channel();
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    // Bind the control socket first: it fails fast if another daemon runs.
    // Removes the socket (and its directory, if bind made it) on every way
    // out of this function.
    let (listener, socket_guard) = server::bind(&socket)?;
    // And the metrics address (in use, malformed): before anything is
    // loaded or attached.
    let metrics_listener = if metrics_addr == "off" {
        None
    } else {
        Some(metrics::bind(&metrics_addr).await?)
    };

    // Ctrl-C through ctrlc; SIGTERM and SIGHUP through tokio. All end up as
    // events for the loop below, the only owner of the state.
    let stop = tx.clone();
    ctrlc::set_handler(move || {
        let _ = stop.send(Event::Stop);
    })
    .context("installing the Ctrl-C handler")?;
    for (kind, reload) in [
        (SignalKind::terminate(), false),
        (SignalKind::hangup(), true),
    ] {
        let mut sig = signal(kind).context("installing a signal handler")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while sig.recv().await.is_some() {
                let ev = if reload { Event::Reload } else { Event::Stop };
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
    }
    // Handlers are in place before the daemon logs `ready:`: a signal sent
    // the moment it is ready is an event, not the default action (which
    // would kill the process and leave its pins attached).
    let mut daemon = Daemon::start(opts, health_tx)?;
    let health_fwd = tx.clone();
    tokio::spawn(async move {
        while let Some(ev) = health_rx.recv().await {
            if health_fwd.send(Event::Health(ev)).is_err() {
                break;
            }
        }
    });
    let server = tokio::spawn(server::serve(listener, tx.clone(), socket.clone()));
    let metrics_task = if let Some(listener) = metrics_listener {
        tracing::info!("metrics on http://{metrics_addr}/metrics");
        let tx = tx.clone();
        Some(tokio::spawn(metrics::serve(listener, move || {
            let (reply, answer) = tokio::sync::oneshot::channel();
            tx.send(Event::Api(daemon::Request::Stats, reply))
                .map_err(|_| "the daemon is shutting down".to_string())?;
            let value = answer
                .blocking_recv()
                .map_err(|_| "the daemon is shutting down".to_string())?
                .map_err(|f| f.message)?;
            serde_json::from_value(value).map_err(|e| e.to_string())
        })))
    } else {
        None
    };
    tracing::info!("control API on {}", socket.display());

    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut rebalance = tokio::time::interval(daemon::REBALANCE_INTERVAL);
    // A slow rebalance is not followed by a burst of catch-up ones.
    rebalance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let sweep = tokio::time::sleep(daemon::SWEEP_INTERVAL);
    tokio::pin!(sweep);
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(Event::Api(req, reply)) => {
                    let _ = reply.send(daemon.handle(req));
                }
                Some(Event::Reload) => daemon.on_reload_signal(),
                Some(Event::Health(ev)) => daemon.on_health(ev),
                Some(Event::Stop) | None => break,
            },
            _ = tick.tick() => daemon.tick(),
            _ = rebalance.tick() => daemon.rebalance(),
            () = &mut sweep => {
                let wait = daemon.sweep();
                sweep.as_mut().reset(tokio::time::Instant::now() + wait);
            }
        }
    }

    server.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    drop(socket_guard);
    let stats = daemon.shutdown()?;
    match exit_stats {
        ExitStats::None => {}
        ExitStats::Table => print_table(&stats),
        ExitStats::Json => println!("{}", stats_json(&stats)),
    }
    Ok(())
}

fn stats_json(stats: &api::Stats) -> serde_json::Value {
    json!({
        "vips": stats.vips.iter().map(|v| json!({
            "vip": v.vip,
            "packets": v.packets,
            "bytes": v.bytes,
            "new_flows": v.new_flows,
            "active_connections": v.active_connections,
            "backends": stats.backends.iter().filter(|b| b.vip == v.vip).map(|b| json!({
                "address": b.address.to_string(),
                "weight": b.weight,
                "mac": b.mac,
                "state": b.state,
                "packets": b.packets,
                "bytes": b.bytes,
                "new_flows": b.new_flows,
                "closed_flows": b.closed_flows,
                "active_connections": b.active_connections,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "reasons": stats.reasons,
    })
}

fn print_table(stats: &api::Stats) {
    println!(
        "{:<28} {:<26} {:>6} {:>10} {:>12} {:>10}",
        "VIP", "BACKEND", "WEIGHT", "PACKETS", "BYTES", "NEW FLOWS"
    );
    for v in &stats.vips {
        println!(
            "{:<28} {:<26} {:>6} {:>10} {:>12} {:>10}",
            v.vip, "(all)", "", v.packets, v.bytes, v.new_flows
        );
        for b in stats.backends.iter().filter(|b| b.vip == v.vip) {
            println!(
                "{:<28} {:<26} {:>6} {:>10} {:>12} {:>10}",
                "", b.address, b.weight, b.packets, b.bytes, b.new_flows
            );
        }
    }
    let nonzero: Vec<String> = stats
        .reasons
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| format!("{r}={n}"))
        .collect();
    if !nonzero.is_empty() {
        println!("not load balanced: {}", nonzero.join(" "));
    }
}
