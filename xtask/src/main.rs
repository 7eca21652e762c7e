//! Developer tasks for xdplb: `cargo xtask <command>`.

mod probe;
mod serve;
mod topology;
mod util;
// Further task modules (deps, demo, e2e, ...) are declared here.

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
    // Add new tasks here (Deps, Build, Demo, Test, Bench, ...) and a match
    // arm in `main`.
    /// Create or remove the network-namespace test topology.
    Topology {
        #[command(subcommand)]
        action: TopologyCmd,
    },
    /// Backend echo server (runs inside a backend namespace).
    Serve(serve::ServeArgs),
    /// Traffic client printing one JSON report (runs inside xlb-client).
    Probe(probe::ProbeArgs),
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
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
    }
}
