//! Compiles `lb-ebpf` for the BPF target (nightly + bpf-linker, see
//! `cargo xtask deps`); the object lands in OUT_DIR and is embedded by
//! `src/dataplane.rs`.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
