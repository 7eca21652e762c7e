use core::mem;

use crate::{
    flows::{self, Buckets, Found},
    packet::{load16, load32, load64, store32, store64},
};
use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
        BPF_F_MMAPABLE,
    },
    macros::{map, xdp},
    maps::{Array, DevMap, HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    flow_table::{bucket_pair, buckets_for, key_of_words, ports_word, same_key, slot_hash},
    hash::{client_hash, flow_hash_of, ring_slot},
    ring_chunk_index, ring_chunks_for, Backend, Counters, FlowBucket, FlowKey, FlowSlot, FlowValue,
    Reason, RingChunk, VipInfo, VipKey, BACKEND_F_DOWN, DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAX_VIPS,
    DEFAULT_RING_SIZE, EMPTY_SLOT, FAMILY_V4, FAMILY_V6, FLOW_F_CLOSED, LAST_SEEN_GRANULARITY_NS,
    MAX_BACKENDS, MAX_TX_PORTS, PROTO_TCP, PROTO_UDP, REASON_SLOTS, RING_CHUNK_SLOTS,
    VIP_FILTER_WORDS, VIP_F_AFFINITY_CLIENT_IP,
};
use lb_common::{vip_index_slot, VipEntry, VIP_INDEX_SHARED, VIP_INDEX_SLOTS};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

// Sizes below are defaults; the daemon sets the real ones at load time.
#[map]
static XLB_VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);
#[map]
static XLB_BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
#[map]
static XLB_RINGS: Array<RingChunk> =
    Array::with_max_entries(DEFAULT_MAX_VIPS * 2 * ring_chunks_for(DEFAULT_RING_SIZE), 0);
/// Mmapable: the daemon reads and sweeps it in place (see flows.rs).
#[map]
static XLB_FLOWS: Array<FlowBucket> =
    Array::with_max_entries(buckets_for(DEFAULT_FLOW_TABLE_SIZE), BPF_F_MMAPABLE);
#[map]
static XLB_TX_PORTS: DevMap = DevMap::with_max_entries(MAX_TX_PORTS, 0);
/// Written by the daemon only: a VIP's packets are counted on its
/// backends (one per-CPU counter update a packet, not two), and this keeps
/// what the VIP's former backends counted (see `lb_common::maps`).
#[map]
static XLB_VIP_RETIRED: Array<Counters> = Array::with_max_entries(DEFAULT_MAX_VIPS, 0);
#[map]
static XLB_BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
#[map]
static XLB_REASON_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_SLOTS, 0);
/// Written by the daemon only (idle flows it expired); defined here so it is
/// created and pinned with the others.
#[map]
static XLB_BACKEND_EXPIRED: Array<u64> = Array::with_max_entries(MAX_BACKENDS, 0);
#[map]
static XLB_VIP_FILTER: Array<u64> = Array::with_max_entries(VIP_FILTER_WORDS, 0);
#[map]
static XLB_CLOCK: Array<u64> = Array::with_max_entries(1, 0);
#[map]
static XLB_VIP_INDEX: Array<u32> = Array::with_max_entries(VIP_INDEX_SLOTS, 0);
#[map]
static XLB_VIP_BY_ID: Array<VipEntry> = Array::with_max_entries(DEFAULT_MAX_VIPS, 0);

// Read-only globals, overridden by the loader (lb_common::globals).
#[unsafe(no_mangle)]
static XLB_RING_SIZE: u32 = DEFAULT_RING_SIZE;
#[unsafe(no_mangle)]
static XLB_RING_CHUNKS: u32 = ring_chunks_for(DEFAULT_RING_SIZE);
#[unsafe(no_mangle)]
static XLB_FLOW_BUCKETS: u32 = buckets_for(DEFAULT_FLOW_TABLE_SIZE);

const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86DDu16.to_be();
const ETH_P_8021Q_BE: u16 = 0x8100u16.to_be();
/// IPv4 `frags` field: MF flag and fragment offset.
const IPV4_MF_OR_OFFSET: u16 = 0x3fff;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[xdp]
pub fn xlb_lb(ctx: XdpContext) -> u32 {
    match try_lb(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count_reason(reason);
            if reason.is_drop() {
                XDP_DROP
            } else {
                XDP_PASS
            }
        }
    }
}

/// The one bounds-checked accessor: every header read goes through here.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Reason> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return Err(Reason::PassTruncated);
    }
    Ok((start + offset) as *mut T)
}

#[inline(always)]
fn count_reason(reason: Reason) {
    if let Some(n) = XLB_REASON_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU.
        unsafe { *n += 1 };
    }
}

/// Counts a packet of `bytes` on the backend `id` it goes to.
#[inline(always)]
fn count(id: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = XLB_BACKEND_STATS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot, no other writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += u64::from(new_flow);
        }
    }
}

/// What the L3/L4 parse yields for a TCP or UDP packet.
struct Parsed {
    /// The flow key as its words (`flow_table::key_words`), read from the
    /// packet as they lie in a slot: an IPv4 packet's zero words are
    /// constants the compiler folds through the hash and the lookup.
    words: [u64; 5],
    ttl: u8,
    /// TCP flags byte; 0 for UDP.
    tcp_flags: u8,
}

/// Reads the ports (and TCP flags) of a TCP or UDP header at `l4`,
/// requiring the whole fixed header to be present.
#[inline(always)]
fn ports(ctx: &XdpContext, l4: usize, proto: u8) -> Result<(u16, u16, u8), Reason> {
    if proto == PROTO_TCP {
        let tcp = ptr_at::<TcpHdr>(ctx, l4)? as *const u8;
        // SAFETY: ptr_at checked the header lies inside the packet: ports
        // at 0 and 2, the flags are byte 13.
        unsafe { Ok((load16::<0>(tcp), load16::<2>(tcp), *tcp.add(13))) }
    } else {
        let udp = ptr_at::<UdpHdr>(ctx, l4)? as *const u8;
        // SAFETY: as above; ports at 0 and 2.
        unsafe { Ok((load16::<0>(udp), load16::<2>(udp), 0)) }
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l3: usize) -> Result<Parsed, Reason> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3)?;
    let raw = ip as *const u8;
    // SAFETY: ptr_at checked the fixed header lies inside the packet.
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 {
        return Err(Reason::PassMalformed);
    }
    let ihl = usize::from(ip.vihl & 0x0f);
    if ihl < 5 {
        return Err(Reason::PassMalformed);
    }
    // Fragments are never load balanced: later fragments carry no ports, and
    // all fragments of a datagram must take the same path. The kernel gets
    // them (and reassembles, or drops them: it does not own the VIP).
    // SAFETY: inside the fixed header (the flags and fragment offset).
    if u16::from_be(unsafe { load16::<6>(raw) }) & IPV4_MF_OR_OFFSET != 0 {
        return Err(Reason::PassIpv4Fragment);
    }
    let proto = ip.proto;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Reason::PassNotTcpUdp);
    }
    // IHL honoured: options are skipped, whatever their length.
    let (src_port_be, dst_port_be, tcp_flags) = ports(ctx, l3 + ihl * 4, proto)?;
    Ok(Parsed {
        words: [
            // SAFETY: inside the fixed header (the addresses).
            u64::from(unsafe { load32::<12>(raw) }),
            0,
            u64::from(unsafe { load32::<16>(raw) }),
            0,
            ports_word(src_port_be, dst_port_be, proto, FAMILY_V4),
        ],
        ttl: ip.ttl,
        tcp_flags,
    })
}

#[inline(always)]
fn is_ipv6_extension(next: u8) -> bool {
    // Hop-by-hop, routing, fragment, ESP, AH, destination options, mobility,
    // HIP, shim6, and the two experimental numbers.
    matches!(
        next,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l3: usize) -> Result<Parsed, Reason> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l3)?;
    let raw = ip as *const u8;
    // SAFETY: ptr_at checked the header lies inside the packet.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Err(Reason::PassMalformed);
    }
    let proto = ip.next_hdr;
    // Extension headers are not walked: they are rare on client traffic and
    // a chain walk costs verifier complexity on every packet.
    if is_ipv6_extension(proto) {
        return Err(Reason::PassIpv6ExtHeader);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Reason::PassNotTcpUdp);
    }
    let (src_port_be, dst_port_be, tcp_flags) = ports(ctx, l3 + Ipv6Hdr::LEN, proto)?;
    Ok(Parsed {
        // SAFETY: inside the header (the addresses, bytes 8..40, each half
        // of an address one little-endian word, as `key_words` pairs them).
        words: unsafe {
            [
                load64::<8>(raw),
                load64::<16>(raw),
                load64::<24>(raw),
                load64::<32>(raw),
                ports_word(src_port_be, dst_port_be, proto, FAMILY_V6),
            ]
        },
        ttl: ip.hop_limit,
        tcp_flags,
    })
}

#[inline(always)]
fn count_closed(backend: u32) {
    if let Some(c) = XLB_BACKEND_STATS.get_ptr_mut(backend) {
        // SAFETY: per-CPU slot, no other writer on this CPU.
        unsafe { (*c).closed_flows += 1 };
    }
}

#[inline(always)]
fn is_closing(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// What the flow table says about a packet's flow.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Track {
    /// Pinned: stay on `Tracked::backend` (id `Tracked::id`).
    Pinned,
    /// No entry (a new flow), or an entry this packet must neither follow
    /// nor replace (a closed flow whose backend left), or one being written
    /// right now: under the bucket lock, insert if no entry exists, else
    /// follow the entry found then.
    Missing,
    /// An entry to overwrite once the ring has answered: an open flow whose
    /// backend was replaced, removed or is down, or a closed flow whose
    /// 5-tuple a SYN reuses. Overwritten under the bucket lock only if the
    /// entry is still as read (`Tracked::seq`), and then a close is counted
    /// on its backend (`Tracked::id`) when `Tracked::count_close` (a down
    /// backend). Two packets of one flow may be handled at once on two CPUs
    /// (veth runs XDP on the sender's CPU; a NIC's RSS would keep them on
    /// one): the second finds the entry changed and follows it.
    Replace,
    /// Not looked up without the lock: a TCP SYN, which opens a connection
    /// (or retransmits the opening of one the table has). Under the bucket
    /// lock an entry found is replaced if a SYN replaces it
    /// (`syn_on_entry`), else followed; no entry, inserted.
    Unread,
}

/// `Track` and what goes with it. A struct with every field set on every
/// path, not an enum with payloads: LLVM leaves the payload registers of
/// a variant without them uninitialised, spills them where paths merge,
/// and the verifier rejects the read ("!read_ok").
#[derive(Clone, Copy)]
struct Tracked {
    track: Track,
    id: u32,
    seq: u64,
    count_close: bool,
    /// The `XLB_BACKENDS` value of `id` when `Pinned`, else null. A map
    /// value pointer, not a copy of the 52-byte entry: the path reads the
    /// few fields it needs where it needs them. A daemon update of the
    /// entry is an in-place copy, so a packet racing one could see old and
    /// new fields with a copy too; here the window runs from the generation
    /// check to the rewrite (tens of ns). What it can do: when an id is
    /// reused for a new backend in that window, one packet of a flow whose
    /// backend was just removed goes to the new backend's MAC. Its next
    /// packet is rescheduled, as every flow of a removed backend is.
    backend: *const Backend,
}

impl Tracked {
    #[inline(always)]
    fn missing() -> Self {
        Self {
            track: Track::Missing,
            id: 0,
            seq: 0,
            count_close: false,
            backend: core::ptr::null(),
        }
    }

    #[inline(always)]
    fn unread() -> Self {
        Self {
            track: Track::Unread,
            ..Self::missing()
        }
    }

    #[inline(always)]
    fn replace(seq: u64, id: u32, count_close: bool) -> Self {
        Self {
            track: Track::Replace,
            id,
            seq,
            count_close,
            backend: core::ptr::null(),
        }
    }
}

/// A VIP key as five words, compared by `same_key` (no memcmp call).
#[inline(always)]
fn vip_words(k: &VipKey) -> [u64; 5] {
    [
        u64::from(k.addr[0]),
        u64::from(k.addr[1]),
        u64::from(k.addr[2]),
        u64::from(k.addr[3]),
        u64::from(k.port_be) | (u64::from(k.proto) << 16) | (u64::from(k.family) << 24),
    ]
}

/// The filter slot of the packet's destination (`VipKey::filter_slot`), if
/// its bit is set; else the packet is not for a VIP. Asked after a
/// flow-table miss, and first by a TCP SYN: most packets that are not for
/// a VIP are turned away by this one array read, with no hash lookup.
#[inline(always)]
fn vip_filter(key: &VipKey) -> Result<u32, Reason> {
    let bit = key.filter_slot();
    let word = XLB_VIP_FILTER
        .get(bit / 64)
        .copied()
        .ok_or(Reason::PassNotVip)?;
    if word & (1u64 << (bit % 64)) == 0 {
        return Err(Reason::PassNotVip);
    }
    Ok(bit)
}

/// The `VipInfo` of `key` (whose filter slot is `filter_slot`), for a new
/// flow: the index slot names the VIP, whose entry must have this key (see
/// `VipEntry`); a slot several VIPs share sends the lookup to `XLB_VIPS`.
/// Two inlined array reads instead of a hash lookup, which costs two
/// kernel calls and returns (through this VM's return thunks).
#[inline(always)]
fn vip_info(key: &VipKey, filter_slot: u32) -> Option<VipInfo> {
    let named = *XLB_VIP_INDEX.get(vip_index_slot(filter_slot))?;
    if named == VIP_INDEX_SHARED {
        // SAFETY: copied out at once.
        return unsafe { XLB_VIPS.get(key) }.copied();
    }
    // 0 (no VIP) wraps to an id past the map: None.
    let entry = XLB_VIP_BY_ID.get(named.wrapping_sub(1))?;
    same_key(&vip_words(&entry.key), &vip_words(key)).then_some(entry.info)
}

/// `XLB_CLOCK`: CLOCK_MONOTONIC ns as the daemon last wrote it.
#[inline(always)]
fn clock() -> u64 {
    XLB_CLOCK.get(0).copied().unwrap_or(0)
}

/// The flow table's bucket count (a read-only global the loader sets).
#[inline(always)]
fn flow_buckets() -> u32 {
    // SAFETY: read-only global; volatile so the compiler does not fold the
    // compiled-in default over the value the loader wrote.
    unsafe { core::ptr::read_volatile(&XLB_FLOW_BUCKETS) }
}

/// Marks the flow closed (a FIN or RST) and counts the close on the
/// backend its entry names, once: under the bucket lock, and only if the
/// entry is still open.
#[inline(always)]
fn close(words: &[u64; 5], b: &Buckets) {
    if !flows::lock(b) {
        // Contended past the bound: uncounted here, the flow expires.
        return;
    }
    if let Some(slot) = flows::find_locked(b, words) {
        // SAFETY: a valid map value pointer in the bucket we locked.
        let value = unsafe { (*slot).value };
        if value.flags & FLOW_F_CLOSED == 0 {
            // SAFETY: as above.
            unsafe { close_locked(slot, words, value) };
        }
    }
    flows::unlock(b);
}

/// Marks the open flow `words` in `slot`, whose entry is `value`, closed
/// and counts the close on its backend.
///
/// # Safety
/// `slot` is a valid map value pointer in a bucket this CPU has locked.
#[inline(always)]
unsafe fn close_locked(slot: *mut FlowSlot, words: &[u64; 5], mut value: FlowValue) {
    value.flags |= FLOW_F_CLOSED;
    // SAFETY: the caller's.
    unsafe { flows::write(slot, words, &value) };
    count_closed(value.backend_id());
}

/// Refreshes the `last_seen_ns` of the entry in `slot` (read as
/// `last_seen_ns`) if it is older than `LAST_SEEN_GRANULARITY_NS` at `now`.
///
/// # Safety
/// `slot` is a valid map value pointer. The store is the one lockless
/// write (see flows.rs).
#[inline(always)]
unsafe fn refresh(slot: *mut FlowSlot, last_seen_ns: u64, now: u64) {
    if now.wrapping_sub(last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
        // SAFETY: the caller's.
        unsafe { (*slot).value.last_seen_ns = now };
    }
}

/// Whether the entry `v` is still on the backend incarnation it was
/// scheduled on: `backend` (its id's `XLB_BACKENDS` entry) was neither
/// removed (generation 0) nor replaced since.
#[inline(always)]
fn still_on(backend: &Backend, v: &FlowValue) -> bool {
    backend.generation != 0 && backend.generation == v.generation
}

#[inline(always)]
fn tracked_backend(words: &[u64; 5], b: &Buckets, tcp_flags: u8) -> Tracked {
    let Found {
        slot,
        seq,
        value: tracked,
    } = flows::find(b, words);
    if slot.is_null() {
        return Tracked::missing();
    }
    let closed = tracked.flags & FLOW_F_CLOSED != 0;
    if closed && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        // A new connection reusing a closed one's 5-tuple.
        return Tracked::replace(seq, tracked.backend_id(), false);
    }
    let Some(backend) = XLB_BACKENDS.get(tracked.backend_id()) else {
        return Tracked::missing();
    };
    let replaced = !still_on(backend, &tracked);
    let down = backend.flags & BACKEND_F_DOWN != 0;
    if replaced || down {
        // A closed flow's last packets go to the ring's answer, unpinned;
        // an open flow moves, closed on a down backend.
        if closed {
            return Tracked::missing();
        }
        return Tracked::replace(seq, tracked.backend_id(), !replaced);
    }
    if !closed && is_closing(tcp_flags) {
        close(words, b);
    }
    // SAFETY: a valid map value pointer.
    unsafe { refresh(slot, tracked.last_seen_ns, clock()) };
    Tracked {
        track: Track::Pinned,
        id: tracked.backend_id(),
        seq,
        count_close: false,
        backend: backend as *const Backend,
    }
}

/// What a SYN does with the entry its 5-tuple has (`syn_on_entry`, under
/// the bucket lock): the decision `tracked_backend` makes for a SYN,
/// without the lockless read. A struct, not an enum (see `Tracked`).
#[derive(Clone, Copy)]
struct SynOnEntry {
    /// Replace the entry: a closed flow (a new connection reusing its
    /// 5-tuple), or an open one whose backend was replaced or removed, or
    /// is down.
    replace: bool,
    /// With `replace`: the entry is open and moves off its backend
    /// (replaced, removed or down).
    moves: bool,
    /// With `replace`: count a close on the entry's backend (down).
    count_close: bool,
    /// Without `replace`: the entry's backend entry, which the SYN follows
    /// (a retransmitted SYN); null if there is none (the ring's answer,
    /// unrecorded).
    backend: *const Backend,
}

#[inline(always)]
fn syn_on_entry(v: &FlowValue) -> SynOnEntry {
    let mut on = SynOnEntry {
        replace: true,
        moves: false,
        count_close: false,
        backend: core::ptr::null(),
    };
    if v.flags & FLOW_F_CLOSED != 0 {
        return on;
    }
    let Some(backend) = XLB_BACKENDS.get(v.backend_id()) else {
        on.replace = false;
        return on;
    };
    on.moves = true;
    if !still_on(backend, v) {
        return on;
    }
    if backend.flags & BACKEND_F_DOWN != 0 {
        on.count_close = true;
        return on;
    }
    on.moves = false;
    on.replace = false;
    on.backend = backend;
    on
}

/// The backend of the flow's entry, read without the lock, if it can be
/// followed (another CPU made or changed it while this packet scheduled
/// the flow, or a SYN found the lock contended); else the ring's answer
/// (`ring`). Never a new flow.
#[inline(always)]
fn follow(
    words: &[u64; 5],
    b: &Buckets,
    tcp_flags: u8,
    ring: (u32, *const Backend),
) -> (u32, *const Backend, bool) {
    let t = tracked_backend(words, b, tcp_flags);
    let (id, backend) = if t.track == Track::Pinned {
        (t.id, t.backend)
    } else {
        ring
    };
    (id, backend, false)
}

/// The flow's hash for the VIP's ring: the client's (`affinity:
/// client-ip`), else the flow's, taken from the slot hash that found its
/// table buckets (`slot_hash`) rather than hashed again.
#[inline(always)]
fn ring_hash(vip: &VipInfo, flow: &FlowKey, slot_hash: u64) -> u32 {
    if vip.flags & VIP_F_AFFINITY_CLIENT_IP != 0 {
        client_hash(flow)
    } else {
        flow_hash_of(slot_hash)
    }
}

/// Counts a close for an open flow a new one pushed out of a full bucket,
/// on its backend if that is still the backend the flow was counted on.
#[inline(always)]
fn count_evicted(old: &FlowSlot) {
    if old.key.family == 0 || old.value.flags & FLOW_F_CLOSED != 0 {
        return;
    }
    if XLB_BACKENDS
        .get(old.value.backend_id())
        .is_some_and(|b| still_on(b, &old.value))
    {
        count_closed(old.value.backend_id());
    }
}

/// The backend the VIP's active Maglev ring names for `hash`
/// (`ring_hash`): its id and entry.
#[inline(always)]
fn ring_pick(vip: &VipInfo, hash: u32) -> Result<(u32, *const Backend), Reason> {
    // SAFETY: read-only globals; volatile so the compiler does not fold the
    // compiled-in defaults over the values the loader wrote.
    let ring_size = unsafe { core::ptr::read_volatile(&XLB_RING_SIZE) };
    let ring_chunks = unsafe { core::ptr::read_volatile(&XLB_RING_CHUNKS) };
    if ring_size == 0 {
        return Err(Reason::DropNoBackend);
    }
    let slot = ring_slot(hash, ring_size);
    let chunk = XLB_RINGS
        .get(ring_chunk_index(vip.id, vip.active_ring, ring_chunks, slot))
        .ok_or(Reason::DropNoBackend)?;
    let id = chunk[(slot & (RING_CHUNK_SLOTS - 1)) as usize];
    if id == EMPTY_SLOT {
        return Err(Reason::DropNoBackend);
    }
    let entry = XLB_BACKENDS.get(id).ok_or(Reason::DropBackendInvalid)?;
    if entry.generation == 0 {
        return Err(Reason::DropBackendInvalid);
    }
    Ok((id, entry))
}

/// The backend the ring of the packet's VIP names for a flow that is not
/// an established one (`key`, and its flow `flow` with slot hash
/// `slot_hash`).
#[inline(always)]
fn vip_and_pick(
    key: &VipKey,
    flow: &FlowKey,
    slot_hash: u64,
) -> Result<(u32, *const Backend), Reason> {
    let bit = vip_filter(key)?;
    let vip = vip_info(key, bit).ok_or(Reason::PassNotVip)?;
    ring_pick(&vip, ring_hash(&vip, flow, slot_hash))
}

/// Records a flow the table does not pin (`found`: `Missing`, `Replace`
/// or `Unread`) on the backend its VIP's ring names (`pick`). Returns the
/// backend the packet goes to and whether this packet made the flow
/// (counted as a new flow). Nothing is written before the ring has
/// answered, so a flow whose VIP has no backend right now keeps its entry
/// as it was.
#[inline(always)]
fn schedule(
    pick: (u32, *const Backend),
    words: &[u64; 5],
    b: &Buckets,
    tcp_flags: u8,
    found: Tracked,
) -> (u32, *const Backend, bool) {
    let (id, backend) = pick;
    let closing = is_closing(tcp_flags);
    let now = clock();
    let value = FlowValue {
        // Below MAX_BACKENDS: XLB_BACKENDS has an entry for it.
        backend: id as u16,
        // SAFETY: a map value pointer (`ring_pick`).
        generation: unsafe { (*backend).generation },
        last_seen_ns: now,
        flags: if closing { FLOW_F_CLOSED } else { 0 },
    };
    // Whether this packet wrote its flow's entry; if not, it follows the
    // entry the table has.
    let made;
    if flows::lock(b) {
        made = match flows::find_locked(b, words) {
            // SAFETY (value, write): a valid map value pointer in the
            // bucket we locked.
            Some(slot) if found.track == Track::Unread => {
                let old = unsafe { (*slot).value };
                let on = syn_on_entry(&old);
                // The SYN read the ring before the entry. A ring that
                // names the very backend the entry moves off (same id and
                // generation) was read before the daemon changed that
                // backend (it takes a backend out of the ring first): the
                // ring's answer, unrecorded, as a read of the entry made
                // before the change would have given; the next packet
                // moves the flow.
                let stale_pick =
                    on.moves && id == old.backend_id() && value.generation == old.generation;
                if on.replace && !stale_pick {
                    unsafe { flows::write(slot, words, &value) };
                    if on.count_close {
                        count_closed(old.backend_id());
                    }
                    true
                } else {
                    // A retransmitted SYN: what `tracked_backend` does for
                    // a pinned flow, done under the lock, where the entry
                    // cannot change before the SYN follows it.
                    // (`on.backend` is null with `replace`.)
                    if !on.backend.is_null() {
                        if closing {
                            unsafe { close_locked(slot, words, old) };
                        }
                        unsafe { refresh(slot, old.last_seen_ns, now) };
                    }
                    flows::unlock(b);
                    if on.backend.is_null() {
                        return (id, backend, false);
                    }
                    return (old.backend_id(), on.backend, false);
                }
            }
            // SAFETY (seq_of, write): as above.
            Some(slot)
                if found.track == Track::Replace && unsafe { flows::seq_of(slot) } == found.seq =>
            {
                unsafe { flows::write(slot, words, &value) };
                if found.count_close {
                    count_closed(found.id);
                }
                true
            }
            // Another CPU made or changed the entry since we read it.
            Some(_) => false,
            // No entry (any more): a new flow.
            None => {
                let (slot, old) = flows::victim(b);
                count_evicted(&old);
                // SAFETY: as above.
                unsafe { flows::write(slot, words, &value) };
                true
            }
        };
        flows::unlock(b);
    } else if found.track == Track::Unread {
        // Contended past the bound, and a SYN has not read the table yet:
        // it follows the entry its flow has, if any, as it would have
        // without the lock.
        made = false;
    } else {
        // Contended past the bound: the ring's answer (the same until the
        // backend set changes), unrecorded and uncounted; the flow's next
        // packet tries again.
        return (id, backend, false);
    }
    if !made {
        return follow(words, b, tcp_flags, (id, backend));
    }
    if closing {
        count_closed(id);
    }
    (id, backend, true)
}

#[inline(always)]
fn try_lb(ctx: &XdpContext) -> Result<u32, Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked bounds.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3 = EthHdr::LEN;
    if ether_type == ETH_P_8021Q_BE {
        let vlan: *mut VlanHdr = ptr_at(ctx, l3)?;
        // SAFETY: ptr_at checked bounds.
        ether_type = unsafe { (*vlan).ether_type };
        l3 += VlanHdr::LEN;
    }
    let parsed = if ether_type == ETH_P_IPV4_BE {
        parse_ipv4(ctx, l3)?
    } else if ether_type == ETH_P_IPV6_BE {
        parse_ipv6(ctx, l3)?
    } else {
        return Err(Reason::PassNonIp);
    };
    let words = parsed.words;
    // The fields, for the VIP lookup and the client hash (new flows).
    let flow = key_of_words(&words);
    let vip_key = VipKey {
        addr: flow.dst,
        port_be: flow.dst_port_be,
        proto: flow.proto,
        family: flow.family,
    };
    if parsed.ttl <= 1 {
        vip_filter(&vip_key)?;
        // SAFETY: only tested for presence.
        let is_vip = unsafe { XLB_VIPS.get(&vip_key) }.is_some();
        return Err(if is_vip {
            Reason::PassTtlExpired
        } else {
            Reason::PassNotVip
        });
    }

    // The flow table first, for every packet but a TCP SYN: an
    // established flow needs neither the VIP filter nor a VIP lookup (only
    // VIP traffic makes entries, and an entry's backend names its VIP). A
    // flow whose backend is gone (VIP removed, backend replaced) falls
    // through to both like a new one.
    let flow_slot_hash = slot_hash(&words);
    let pair = bucket_pair(flow_slot_hash, flow_buckets());
    // Unreachable: the loader sizes the map with the bucket count the pair
    // is computed from.
    let b = flows::buckets(&XLB_FLOWS, &pair).ok_or(Reason::DropBackendInvalid)?;
    // A TCP SYN opens a connection: it goes to its VIP and ring first, and
    // the bucket lock then finds whether the table has the flow already (a
    // retransmitted SYN, a reused 5-tuple); a lockless lookup first would
    // only confirm the miss. If that fails (not a VIP, no backend), the
    // SYN takes the common path below, which follows an entry if it has
    // one and else fails the same way. (Both paths end in the one
    // `schedule` below: two copies of it would double the program the
    // verifier walks.)
    // (Plain variables, not an Option of a tuple: see `Tracked`.)
    let syn = parsed.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let mut early = false;
    let mut early_pick: (u32, *const Backend) = (0, core::ptr::null());
    if syn {
        if let Ok(pick) = vip_and_pick(&vip_key, &flow, flow_slot_hash) {
            early = true;
            early_pick = pick;
        }
    }
    let (id, backend, new_flow) = 'path: {
        let (found, pick) = if early {
            (Tracked::unread(), early_pick)
        } else {
            let found = tracked_backend(&words, &b, parsed.tcp_flags);
            if found.track == Track::Pinned {
                break 'path (found.id, found.backend, false);
            }
            let pick = vip_and_pick(&vip_key, &flow, flow_slot_hash)?;
            (found, pick)
        };
        schedule(pick, &words, &b, parsed.tcp_flags, found)
    };

    let bytes = (ctx.data_end() - ctx.data()) as u64;

    // L2 DSR: only the MACs change; the backend owns the VIP on a loopback
    // and answers the client directly.
    // SAFETY: a map value pointer (every path that gets here has one).
    let backend = unsafe { &*backend };
    // The backend entry begins with the two MACs in frame order
    // (`Backend::dst_mac`, `src_mac`): 12 bytes copied as 8 + 4.
    // SAFETY: both ranges were bounds-checked (the Ethernet header; the
    // map value).
    unsafe {
        let from = core::ptr::from_ref(backend).cast::<u8>();
        let to = eth.cast::<u8>();
        store64::<0>(to, load64::<0>(from));
        store32::<8>(to, load32::<8>(from));
    }
    let action = if backend.ifindex == ctx.ingress_ifindex() as u32 {
        XDP_TX
    } else {
        XLB_TX_PORTS
            .redirect(backend.tx_port, 0)
            .map_err(|_| Reason::DropRedirectFailed)?
    };
    // The one counter update: the VIP's counters are its backends' sums
    // (the daemon adds what its former backends counted).
    count(id, bytes, new_flow);
    Ok(action)
}
