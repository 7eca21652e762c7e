//! Multi-byte packet fields read and written with one instruction each
//! (shared by the datapath and the bench floors).
//!
//! Header fields are byte arrays (network-types), and LLVM's BPF backend
//! turns a 4-byte read it cannot prove aligned into four byte loads, three
//! shifts and three ors: about 20 instructions per IPv4 packet and 90 per
//! IPv6 packet. Packet pointers are rarely aligned (an IPv4 address sits
//! at an odd multiple of 2 after a 14-byte Ethernet header), and Rust has
//! no way to say "one load, any alignment" for BPF, so these helpers issue
//! the load and store instructions themselves. The kernel permits
//! misaligned packet access on x86-64 (it enforces packet alignment only on
//! architectures without efficient unaligned access, or when a loader asks
//! for strict alignment, which aya does not); if it did not, the verifier
//! would refuse the program at load time rather than let it misread.
//!
//! Values are as they lie in memory: network order stays network order.

/// `unsafe fn $name<const OFF: i16>(p: *const u8) -> $ty`: the bytes at
/// `p + OFF` with one `$size` load (which zero-extends into the register).
macro_rules! load {
    ($(#[$doc:meta])* $name:ident, $ty:ty, $size:literal) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// The bytes read are inside the packet (a bounds check the verifier
        /// has seen covers them) or inside a map value.
        #[inline(always)]
        pub unsafe fn $name<const OFF: i16>(p: *const u8) -> $ty {
            let v: u64;
            // SAFETY: the caller's bounds; the instruction only reads.
            unsafe {
                core::arch::asm!(
                    concat!("{v} = *(", $size, " *)({p} + {off})"),
                    v = lateout(reg) v,
                    p = in(reg) p,
                    off = const OFF,
                    options(pure, readonly, nostack, preserves_flags),
                );
            }
            v as $ty
        }
    };
}

/// `unsafe fn $name<const OFF: i16>(p: *mut u8, v: $ty)`: writes `v` to
/// the bytes at `p + OFF` with one `$size` store.
macro_rules! store {
    ($(#[$doc:meta])* $name:ident, $ty:ty, $size:literal) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// The bytes written are inside the packet (a bounds check the
        /// verifier has seen covers them).
        #[inline(always)]
        pub unsafe fn $name<const OFF: i16>(p: *mut u8, v: $ty) {
            // SAFETY: the caller's bounds.
            unsafe {
                core::arch::asm!(
                    concat!("*(", $size, " *)({p} + {off}) = {v}"),
                    v = in(reg) u64::from(v),
                    p = in(reg) p,
                    off = const OFF,
                    options(nostack, preserves_flags),
                );
            }
        }
    };
}

load!(
    /// 2 bytes (ports, the IPv4 fragment word).
    load16, u16, "u16"
);
load!(
    /// 4 bytes (addresses).
    load32, u32, "u32"
);
load!(
    /// 8 bytes (half an IPv6 address; also from map values, whose
    /// alignment Rust cannot know either).
    load64, u64, "u64"
);
store!(
    /// 4 bytes.
    store32, u32, "u32"
);
store!(
    /// 8 bytes.
    store64, u64, "u64"
);
