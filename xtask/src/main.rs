//! Developer tasks for xdplb: `cargo xtask <command>`.

mod bench;
mod daemon;
mod demo;
mod deps;
mod e2e;
mod probe;
mod serve;
mod testcmd;
mod topology;
mod util;
// Further task modules are declared here.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "Developer tasks for xdplb")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    // Add new tasks here (Bench, ...) and a match arm in `main`.
    /// Install what this machine lacks to build and test xdplb (Debian
    /// packages, nightly rust-src, bpf-linker). Idempotent and fast when
    /// everything is present.
    Deps,
    /// `deps`, then `cargo build --release -p lb-userspace` (target/release/xdplb).
    Build,
    /// Build xdplb, run it on the namespace topology with
    /// deploy/examples/demo.yaml, send traffic through the VIP and explain
    /// the result. Needs root.
    Demo,
    /// Run every test layer: unit and in-kernel tests (`cargo test`), then
    /// the namespace end-to-end scenarios. Needs root.
    Test(testcmd::TestArgs),
    /// Create or remove the network-namespace test topology.
    Topology {
        #[command(subcommand)]
        action: TopologyCmd,
    },
    /// Backend echo server (runs inside a backend namespace).
    Serve(serve::ServeArgs),
    /// Traffic client printing one JSON report (runs inside xlb-client).
    Probe(probe::ProbeArgs),
    /// Run every benchmark beside its baseline (in-kernel ns/packet, veth
    /// Mpps, HTTP requests/s through xdplb vs no LB vs HAProxy vs nftables
    /// vs a bare XDP forwarder, Maglev build and drain reaction time) and
    /// write docs/benchmarks.md
    /// and docs/benchmarks.png. Needs root.
    Bench(bench::BenchArgs),
    /// The drain benchmark's connection loop (runs inside xlb-client).
    #[command(hide = true)]
    BenchClient(bench::ClientArgs),
}

#[derive(Debug, Subcommand)]
enum TopologyCmd {
    /// Build client, load balancer, switch and backend namespaces and start
    /// the echo servers. Idempotent.
    Up {
        /// Number of backends (1..=9).
        #[arg(long, default_value_t = 3,
              value_parser = clap::value_parser!(u8).range(1..=topology::MAX_BACKENDS as i64))]
        backends: u8,
    },
    /// Stop the echo servers and delete every namespace of the topology.
    Down,
    /// Probe every backend's own addresses directly (no load balancer).
    Check {
        #[arg(long, default_value_t = 3)]
        backends: usize,
        /// Flows per address and protocol.
        #[arg(long, default_value_t = 20)]
        count: usize,
    },
    /// Print the address plan.
    Show {
        #[arg(long, default_value_t = 3)]
        backends: usize,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain, without the backtrace anyhow's Debug would add
            // under RUST_BACKTRACE=1: every error here carries its context.
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Deps => deps::run(),
        Cmd::Build => {
            deps::run()?;
            daemon::build_release()
        }
        Cmd::Demo => demo::run(),
        Cmd::Test(args) => testcmd::run(args),
        Cmd::Topology { action } => match action {
            TopologyCmd::Up { backends } => {
                topology::up(usize::from(backends))?;
                topology::print_addresses(usize::from(backends));
                Ok(())
            }
            TopologyCmd::Down => topology::down(),
            TopologyCmd::Check { backends, count } => topology::check(backends, count),
            TopologyCmd::Show { backends } => {
                topology::print_addresses(backends);
                Ok(())
            }
        },
        Cmd::Serve(args) => serve::run(args),
        Cmd::Probe(args) => probe::run(args),
        Cmd::Bench(args) => bench::run(args),
        Cmd::BenchClient(args) => bench::client_main(args),
    }
}
