//! The xdplb datapath: one XDP program, `xlb_lb`.
//!
//! Packet walk: Ethernet (+ one 802.1Q tag) -> IPv4 / IPv6 -> TCP / UDP ->
//! VIP lookup -> flow table -> (miss) Maglev ring + flow insert -> L2 DSR
//! rewrite -> XDP_TX or XDP_REDIRECT. Anything that is not load balanced ends
//! as an `Err(Reason)`: counted, then passed to the kernel or dropped by the
//! reason's policy (see `lb_common::Reason`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The flow table's bucket lock is a compare-and-swap on a map value field;
// core::sync::atomic does not offer it on the BPF target, the intrinsic is
// BPF_CMPXCHG. Packet fields are read with inline BPF assembly (packet.rs).
// aya-build always compiles this crate with nightly.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics, asm_experimental_arch))]
#![cfg_attr(
    target_arch = "bpf",
    expect(internal_features, reason = "core_intrinsics, for the bucket lock")
)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod datapath;
#[cfg(target_arch = "bpf")]
mod flows;
#[cfg(target_arch = "bpf")]
mod packet;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that can reach this.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
