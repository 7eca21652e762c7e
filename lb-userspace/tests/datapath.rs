//! In-kernel tests: the real XDP program, loaded and programmed through the
//! daemon's own code (`Config` -> `State::apply` -> maps), fed packets
//! through BPF_PROG_TEST_RUN.
//!
//! Each fixture states its input packet, the map state it needs (the shared
//! config below, plus flow entries), the expected XDP action, the expected
//! output bytes and the counter it must move. Needs root: every test fails
//! (does not skip) without it.
//!
//! Each test runs in a network namespace of its own (unshare on the test's
//! thread), so the interfaces it creates never touch the host.

use std::{net::IpAddr, process::Command};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{
    hash::{client_hash, flow_hash, ring_slot},
    maglev, maps, Counters, FlowKey, FlowValue, Reason, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP,
};
use xdplb::{
    api::Health,
    config::{Config, MacAddr, Vip},
    dataplane::Dataplane,
    netdev::{Interface, NetError},
    state::{Resolver, State},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const EGRESS_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xe0];
const B1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const B2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];
const B3_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x13];
const RING_SIZE: u32 = 65_537;

/// The map state every fixture starts from. `lo` is the VIP interface
/// because BPF_PROG_TEST_RUN reports the namespace's loopback as the
/// ingress device; `xt0` is a veth created per test for XDP_REDIRECT.
const CONFIG: &str = "
interface: lo
datapath:
  ring_size: 65537
  flow_table_size: 4096
  max_vips: 16
vips:
  - name: single-tcp
    address: 10.200.100.1
    port: 80
    protocol: tcp
    backends:
      - { address: 10.200.0.11, mac: '02:00:00:00:00:11' }
  - name: single-udp
    address: 10.200.100.1
    port: 53
    protocol: udp
    backends:
      - { address: 10.200.0.12, mac: '02:00:00:00:00:12' }
  - name: three
    address: 10.200.100.2
    port: 80
    protocol: tcp
    # Checked, so a backend can be down (the tests set health by hand; no
    # probe runs here).
    health_check: { type: tcp }
    backends: &three
      - { address: 10.200.0.11, mac: '02:00:00:00:00:11' }
      - { address: 10.200.0.12, mac: '02:00:00:00:00:12' }
      - { address: 10.200.0.13, mac: '02:00:00:00:00:13' }
  - name: affinity
    address: 10.200.100.3
    port: 80
    protocol: tcp
    affinity: client-ip
    backends: *three
  - name: all-weight-zero
    address: 10.200.100.4
    port: 80
    protocol: tcp
    backends:
      - { address: 10.200.0.11, mac: '02:00:00:00:00:11', weight: 0 }
  - name: redirect
    address: 10.200.100.5
    port: 80
    protocol: tcp
    backends:
      - { address: 10.200.1.13, mac: '02:00:00:00:00:13', interface: xt0 }
  - name: v6-tcp
    address: fd00:200::100
    port: 80
    protocol: tcp
    backends:
      - { address: 'fd00:200::11', mac: '02:00:00:00:00:11' }
  - name: v6-udp
    address: fd00:200::100
    port: 53
    protocol: udp
    backends:
      - { address: 'fd00:200::12', mac: '02:00:00:00:00:12' }
  - name: v6-three
    address: fd00:200::101
    port: 443
    protocol: tcp
    backends:
      - { address: 'fd00:200::11', mac: '02:00:00:00:00:11' }
      - { address: 'fd00:200::12', mac: '02:00:00:00:00:12' }
      - { address: 'fd00:200::13', mac: '02:00:00:00:00:13', weight: 3 }
";

const CLIENT4: [u8; 4] = [10, 200, 0, 1];
const VIP4: [u8; 4] = [10, 200, 100, 1];
const VIP4_THREE: [u8; 4] = [10, 200, 100, 2];
const VIP4_AFFINITY: [u8; 4] = [10, 200, 100, 3];
const VIP4_ZERO: [u8; 4] = [10, 200, 100, 4];
const VIP4_REDIRECT: [u8; 4] = [10, 200, 100, 5];

fn v6(last: u16) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0..4].copy_from_slice(&[0xfd, 0x00, 0x02, 0x00]);
    a[14..16].copy_from_slice(&last.to_be_bytes());
    a
}
fn client6() -> [u8; 16] {
    v6(1)
}
fn vip6() -> [u8; 16] {
    v6(0x100)
}

// ---------------------------------------------------------------- packets

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&1u32.to_be_bytes()); // seq
    h.extend_from_slice(&0u32.to_be_bytes()); // ack
    h.push(5 << 4); // data offset
    h.push(flags);
    h.extend_from_slice(&64240u16.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
    h
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

fn csum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv4 header (IHL from `options`) followed by `l4`.
fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, ttl: u8, options: &[u8], l4: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let ihl = 5 + options.len() / 4;
    let total = ihl * 4 + l4.len();
    let mut h = vec![(4 << 4) | ihl as u8, 0];
    h.extend_from_slice(&(total as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0x00]); // id, DF
    h.extend_from_slice(&[ttl, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(options);
    let c = csum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(l4);
    h
}

fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, hop: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, hop]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(payload);
    h
}

fn frame(ether_type: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + l3.len());
    f.extend_from_slice(&LB_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(l3);
    f
}

fn frame_vlan(vid: u16, ether_type: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&LB_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x8100u16.to_be_bytes());
    f.extend_from_slice(&vid.to_be_bytes());
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(l3);
    f
}

fn tcp4(dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    frame(
        0x0800,
        &ipv4(
            CLIENT4,
            dst,
            PROTO_TCP,
            64,
            &[],
            &tcp(sport, dport, TCP_SYN),
        ),
    )
}

fn tcp6(dst: [u8; 16], sport: u16, dport: u16) -> Vec<u8> {
    frame(
        0x86dd,
        &ipv6(client6(), dst, PROTO_TCP, 64, &tcp(sport, dport, TCP_SYN)),
    )
}

/// `packet` with the L2 DSR rewrite applied.
fn rewritten(packet: &[u8], dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut out = packet.to_vec();
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    out
}

fn flow4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: [u32::from_ne_bytes(src), 0, 0, 0],
        dst: [u32::from_ne_bytes(dst), 0, 0, 0],
        src_port_be: sport.to_be(),
        dst_port_be: dport.to_be(),
        proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

fn flow6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, proto: u8) -> FlowKey {
    let w = |a: [u8; 16], i: usize| {
        u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
    };
    FlowKey {
        src: [w(src, 0), w(src, 1), w(src, 2), w(src, 3)],
        dst: [w(dst, 0), w(dst, 1), w(dst, 2), w(dst, 3)],
        src_port_be: sport.to_be(),
        dst_port_be: dport.to_be(),
        proto,
        family: FAMILY_V6,
        _pad: [0; 2],
    }
}

// ---------------------------------------------------------------- harness

struct TestResolver {
    egress_ifindex: u32,
}

impl Resolver for TestResolver {
    fn interface(&mut self, name: &str) -> Result<Interface, NetError> {
        match name {
            "lo" => Ok(Interface {
                name: name.into(),
                ifindex: 1,
                mac: MacAddr(LB_MAC),
            }),
            "xt0" => Ok(Interface {
                name: name.into(),
                ifindex: self.egress_ifindex,
                mac: MacAddr(EGRESS_MAC),
            }),
            other => Err(NetError::NoInterface(other.into())),
        }
    }
    fn mac(&mut self, address: IpAddr, interface: &str) -> Result<MacAddr, NetError> {
        Err(NetError::Unresolved {
            address,
            interface: interface.into(),
            waited_ms: 0,
        })
    }
}

struct Harness {
    dp: Dataplane,
    state: State,
    cfg: Config,
    resolver: TestResolver,
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "in-kernel tests need root (BPF_PROG_TEST_RUN, XDP maps, network namespaces); \
         run them through `cargo xtask test`"
    );
}

impl Harness {
    fn new() -> Harness {
        require_root();
        // SAFETY: unshare affects only the calling thread, which is this
        // test's own thread; children it spawns inherit the new namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        let status = Command::new("ip")
            .args(["link", "add", "xt0", "type", "veth", "peer", "name", "xt1"])
            .status()
            .expect("running ip");
        assert!(status.success(), "creating veth xt0 in the test namespace");
        let name = std::ffi::CString::new("xt0").expect("literal");
        // SAFETY: valid NUL-terminated string.
        let egress_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(egress_ifindex, 0);

        let cfg = Config::parse(CONFIG, "fixture config").expect("fixture config is valid");
        let mut dp = Dataplane::load(cfg.datapath, None).expect("loading the XDP program");
        let mut state = State::default();
        let mut resolver = TestResolver { egress_ifindex };
        state
            .apply(&mut dp, &cfg, &mut resolver)
            .expect("programming the fixture config");
        Harness {
            dp,
            state,
            cfg,
            resolver,
        }
    }

    fn vip(&self, name: &str) -> &Vip {
        self.cfg
            .vips
            .iter()
            .find(|v| v.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no VIP named {name}"))
    }

    /// Applies the configuration without the backend `address` of VIP
    /// `vip`.
    fn remove_backend(&mut self, vip: &str, address: &str) {
        let mut cfg = self.cfg.clone();
        vip_mut(&mut cfg, vip)
            .backends
            .retain(|b| b.address.to_string() != address);
        self.state
            .apply(&mut self.dp, &cfg, &mut self.resolver)
            .expect("apply");
        self.cfg = cfg;
    }

    /// (id, generation) of a VIP's backend.
    fn backend(&self, vip: &str, address: &str) -> (u32, u32) {
        let addr: IpAddr = address.parse().expect("address");
        self.state
            .backend_id(self.vip(vip), addr)
            .unwrap_or_else(|| panic!("no backend {address} in {vip}"))
    }

    fn run(&mut self, packet: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; packet.len() + 256];
        let result = self
            .dp
            .program_mut()
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// New flows counted over every VIP.
    fn total_new_flows(&self) -> u64 {
        self.cfg
            .vips
            .iter()
            .map(|vip| {
                self.state
                    .vip_counters(&self.dp, &xdplb::state::vip_key(vip))
                    .expect("VIP counters")
                    .new_flows
            })
            .sum()
    }

    /// The counters of VIP `name`.
    fn vip_counters(&self, name: &str) -> Counters {
        self.state
            .vip_counters(&self.dp, &xdplb::state::vip_key(self.vip(name)))
            .expect("VIP counters")
    }

    /// The id of VIP `name` (its `XLB_VIPS` entry's).
    fn vip_id(&self, name: &str) -> u32 {
        let key = xdplb::state::vip_key(self.vip(name));
        self.dp
            .vip_entries()
            .expect("VIP entries")
            .into_iter()
            .find(|(k, _)| *k == key)
            .expect("the VIP's entry")
            .1
            .id
    }

    /// Packets counted on VIP `name`.
    fn vip_packets(&self, name: &str) -> u64 {
        self.vip_counters(name).packets
    }

    fn reasons(&self) -> Vec<(Reason, u64)> {
        self.dp.reason_counters().expect("reading reason counters")
    }

    /// The host-side answer to "which backend does this new flow get": the
    /// same Maglev build and hash the daemon and datapath use.
    fn reference_backend(&self, vip: &str, flow: &FlowKey) -> u32 {
        let v = self.vip(vip);
        let members: Vec<maglev::Member> = v
            .backends
            .iter()
            .map(|b| {
                // Down or draining backends are out of the ring.
                let rt = self
                    .state
                    .runtime(&(xdplb::state::vip_key(v), b.address))
                    .expect("backend");
                let in_ring = rt.health != Health::Down && rt.draining_since.is_none();
                maglev::Member {
                    identity: b.address.to_string().into_bytes(),
                    weight: if in_ring { b.weight } else { 0 },
                    id: self.state.backend_id(v, b.address).expect("backend").0,
                }
            })
            .collect();
        let table = maglev::build(&members, RING_SIZE).expect("table");
        let hash = match v.affinity {
            xdplb::config::Affinity::ClientIp => client_hash(flow),
            xdplb::config::Affinity::None => flow_hash(flow),
        };
        table[ring_slot(hash, RING_SIZE) as usize]
    }

    /// (id, generation) of a backend of `vip` that the ring would not pick
    /// for `flow`: pinning the flow there shows the flow table wins.
    fn backend_off_ring(&self, vip: &str, flow: &FlowKey) -> (u32, u32) {
        let ring_choice = self.reference_backend(vip, flow);
        let v = self.vip(vip);
        v.backends
            .iter()
            .map(|b| self.state.backend_id(v, b.address).expect("backend"))
            .find(|(id, _)| *id != ring_choice)
            .expect("the VIP has another backend")
    }

    fn pin_flow(&mut self, flow: &FlowKey, backend: u32, generation: u32) {
        self.dp
            .insert_flow(
                flow,
                &FlowValue {
                    backend: backend.try_into().expect("a backend id"),
                    generation,
                    last_seen_ns: xdplb::state::monotonic_ns(),
                    ..FlowValue::default()
                },
            )
            .expect("insert flow");
    }

    fn mac_of_id(&self, id: u32) -> [u8; 6] {
        let name = self
            .cfg
            .vips
            .iter()
            .find(|v| {
                v.backends
                    .iter()
                    .any(|b| self.state.backend_id(v, b.address).map(|x| x.0) == Some(id))
            })
            .and_then(|v| v.name.clone())
            .expect("backend id in the config");
        self.mac_of(&name, id)
    }

    fn mac_of(&self, vip: &str, id: u32) -> [u8; 6] {
        let v = self.vip(vip);
        v.backends
            .iter()
            .find(|b| self.state.backend_id(v, b.address).expect("backend").0 == id)
            .and_then(|b| b.mac)
            .expect("fixture backends have MACs")
            .0
    }
}

/// Where a forwarded packet must go.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// A fixed backend MAC.
    Mac([u8; 6]),
    /// Whatever the host reference (same Maglev build, same hash) picks for
    /// the fixture's flow on this VIP.
    Ring(&'static str),
    /// The backend the fixture pinned the flow to.
    Pinned,
}

/// The expected outcome of one packet.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Passed to the kernel untouched, counted under the reason.
    Pass(Reason),
    /// Dropped, counted under the reason.
    Drop(Reason),
    /// Sent back out of the ingress interface (L2 DSR rewrite).
    Tx { to: Target, new_flow: bool },
    /// Redirected to another interface, source MAC = that interface's.
    Redirect { dst: [u8; 6], src: [u8; 6] },
}

/// Flow-table state a fixture adds to the shared config.
#[derive(Clone, Copy, Debug)]
enum Pin {
    None,
    /// Pin the fixture's flow to a backend of this VIP the ring would not
    /// pick, with the backend's current generation.
    OffRing(&'static str),
    /// Same, with a generation that no longer matches (the backend that
    /// owned the slot was replaced).
    Stale(&'static str),
}

/// One row of the table: description, input packet, map state (the shared
/// `CONFIG` plus `pin`), expected action and output (in `expect`; output
/// bytes are the input for pass/drop and the input with the MAC rewrite
/// for tx/redirect), and the counters `check` derives from it.
struct Fixture {
    name: &'static str,
    description: &'static str,
    packet: Vec<u8>,
    /// The packet's flow, where the expectation depends on it.
    flow: Option<FlowKey>,
    pin: Pin,
    expect: Expect,
}

fn fixture(
    name: &'static str,
    description: &'static str,
    packet: Vec<u8>,
    expect: Expect,
) -> Fixture {
    Fixture {
        name,
        description,
        packet,
        flow: None,
        pin: Pin::None,
        expect,
    }
}

fn tx(dst: [u8; 6]) -> Expect {
    Expect::Tx {
        to: Target::Mac(dst),
        new_flow: true,
    }
}

fn with_byte(mut packet: Vec<u8>, at: usize, value: u8) -> Vec<u8> {
    packet[at] = value;
    packet
}

fn cut(packet: Vec<u8>, len: usize) -> Vec<u8> {
    packet[..len].to_vec()
}

/// IPv4 header offset in an untagged frame.
const L3: usize = 14;

fn fixtures() -> Vec<Fixture> {
    use Reason::*;
    let arp = {
        let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
        arp.extend_from_slice(&CLIENT_MAC);
        arp.extend_from_slice(&CLIENT4);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&VIP4);
        let mut f = frame(0x0806, &arp);
        f[0..6].copy_from_slice(&[0xff; 6]);
        f
    };
    let udp4 = |sport, dport| {
        frame(
            0x0800,
            &ipv4(
                CLIENT4,
                VIP4,
                PROTO_UDP,
                64,
                &[],
                &udp(sport, dport, b"query"),
            ),
        )
    };
    let tcp4_ttl = |ttl| {
        frame(
            0x0800,
            &ipv4(CLIENT4, VIP4, PROTO_TCP, ttl, &[], &tcp(45006, 80, TCP_SYN)),
        )
    };
    let v6_ext = |next_hdr: u8, ext: [u8; 8]| {
        let mut payload = ext.to_vec();
        payload.extend_from_slice(&tcp(46003, 80, TCP_SYN));
        frame(0x86dd, &ipv6(client6(), vip6(), next_hdr, 64, &payload))
    };
    vec![
        // ---- IPv4, load balanced
        fixture("v4_tcp_syn", "IPv4 TCP SYN to a one-backend VIP: miss, sent to b1", tcp4(VIP4, 40000, 80), tx(B1_MAC)),
        fixture("v4_udp", "IPv4 UDP to a one-backend VIP", udp4(5353, 53), tx(B2_MAC)),
        fixture(
            "v4_ip_options",
            "IPv4 with 8 bytes of options (IHL 7): ports read after the options, a 20-byte assumption would see port 0x0101",
            frame(0x0800, &ipv4(CLIENT4, VIP4, PROTO_TCP, 64, &[1, 1, 1, 1, 1, 1, 1, 0], &tcp(40001, 80, TCP_SYN))),
            tx(B1_MAC),
        ),
        fixture(
            "v4_ihl_15",
            "IPv4 with the largest header (IHL 15, 40 bytes of options)",
            frame(0x0800, &ipv4(CLIENT4, VIP4, PROTO_TCP, 64, &[1; 40], &tcp(40002, 80, TCP_SYN))),
            tx(B1_MAC),
        ),
        fixture(
            "v4_vlan",
            "802.1Q-tagged IPv4 TCP: balanced, the tag kept",
            frame_vlan(100, 0x0800, &ipv4(CLIENT4, VIP4, PROTO_TCP, 64, &[], &tcp(40003, 80, TCP_SYN))),
            tx(B1_MAC),
        ),
        Fixture {
            flow: Some(flow4(CLIENT4, VIP4_THREE, 41000, 80, PROTO_TCP)),
            ..fixture(
                "v4_ring",
                "IPv4 new flow on a three-backend VIP: the ring's backend",
                tcp4(VIP4_THREE, 41000, 80),
                Expect::Tx { to: Target::Ring("three"), new_flow: true },
            )
        },
        Fixture {
            flow: Some(flow4(CLIENT4, VIP4_THREE, 42000, 80, PROTO_TCP)),
            pin: Pin::OffRing("three"),
            ..fixture(
                "v4_flow_hit",
                "IPv4 packet of a tracked flow: the flow table's backend, not the ring's; not a new flow",
                tcp4(VIP4_THREE, 42000, 80),
                Expect::Tx { to: Target::Pinned, new_flow: false },
            )
        },
        Fixture {
            flow: Some(flow4(CLIENT4, VIP4_THREE, 42001, 80, PROTO_TCP)),
            pin: Pin::Stale("three"),
            ..fixture(
                "v4_flow_stale",
                "IPv4 flow pinned to a backend slot that was reused (old generation): rescheduled on the ring",
                tcp4(VIP4_THREE, 42001, 80),
                Expect::Tx { to: Target::Ring("three"), new_flow: true },
            )
        },
        Fixture {
            flow: Some(flow4(CLIENT4, VIP4_AFFINITY, 1, 80, PROTO_TCP)),
            ..fixture(
                "v4_affinity",
                "client-ip affinity: the backend of the client's address hash",
                tcp4(VIP4_AFFINITY, 43000, 80),
                Expect::Tx { to: Target::Ring("affinity"), new_flow: true },
            )
        },
        fixture(
            "v4_redirect",
            "backend behind another interface (xt0): XDP_REDIRECT, source MAC of xt0",
            tcp4(VIP4_REDIRECT, 44000, 80),
            Expect::Redirect { dst: B3_MAC, src: EGRESS_MAC },
        ),
        // ---- IPv4, not load balanced
        fixture("v4_no_live_backend", "VIP whose backends all have weight 0: dropped", tcp4(VIP4_ZERO, 45000, 80), Expect::Drop(DropNoBackend)),
        fixture("v4_other_port", "VIP address, port 81 (not a VIP)", tcp4(VIP4, 45001, 81), Expect::Pass(PassNotVip)),
        fixture("v4_other_protocol", "UDP to the port of a TCP-only VIP", udp4(45002, 80), Expect::Pass(PassNotVip)),
        fixture("v4_other_address", "TCP to the load balancer's own address", tcp4([10, 200, 0, 2], 45003, 22), Expect::Pass(PassNotVip)),
        fixture("arp", "ARP request for the VIP", arp, Expect::Pass(PassNonIp)),
        fixture("v4_first_fragment", "IPv4 first fragment (MF, offset 0) to the VIP", with_byte(tcp4(VIP4, 45004, 80), L3 + 6, 0x20), Expect::Pass(PassIpv4Fragment)),
        fixture(
            "v4_last_fragment",
            "IPv4 last fragment (offset 185, no MF) to the VIP",
            with_byte(with_byte(tcp4(VIP4, 45005, 80), L3 + 6, 0), L3 + 7, 0xb9),
            Expect::Pass(PassIpv4Fragment),
        ),
        fixture(
            "v4_icmp",
            "ICMP echo to the VIP address",
            frame(0x0800, &ipv4(CLIENT4, VIP4, 1, 64, &[], &[8, 0, 0, 0, 0, 1, 0, 1])),
            Expect::Pass(PassNotTcpUdp),
        ),
        fixture("v4_ttl_1", "TTL 1 to the VIP", tcp4_ttl(1), Expect::Pass(PassTtlExpired)),
        fixture("v4_ttl_0", "TTL 0 to the VIP", tcp4_ttl(0), Expect::Pass(PassTtlExpired)),
        fixture(
            "cut_vlan_tag",
            "802.1Q ethertype with the tag cut after 2 bytes (BPF_PROG_TEST_RUN refuses frames under 14 bytes, so this is the shortest case)",
            cut(frame_vlan(5, 0x0800, &ipv4(CLIENT4, VIP4, PROTO_TCP, 64, &[], &tcp(45007, 80, TCP_SYN))), 16),
            Expect::Pass(PassTruncated),
        ),
        fixture("ethernet_only", "IPv4 ethertype, no IP header", cut(tcp4(VIP4, 45008, 80), 14), Expect::Pass(PassTruncated)),
        fixture("v4_cut_ip_header", "IPv4 header cut at 10 bytes", cut(tcp4(VIP4, 45009, 80), 24), Expect::Pass(PassTruncated)),
        fixture("v4_cut_tcp_header", "TCP header cut at 10 bytes", cut(tcp4(VIP4, 45010, 80), 44), Expect::Pass(PassTruncated)),
        fixture("v4_cut_udp_header", "UDP header cut at 6 bytes", cut(udp4(45011, 53), 40), Expect::Pass(PassTruncated)),
        fixture(
            "v4_ihl_past_end",
            "IHL 15 announces a 60-byte header in a 40-byte IP packet",
            with_byte(tcp4(VIP4, 45012, 80), L3, 0x4f),
            Expect::Pass(PassTruncated),
        ),
        fixture("v4_ihl_4", "IPv4 IHL 4 (below the minimum)", with_byte(tcp4(VIP4, 45013, 80), L3, 0x44), Expect::Pass(PassMalformed)),
        fixture(
            "v4_version_mismatch",
            "IPv4 ethertype carrying IP version 6",
            with_byte(tcp4(VIP4, 45014, 80), L3, 0x65),
            Expect::Pass(PassMalformed),
        ),
        // ---- IPv6
        fixture("v6_tcp", "IPv6 TCP SYN to a one-backend VIP", tcp6(vip6(), 46000, 80), tx(B1_MAC)),
        fixture(
            "v6_udp",
            "IPv6 UDP to a one-backend VIP",
            frame(0x86dd, &ipv6(client6(), vip6(), PROTO_UDP, 64, &udp(46001, 53, b"q"))),
            tx(B2_MAC),
        ),
        fixture(
            "v6_vlan",
            "802.1Q-tagged IPv6 TCP (an ACK: any packet of an unknown flow schedules it)",
            frame_vlan(7, 0x86dd, &ipv6(client6(), vip6(), PROTO_TCP, 64, &tcp(46002, 80, TCP_ACK))),
            tx(B1_MAC),
        ),
        Fixture {
            flow: Some(flow6(client6(), v6(0x101), 46100, 443, PROTO_TCP)),
            ..fixture(
                "v6_ring",
                "IPv6 new flow on a weighted (1:1:3) VIP: the ring's backend",
                tcp6(v6(0x101), 46100, 443),
                Expect::Tx { to: Target::Ring("v6-three"), new_flow: true },
            )
        },
        Fixture {
            flow: Some(flow6(client6(), v6(0x101), 46200, 443, PROTO_TCP)),
            pin: Pin::OffRing("v6-three"),
            ..fixture(
                "v6_flow_hit",
                "IPv6 packet of a tracked flow: the flow table's backend",
                tcp6(v6(0x101), 46200, 443),
                Expect::Tx { to: Target::Pinned, new_flow: false },
            )
        },
        fixture("v6_hop_by_hop", "IPv6 with a hop-by-hop header before TCP", v6_ext(0, [PROTO_TCP, 0, 1, 4, 0, 0, 0, 0]), Expect::Pass(PassIpv6ExtHeader)),
        fixture("v6_fragment", "IPv6 fragment header (offset 0, M=1)", v6_ext(44, [PROTO_TCP, 0, 0, 1, 0, 0, 0, 42]), Expect::Pass(PassIpv6ExtHeader)),
        fixture(
            "v6_icmp",
            "ICMPv6 echo to the VIP",
            frame(0x86dd, &ipv6(client6(), vip6(), 58, 64, &[128, 0, 0, 0, 0, 1, 0, 1])),
            Expect::Pass(PassNotTcpUdp),
        ),
        fixture(
            "v6_hop_limit_1",
            "IPv6 hop limit 1 to the VIP",
            frame(0x86dd, &ipv6(client6(), vip6(), PROTO_TCP, 1, &tcp(46005, 80, TCP_SYN))),
            Expect::Pass(PassTtlExpired),
        ),
        fixture("v6_cut_header", "IPv6 header cut at 30 bytes", cut(tcp6(vip6(), 46006, 80), 44), Expect::Pass(PassTruncated)),
        fixture("v6_other_address", "IPv6 TCP to an address that is not a VIP", tcp6(v6(0x2), 46007, 80), Expect::Pass(PassNotVip)),
    ]
}

/// Runs one packet: action, output bytes, and exactly the right counters.
fn check(
    h: &mut Harness,
    description: &str,
    packet: &[u8],
    expect: Expect,
    flow: Option<&FlowKey>,
    pinned: Option<u32>,
) {
    let before = h.reasons();
    let new_flows_before = h.total_new_flows();
    let (action, out) = h.run(packet);
    let after = h.reasons();
    let new_flows = h.total_new_flows() - new_flows_before;
    let moved: Vec<(Reason, u64)> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| a.1 != b.1)
        .map(|(b, a)| (a.0, a.1 - b.1))
        .collect();
    match expect {
        Expect::Pass(reason) | Expect::Drop(reason) => {
            let want_action = if matches!(expect, Expect::Pass(_)) {
                XDP_PASS
            } else {
                XDP_DROP
            };
            assert_eq!(action, want_action, "{description}: action");
            assert_eq!(
                out, packet,
                "{description}: a packet not load balanced must be untouched"
            );
            assert_eq!(moved, vec![(reason, 1)], "{description}: reason counters");
            assert_eq!(new_flows, 0, "{description}: no flow counted");
        }
        Expect::Tx { to, new_flow } => {
            let dst = match to {
                Target::Mac(mac) => mac,
                Target::Ring(vip) => {
                    let flow = flow.unwrap_or_else(|| {
                        panic!("{description}: a Ring target needs the fixture's flow")
                    });
                    h.mac_of(vip, h.reference_backend(vip, flow))
                }
                Target::Pinned => {
                    let id = pinned
                        .unwrap_or_else(|| panic!("{description}: a Pinned target needs a pin"));
                    h.mac_of_id(id)
                }
            };
            assert_eq!(action, XDP_TX, "{description}: action");
            assert_eq!(
                out,
                rewritten(packet, dst, LB_MAC),
                "{description}: output bytes"
            );
            assert!(
                moved.is_empty(),
                "{description}: no pass/drop reason, got {moved:?}"
            );
            assert_eq!(
                new_flows,
                u64::from(new_flow),
                "{description}: new-flow counter"
            );
        }
        Expect::Redirect { dst, src } => {
            assert_eq!(action, XDP_REDIRECT, "{description}: action");
            assert_eq!(
                out,
                rewritten(packet, dst, src),
                "{description}: output bytes"
            );
            assert!(
                moved.is_empty(),
                "{description}: no pass/drop reason, got {moved:?}"
            );
            assert_eq!(new_flows, 1, "{description}: new-flow counter");
        }
    }
}

/// Runs the table row `name` on a freshly loaded program.
fn run_fixture(name: &str) {
    let f = fixtures()
        .into_iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no fixture named {name}"));
    let mut h = Harness::new();
    let pinned = match f.pin {
        Pin::None => None,
        Pin::OffRing(vip) | Pin::Stale(vip) => {
            let flow = f.flow.as_ref().expect("a pinned fixture states its flow");
            let (id, generation) = h.backend_off_ring(vip, flow);
            let generation = if matches!(f.pin, Pin::Stale(_)) {
                generation.wrapping_sub(100)
            } else {
                generation
            };
            h.pin_flow(flow, id, generation);
            Some(id)
        }
    };
    check(
        &mut h,
        f.description,
        &f.packet,
        f.expect,
        f.flow.as_ref(),
        pinned,
    );
}

/// One `#[test]` per table row, so each is reported (and counted) on its own.
macro_rules! fixture_tests {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { run_fixture(stringify!($name)); })*
        const FIXTURE_TESTS: &[&str] = &[$(stringify!($name)),*];
    };
}

fixture_tests!(
    v4_tcp_syn,
    v4_udp,
    v4_ip_options,
    v4_ihl_15,
    v4_vlan,
    v4_ring,
    v4_flow_hit,
    v4_flow_stale,
    v4_affinity,
    v4_redirect,
    v4_no_live_backend,
    v4_other_port,
    v4_other_protocol,
    v4_other_address,
    arp,
    v4_first_fragment,
    v4_last_fragment,
    v4_icmp,
    v4_ttl_1,
    v4_ttl_0,
    cut_vlan_tag,
    ethernet_only,
    v4_cut_ip_header,
    v4_cut_tcp_header,
    v4_cut_udp_header,
    v4_ihl_past_end,
    v4_ihl_4,
    v4_version_mismatch,
    v6_tcp,
    v6_udp,
    v6_vlan,
    v6_ring,
    v6_flow_hit,
    v6_hop_by_hop,
    v6_fragment,
    v6_icmp,
    v6_hop_limit_1,
    v6_cut_header,
    v6_other_address,
);

#[test]
fn every_fixture_has_a_test() {
    let names: Vec<&str> = fixtures().iter().map(|f| f.name).collect();
    for name in &names {
        assert!(
            FIXTURE_TESTS.contains(name),
            "table row {name} has no #[test]"
        );
    }
    assert_eq!(
        names.len(),
        FIXTURE_TESTS.len(),
        "duplicate or missing rows"
    );
}

// ------------------------------------------------------- multi-step scenarios

#[test]
fn first_packet_inserts_a_flow_and_counts_it_once() {
    let mut h = Harness::new();
    let packet = tcp4(VIP4, 40000, 80);
    let (b1, gen) = h.backend("single-tcp", "10.200.0.11");
    let vip_before = h.vip_counters("single-tcp");
    check(
        &mut h,
        "IPv4 TCP SYN, miss",
        &packet,
        Expect::Tx {
            to: Target::Mac(B1_MAC),
            new_flow: true,
        },
        None,
        None,
    );
    let flow = h.dp.flow(&flow4(CLIENT4, VIP4, 40000, 80, PROTO_TCP));
    assert_eq!(
        flow.map(|f| (f.backend_id(), f.generation, f.flags)),
        Some((b1, gen, 0)),
        "flow entry inserted, open"
    );
    let vip = h.vip_counters("single-tcp");
    assert_eq!(vip.packets - vip_before.packets, 1);
    assert_eq!(vip.bytes - vip_before.bytes, packet.len() as u64);
    assert_eq!(vip.new_flows - vip_before.new_flows, 1);
    let backend = h.dp.backend_counters(b1).expect("counters");
    assert_eq!((backend.packets, backend.new_flows), (1, 1));
    // Second packet of the flow: a hit, not a new flow.
    check(
        &mut h,
        "IPv4 TCP ACK, hit",
        &tcp4(VIP4, 40000, 80),
        Expect::Tx {
            to: Target::Mac(B1_MAC),
            new_flow: false,
        },
        None,
        None,
    );
    let backend = h.dp.backend_counters(b1).expect("counters");
    assert_eq!((backend.packets, backend.new_flows), (2, 1));
}

#[test]
fn v4_new_flows_follow_the_maglev_ring() {
    let mut h = Harness::new();
    let mut seen = std::collections::HashSet::new();
    for sport in 41000..41064u16 {
        let flow = flow4(CLIENT4, VIP4_THREE, sport, 80, PROTO_TCP);
        let id = h.reference_backend("three", &flow);
        let dst = h.mac_of("three", id);
        seen.insert(dst);
        check(
            &mut h,
            &format!("three backends, port {sport}"),
            &tcp4(VIP4_THREE, sport, 80),
            Expect::Tx {
                to: Target::Mac(dst),
                new_flow: true,
            },
            None,
            None,
        );
    }
    assert_eq!(
        seen.len(),
        3,
        "64 flows over 3 equal backends reach all of them"
    );
}

#[test]
fn v4_affinity_sends_every_connection_of_a_client_to_one_backend() {
    let mut h = Harness::new();
    let first = h.reference_backend("affinity", &flow4(CLIENT4, VIP4_AFFINITY, 1, 80, PROTO_TCP));
    let dst = h.mac_of("affinity", first);
    for sport in 43000..43032u16 {
        check(
            &mut h,
            &format!("affinity, port {sport}"),
            &tcp4(VIP4_AFFINITY, sport, 80),
            Expect::Tx {
                to: Target::Mac(dst),
                new_flow: true,
            },
            None,
            None,
        );
    }
    // A different client may land elsewhere; it follows the client hash.
    let other_client = [10, 200, 0, 77];
    let flow = flow4(other_client, VIP4_AFFINITY, 43000, 80, PROTO_TCP);
    let dst = h.mac_of("affinity", h.reference_backend("affinity", &flow));
    let packet = frame(
        0x0800,
        &ipv4(
            other_client,
            VIP4_AFFINITY,
            PROTO_TCP,
            64,
            &[],
            &tcp(43000, 80, TCP_SYN),
        ),
    );
    check(
        &mut h,
        "affinity, other client",
        &packet,
        Expect::Tx {
            to: Target::Mac(dst),
            new_flow: true,
        },
        None,
        None,
    );
}

#[test]
fn v6_weighted_new_flows_follow_the_ring() {
    let mut h = Harness::new();
    let vip = v6(0x101);
    for sport in 46100..46132u16 {
        let flow = flow6(client6(), vip, sport, 443, PROTO_TCP);
        let dst = h.mac_of("v6-three", h.reference_backend("v6-three", &flow));
        check(
            &mut h,
            &format!("IPv6 weighted, port {sport}"),
            &tcp6(vip, sport, 443),
            Expect::Tx {
                to: Target::Mac(dst),
                new_flow: true,
            },
            None,
            None,
        );
    }
}

#[test]
fn established_flows_survive_a_ring_change() {
    let mut h = Harness::new();
    // 64 flows over three backends, then a fourth backend joins.
    let ports: Vec<u16> = (47000..47064).collect();
    let mut first = Vec::new();
    for &p in &ports {
        let (_, out) = h.run(&tcp4(VIP4_THREE, p, 80));
        first.push(out[0..6].to_vec());
    }
    let mut cfg = h.cfg.clone();
    let three = cfg
        .vips
        .iter_mut()
        .find(|v| v.name.as_deref() == Some("three"))
        .expect("vip");
    let mut extra = three.backends[0].clone();
    extra.address = "10.200.0.14".parse().expect("address");
    extra.mac = Some(MacAddr([0x02, 0, 0, 0, 0, 0x14]));
    three.backends.push(extra);
    let summary = h
        .state
        .apply(&mut h.dp, &cfg, &mut h.resolver)
        .expect("apply");
    assert_eq!(summary.rings_swapped, 1, "{summary:?}");
    assert_eq!(summary.backends_added, 1, "{summary:?}");
    h.cfg = cfg;
    for (i, &p) in ports.iter().enumerate() {
        let (action, out) = h.run(&tcp4(VIP4_THREE, p, 80));
        assert_eq!(action, XDP_TX);
        assert_eq!(
            out[0..6],
            first[i][..],
            "flow from port {p} moved after a backend joined"
        );
    }
    // New flows use the new ring: some reach the new backend, and each
    // matches the host's reference answer.
    let mut new_backend_flows = 0;
    for p in 48000..48100u16 {
        let flow = flow4(CLIENT4, VIP4_THREE, p, 80, PROTO_TCP);
        let dst = h.mac_of("three", h.reference_backend("three", &flow));
        new_backend_flows += usize::from(dst == [0x02, 0, 0, 0, 0, 0x14]);
        check(
            &mut h,
            &format!("after swap, port {p}"),
            &tcp4(VIP4_THREE, p, 80),
            Expect::Tx {
                to: Target::Mac(dst),
                new_flow: true,
            },
            None,
            None,
        );
    }
    assert!(
        new_backend_flows > 10,
        "new backend got {new_backend_flows} of 100 new flows"
    );
}

#[test]
fn removed_backend_flows_are_rescheduled_not_blackholed() {
    let mut h = Harness::new();
    let (b3, _) = h.backend("three", "10.200.0.13");
    // Find flows currently on b3.
    let on_b3: Vec<u16> = ports_of_three_on(&h, b3, 49000..49200u16)
        .into_iter()
        .take(10)
        .collect();
    for &p in &on_b3 {
        let (_, out) = h.run(&tcp4(VIP4_THREE, p, 80));
        assert_eq!(out[0..6], B3_MAC);
    }
    h.remove_backend("three", "10.200.0.13");
    for &p in &on_b3 {
        let flow = flow4(CLIENT4, VIP4_THREE, p, 80, PROTO_TCP);
        let dst = h.mac_of("three", h.reference_backend("three", &flow));
        assert_ne!(dst, B3_MAC);
        check(
            &mut h,
            &format!("b3 removed, port {p}"),
            &tcp4(VIP4_THREE, p, 80),
            Expect::Tx {
                to: Target::Mac(dst),
                new_flow: true,
            },
            None,
            None,
        );
    }
}

/// VIP `name` of `cfg`, to change.
fn vip_mut<'c>(cfg: &'c mut Config, name: &str) -> &'c mut Vip {
    cfg.vips
        .iter_mut()
        .find(|v| v.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no VIP named {name}"))
}

#[test]
fn a_vip_keeps_what_its_removed_backends_counted() {
    // The datapath counts a packet on its backend only: a VIP's counters
    // are its backends' plus what the backends that left it counted.
    let mut h = Harness::new();
    for p in 55000..55060u16 {
        assert_eq!(h.run(&tcp4_flags(VIP4_THREE, p, 80, TCP_SYN)).0, XDP_TX);
    }
    let before = h.vip_counters("three");
    assert_eq!((before.packets, before.new_flows), (60, 60));
    let (b3, _) = h.backend("three", "10.200.0.13");
    let on_b3 = h.dp.backend_counters(b3).expect("counters");
    assert!(
        on_b3.packets > 0,
        "the ring sent none of 60 flows to 10.200.0.13"
    );

    // 10.200.0.13 leaves the VIP, then a new backend takes its id.
    h.remove_backend("three", "10.200.0.13");
    assert_eq!(h.vip_counters("three"), before, "after removing a backend");
    // The status the CLI, the API and the metrics show says the same.
    let rows = h.state.backend_statuses(&h.dp, None).expect("backends");
    let status = h.state.vip_statuses(&h.dp, &rows).expect("VIPs");
    let three = status
        .iter()
        .find(|v| v.name.as_deref() == Some("three"))
        .expect("VIP three");
    assert_eq!(
        (three.packets, three.bytes, three.new_flows),
        (before.packets, before.bytes, before.new_flows)
    );
    let mut cfg = h.cfg.clone();
    let three = vip_mut(&mut cfg, "three");
    let mut extra = three.backends[0].clone();
    extra.address = "10.200.0.14".parse().expect("address");
    extra.mac = Some(MacAddr([0x02, 0, 0, 0, 0, 0x14]));
    three.backends.push(extra);
    h.state
        .apply(&mut h.dp, &cfg, &mut h.resolver)
        .expect("apply");
    h.cfg = cfg.clone();
    let (b4, _) = h.backend("three", "10.200.0.14");
    assert_eq!(b4, b3, "the new backend has the freed id");
    assert_eq!(
        h.dp.backend_counters(b4).expect("counters"),
        Counters::default()
    );
    assert_eq!(h.vip_counters("three"), before, "after reusing the id");
    h.run(&tcp4_flags(VIP4_THREE, 56000, 80, TCP_SYN));
    assert_eq!(h.vip_counters("three").packets, before.packets + 1);

    // A VIP that takes a removed VIP's id starts from zero.
    let three_id = h.vip_id("three");
    cfg.vips.retain(|v| v.name.as_deref() != Some("three"));
    h.state
        .apply(&mut h.dp, &cfg, &mut h.resolver)
        .expect("apply");
    let mut other = h.vip("single-tcp").clone();
    other.name = Some("other".into());
    other.address = "10.200.100.9".parse().expect("address");
    cfg.vips.push(other);
    h.state
        .apply(&mut h.dp, &cfg, &mut h.resolver)
        .expect("apply");
    h.cfg = cfg;
    assert_eq!(h.vip_id("other"), three_id, "the VIP has the freed id");
    assert_eq!(h.vip_counters("other"), Counters::default());
}

#[test]
fn a_retried_apply_does_not_add_a_removed_backend_twice() {
    // An apply that failed after it cleared a removed backend's entry and
    // added its counters to the VIP's leaves the backend in the daemon's
    // state: the retry must not add them again.
    let mut h = Harness::new();
    for p in 58000..58030u16 {
        h.run(&tcp4_flags(VIP4_THREE, p, 80, TCP_SYN));
    }
    let before = h.vip_counters("three");
    let (b3, _) = h.backend("three", "10.200.0.13");
    let on_b3 = h.dp.backend_counters(b3).expect("counters");
    assert!(
        on_b3.packets > 0,
        "the ring sent none of 30 flows to 10.200.0.13"
    );
    // What the failed apply wrote before it failed.
    h.dp.set_backend(b3, &lb_common::Backend::default())
        .expect("clear");
    h.dp.add_vip_retired(h.vip_id("three"), &on_b3)
        .expect("retire");
    // The retry.
    h.remove_backend("three", "10.200.0.13");
    assert_eq!(h.vip_counters("three"), before);
}

// --------------------------------------------- connection accounting, state

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

fn tcp4_flags(dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    frame(
        0x0800,
        &ipv4(CLIENT4, dst, PROTO_TCP, 64, &[], &tcp(sport, dport, flags)),
    )
}

/// (new_flows, closed_flows) of a backend.
fn opened_closed(h: &Harness, id: u32) -> (u64, u64) {
    let c = h.dp.backend_counters(id).expect("counters");
    (c.new_flows, c.closed_flows)
}

#[test]
fn fin_closes_a_flow_once_and_later_packets_stay() {
    let mut h = Harness::new();
    let (b1, _) = h.backend("single-tcp", "10.200.0.11");
    let sport = 50000;
    h.run(&tcp4_flags(VIP4, sport, 80, TCP_SYN));
    assert_eq!(opened_closed(&h, b1), (1, 0));
    for (i, flags) in [TCP_FIN | TCP_ACK, TCP_FIN | TCP_ACK, TCP_ACK]
        .iter()
        .enumerate()
    {
        let (action, out) = h.run(&tcp4_flags(VIP4, sport, 80, *flags));
        assert_eq!(action, XDP_TX, "packet {i} after FIN still forwarded");
        assert_eq!(
            out[0..6],
            B1_MAC,
            "packet {i} after FIN to the same backend"
        );
        assert_eq!(
            opened_closed(&h, b1),
            (1, 1),
            "packet {i}: one flow, closed once (a retransmitted FIN counts nothing)"
        );
    }
    let flow =
        h.dp.flow(&flow4(CLIENT4, VIP4, sport, 80, PROTO_TCP))
            .expect("entry kept for the last ACKs");
    assert_eq!(
        flow.flags & lb_common::FLOW_F_CLOSED,
        lb_common::FLOW_F_CLOSED
    );
}

#[test]
fn syn_reusing_a_closed_tuple_is_a_new_flow() {
    let mut h = Harness::new();
    let (b1, _) = h.backend("single-tcp", "10.200.0.11");
    h.run(&tcp4_flags(VIP4, 50001, 80, TCP_SYN));
    h.run(&tcp4_flags(VIP4, 50001, 80, TCP_RST));
    assert_eq!(opened_closed(&h, b1), (1, 1));
    h.run(&tcp4_flags(VIP4, 50001, 80, TCP_SYN));
    assert_eq!(opened_closed(&h, b1), (2, 1), "the new connection is open");
}

/// A SYN goes to its VIP's ring first and finds its entry under the
/// bucket lock (no lockless lookup): a retransmitted SYN must still follow
/// its flow wherever the ring points now, or move it only as any packet
/// would (a down backend, counted closed once).
#[test]
fn a_retransmitted_syn_follows_its_flow_or_moves_as_any_packet_would() {
    let mut h = Harness::new();
    let (b3, _) = h.backend("three", "10.200.0.13");
    let on_b3: Vec<u16> = ports_of_three_on(&h, b3, 54000..54400u16)
        .into_iter()
        .take(2)
        .collect();
    let (draining, going_down) = (on_b3[0], on_b3[1]);
    for &p in &on_b3 {
        h.run(&tcp4_flags(VIP4_THREE, p, 80, TCP_SYN));
    }
    assert_eq!(opened_closed(&h, b3), (2, 0));

    // Draining: the ring no longer names b3, the flow stays on it.
    let key = three_key(&h, "10.200.0.13");
    drain(&mut h, &key);
    let (new_before, packets_before) = (h.total_new_flows(), h.vip_packets("three"));
    let (action, out) = h.run(&tcp4_flags(VIP4_THREE, draining, 80, TCP_SYN));
    assert_eq!(
        (action, &out[0..6]),
        (XDP_TX, &B3_MAC[..]),
        "a retransmitted SYN stays on the draining backend"
    );
    assert_eq!(h.total_new_flows(), new_before, "and is not a new flow");
    assert_eq!(
        h.vip_packets("three"),
        packets_before + 1,
        "counted once, on its VIP"
    );
    // A SYN with FIN on it closes it there (a second one would be a new
    // connection reusing the closed 5-tuple).
    let (action, out) = h.run(&tcp4_flags(VIP4_THREE, draining, 80, TCP_SYN | TCP_FIN));
    assert_eq!(
        (action, &out[0..6]),
        (XDP_TX, &B3_MAC[..]),
        "a SYN|FIN of the flow stays on its backend"
    );
    assert_eq!(opened_closed(&h, b3), (2, 1), "closed on b3");
    assert_eq!(
        h.dp.flow(&flow4(CLIENT4, VIP4_THREE, draining, 80, PROTO_TCP))
            .map(|v| (v.backend_id(), v.flags)),
        Some((b3, lb_common::FLOW_F_CLOSED)),
        "its entry closed, on b3"
    );

    // Down: the flow moves to the ring's answer, closed on b3 once.
    mark_down(&mut h, "10.200.0.13");
    let flow = flow4(CLIENT4, VIP4_THREE, going_down, 80, PROTO_TCP);
    let moved_to = h.reference_backend("three", &flow);
    assert_ne!(moved_to, b3);
    for round in 0..2u64 {
        let new_before = h.total_new_flows();
        let (action, out) = h.run(&tcp4_flags(VIP4_THREE, going_down, 80, TCP_SYN));
        assert_eq!(
            (action, &out[0..6]),
            (XDP_TX, &h.mac_of("three", moved_to)[..]),
            "round {round}: a retransmitted SYN of a flow on a down backend moves"
        );
        assert_eq!(
            h.total_new_flows() - new_before,
            u64::from(round == 0),
            "round {round}: a new flow on its new backend the first time only"
        );
    }
    assert_eq!(opened_closed(&h, b3), (2, 2), "closed on b3 once more");
    assert_eq!(
        h.dp.flow(&flow).map(|v| v.backend_id()),
        Some(moved_to),
        "its entry names the new backend"
    );

    // No backend left in the ring (its only one draining): a retransmitted
    // SYN of a tracked flow still reaches it; a new flow is dropped.
    let (b1, _) = h.backend("single-tcp", "10.200.0.11");
    h.run(&tcp4_flags(VIP4, 54500, 80, TCP_SYN));
    let key = (
        xdplb::state::vip_key(h.vip("single-tcp")),
        "10.200.0.11".parse().expect("address"),
    );
    drain(&mut h, &key);
    let (action, out) = h.run(&tcp4_flags(VIP4, 54500, 80, TCP_SYN));
    assert_eq!(
        (action, &out[0..6]),
        (XDP_TX, &h.mac_of("single-tcp", b1)[..]),
        "a retransmitted SYN reaches its draining backend with none in the ring"
    );
    check(
        &mut h,
        "a new flow with no backend in the ring",
        &tcp4_flags(VIP4, 54501, 80, TCP_SYN),
        Expect::Drop(Reason::DropNoBackend),
        None,
        None,
    );
}

/// The window `schedule`'s stale-pick rule is for: a SYN read its VIP's
/// ring just before the daemon took a backend out of it, then found its
/// flow's entry on that backend, marked down in between. The ring's answer
/// (the very backend the entry moves off) is forwarded unrecorded, as a
/// read of the entry made before the change would have been: no new flow,
/// no close, the entry as it was. The next packet, which reads the ring
/// after the change, moves the flow. Made deterministic by writing the
/// backend's entry as the daemon does, with the ring left as it was.
#[test]
fn a_syn_that_read_the_ring_before_its_backend_went_down_is_not_recorded() {
    let mut h = Harness::new();
    let (b3, _) = h.backend("three", "10.200.0.13");
    let port = ports_of_three_on(&h, b3, 55000..55400u16)[0];
    let flow = flow4(CLIENT4, VIP4_THREE, port, 80, PROTO_TCP);
    h.run(&tcp4_flags(VIP4_THREE, port, 80, TCP_SYN));
    assert_eq!(opened_closed(&h, b3), (1, 0));
    let entry = h.dp.flow(&flow).expect("the SYN made an entry");

    // b3 down in its backend entry only: the ring still names it.
    let mut down = h.dp.backend(b3).expect("b3's entry");
    down.flags |= lb_common::BACKEND_F_DOWN;
    h.dp.set_backend(b3, &down).expect("write b3's entry");
    let new_before = h.total_new_flows();
    let (action, out) = h.run(&tcp4_flags(VIP4_THREE, port, 80, TCP_SYN));
    assert_eq!(
        (action, &out[0..6]),
        (XDP_TX, &B3_MAC[..]),
        "the ring's answer, b3"
    );
    assert_eq!(h.total_new_flows(), new_before, "not a new flow");
    assert_eq!(opened_closed(&h, b3), (1, 0), "no close counted on b3");
    assert_eq!(h.dp.flow(&flow), Some(entry), "the entry as it was");

    // The daemon's change completed (b3 out of the ring): the flow moves,
    // closed on b3 once.
    mark_down(&mut h, "10.200.0.13");
    let moved_to = h.reference_backend("three", &flow);
    assert_ne!(moved_to, b3);
    let (action, out) = h.run(&tcp4_flags(VIP4_THREE, port, 80, TCP_SYN));
    assert_eq!(
        (action, &out[0..6]),
        (XDP_TX, &h.mac_of("three", moved_to)[..]),
        "the next SYN moves to the ring's new answer"
    );
    assert_eq!(h.total_new_flows(), new_before + 1, "a new flow there");
    assert_eq!(opened_closed(&h, b3), (1, 1), "closed on b3 once");
    assert_eq!(h.dp.flow(&flow).map(|v| v.backend_id()), Some(moved_to));
}

#[test]
fn rst_as_first_packet_opens_and_closes() {
    let mut h = Harness::new();
    let (b1, _) = h.backend("single-tcp", "10.200.0.11");
    let (action, _) = h.run(&tcp4_flags(VIP4, 50002, 80, TCP_RST | TCP_ACK));
    assert_eq!(action, XDP_TX);
    assert_eq!(opened_closed(&h, b1), (1, 1), "never counted active");
}

#[test]
fn udp_flows_are_never_closed_by_the_datapath() {
    let mut h = Harness::new();
    let (b2, _) = h.backend("single-udp", "10.200.0.12");
    for _ in 0..3 {
        h.run(&frame(
            0x0800,
            &ipv4(CLIENT4, VIP4, PROTO_UDP, 64, &[], &udp(50003, 53, b"q")),
        ));
    }
    assert_eq!(opened_closed(&h, b2), (1, 0));
}

fn three_key(h: &Harness, addr: &str) -> xdplb::state::BackendKey {
    (
        xdplb::state::vip_key(h.vip("three")),
        addr.parse().expect("address"),
    )
}

/// Sets a backend of the "three" VIP's health, as its health check does.
fn set_health(h: &mut Harness, address: &str, health: Health) {
    let key = three_key(h, address);
    assert!(set_runtime(h, &key, |rt| rt.health = health));
}

/// Changes a backend's runtime state as the daemon does (health checks,
/// the CLI); whether it changed anything.
fn set_runtime(
    h: &mut Harness,
    key: &xdplb::state::BackendKey,
    change: impl FnOnce(&mut xdplb::state::Runtime),
) -> bool {
    let mut resolver = TestResolver {
        egress_ifindex: h.resolver.egress_ifindex,
    };
    h.state
        .set_runtime(&mut h.dp, &mut resolver, key, change)
        .expect("set runtime")
}

fn mark_down(h: &mut Harness, address: &str) {
    set_health(h, address, Health::Down);
}

/// Marks a backend draining, as `xdplb backend drain` does.
fn drain(h: &mut Harness, key: &xdplb::state::BackendKey) {
    set_runtime(h, key, |rt| {
        rt.draining_since = Some(std::time::Instant::now())
    });
}

/// The ports in `ports` whose TCP flows from `CLIENT4` the "three" VIP's
/// ring gives backend `id`.
fn ports_of_three_on(h: &Harness, id: u32, ports: std::ops::Range<u16>) -> Vec<u16> {
    ports
        .filter(|&p| {
            h.reference_backend("three", &flow4(CLIENT4, VIP4_THREE, p, 80, PROTO_TCP)) == id
        })
        .collect()
}

#[test]
fn flows_of_a_down_backend_move_and_are_counted_closed_once() {
    let mut h = Harness::new();
    let (b3, _) = h.backend("three", "10.200.0.13");
    let on_b3: Vec<u16> = ports_of_three_on(&h, b3, 51000..51400u16)
        .into_iter()
        .take(8)
        .collect();
    for &p in &on_b3 {
        h.run(&tcp4_flags(VIP4_THREE, p, 80, TCP_SYN));
    }
    assert_eq!(opened_closed(&h, b3), (8, 0));
    mark_down(&mut h, "10.200.0.13");
    for round in 0..2 {
        for &p in &on_b3 {
            let (action, out) = h.run(&tcp4_flags(VIP4_THREE, p, 80, TCP_ACK));
            assert_eq!(action, XDP_TX);
            assert_ne!(
                out[0..6],
                B3_MAC,
                "round {round}: port {p} still sent to the down backend"
            );
            let flow = flow4(CLIENT4, VIP4_THREE, p, 80, PROTO_TCP);
            assert_eq!(
                out[0..6],
                h.mac_of("three", h.reference_backend("three", &flow)),
                "moved to the ring's answer without b3"
            );
        }
    }
    assert_eq!(
        opened_closed(&h, b3),
        (8, 8),
        "each moved flow closed on b3 exactly once"
    );
    let moved: u64 = ["10.200.0.11", "10.200.0.12"]
        .iter()
        .map(|a| opened_closed(&h, h.backend("three", a).0).0)
        .sum();
    assert_eq!(moved, 8, "and opened once on the backends that took them");
}

#[test]
fn a_draining_backend_keeps_its_flows_and_gets_no_new_ones() {
    let mut h = Harness::new();
    let (b3, _) = h.backend("three", "10.200.0.13");
    let on_b3: Vec<u16> = ports_of_three_on(&h, b3, 52000..52400u16)
        .into_iter()
        .take(8)
        .collect();
    for &p in &on_b3 {
        h.run(&tcp4_flags(VIP4_THREE, p, 80, TCP_SYN));
    }
    let key = three_key(&h, "10.200.0.13");
    drain(&mut h, &key);
    for &p in &on_b3 {
        let (_, out) = h.run(&tcp4_flags(VIP4_THREE, p, 80, TCP_ACK));
        assert_eq!(
            out[0..6],
            B3_MAC,
            "established flow from port {p} left the draining backend"
        );
    }
    for p in 53000..53200u16 {
        let (_, out) = h.run(&tcp4_flags(VIP4_THREE, p, 80, TCP_SYN));
        assert_ne!(
            out[0..6],
            B3_MAC,
            "new flow from port {p} reached the draining backend"
        );
    }
    assert_eq!(
        opened_closed(&h, b3),
        (8, 0),
        "drain closes nothing by itself"
    );
}

/// Removes a test's pin directory when the test ends, also when it fails
/// half-way.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A harness whose datapath is pinned in a directory of its own
/// (/sys/fs/bpf/xdplb-test-NAME-PID, removed with the guard), programmed
/// with the fixture config; also the pin directory and a resolver for
/// later `apply` calls.
fn pinned_harness(name: &str) -> (Harness, RemoveOnDrop, std::path::PathBuf, TestResolver) {
    require_root();
    let dir = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/xdplb-test-{name}-{}",
        std::process::id()
    ));
    let pins = RemoveOnDrop(dir.clone());
    xdplb::bpffs::ensure_mounted(&dir).expect("bpffs");
    let mut h = Harness::new();
    // Swap the harness's unpinned datapath for a pinned one.
    let cfg = h.cfg.clone();
    h.dp = Dataplane::load(cfg.datapath, Some(&dir)).expect("load pinned");
    assert!(!h.dp.adopted());
    h.state = State::default();
    let mut resolver = TestResolver {
        egress_ifindex: h.resolver.egress_ifindex,
    };
    h.state
        .apply(&mut h.dp, &cfg, &mut resolver)
        .expect("apply");
    (h, pins, dir, resolver)
}

#[test]
fn a_restarted_daemon_adopts_pinned_maps() {
    let (mut h, _pins, dir, mut resolver) = pinned_harness("adopt");
    let cfg = h.cfg.clone();
    let ids: Vec<(u32, u32)> = ["10.200.0.11", "10.200.0.12", "10.200.0.13"]
        .iter()
        .map(|a| h.backend("three", a))
        .collect();
    let mut first = Vec::new();
    for p in 54000..54032u16 {
        first.push(h.run(&tcp4_flags(VIP4_THREE, p, 80, TCP_SYN)).1[0..6].to_vec());
    }
    let packets_before = h.vip_packets("three");

    // "Restart": a new datapath and state from the pins alone.
    h.dp = Dataplane::load(cfg.datapath, Some(&dir)).expect("adopt");
    assert!(h.dp.adopted());
    h.state = State::default();
    h.state.adopt(&h.dp).expect("adopt state");
    let s = h
        .state
        .apply(&mut h.dp, &cfg, &mut resolver)
        .expect("apply");
    assert_eq!(s.backends_added, 0, "every backend adopted: {s:?}");
    let ids_after: Vec<(u32, u32)> = ["10.200.0.11", "10.200.0.12", "10.200.0.13"]
        .iter()
        .map(|a| h.backend("three", a))
        .collect();
    assert_eq!(ids, ids_after, "ids and generations kept");
    assert!(h.vip_packets("three") >= packets_before, "counters kept");
    let before = h.total_new_flows();
    for (i, p) in (54000..54032u16).enumerate() {
        let out = h.run(&tcp4_flags(VIP4_THREE, p, 80, TCP_ACK)).1;
        assert_eq!(
            out[0..6],
            first[i][..],
            "flow from port {p} changed backend across the restart"
        );
    }
    assert_eq!(
        h.total_new_flows(),
        before,
        "flows were found in the adopted table"
    );

    // A daemon with other datapath settings refuses the pins.
    let mut other = cfg.datapath;
    other.flow_table_size *= 2;
    let err = Dataplane::load(other, Some(&dir))
        .err()
        .expect("mismatch refused");
    assert!(err.to_string().contains("max entries"), "{err}");

    h.dp.unpin().expect("unpin");
    assert!(!dir.exists(), "pins removed");
}

#[test]
fn a_start_turns_older_per_vip_counters_into_its_own() {
    // An older daemon's datapath counted every packet on its VIP too, in a
    // per-CPU map (`XLB_VIP_STATS`). A start that finds that pin keeps, per
    // VIP, what it counted beyond the VIP's backends now: what its former
    // backends counted.
    let (mut h, _pins, dir, mut resolver) = pinned_harness("vipstats");
    for p in 57000..57030u16 {
        h.run(&tcp4_flags(VIP4_THREE, p, 80, TCP_SYN));
    }
    h.run(&tcp4_flags(VIP4, 57000, 80, TCP_SYN));
    h.run(&frame(
        0x0800,
        &ipv4(CLIENT4, VIP4, PROTO_UDP, 64, &[], &udp(57000, 53, b"q")),
    ));
    let three_now = h.vip_counters("three");
    assert_eq!(three_now.packets, 30);
    // 10.200.0.13 leaves; its id stays free, its counters in the map.
    let (b3, _) = h.backend("three", "10.200.0.13");
    assert!(h.dp.backend_counters(b3).expect("counters").packets > 0);
    h.remove_backend("three", "10.200.0.13");
    let cfg = h.cfg.clone();
    assert_eq!(h.vip_counters("three"), three_now);
    // What the older daemon counted: the same, and what backends removed
    // before counted.
    let mut three_counted = three_now;
    three_counted.add(&Counters {
        packets: 1000,
        bytes: 64_000,
        new_flows: 10,
        closed_flows: 0,
    });
    // single-tcp has id 0, which cleared backend entries name too (the
    // removed one's counters are not its): 5 packets of former backends.
    let (three, single, udp) = (
        h.vip_id("three"),
        h.vip_id("single-tcp"),
        h.vip_id("single-udp"),
    );
    assert_eq!(single, 0);
    let single_now = h.vip_counters("single-tcp");
    assert_eq!(single_now.packets, 1);
    let mut single_counted = single_now;
    single_counted.add(&Counters {
        packets: 5,
        bytes: 500,
        new_flows: 5,
        closed_flows: 0,
    });
    // single-udp's count is below its backend's (a count the older daemon
    // reset): nothing retired, not a negative.
    let udp_now = h.vip_counters("single-udp");
    assert_eq!(udp_now.packets, 1);
    let udp_counted = Counters {
        bytes: 1,
        ..udp_now
    };

    // The pins as an older daemon left them: its VIP counters, no retired
    // ones.
    std::fs::remove_file(dir.join(maps::VIP_RETIRED)).expect("unpin");
    let legacy = dir.join(maps::LEGACY_VIP_STATS);
    xdplb::dataplane::pin_legacy_vip_stats(
        &legacy,
        cfg.datapath.max_vips,
        &[
            (three, three_counted),
            (single, single_counted),
            (udp, udp_counted),
        ],
    )
    .expect("older VIP counters");

    // A start that stops before its links run the new program leaves the
    // older pin, and the next converts it again; the pin goes once the
    // links run the new program (`finish_migration`), and the counters
    // stay.
    for (start, finishes) in [("first", false), ("second", true), ("third", false)] {
        h.dp = Dataplane::load(cfg.datapath, Some(&dir)).expect("adopt");
        h.state = State::default();
        h.state.adopt(&h.dp).expect("adopt state");
        h.state
            .apply(&mut h.dp, &cfg, &mut resolver)
            .expect("apply");
        if finishes {
            h.dp.finish_migration().expect("finish");
        }
        assert_eq!(legacy.exists(), start == "first", "{start} start");
        assert_eq!(h.vip_counters("three"), three_counted, "{start} start");
        assert_eq!(
            h.vip_counters("single-tcp"),
            single_counted,
            "{start} start"
        );
        assert_eq!(h.vip_counters("single-udp"), udp_now, "{start} start");
    }
    h.dp.unpin().expect("unpin");
    assert!(!dir.exists(), "pins removed");
}

#[test]
fn a_restarted_daemon_migrates_a_flow_table_of_72_byte_slots() {
    let (mut h, _pins, dir, mut resolver) = pinned_harness("legacy");
    let cfg = h.cfg.clone();
    let mut first = Vec::new();
    for p in 55000..55032u16 {
        first.push(h.run(&tcp4_flags(VIP4_THREE, p, 80, TCP_SYN)).1[0..6].to_vec());
    }
    // One of them closed: its flags must cross over too.
    h.run(&tcp4_flags(VIP4_THREE, 55000, 80, TCP_FIN | TCP_ACK));
    let flows = h.dp.flows();
    assert_eq!(flows.len(), 32);

    // An older daemon's table: the same flows in the 72-byte-slot layout,
    // each in a slot of its own buckets, pinned where the table was.
    let buckets = lb_common::flow_table::buckets_for(cfg.datapath.flow_table_size);
    let mut used = std::collections::HashSet::new();
    let mut place = |key: &FlowKey| {
        let pair = lb_common::flow_table::key_buckets(key, buckets);
        (0..lb_common::flow_table::FLOW_CANDIDATES)
            .map(|i| lb_common::flow_table::candidate(&pair, i))
            .find(|at| used.insert(*at))
            .expect("a free candidate")
    };
    let legacy: Vec<_> = flows.iter().map(|(k, v)| (place(k), *k, *v)).collect();
    let pin = dir.join(lb_common::maps::FLOWS);
    let moved = dir.join(xdplb::dataplane::LEGACY_FLOWS_PIN);
    std::fs::remove_file(&pin).expect("unpin the current table");
    let older = xdplb::flows::LegacyFixture::pin(&pin, buckets, &legacy).expect("older table");

    // A start that fails before it attaches puts the older pin back.
    let mut failed = Dataplane::load(cfg.datapath, Some(&dir)).expect("migrating load");
    assert!(moved.exists(), "older table moved aside during the start");
    failed.abandon_migration().expect("abandon");
    drop(failed);
    assert!(!moved.exists());
    assert_eq!(
        aya::maps::MapInfo::from_pin(&pin)
            .expect("pin")
            .value_size(),
        xdplb::flows::LEGACY_BUCKET_BYTES,
        "the older table is back at its pin"
    );

    // The older build's program, running on the VIP interface until a
    // start takes its link over (the kernel lists the table among its
    // maps).
    let older_program = older.program_using_it().expect("the older program");

    // A start that copies the table, brings the copy up to date just
    // before its takeover, then dies before the takeover.
    let mut crashed = Dataplane::load(cfg.datapath, Some(&dir)).expect("migrating load");
    assert_eq!(
        aya::maps::MapInfo::from_pin(&pin)
            .expect("pin")
            .value_size() as usize,
        std::mem::size_of::<lb_common::FlowBucket>(),
        "a new table at the pin"
    );
    for (k, v) in &flows {
        assert_eq!(crashed.flow(k), Some(*v), "copied at load: {k:?}");
    }
    // Meanwhile the older program closes an open flow and makes another.
    let &(closing_at, closing_key, open) = legacy
        .iter()
        .find(|(_, _, v)| v.flags == 0)
        .expect("an open flow");
    let closing = FlowValue {
        flags: lb_common::FLOW_F_CLOSED,
        ..open
    };
    older.write(closing_at, &closing_key, &closing);
    let mut made = |port: u16| {
        let key = flow4(CLIENT4, VIP4_THREE, port, 80, PROTO_TCP);
        let value = FlowValue {
            flags: 0,
            ..flows[1].1
        };
        (place(&key), key, value)
    };
    let (late_at, late_key, late) = made(55100);
    older.write(late_at, &late_key, &late);
    assert_eq!(crashed.sync_migration().expect("sync"), flows.len() + 1);
    assert_eq!(
        crashed.flow(&closing_key),
        Some(closing),
        "the close copied"
    );
    assert_eq!(crashed.flow(&late_key), Some(late), "the new flow copied");
    drop(crashed);
    assert!(
        moved.exists() && pin.exists(),
        "both tables pinned after the crash"
    );

    // A start that goes on with it and fails before it attaches leaves
    // both pins: the new table is the earlier start's, which a link it
    // took over could be using.
    let mut failed = Dataplane::load(cfg.datapath, Some(&dir)).expect("resuming load");
    failed.abandon_migration().expect("abandon");
    drop(failed);
    assert!(
        moved.exists() && pin.exists(),
        "both tables still pinned after a failed resumed start"
    );
    assert_eq!(
        aya::maps::MapInfo::from_pin(&pin)
            .expect("pin")
            .value_size() as usize,
        std::mem::size_of::<lb_common::FlowBucket>(),
        "the new table stays at the pin"
    );

    // The next start goes on with it and syncs again, overwriting (the
    // older program still runs: it closed another flow and made one),
    // takes over, and dies before it finishes.
    let &(closing2_at, closing2_key, open2) = legacy
        .iter()
        .find(|(_, k, v)| v.flags == 0 && *k != closing_key)
        .expect("another open flow");
    let closing2 = FlowValue {
        flags: lb_common::FLOW_F_CLOSED,
        ..open2
    };
    older.write(closing2_at, &closing2_key, &closing2);
    let (later_at, later_key, later) = made(55101);
    older.write(later_at, &later_key, &later);
    let mut crashed = Dataplane::load(cfg.datapath, Some(&dir)).expect("resuming load");
    assert_eq!(
        crashed.flow(&closing2_key),
        Some(open2),
        "the load copies only what the new table lacks"
    );
    assert_eq!(crashed.sync_migration().expect("sync"), flows.len() + 2);
    assert_eq!(crashed.flow(&later_key), Some(later));
    assert_eq!(
        crashed.flow(&closing2_key),
        Some(closing2),
        "the older program's close reaches the new table"
    );
    crashed.mark_taken_over().expect("takeover recorded");
    let taken = dir.join(xdplb::dataplane::LEGACY_FLOWS_PIN_TAKEN_OVER);
    assert!(taken.exists() && !moved.exists());
    drop(crashed);

    // Had it died between the takeover and that record, the pin would
    // still say "copied"; but the older program stopped with the takeover,
    // and the next start asks the kernel: no program uses the older table,
    // so the new table's entries win, and the pin says so from then on.
    std::fs::rename(&taken, &moved).expect("the pin as it was before the record");
    drop(older_program);

    // The next start goes on after the takeover: the new table's entries
    // win over the older table's, only missing flows are copied.
    h.dp = Dataplane::load(cfg.datapath, Some(&dir)).expect("resuming load");
    assert!(h.dp.adopted());
    assert!(
        taken.exists() && !moved.exists(),
        "a copied-stage pin that no program uses is recorded as taken over"
    );
    let newer = FlowValue {
        backend: flows[0].1.backend,
        generation: flows[0].1.generation,
        ..late
    };
    h.dp.insert_flow(&late_key, &newer).expect("a newer entry");
    let (last_at, last_key, last) = made(55102);
    older.write(last_at, &last_key, &last);
    h.state = State::default();
    h.state.adopt(&h.dp).expect("adopt state");
    h.state
        .apply(&mut h.dp, &cfg, &mut resolver)
        .expect("apply");
    assert_eq!(
        h.dp.sync_migration().expect("sync"),
        0,
        "after the takeover: no overwrite"
    );
    let m =
        h.dp.finish_migration()
            .expect("finish")
            .expect("a migration");
    assert_eq!((m.late, m.dropped), (1, 0));
    assert_eq!(h.dp.flow(&last_key), Some(last), "the last flow copied");
    assert_eq!(
        h.dp.flow(&late_key),
        Some(newer),
        "the new table's entry kept"
    );
    assert!(!taken.exists(), "older table unpinned");
    assert!(!moved.exists(), "older table unpinned");
    assert_eq!(h.dp.finish_migration().expect("again"), None);
    drop(older);

    let before = h.total_new_flows();
    for (i, p) in (55001..55032u16).enumerate() {
        let out = h.run(&tcp4_flags(VIP4_THREE, p, 80, TCP_ACK)).1;
        assert_eq!(
            out[0..6],
            first[i + 1][..],
            "flow from port {p} changed backend across the migration"
        );
    }
    assert_eq!(
        h.total_new_flows(),
        before,
        "every flow found after the migration"
    );
    h.dp.unpin().expect("unpin");
}

#[test]
fn removing_a_vip_stops_its_established_flows_at_once() {
    let mut h = Harness::new();
    // An established flow on the VIP, then the VIP leaves the configuration.
    let (action, _) = h.run(&tcp4_flags(VIP4, 55000, 80, TCP_SYN));
    assert_eq!(action, XDP_TX);
    let mut cfg = h.cfg.clone();
    cfg.vips.retain(|v| v.name.as_deref() != Some("single-tcp"));
    let mut resolver = TestResolver {
        egress_ifindex: h.resolver.egress_ifindex,
    };
    let s = h
        .state
        .apply(&mut h.dp, &cfg, &mut resolver)
        .expect("apply");
    assert_eq!(s.vips_removed, 1);
    h.cfg = cfg;
    for (what, packet) in [
        ("established flow", tcp4_flags(VIP4, 55000, 80, TCP_ACK)),
        ("new flow", tcp4_flags(VIP4, 55001, 80, TCP_SYN)),
    ] {
        check(
            &mut h,
            what,
            &packet,
            Expect::Pass(Reason::PassNotVip),
            None,
            None,
        );
    }
    // The UDP VIP on the same address is untouched.
    let udp = frame(
        0x0800,
        &ipv4(CLIENT4, VIP4, PROTO_UDP, 64, &[], &udp(55002, 53, b"q")),
    );
    check(
        &mut h,
        "the address's other VIP",
        &udp,
        Expect::Tx {
            to: Target::Mac(B2_MAC),
            new_flow: true,
        },
        None,
        None,
    );
}

/// Pins the calling thread to `cpu`.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the libc macros only
    // touch the set passed to them.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Sends each packet from two CPUs at once: both threads send packet i,
/// then wait for each other (spinning, so they start the next one
/// together). On veth (and in generic mode) XDP runs on the sending CPU,
/// so two packets of one flow can be handled at the same time. Returns,
/// per packet, the destination MAC each CPU's copy was sent to; asserts
/// both were forwarded (XDP_TX) to the same backend.
fn race_on_two_cpus(h: &mut Harness, packets: &[Vec<u8>]) -> Vec<[u8; 6]> {
    use std::{
        sync::atomic::{AtomicBool, AtomicU64, Ordering},
        time::{Duration, Instant},
    };

    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    assert!(
        cpus >= 2,
        "this test needs 2 CPUs to race two packets, the machine offers {cpus}"
    );
    let program: &aya::programs::Xdp = h.dp.program_mut();
    let arrived = AtomicU64::new(0);
    // Set by a thread that stops early, so the other never waits forever.
    let gave_up = AtomicBool::new(false);
    let mut macs: Vec<Vec<[u8; 6]>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..2)
            .map(|cpu| {
                let (arrived, gave_up) = (&arrived, &gave_up);
                s.spawn(move || {
                    struct GiveUpOnPanic<'a>(&'a AtomicBool);
                    impl Drop for GiveUpOnPanic<'_> {
                        fn drop(&mut self) {
                            if std::thread::panicking() {
                                self.0.store(true, Ordering::SeqCst);
                            }
                        }
                    }
                    let _guard = GiveUpOnPanic(gave_up);
                    pin_to_cpu(cpu);
                    let mut macs = Vec::with_capacity(packets.len());
                    for (i, packet) in packets.iter().enumerate() {
                        let mut out = vec![0u8; packet.len() + 256];
                        let r = program
                            .test_run(TestRunOptions {
                                data_in: Some(packet),
                                data_out: Some(&mut out),
                                ..TestRunOptions::default()
                            })
                            .expect("BPF_PROG_TEST_RUN");
                        assert_eq!(r.return_value, XDP_TX, "packet {i} on CPU {cpu}");
                        macs.push(out[0..6].try_into().expect("6 bytes"));
                        arrived.fetch_add(1, Ordering::SeqCst);
                        let all = 2 * (i as u64 + 1);
                        let deadline = Instant::now() + Duration::from_secs(10);
                        while arrived.load(Ordering::SeqCst) < all {
                            assert!(
                                !gave_up.load(Ordering::SeqCst) && Instant::now() < deadline,
                                "CPU {cpu}: the other thread stopped before packet {i}"
                            );
                            std::hint::spin_loop();
                        }
                    }
                    macs
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("a racing thread panicked (see above)"))
            .collect()
    });
    for (i, (a, b)) in macs[0].iter().zip(&macs[1]).enumerate() {
        assert_eq!(
            a, b,
            "packet {i}: the two CPUs sent its copies to different backends"
        );
    }
    macs.swap_remove(0)
}

const RACED_FLOWS: u16 = 2_000;

fn raced_packets(flags: u8) -> Vec<Vec<u8>> {
    (0..RACED_FLOWS)
        .map(|i| tcp4_flags(VIP4, 10_000 + i, 80, flags))
        .collect()
}

#[test]
fn a_new_flow_raced_on_two_cpus_is_counted_once() {
    // Counted twice, a flow would keep its backend above 0 active
    // connections for good, and a drain would never complete.
    let mut h = Harness::new();
    let (b1, _) = h.backend("single-tcp", "10.200.0.11");
    let before = opened_closed(&h, b1);
    race_on_two_cpus(&mut h, &raced_packets(TCP_SYN));
    for p in 0..RACED_FLOWS {
        let flow =
            h.dp.flow(&flow4(CLIENT4, VIP4, 10_000 + p, 80, PROTO_TCP))
                .expect("each raced flow has its entry");
        assert_eq!(
            (flow.backend_id(), flow.flags),
            (b1, 0),
            "port {}",
            10_000 + p
        );
    }
    let (opened, closed) = opened_closed(&h, b1);
    assert_eq!(
        (opened - before.0, closed - before.1),
        (u64::from(RACED_FLOWS), 0),
        "{RACED_FLOWS} flows, each SYN sent from two CPUs at once: (new, closed) flows counted"
    );
}

#[test]
fn a_fin_raced_on_two_cpus_closes_its_flow_once() {
    let mut h = Harness::new();
    let (b1, _) = h.backend("single-tcp", "10.200.0.11");
    for p in raced_packets(TCP_SYN) {
        h.run(&p);
    }
    let before = opened_closed(&h, b1);
    assert_eq!(
        before,
        (u64::from(RACED_FLOWS), 0),
        "flows opened on one CPU"
    );
    let macs = race_on_two_cpus(&mut h, &raced_packets(TCP_FIN | TCP_ACK));
    assert!(macs.iter().all(|m| *m == B1_MAC), "FINs follow their flows");
    for p in 0..RACED_FLOWS {
        let flow =
            h.dp.flow(&flow4(CLIENT4, VIP4, 10_000 + p, 80, PROTO_TCP))
                .expect("a closed flow keeps its entry");
        assert_eq!(flow.flags, lb_common::FLOW_F_CLOSED, "port {}", 10_000 + p);
    }
    let (opened, closed) = opened_closed(&h, b1);
    assert_eq!(
        (opened - before.0, closed - before.1),
        (0, u64::from(RACED_FLOWS)),
        "{RACED_FLOWS} open flows, each FIN sent from two CPUs at once: (new, closed) flows \
         counted"
    );
}

#[test]
fn flows_of_a_down_backend_raced_on_two_cpus_move_once() {
    // An ACK reads the entry without the lock first; a SYN decides under it.
    for flags in [TCP_ACK, TCP_SYN] {
        down_backend_raced_on_two_cpus(flags);
    }
}

fn down_backend_raced_on_two_cpus(flags: u8) {
    let mut h = Harness::new();
    let (b3, _) = h.backend("three", "10.200.0.13");
    let on_b3 = ports_of_three_on(&h, b3, 10_000..10_000 + RACED_FLOWS);
    let n = on_b3.len() as u64;
    for &p in &on_b3 {
        h.run(&tcp4_flags(VIP4_THREE, p, 80, TCP_SYN));
    }
    assert_eq!(opened_closed(&h, b3), (n, 0), "flows opened on one CPU");
    mark_down(&mut h, "10.200.0.13");
    let next: Vec<Vec<u8>> = on_b3
        .iter()
        .map(|&p| tcp4_flags(VIP4_THREE, p, 80, flags))
        .collect();
    let macs = race_on_two_cpus(&mut h, &next);
    for (&p, mac) in on_b3.iter().zip(&macs) {
        assert_ne!(
            *mac, B3_MAC,
            "flags {flags:#x}: port {p} still sent to the down backend"
        );
        let flow =
            h.dp.flow(&flow4(CLIENT4, VIP4_THREE, p, 80, PROTO_TCP))
                .expect("the moved flow has an entry");
        assert_eq!(
            (h.mac_of("three", flow.backend_id()), flow.flags),
            (*mac, 0),
            "flags {flags:#x}: port {p}: moved, pinned where its packets went, open"
        );
    }
    assert_eq!(
        opened_closed(&h, b3),
        (n, n),
        "flags {flags:#x}: {n} flows of the down backend, each next packet sent from two CPUs \
         at once: each closed there exactly once"
    );
    let moved: u64 = ["10.200.0.11", "10.200.0.12"]
        .iter()
        .map(|a| opened_closed(&h, h.backend("three", a).0).0)
        .sum();
    assert_eq!(
        moved, n,
        "flags {flags:#x}: and opened once on the backends that took them"
    );
}

#[test]
fn a_flow_keeps_its_entry_while_its_vip_has_no_backend() {
    // Every backend down: the flow's packets are dropped, but its entry is
    // neither closed nor moved, so it resumes on its backend when that
    // backend is back, without being counted again.
    let mut h = Harness::new();
    let (b3, _) = h.backend("three", "10.200.0.13");
    let port = *ports_of_three_on(&h, b3, 52000..52400)
        .first()
        .expect("a port the ring gives b3");
    h.run(&tcp4_flags(VIP4_THREE, port, 80, TCP_SYN));
    for a in ["10.200.0.11", "10.200.0.12", "10.200.0.13"] {
        mark_down(&mut h, a);
    }
    let (action, _) = h.run(&tcp4_flags(VIP4_THREE, port, 80, TCP_ACK));
    assert_eq!(action, XDP_DROP, "no backend up");
    let flow =
        h.dp.flow(&flow4(CLIENT4, VIP4_THREE, port, 80, PROTO_TCP))
            .expect("entry kept");
    assert_eq!(
        (flow.backend_id(), flow.flags),
        (b3, 0),
        "still open, still on b3"
    );
    assert_eq!(opened_closed(&h, b3), (1, 0), "not counted closed");
    set_health(&mut h, "10.200.0.13", Health::Up);
    let (action, out) = h.run(&tcp4_flags(VIP4_THREE, port, 80, TCP_ACK));
    assert_eq!((action, &out[0..6]), (XDP_TX, &B3_MAC[..]), "back on b3");
    assert_eq!(opened_closed(&h, b3), (1, 0), "the same flow, counted once");
}

#[test]
fn syns_reusing_closed_tuples_raced_on_two_cpus_open_once() {
    let mut h = Harness::new();
    let (b1, _) = h.backend("single-tcp", "10.200.0.11");
    for flags in [TCP_SYN, TCP_RST] {
        for p in raced_packets(flags) {
            h.run(&p);
        }
    }
    let flows = u64::from(RACED_FLOWS);
    assert_eq!(
        opened_closed(&h, b1),
        (flows, flows),
        "opened and reset on one CPU"
    );
    race_on_two_cpus(&mut h, &raced_packets(TCP_SYN));
    assert_eq!(
        opened_closed(&h, b1),
        (2 * flows, flows),
        "{RACED_FLOWS} closed 5-tuples, each reused by a SYN sent from two CPUs at once: \
         each new connection counted once, open"
    );
    for p in 0..RACED_FLOWS {
        let flow =
            h.dp.flow(&flow4(CLIENT4, VIP4, 10_000 + p, 80, PROTO_TCP))
                .expect("entry");
        assert_eq!(
            flow.flags,
            0,
            "port {}: the new connection's entry",
            10_000 + p
        );
    }
}

#[test]
fn open_flows_pushed_out_of_a_full_table_count_as_closed() {
    // 12000 new flows into a table for 4096 (8192 slots): once both buckets
    // of a new flow are full, it takes the slot of the flow there seen
    // longest ago, and that flow counts as closed, so opened - closed stays
    // the number of open entries.
    let mut h = Harness::new();
    let (b1, _) = h.backend("single-tcp", "10.200.0.11");
    let slots = lb_common::flow_table::slots_for(h.dp.settings().flow_table_size);
    let flows: u16 = 12_000;
    for p in 0..flows {
        let (action, _) = h.run(&tcp4_flags(VIP4, 10_000 + p, 80, TCP_SYN));
        assert_eq!(action, XDP_TX, "port {}", 10_000 + p);
    }
    let (opened, closed) = opened_closed(&h, b1);
    let entries = h.dp.flows();
    let open = entries
        .iter()
        .filter(|(_, v)| v.backend_id() == b1 && v.flags & lb_common::FLOW_F_CLOSED == 0)
        .count() as u64;
    assert_eq!(opened, u64::from(flows), "every SYN made its flow");
    assert!(
        entries.len() as u32 > slots * 99 / 100,
        "{} of {slots} slots used",
        entries.len()
    );
    assert!(
        closed >= u64::from(flows) - u64::from(slots),
        "{closed} pushed out"
    );
    assert_eq!(opened - closed, open, "opened - closed = open entries");
    assert!(
        h.dp.flow(&flow4(CLIENT4, VIP4, 10_000 + flows - 1, 80, PROTO_TCP))
            .is_some(),
        "the newest flow has its entry"
    );
}

/// Where a SYN's new flow goes, given what its two buckets hold.
struct VictimCase {
    what: &'static str,
    /// Per bucket (the flow's first, then its second), per way: `None`
    /// empty, else (seconds since it was last seen, closed, generation of
    /// its backend entry).
    held: [[Option<(u64, bool, u32)>; 4]; 2],
    /// (bucket of the pair, way) the new flow must take.
    expect: (usize, u32),
    /// Whether a close is counted for the flow it pushes out.
    counts_close: bool,
}

#[test]
fn a_new_flow_takes_an_empty_slot_of_its_emptier_bucket_else_the_closed_then_the_oldest() {
    let mut h = Harness::new();
    let (b1, g1) = h.backend("single-tcp", "10.200.0.11");
    let buckets = lb_common::flow_table::buckets_for(h.dp.settings().flow_table_size);
    let now = 1_000_000_000_000;
    h.dp.set_clock(now).expect("clock");
    let open = |seen| Some((seen, false, g1));
    let closed = |seen| Some((seen, true, g1));
    let cases = [
        VictimCase {
            what: "the emptier bucket: the second",
            held: [[open(1), open(1), None, None], [open(1), None, None, None]],
            expect: (1, 1),
            counts_close: false,
        },
        VictimCase {
            what: "a tie: the first bucket's first empty way",
            held: [
                [open(1), open(1), None, open(1)],
                [None, open(1), open(1), open(1)],
            ],
            expect: (0, 2),
            counts_close: false,
        },
        VictimCase {
            // Counted, not compared as bit masks (0b0011 < 0b1000).
            what: "two empty ways against one: the first bucket's lowest",
            held: [
                [None, None, open(1), open(1)],
                [open(1), open(1), open(1), None],
            ],
            expect: (0, 0),
            counts_close: false,
        },
        VictimCase {
            what: "the first bucket full: the second's empty way",
            held: [[open(1); 4], [open(1), open(1), None, open(1)]],
            expect: (1, 2),
            counts_close: false,
        },
        VictimCase {
            what: "both full, all open: the one seen longest ago, counted closed",
            held: [
                [open(50), open(40), open(60), open(45)],
                [open(55), open(41), open(90), open(70)],
            ],
            expect: (1, 2),
            counts_close: true,
        },
        VictimCase {
            what: "both full: a closed flow before any open one, the older closed first",
            held: [
                [open(100), open(110), closed(20), open(120)],
                [closed(60), open(130), open(140), closed(40)],
            ],
            expect: (1, 0),
            counts_close: false,
        },
        VictimCase {
            what: "both full, two open flows seen equally long ago: the first candidate",
            held: [
                [open(50), open(40), open(90), open(45)],
                [open(55), open(90), open(30), open(70)],
            ],
            expect: (0, 2),
            counts_close: true,
        },
        VictimCase {
            what: "both full: the oldest open flow's backend replaced, not counted",
            held: [
                [
                    open(50),
                    Some((200, false, g1.wrapping_add(1))),
                    open(60),
                    open(45),
                ],
                [open(70), open(41), open(30), open(55)],
            ],
            expect: (0, 1),
            counts_close: false,
        },
    ];
    let mut used_buckets = std::collections::HashSet::new();
    let mut port = 20_000u16;
    let mut filler = 0u16;
    for case in &cases {
        // A SYN whose two buckets differ and no earlier case used.
        let (key, pair) = loop {
            port += 1;
            let key = flow4(CLIENT4, VIP4, port, 80, PROTO_TCP);
            let pair = lb_common::flow_table::key_buckets(&key, buckets);
            if pair[0] != pair[1]
                && !used_buckets.contains(&pair[0])
                && !used_buckets.contains(&pair[1])
            {
                break (key, pair);
            }
        };
        used_buckets.extend(pair);
        let mut placed = Vec::new();
        for (side, ways) in case.held.iter().enumerate() {
            for (way, held) in ways.iter().enumerate() {
                if let Some((seen, is_closed, generation)) = *held {
                    filler += 1;
                    placed.push((
                        (pair[side], way as u32),
                        flow4([10, 200, 9, 9], VIP4, filler, 80, PROTO_TCP),
                        FlowValue {
                            backend: b1 as u16,
                            generation,
                            last_seen_ns: now - seen * 1_000_000_000,
                            flags: if is_closed {
                                lb_common::FLOW_F_CLOSED
                            } else {
                                0
                            },
                        },
                    ));
                }
            }
        }
        assert_eq!(
            h.dp.place_flows(&placed).expect("placing"),
            placed.len(),
            "{}: the slots were empty",
            case.what
        );
        let (_, closed_before) = opened_closed(&h, b1);
        let (action, _) = h.run(&tcp4_flags(VIP4, port, 80, TCP_SYN));
        assert_eq!(action, XDP_TX, "{}", case.what);
        let at =
            h.dp.placed_flows()
                .into_iter()
                .find(|(_, k, _)| *k == key)
                .map(|(at, _, _)| at);
        assert_eq!(
            at,
            Some((pair[case.expect.0], case.expect.1)),
            "{}: buckets {pair:?}",
            case.what
        );
        let (_, closed_after) = opened_closed(&h, b1);
        assert_eq!(
            closed_after - closed_before,
            u64::from(case.counts_close),
            "{}: closes counted",
            case.what
        );
    }
}

#[test]
fn vips_sharing_an_index_slot_both_balance() {
    // Two VIPs whose XLB_VIP_INDEX slot is the same: new flows of both are
    // found through XLB_VIPS instead (VIP_INDEX_SHARED), and once one goes
    // the other is named by the slot again.
    let mut h = Harness::new();
    let slot = |port: u16| {
        lb_common::vip_index_slot(lb_common::vip_filter_slot(
            &[u32::from_ne_bytes(VIP4), 0, 0, 0],
            port.to_be(),
            PROTO_TCP,
        ))
    };
    let port = (81..=u16::MAX)
        .find(|&p| slot(p) == slot(80))
        .expect("a port sharing port 80's index slot");
    let before = h.cfg.clone();
    let mut cfg = before.clone();
    let mut sharing = h.vip("single-tcp").clone();
    sharing.name = Some("sharing".into());
    sharing.port = port;
    sharing.backends[0].address = "10.200.0.12".parse().expect("address");
    sharing.backends[0].mac = Some(MacAddr([0x02, 0, 0, 0, 0, 0x12]));
    cfg.vips.push(sharing);
    h.state
        .apply(&mut h.dp, &cfg, &mut h.resolver)
        .expect("adding a VIP sharing the slot");
    h.cfg = cfg;
    for (p, dport, mac) in [(40_000, 80, 0x11), (40_001, port, 0x12)] {
        let (action, out) = h.run(&tcp4_flags(VIP4, p, dport, TCP_SYN));
        assert_eq!(action, XDP_TX, "new flow to port {dport}");
        assert_eq!(
            out[0..6],
            [0x02, 0, 0, 0, 0, mac],
            "new flow to port {dport}"
        );
    }
    h.state
        .apply(&mut h.dp, &before, &mut h.resolver)
        .expect("removing the VIP sharing the slot");
    h.cfg = before;
    let (action, out) = h.run(&tcp4_flags(VIP4, 40_002, 80, TCP_SYN));
    assert_eq!(
        action, XDP_TX,
        "new flow to port 80 after the other VIP left"
    );
    assert_eq!(out[0..6], [0x02, 0, 0, 0, 0, 0x11]);
    let (action, _) = h.run(&tcp4_flags(VIP4, 40_003, port, TCP_SYN));
    assert_eq!(action, XDP_PASS, "port {port} is no VIP any more");
}
