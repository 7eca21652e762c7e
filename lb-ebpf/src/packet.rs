//! Multi-byte packet fields read and written with one instruction each
//! (shared by the datapath and the bench floors).
//!
//! Header fields are byte arrays (network-types), and LLVM's BPF backend
//! turns a 4-byte read it cannot prove aligned into four byte loads, three
//! shifts and three ors: about 20 instructions per IPv4 packet and 90 per
//! IPv6 packet. Packet pointers are rarely aligned (an IPv4 address sits
//! at an odd multiple of 2 after a 14-byte Ethernet header), and Rust has
//! no way to say "one load, any alignment" for BPF, so these helpers issue
//! the load instruction themselves. The kernel permits misaligned packet
//! reads on x86-64 (it enforces packet alignment only on architectures
//! without efficient unaligned access, or when a loader asks for strict
//! alignment, which aya does not); if it did not, the verifier would
//! refuse the program at load time rather than let it misread.

/// The 4 bytes at `p + OFF`, as they lie in memory (network order stays
/// network order).
///
/// # Safety
/// `p + OFF .. p + OFF + 4` is inside the packet: a bounds check the
/// verifier has seen covers it.
#[inline(always)]
pub unsafe fn load32<const OFF: i16>(p: *const u8) -> u32 {
    let v: u64;
    // SAFETY: the caller's bounds check; the instruction only reads.
    unsafe {
        core::arch::asm!(
            "{v} = *(u32 *)({p} + {off})",
            v = lateout(reg) v,
            p = in(reg) p,
            off = const OFF,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    // The load zero-extends: the high half is 0.
    v as u32
}

/// The 2 bytes at `p + OFF`, as `load32`.
///
/// # Safety
/// `p + OFF .. p + OFF + 2` is inside the packet, as for `load32`.
#[inline(always)]
pub unsafe fn load16<const OFF: i16>(p: *const u8) -> u16 {
    let v: u64;
    // SAFETY: as in `load32`.
    unsafe {
        core::arch::asm!(
            "{v} = *(u16 *)({p} + {off})",
            v = lateout(reg) v,
            p = in(reg) p,
            off = const OFF,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    v as u16
}

/// The 8 bytes at `p + OFF`, as `load32` (also used on map values, where
/// Rust cannot know a value's alignment either).
///
/// # Safety
/// `p + OFF .. p + OFF + 8` is inside the packet or a map value.
#[inline(always)]
pub unsafe fn load64<const OFF: i16>(p: *const u8) -> u64 {
    let v: u64;
    // SAFETY: as in `load32`.
    unsafe {
        core::arch::asm!(
            "{v} = *(u64 *)({p} + {off})",
            v = lateout(reg) v,
            p = in(reg) p,
            off = const OFF,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    v
}

/// Writes `v` (as it lies in memory) to the 8 bytes at `p + OFF`.
///
/// # Safety
/// `p + OFF .. p + OFF + 8` is inside the packet, as for `load32`.
#[inline(always)]
pub unsafe fn store64<const OFF: i16>(p: *mut u8, v: u64) {
    // SAFETY: the caller's bounds check.
    unsafe {
        core::arch::asm!(
            "*(u64 *)({p} + {off}) = {v}",
            v = in(reg) v,
            p = in(reg) p,
            off = const OFF,
            options(nostack, preserves_flags),
        );
    }
}

/// `store64`, 4 bytes.
///
/// # Safety
/// `p + OFF .. p + OFF + 4` is inside the packet.
#[inline(always)]
pub unsafe fn store32<const OFF: i16>(p: *mut u8, v: u32) {
    // SAFETY: as in `store64`.
    unsafe {
        core::arch::asm!(
            "*(u32 *)({p} + {off}) = {v}",
            v = in(reg) u64::from(v),
            p = in(reg) p,
            off = const OFF,
            options(nostack, preserves_flags),
        );
    }
}
