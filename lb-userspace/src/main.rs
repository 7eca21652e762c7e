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
    config::{Config, XdpMode},
    dataplane::{Attached, Dataplane},
    state::{State, SystemResolver, VipReport},
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
}

#[derive(Subcommand)]
enum Command {
    /// Load the XDP program, program the VIPs of a config file, attach, and
    /// serve until Ctrl-C / SIGTERM (which detach). SIGHUP re-reads the file;
    /// a bad file is rejected and the running state is kept.
    Run {
        /// YAML configuration (see README, "Configuration").
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Force an XDP mode. Default: the file's `xdp_mode`, else native
        /// with a fallback to generic when the driver refuses.
        #[arg(long, value_enum)]
        xdp_mode: Option<XdpMode>,
        /// How to print the per-VIP and per-backend counters on exit.
        #[arg(long, value_enum, default_value_t = ExitStats::Table)]
        exit_stats: ExitStats,
        /// How long to wait for a backend's MAC in the neighbour table.
        #[arg(long, value_name = "MS", default_value_t = 3000)]
        neighbour_timeout_ms: u64,
    },
    /// Validate a configuration file and exit (needs no privileges).
    Check {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
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
        Command::Run {
            config,
            xdp_mode,
            exit_stats,
            neighbour_timeout_ms,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")
            .and_then(|rt| {
                rt.block_on(run(
                    config,
                    xdp_mode,
                    exit_stats,
                    Duration::from_millis(neighbour_timeout_ms),
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

#[derive(Clone, Copy)]
enum Event {
    Stop,
    Reload,
}

async fn run(
    path: PathBuf,
    mode_flag: Option<XdpMode>,
    exit_stats: ExitStats,
    neighbour_timeout: Duration,
) -> Result<()> {
    let cfg = Config::load(&path)?;
    let mut resolver = SystemResolver { neighbour_timeout };
    let mut dp = Dataplane::load(cfg.datapath).context(
        "loading the XDP program (needs root or CAP_BPF+CAP_NET_ADMIN, and a kernel with BPF)",
    )?;
    let mut state = State::default();
    // Program the tables before attaching, so the first packet finds them.
    let summary = state
        .apply(&mut dp, &cfg, &mut resolver)
        .context("programming the initial configuration")?;
    let mode = mode_flag.or(cfg.xdp_mode);
    let mut attached = vec![cfg.interface.clone()];
    let how = dp.attach(&cfg.interface, mode)?;
    for name in state
        .egress_interfaces()
        .map(str::to_owned)
        .collect::<Vec<_>>()
    {
        dp.attach(&name, mode)?;
        attached.push(name);
    }
    tracing::info!(
        "ready: attached to {} ({} mode), {} VIPs, {} backends, ring size {}",
        attached.join(", "),
        match how {
            Attached::Native => "native",
            Attached::Generic => "generic",
        },
        summary.vips_added,
        summary.backends_added,
        cfg.datapath.ring_size,
    );

    // Ctrl-C through ctrlc; SIGTERM and SIGHUP through tokio. All end up
    // as events for this loop, the only owner of the state.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = tx.clone();
    ctrlc::set_handler(move || {
        let _ = stop.send(Event::Stop);
    })
    .context("installing the Ctrl-C handler")?;
    for (kind, event) in [
        (SignalKind::terminate(), Event::Stop),
        (SignalKind::hangup(), Event::Reload),
    ] {
        let mut sig = signal(kind).context("installing a signal handler")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while sig.recv().await.is_some() {
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);

    while let Some(event) = rx.recv().await {
        match event {
            Event::Stop => break,
            Event::Reload => {
                let applied = Config::load(&path)
                    .map_err(anyhow::Error::from)
                    .and_then(|new| {
                        state
                            .apply(&mut dp, &new, &mut resolver)
                            .map_err(anyhow::Error::from)
                    });
                match applied {
                    Ok(s) => {
                        for name in state
                            .egress_interfaces()
                            .map(str::to_owned)
                            .collect::<Vec<_>>()
                        {
                            if !attached.contains(&name) {
                                dp.attach(&name, mode)?;
                                attached.push(name);
                            }
                        }
                        tracing::info!(
                            "reloaded {}: VIPs +{} -{}, backends +{} -{}, {} rings swapped",
                            path.display(),
                            s.vips_added,
                            s.vips_removed,
                            s.backends_added,
                            s.backends_removed,
                            s.rings_swapped
                        );
                    }
                    Err(e) => tracing::error!(
                        "reload of {} rejected, running configuration unchanged: {e:#}",
                        path.display()
                    ),
                }
            }
        }
    }

    let report = state.report(&dp).context("reading counters")?;
    let reasons = dp.reason_counters().context("reading counters")?;
    drop(dp);
    tracing::info!("detached from {}", attached.join(", "));
    match exit_stats {
        ExitStats::None => {}
        ExitStats::Table => print_table(&report, &reasons),
        ExitStats::Json => println!("{}", stats_json(&report, &reasons)),
    }
    Ok(())
}

fn stats_json(report: &[VipReport], reasons: &[(lb_common::Reason, u64)]) -> serde_json::Value {
    json!({
        "vips": report.iter().map(|v| json!({
            "vip": v.label,
            "packets": v.counters.packets,
            "bytes": v.counters.bytes,
            "new_flows": v.counters.new_flows,
            "backends": v.backends.iter().map(|b| json!({
                "address": b.address.to_string(),
                "weight": b.weight,
                "mac": b.mac.to_string(),
                "packets": b.counters.packets,
                "bytes": b.counters.bytes,
                "new_flows": b.counters.new_flows,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "reasons": reasons.iter().map(|(r, n)| (r.name().to_string(), json!(n)))
            .collect::<serde_json::Map<_, _>>(),
    })
}

fn print_table(report: &[VipReport], reasons: &[(lb_common::Reason, u64)]) {
    println!(
        "{:<28} {:<26} {:>6} {:>10} {:>12} {:>10}",
        "VIP", "BACKEND", "WEIGHT", "PACKETS", "BYTES", "NEW FLOWS"
    );
    for v in report {
        println!(
            "{:<28} {:<26} {:>6} {:>10} {:>12} {:>10}",
            v.label, "(all)", "", v.counters.packets, v.counters.bytes, v.counters.new_flows
        );
        for b in &v.backends {
            println!(
                "{:<28} {:<26} {:>6} {:>10} {:>12} {:>10}",
                "", b.address, b.weight, b.counters.packets, b.counters.bytes, b.counters.new_flows
            );
        }
    }
    let nonzero: Vec<String> = reasons
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{}={n}", r.name()))
        .collect();
    if !nonzero.is_empty() {
        println!("not load balanced: {}", nonzero.join(" "));
    }
}
