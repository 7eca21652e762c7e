//! Types and constants shared by the XDP program (`lb-ebpf`) and the daemon
//! (`lb-userspace`), plus host-only logic (Maglev) behind the `std` feature.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and a
//! compile-time size check, so both sides agree on the layout byte for byte.
//! Addresses are stored in network byte order exactly as they appear in the
//! packet: an IPv4 address occupies word 0 and words 1..3 are zero.
#![cfg_attr(not(feature = "std"), no_std)]

pub mod flow_table;
pub mod hash;
#[cfg(feature = "std")]
pub mod maglev;

/// Map names, shared so the daemon never spells them differently.
pub mod maps {
    pub const VIPS: &str = "XLB_VIPS";
    pub const BACKENDS: &str = "XLB_BACKENDS";
    pub const RINGS: &str = "XLB_RINGS";
    pub const FLOWS: &str = "XLB_FLOWS";
    pub const TX_PORTS: &str = "XLB_TX_PORTS";
    /// Written by the daemon only: per VIP id, what the VIP's former
    /// backends counted (their `Counters` as they left it). The datapath
    /// counts a packet on its backend alone; a VIP's counters are this
    /// plus its backends' (`State::vip_counters`).
    pub const VIP_RETIRED: &str = "XLB_VIP_RETIRED";
    /// The per-CPU VIP counters of builds before `VIP_RETIRED`, which
    /// counted every packet on its VIP too: a start that finds this pin
    /// rewrites `VIP_RETIRED` from it (`Dataplane::convert_vip_stats`) and
    /// removes it once every link runs the new program.
    pub const LEGACY_VIP_STATS: &str = "XLB_VIP_STATS";
    pub const BACKEND_STATS: &str = "XLB_BACKEND_STATS";
    pub const REASON_STATS: &str = "XLB_REASON_STATS";
    /// Written by the daemon only: flows it expired for being idle, per
    /// backend id. Pinned with the rest, so a restarted daemon keeps the
    /// active-connection arithmetic right.
    pub const BACKEND_EXPIRED: &str = "XLB_BACKEND_EXPIRED";
    /// Bitmap of `vip_filter_slot` of every VIP: after a flow-table miss,
    /// most packets that are not for a VIP are turned away by one array
    /// read, with no hash lookup.
    pub const VIP_FILTER: &str = "XLB_VIP_FILTER";
    /// One `u64`: CLOCK_MONOTONIC in ns, written by the daemon every 250 ms.
    /// Flow timestamps use it; `bpf_ktime_get_ns` costs ~28 ns a packet here.
    pub const CLOCK: &str = "XLB_CLOCK";
    /// `u32` per `vip_index_slot`: which VIP a new flow's destination may
    /// be, so the new-flow path finds its `VipInfo` with two array reads
    /// and no hash lookup (see `VipEntry`).
    pub const VIP_INDEX: &str = "XLB_VIP_INDEX";
    /// `VipEntry` per VIP id.
    pub const VIP_BY_ID: &str = "XLB_VIP_BY_ID";

    /// Every map, for pinning and adoption.
    pub const ALL: [&str; 13] = [
        VIPS,
        BACKENDS,
        RINGS,
        FLOWS,
        TX_PORTS,
        VIP_RETIRED,
        BACKEND_STATS,
        REASON_STATS,
        BACKEND_EXPIRED,
        VIP_FILTER,
        CLOCK,
        VIP_INDEX,
        VIP_BY_ID,
    ];
}

/// Names of the read-only globals the daemon sets at load time.
pub mod globals {
    /// `u32`: slots per Maglev ring (a prime).
    pub const RING_SIZE: &str = "XLB_RING_SIZE";
    /// `u32`: `XLB_RINGS` entries per ring, `ceil(RING_SIZE / RING_CHUNK_SLOTS)`.
    pub const RING_CHUNKS: &str = "XLB_RING_CHUNKS";
    /// `u32`: buckets of the flow table, `flow_table_size / FLOW_WAYS`.
    pub const FLOW_BUCKETS: &str = "XLB_FLOW_BUCKETS";
}

/// The XDP program names in the object file.
pub mod programs {
    pub const LB: &str = "xlb_lb";
}

pub const DEFAULT_RING_SIZE: u32 = 65_537;
/// Largest ring the datapath accepts; bounded so `slot / RING_CHUNK_SLOTS`
/// fits the chunk index arithmetic with room to spare.
pub const MAX_RING_SIZE: u32 = 1_048_573;
/// Ring slots per `XLB_RINGS` array entry. A power of two, so the slot index
/// inside a chunk is a mask the verifier can bound.
pub const RING_CHUNK_SLOTS: u32 = 1024;
pub const DEFAULT_MAX_VIPS: u32 = 64;
/// Backend ids index `XLB_BACKENDS` and `XLB_BACKEND_STATS`.
pub const MAX_BACKENDS: u32 = 4096;
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1_000_000;
/// Egress interfaces reachable through `XLB_TX_PORTS` (XDP_REDIRECT).
pub const MAX_TX_PORTS: u32 = 64;
/// Backends of the benchmark's bare forwarder (`xlb_bench_fwd`, never
/// loaded by the daemon): entries of its `XLB_BENCH_FWD_MACS`.
pub const BENCH_FWD_BACKENDS: u32 = 16;
/// Entries of `XLB_REASON_STATS`; larger than the reason list so reasons can
/// be appended without resizing a pinned map.
pub const REASON_SLOTS: u32 = 32;
/// `u64` words of `XLB_VIP_FILTER`: 65536 bits, so a few hundred VIPs leave
/// it sparse.
pub const VIP_FILTER_WORDS: u32 = 1024;

/// The bit of `XLB_VIP_FILTER` for a VIP (address words and port in network
/// order, as in `VipKey`). Shared by the datapath and the daemon.
#[inline(always)]
pub const fn vip_filter_slot(addr: &[u32; 4], port_be: u16, proto: u8) -> u32 {
    let x = addr[0]
        ^ addr[1].rotate_left(8)
        ^ addr[2].rotate_left(16)
        ^ addr[3].rotate_left(24)
        ^ (((port_be as u32) << 8) | proto as u32);
    x.wrapping_mul(0x9e37_79b1) >> 16
}

/// `XLB_VIP_INDEX` entries. Written by the daemon only, read per new flow.
pub const VIP_INDEX_SLOTS: u32 = 4096;
/// `XLB_VIP_INDEX` value: several VIPs share the slot; look the
/// destination up in `XLB_VIPS`. (0: no VIP; else the VIP id + 1.)
pub const VIP_INDEX_SHARED: u32 = u32::MAX;

/// The `XLB_VIP_INDEX` slot of a VIP, from its `vip_filter_slot`.
#[inline(always)]
pub const fn vip_index_slot(filter_slot: u32) -> u32 {
    filter_slot % VIP_INDEX_SLOTS
}

/// Ring slot value meaning "no backend" (a VIP whose backends all have
/// weight 0, or none at all).
pub const EMPTY_SLOT: u32 = u32::MAX;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Ring slots used by one VIP: two rings (double buffer) of `ring_chunks`.
pub const fn ring_chunk_index(vip_id: u32, ring: u32, ring_chunks: u32, slot: u32) -> u32 {
    (vip_id * 2 + (ring & 1)) * ring_chunks + slot / RING_CHUNK_SLOTS
}

pub const fn ring_chunks_for(ring_size: u32) -> u32 {
    ring_size.div_ceil(RING_CHUNK_SLOTS)
}

/// `XLB_VIPS` key: which traffic is load balanced.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// Destination address, network byte order (IPv4 in word 0).
    pub addr: [u32; 4],
    /// Destination port, network byte order.
    pub port_be: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}

impl VipKey {
    /// The VIP's bit in `XLB_VIP_FILTER` (`vip_filter_slot`).
    #[inline(always)]
    pub const fn filter_slot(&self) -> u32 {
        vip_filter_slot(&self.addr, self.port_be, self.proto)
    }
}

/// `VipInfo::flags`: hash new flows on the client address only.
pub const VIP_F_AFFINITY_CLIENT_IP: u32 = 1;

/// `XLB_VIPS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index into `XLB_VIP_RETIRED` and the ring area of `XLB_RINGS`.
    pub id: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
    /// Which of the VIP's two rings the datapath reads (0 or 1). The daemon
    /// writes the other ring, then flips this in one map update.
    pub active_ring: u32,
    pub _pad: u32,
}

/// `XLB_VIP_BY_ID` value: a VIP's key and `XLB_VIPS` value, by VIP id.
///
/// The datapath trusts an entry only if its key is the packet's, so an
/// index slot naming a VIP that is going away, or a destination that only
/// shares the VIP's slot, reads as no VIP. The daemon never writes a key
/// into an entry the index names (a new VIP's entry is complete before the
/// index names it; an id is reused only after the index stopped naming it),
/// and it changes an entry's info one 4-byte field per map update, so a
/// read racing with an update sees the old or the new field, never a mix
/// of two updates.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipEntry {
    pub key: VipKey,
    pub info: VipInfo,
}

/// `Backend::flags`: failed its health check. Flows pinned to it are
/// rescheduled on the ring (which no longer contains it) instead of being
/// sent to a dead server.
pub const BACKEND_F_DOWN: u32 = 1;
/// `Backend::flags`: being drained by the operator. Ignored by the datapath
/// (a draining backend is simply not in the ring); kept in the map so a
/// restarted daemon adopts the drain.
pub const BACKEND_F_DRAINING: u32 = 2;

/// `XLB_BACKENDS` value (array indexed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Destination MAC written into forwarded frames.
    pub dst_mac: [u8; 6],
    /// Source MAC: the MAC of the egress interface.
    pub src_mac: [u8; 6],
    /// Egress interface. Equal to the ingress interface: XDP_TX; otherwise
    /// XDP_REDIRECT through `XLB_TX_PORTS[tx_port]`.
    pub ifindex: u32,
    pub tx_port: u32,
    /// Non-zero while the slot is in use; a new backend in a reused slot gets
    /// a new generation, so flow entries of the old one stop matching.
    pub generation: u32,
    /// `BACKEND_F_*` bits.
    pub flags: u32,
    /// The VIP this backend serves, and its address (network order, IPv4 in
    /// word 0): unused by the datapath, they let a restarted daemon adopt
    /// the table and keep every id and generation (and a start that
    /// converts `maps::LEGACY_VIP_STATS` finds a VIP's backends by it).
    pub vip_id: u32,
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// The 5-tuple of a client-to-VIP packet: what a flow-table slot is for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Client address, network byte order (IPv4 in word 0).
    pub src: [u32; 4],
    /// VIP address, network byte order (IPv4 in word 0).
    pub dst: [u32; 4],
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// `FlowValue::flags`: a FIN or RST was seen; the flow is counted as
/// closed. Later packets (the last ACKs) still go to its backend; a SYN
/// starts a new flow.
pub const FLOW_F_CLOSED: u16 = 1;

/// How stale `FlowValue::last_seen_ns` may get before a packet refreshes
/// it: idle timeouts are seconds to minutes, so refreshing at most once a
/// second keeps the write off most packets.
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// What the flow table keeps of a flow: 16 bytes, so that a `FlowSlot` is
/// one 64-byte cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Backend id (below `MAX_BACKENDS`).
    pub backend: u16,
    /// `FLOW_F_*` bits, written under the flow's bucket locks.
    pub flags: u16,
    /// `Backend::generation` when the flow was scheduled.
    pub generation: u32,
    /// `XLB_CLOCK` (CLOCK_MONOTONIC ns, 250 ms steps) when a recent packet
    /// was seen, within `LAST_SEEN_GRANULARITY_NS`.
    pub last_seen_ns: u64,
}

impl FlowValue {
    /// The backend id as the maps index it.
    #[inline(always)]
    pub const fn backend_id(&self) -> u32 {
        self.backend as u32
    }
}

/// Per-CPU counters of a backend (`XLB_BACKEND_STATS`), and the sums the
/// daemon keeps of a VIP's (`XLB_VIP_RETIRED`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    /// Bytes of the whole frame as received (L2 header included).
    pub bytes: u64,
    /// Flows scheduled on this backend (flow-table misses).
    pub new_flows: u64,
    /// Flows of this backend that ended in the datapath: FIN or RST seen,
    /// or moved to another backend because this one went down. Active
    /// connections = new_flows - closed_flows - expired (daemon's count).
    pub closed_flows: u64,
}

impl Counters {
    pub fn add(&mut self, other: &Counters) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
        self.closed_flows += other.closed_flows;
    }

    /// Each counter less `other`'s, at least 0.
    pub fn saturating_sub(&self, other: &Counters) -> Counters {
        Counters {
            packets: self.packets.saturating_sub(other.packets),
            bytes: self.bytes.saturating_sub(other.bytes),
            new_flows: self.new_flows.saturating_sub(other.new_flows),
            closed_flows: self.closed_flows.saturating_sub(other.closed_flows),
        }
    }
}

/// Ring storage unit: `RING_CHUNK_SLOTS` backend ids.
pub type RingChunk = [u32; RING_CHUNK_SLOTS as usize];

/// Why a packet was not load balanced. Indexes `XLB_REASON_STATS`.
///
/// Stable: append new reasons, never renumber (the numbers are in pinned maps
/// and dashboards).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    PassNonIp = 0,
    /// IP, TCP or UDP, but no VIP matches (address, port, protocol).
    PassNotVip = 1,
    /// An IPv4 fragment (MF set or offset non-zero), first fragment included.
    PassIpv4Fragment = 2,
    /// IPv6 whose next header is an extension header.
    PassIpv6ExtHeader = 3,
    /// Neither TCP nor UDP (ICMP, ICMPv6, GRE, ...).
    PassNotTcpUdp = 4,
    /// Destined to a VIP with TTL / hop limit <= 1.
    PassTtlExpired = 5,
    /// Shorter than the headers it announces.
    PassTruncated = 6,
    /// Header fields that cannot be right (IPv4 IHL < 5, version mismatch).
    PassMalformed = 7,
    /// VIP matched but its ring has no backend (none, or all weight 0).
    DropNoBackend = 8,
    /// The ring points at an unused backend slot (update in flight).
    DropBackendInvalid = 9,
    /// XDP_REDIRECT to the backend's egress interface failed.
    DropRedirectFailed = 10,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::PassNonIp,
        Reason::PassNotVip,
        Reason::PassIpv4Fragment,
        Reason::PassIpv6ExtHeader,
        Reason::PassNotTcpUdp,
        Reason::PassTtlExpired,
        Reason::PassTruncated,
        Reason::PassMalformed,
        Reason::DropNoBackend,
        Reason::DropBackendInvalid,
        Reason::DropRedirectFailed,
    ];

    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::DropNoBackend | Reason::DropBackendInvalid | Reason::DropRedirectFailed
        )
    }

    /// Stable snake_case name, used in metrics labels and CLI output.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNonIp => "pass_non_ip",
            Reason::PassNotVip => "pass_not_vip",
            Reason::PassIpv4Fragment => "pass_ipv4_fragment",
            Reason::PassIpv6ExtHeader => "pass_ipv6_ext_header",
            Reason::PassNotTcpUdp => "pass_not_tcp_udp",
            Reason::PassTtlExpired => "pass_ttl_expired",
            Reason::PassTruncated => "pass_truncated",
            Reason::PassMalformed => "pass_malformed",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropBackendInvalid => "drop_backend_invalid",
            Reason::DropRedirectFailed => "drop_redirect_failed",
        }
    }
}

/// Slots per flow-table bucket: a flow lives in one of the `FLOW_WAYS`
/// slots of the bucket its `flow_table::slot_hash` picks.
pub const FLOW_WAYS: u32 = 4;
/// `FlowSlot::seq` bit of a bucket's first slot: the bucket's write lock.
pub const FLOW_BUCKET_LOCK: u64 = 1 << 63;

/// One slot of a `FlowBucket`: one cache line (the table's values start
/// page-aligned, as every mmapable array's do). Every write to a bucket's
/// slots (datapath or daemon) holds the bucket's lock, and every write
/// bumps `seq` to odd before and to even after, so lockless readers can
/// tell a torn read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSlot {
    /// Write count: odd while a write is in progress. Bit 63
    /// (`FLOW_BUCKET_LOCK`) of a bucket's first slot is the bucket's lock.
    pub seq: u64,
    /// All zero (`family` 0) in an empty slot.
    pub key: FlowKey,
    pub value: FlowValue,
}

/// One `XLB_FLOWS` array entry: `FLOW_WAYS` slots, reached through one map
/// value pointer (one array lookup per bucket, not per slot), each slot a
/// cache line of its own: a lookup that stops at a bucket's first slot
/// reads one line, a miss reads `FLOW_WAYS` per bucket. The table has
/// `flow_table::buckets_for(flow_table_size)` of them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBucket {
    pub slots: [FlowSlot; FLOW_WAYS as usize],
}

const _: () = {
    assert!(core::mem::size_of::<FlowSlot>() == 64);
    assert!(core::mem::size_of::<FlowBucket>() == 64 * FLOW_WAYS as usize);
    assert!(core::mem::size_of::<VipKey>() == 20);
    assert!(core::mem::size_of::<VipInfo>() == 16);
    assert!(core::mem::size_of::<VipEntry>() == 36);
    assert!(core::mem::size_of::<Backend>() == 52);
    // The datapath copies the MACs into the frame as one 12-byte run.
    assert!(core::mem::offset_of!(Backend, dst_mac) == 0);
    assert!(core::mem::offset_of!(Backend, src_mac) == 6);
    assert!(core::mem::size_of::<FlowKey>() == 40);
    assert!(core::mem::size_of::<FlowValue>() == 16);
    // Backend ids fit `FlowValue::backend`.
    assert!(MAX_BACKENDS <= 1 << 16);
    assert!(core::mem::size_of::<Counters>() == 32);
    assert!(Reason::ALL.len() as u32 <= REASON_SLOTS);
    assert!(RING_CHUNK_SLOTS.is_power_of_two());
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, contain only integers and byte
    // arrays, and have explicit padding fields (no implicit padding bytes).
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::VipEntry {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::FlowSlot {}
    unsafe impl aya::Pod for super::FlowBucket {}
    unsafe impl aya::Pod for super::Counters {}
}

#[cfg(feature = "std")]
mod addr {
    use std::net::IpAddr;

    use super::{FAMILY_V4, FAMILY_V6};

    /// Address words in network byte order, as the datapath stores them.
    pub fn addr_words(addr: IpAddr) -> ([u32; 4], u8) {
        match addr {
            IpAddr::V4(a) => ([u32::from_ne_bytes(a.octets()), 0, 0, 0], FAMILY_V4),
            IpAddr::V6(a) => {
                let o = a.octets();
                let mut w = [0u32; 4];
                for (i, word) in w.iter_mut().enumerate() {
                    *word =
                        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
                }
                (w, FAMILY_V6)
            }
        }
    }

    impl super::VipKey {
        pub fn new(addr: IpAddr, port: u16, proto: u8) -> Self {
            let (addr, family) = addr_words(addr);
            Self {
                addr,
                port_be: port.to_be(),
                proto,
                family,
            }
        }
    }
}
#[cfg(feature = "std")]
pub use addr::addr_words;
