//! xdplb daemon library: configuration, datapath maps, host networking, and
//! the state that ties them together. The `xdplb` binary is a thin CLI over
//! it; the in-kernel tests drive the same code.

pub mod config;
pub mod dataplane;
pub mod netdev;
pub mod state;
