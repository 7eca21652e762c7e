//! xdplb daemon library: configuration, datapath maps, host networking, the
//! state that ties them together, the daemon loop, its control API, health
//! checks and metrics. The `xdplb` binary is a thin CLI over it; the
//! in-kernel tests drive the same code.

pub mod api;
pub mod bpffs;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod flows;
pub mod health;
pub mod metrics;
pub mod netdev;
pub mod server;
pub mod state;
