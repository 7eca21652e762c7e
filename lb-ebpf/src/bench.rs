//! Helper XDP programs for `xdplb-bench` (lb-userspace/src/bin/xdplb-bench.rs).
//! Never loaded by the daemon; the load balancer itself is not here, only
//! what measuring it needs:
//!
//! - `xlb_bench_reflect`: the reference a load balancer is compared with:
//!   swap the MACs and send the frame back (XDP_TX).
//! - `xlb_bench_reset` + `xlb_bench_tx`: with `repeat > 1`,
//!   BPF_PROG_TEST_RUN hands the same buffer to every repetition. The reset
//!   step gives each repetition a fresh 5-tuple, then tail-calls slot 0 of
//!   `XLB_BENCH_JUMP`: the program under test, or `xlb_bench_tx` to measure
//!   the reset step alone (then subtracted).
//! - `xlb_bench_gen`: a traffic generator for live-frame test runs: every
//!   frame is redirected to the interface in `XLB_BENCH_PORTS[0]`.
//! - `xlb_bench_sink`: counts and drops what comes back.
//! - `xlb_bench_flow_hit` / `xlb_bench_flow_insert`: the flow table alone,
//!   the floor under the load balancer's established and new-flow paths:
//!   build the same `FlowKey` from an IPv4 TCP/UDP frame, then one lookup
//!   (MAC swap, XDP_TX on a hit) or one insert (bucket locks, victim slot,
//!   write) with the load balancer's own table code (flows.rs) into
//!   `XLB_BENCH_FLOWS`, sized by the bench like the load balancer's table.
//! - `xlb_bench_flow_touch`: the memory floor under an insert: build the
//!   key and read one word of each of its two buckets in the same table,
//!   nothing else (what any two-choice table reads for a new flow).
//! - `xlb_bench_lru_hit` / `xlb_bench_lru_insert`: the same on a kernel LRU
//!   hash of `FlowKey` -> `FlowValue` (`XLB_BENCH_LRU`, same flow count),
//!   what the flow table was before: the comparison that justifies it.
//! - `xlb_bench_fwd`: the least an XDP load balancer with L2 DSR does, the
//!   end-to-end benchmark's baseline for xdplb's own cost: IPv4 TCP to one
//!   address and port goes to the backend `(source address + source port)
//!   % n` names (`XLB_BENCH_FWD_MACS`), by rewriting the MACs and XDP_TX;
//!   no state, no counters, no health; anything else passes.
//!
//! Map names and counter slots are mirrored in the host binary.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// flows.rs's bucket lock and packet.rs's loads (see main.rs).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics, asm_experimental_arch))]
#![cfg_attr(
    target_arch = "bpf",
    expect(internal_features, reason = "core_intrinsics, for the bucket lock")
)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod flows;
#[cfg(target_arch = "bpf")]
#[allow(dead_code, reason = "the bench programs only read packet fields")]
mod packet;

#[cfg(target_arch = "bpf")]
mod programs {
    use core::mem;

    use aya_ebpf::{
        bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX},
        helpers::bpf_get_smp_processor_id,
        macros::{map, xdp},
        maps::{Array, DevMap, LruHashMap, PerCpuArray, ProgramArray},
        programs::XdpContext,
    };
    use lb_common::{
        flow_table::{bucket_pair, key_words, slot_hash},
        FlowBucket, FlowKey, FlowValue, BENCH_FWD_BACKENDS, FAMILY_V4, PROTO_TCP, PROTO_UDP,
    };

    use crate::{
        flows,
        packet::{load16, load32},
    };
    use network_types::{eth::EthHdr, ip::Ipv4Hdr};

    /// Slot 0: the program `xlb_bench_reset` hands each packet to.
    #[map]
    static XLB_BENCH_JUMP: ProgramArray = ProgramArray::with_max_entries(1, 0);
    /// Slot 0: the egress interface of `xlb_bench_gen`.
    #[map]
    static XLB_BENCH_PORTS: DevMap = DevMap::with_max_entries(1, 0);
    /// Slot 0: repetitions seen by `xlb_bench_reset` on this CPU.
    #[map]
    static XLB_BENCH_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
    /// Frames per role: `COUNT_GEN` sent by the generator, `COUNT_SINK`
    /// consumed by the sink.
    #[map]
    static XLB_BENCH_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

    /// Sized by the bench at load time like the load balancer's flow table
    /// (`XLB_BENCH_FLOW_BUCKETS` too).
    #[map]
    static XLB_BENCH_FLOWS: Array<FlowBucket> = Array::with_max_entries(1, 0);
    #[unsafe(no_mangle)]
    static XLB_BENCH_FLOW_BUCKETS: u32 = 0;
    /// Sized by the bench: as many entries as the flow table holds flows.
    #[map]
    static XLB_BENCH_LRU: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(1, 0);

    /// `xlb_bench_fwd`'s backends: destination then source MAC, the first
    /// `XLB_BENCH_FWD_N` entries.
    #[map]
    static XLB_BENCH_FWD_MACS: Array<[u8; 12]> = Array::with_max_entries(BENCH_FWD_BACKENDS, 0);
    #[unsafe(no_mangle)]
    static XLB_BENCH_FWD_N: u32 = 0;
    /// The forwarded address and port, as they lie in the packet.
    #[unsafe(no_mangle)]
    static XLB_BENCH_FWD_ADDR_BE: u32 = 0;
    #[unsafe(no_mangle)]
    static XLB_BENCH_FWD_PORT_BE: u16 = 0;

    const COUNT_GEN: u32 = 0;
    const COUNT_SINK: u32 = 1;
    const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();

    #[inline(always)]
    fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
        let start = ctx.data();
        if start + offset + mem::size_of::<T>() > ctx.data_end() {
            return None;
        }
        Some((start + offset) as *mut T)
    }

    #[inline(always)]
    fn bump(slot: u32) {
        if let Some(n) = XLB_BENCH_COUNT.get_ptr_mut(slot) {
            // SAFETY: per-CPU slot, no other writer on this CPU.
            unsafe { *n += 1 };
        }
    }

    #[xdp]
    pub fn xlb_bench_reflect(ctx: XdpContext) -> u32 {
        let Some(eth) = ptr_at::<EthHdr>(&ctx, 0) else {
            return XDP_ABORTED;
        };
        // SAFETY: ptr_at checked the header lies inside the packet.
        unsafe { core::mem::swap(&mut (*eth).dst_addr, &mut (*eth).src_addr) };
        XDP_TX
    }

    #[xdp]
    pub fn xlb_bench_tx(_ctx: XdpContext) -> u32 {
        XDP_TX
    }

    /// Rewrites the IPv4 source address and the L4 source port from this
    /// CPU's repetition counter `n`: address 10.200.(n >> 8).(n), port
    /// 0x8000 | cpu << 12 | (n >> 16), so 2^28 repetitions per CPU (and
    /// runs on different CPUs) never repeat a 5-tuple. The IPv4 checksum is
    /// left stale: the load balancer does not check it.
    #[xdp]
    pub fn xlb_bench_reset(ctx: XdpContext) -> u32 {
        if reset(&ctx).is_none() {
            return XDP_ABORTED;
        }
        // SAFETY: a tail call either does not return or fails; both are fine.
        unsafe { XLB_BENCH_JUMP.tail_call(&ctx, 0) };
        XDP_ABORTED
    }

    #[inline(always)]
    fn reset(ctx: &XdpContext) -> Option<()> {
        let eth = ptr_at::<EthHdr>(ctx, 0)?;
        // SAFETY: ptr_at checked bounds.
        if unsafe { (*eth).ether_type } != ETH_P_IPV4_BE {
            return None;
        }
        let ip = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN)?;
        // SAFETY: ptr_at checked bounds.
        let (vihl, proto) = unsafe { ((*ip).vihl, (*ip).proto) };
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return None;
        }
        let ihl = usize::from(vihl & 0x0f);
        if ihl < 5 {
            return None;
        }
        // Source port: the first two bytes of both TCP and UDP headers.
        let sport = ptr_at::<[u8; 2]>(ctx, EthHdr::LEN + ihl * 4)?;
        let seq = XLB_BENCH_SEQ.get_ptr_mut(0)?;
        // SAFETY: per-CPU slot, no other writer on this CPU.
        let n = unsafe {
            let n = *seq;
            *seq = n + 1;
            n
        };
        // SAFETY: a helper without preconditions.
        let cpu = unsafe { bpf_get_smp_processor_id() };
        let port = 0x8000 | ((cpu & 0x7) << 12) as u16 | ((n >> 16) & 0x0fff) as u16;
        // SAFETY: both pointers were bounds-checked above.
        unsafe {
            (*ip).src_addr = [10, 200, (n >> 8) as u8, n as u8];
            *sport = port.to_be_bytes();
        }
        Some(())
    }

    /// The load balancer's flow key of an IPv4 TCP/UDP frame without
    /// options (the frames the kernel benchmark sends).
    #[inline(always)]
    fn flow_key(ctx: &XdpContext) -> Option<FlowKey> {
        let eth = ptr_at::<EthHdr>(ctx, 0)?;
        // SAFETY: ptr_at checked bounds.
        if unsafe { (*eth).ether_type } != ETH_P_IPV4_BE {
            return None;
        }
        // The same loads as the load balancer's (packet.rs).
        let ip = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN)? as *const u8;
        let l4 = ptr_at::<[u16; 2]>(ctx, EthHdr::LEN + Ipv4Hdr::LEN)? as *const u8;
        // SAFETY: ptr_at checked bounds.
        let (src, dst, proto, src_port_be, dst_port_be) = unsafe {
            (
                load32::<12>(ip),
                load32::<16>(ip),
                *ip.add(9),
                load16::<0>(l4),
                load16::<2>(l4),
            )
        };
        Some(FlowKey {
            src: [src, 0, 0, 0],
            dst: [dst, 0, 0, 0],
            src_port_be,
            dst_port_be,
            proto,
            family: FAMILY_V4,
            _pad: [0; 2],
        })
    }

    /// A flow-table entry of the kind the load balancer writes.
    const VALUE: FlowValue = FlowValue {
        backend: 1,
        generation: 1,
        last_seen_ns: 0,
        flags: 0,
    };

    #[inline(always)]
    fn pair(words: &[u64; 5]) -> [u32; 2] {
        // SAFETY: a read-only global the loader sets; volatile so the
        // compiled-in 0 is not folded in.
        let buckets = unsafe { core::ptr::read_volatile(&XLB_BENCH_FLOW_BUCKETS) };
        bucket_pair(slot_hash(words), buckets)
    }

    #[inline(always)]
    fn buckets(words: &[u64; 5]) -> Option<flows::Buckets> {
        flows::buckets(&XLB_BENCH_FLOWS, &pair(words))
    }

    #[inline(always)]
    fn swap_macs(ctx: &XdpContext) -> u32 {
        let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
            return XDP_ABORTED;
        };
        // SAFETY: ptr_at checked the header lies inside the packet.
        unsafe { core::mem::swap(&mut (*eth).dst_addr, &mut (*eth).src_addr) };
        XDP_TX
    }

    #[xdp]
    pub fn xlb_bench_flow_hit(ctx: XdpContext) -> u32 {
        let Some(key) = flow_key(&ctx) else {
            return XDP_ABORTED;
        };
        let words = key_words(&key);
        let Some(b) = buckets(&words) else {
            return XDP_ABORTED;
        };
        if flows::find(&b, &words).slot.is_null() {
            return XDP_DROP;
        }
        swap_macs(&ctx)
    }

    /// Inserts as the load balancer does a new flow. XDP_TX: inserted;
    /// XDP_PASS: the key exists; XDP_DROP: the locks stayed taken.
    #[xdp]
    pub fn xlb_bench_flow_insert(ctx: XdpContext) -> u32 {
        let Some(key) = flow_key(&ctx) else {
            return XDP_ABORTED;
        };
        let words = key_words(&key);
        let Some(b) = buckets(&words) else {
            return XDP_ABORTED;
        };
        if !flows::lock(&b) {
            return XDP_DROP;
        }
        let action = if flows::find_locked(&b, &words).is_some() {
            XDP_PASS
        } else {
            let (slot, _) = flows::victim(&b);
            // SAFETY: a slot of the buckets we locked.
            unsafe { flows::write(slot, &words, &VALUE) };
            XDP_TX
        };
        flows::unlock(&b);
        action
    }

    #[xdp]
    pub fn xlb_bench_flow_touch(ctx: XdpContext) -> u32 {
        let Some(key) = flow_key(&ctx) else {
            return XDP_ABORTED;
        };
        let mut sum = 0u64;
        for bucket in pair(&key_words(&key)) {
            if let Some(b) = XLB_BENCH_FLOWS.get_ptr(bucket) {
                // SAFETY: a valid map value pointer; volatile so the read
                // is made although only the return value depends on it.
                sum = sum.wrapping_add(unsafe { core::ptr::read_volatile(&(*b).slots[0].seq) });
            }
        }
        // Always XDP_TX: with no write in progress (none here) both seqs
        // are even, so their sum is never u64::MAX. The branch makes the
        // program wait for both reads.
        if sum == u64::MAX {
            XDP_DROP
        } else {
            XDP_TX
        }
    }

    #[xdp]
    pub fn xlb_bench_lru_hit(ctx: XdpContext) -> u32 {
        let Some(key) = flow_key(&ctx) else {
            return XDP_ABORTED;
        };
        if XLB_BENCH_LRU.get_ptr(&key).is_none() {
            return XDP_DROP;
        }
        swap_macs(&ctx)
    }

    /// A `BPF_NOEXIST` insert. XDP_TX: inserted; XDP_PASS: the key exists;
    /// XDP_DROP: any other failure.
    #[xdp]
    pub fn xlb_bench_lru_insert(ctx: XdpContext) -> u32 {
        let Some(key) = flow_key(&ctx) else {
            return XDP_ABORTED;
        };
        match XLB_BENCH_LRU.insert(&key, &VALUE, 1) {
            Ok(()) => XDP_TX,
            Err(-17) => XDP_PASS,
            Err(_) => XDP_DROP,
        }
    }

    #[xdp]
    pub fn xlb_bench_fwd(ctx: XdpContext) -> u32 {
        fwd(&ctx).unwrap_or(XDP_PASS)
    }

    #[inline(always)]
    fn fwd(ctx: &XdpContext) -> Option<u32> {
        // SAFETY: read-only globals the loader sets; volatile so the
        // compiled-in zeros are not folded in.
        let (n, addr, port) = unsafe {
            (
                core::ptr::read_volatile(&XLB_BENCH_FWD_N),
                core::ptr::read_volatile(&XLB_BENCH_FWD_ADDR_BE),
                core::ptr::read_volatile(&XLB_BENCH_FWD_PORT_BE),
            )
        };
        let eth = ptr_at::<EthHdr>(ctx, 0)?;
        // SAFETY: ptr_at checked bounds.
        if unsafe { (*eth).ether_type } != ETH_P_IPV4_BE || n == 0 {
            return None;
        }
        let ip = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN)? as *const u8;
        // SAFETY: ptr_at checked bounds (protocol, addresses, IHL).
        let (vihl, proto, src, dst) =
            unsafe { (*ip, *ip.add(9), load32::<12>(ip), load32::<16>(ip)) };
        let ihl = usize::from(vihl & 0x0f);
        if proto != PROTO_TCP || dst != addr || ihl < 5 {
            return None;
        }
        let l4 = ptr_at::<[u16; 2]>(ctx, EthHdr::LEN + ihl * 4)?;
        // SAFETY: ptr_at checked bounds.
        let (sport, dport) = unsafe { (load16::<0>(l4.cast()), load16::<2>(l4.cast())) };
        if dport != port {
            return None;
        }
        let k = u32::from_be(src).wrapping_add(u32::from(u16::from_be(sport))) % n;
        let macs = XLB_BENCH_FWD_MACS.get(k)?;
        // SAFETY: ptr_at checked the Ethernet header; it begins with the
        // two MACs in the order `macs` holds them.
        unsafe { *eth.cast::<[u8; 12]>() = *macs };
        Some(XDP_TX)
    }

    #[xdp]
    pub fn xlb_bench_gen(_ctx: XdpContext) -> u32 {
        bump(COUNT_GEN);
        XLB_BENCH_PORTS.redirect(0, 0).unwrap_or(XDP_ABORTED)
    }

    #[xdp]
    pub fn xlb_bench_sink(_ctx: XdpContext) -> u32 {
        bump(COUNT_SINK);
        XDP_DROP
    }
}

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
