//! `xdplb-bench`: microbenchmarks of the xdplb datapath, each beside a
//! baseline measured in the same run.
//!
//! - `kernel`: ns/packet through BPF_PROG_TEST_RUN for an established TCP
//!   flow, a new flow (miss, Maglev lookup, insert into a 2^20-entry flow
//!   table), a packet to no VIP, and a MAC-swapping reflector.
//! - `veth`: packets per second through a veth pair in a namespace of its
//!   own, the load balancer against the reflector, driven by a live-frame
//!   BPF_PROG_TEST_RUN generator.
//! - `maglev`: Maglev table build time against filling a table.
//! - `ab`: datapath objects of different builds side by side in one
//!   process, timed in alternation: what a change to the datapath gains,
//!   at a resolution the other commands' separate runs do not have on a
//!   shared machine.
//!
//! The load balancer is the production program and maps: loaded by
//! `Dataplane::load` and programmed by `State::apply` from a YAML config.
//! The helper programs (reflector, reset step, generator, sink) are the
//! `lb-bench` object built from lb-ebpf/src/bench.rs.
//!
//! Each subcommand prints one JSON object on stdout and a summary on stderr.
//! Needs root.

use std::{
    fs::File,
    hint::black_box,
    io,
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::Path,
    process::{Command as Process, ExitCode},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Context as _, Result};
use aya::{
    maps::{Array, DevMap, MapData, PerCpuArray, ProgramArray},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use clap::{Parser, Subcommand};
use lb_common::{
    flow_table::{buckets_for, slots_for},
    globals, maglev, maps, programs, ring_chunk_index, ring_chunks_for, vip_index_slot, Backend,
    Counters, RingChunk, VipEntry, VipInfo, VipKey, BENCH_FWD_BACKENDS, DEFAULT_RING_SIZE,
    EMPTY_SLOT, FAMILY_V4, FLOW_WAYS, PROTO_TCP, PROTO_UDP, RING_CHUNK_SLOTS,
};
use serde_json::{json, Value};
use xdplb::{
    config::{Config, MacAddr},
    dataplane::Dataplane,
    netdev::{self, Interface, NetError},
    state::{vip_key, Resolver, State},
};

/// The helper programs, built by build.rs (aya-build builds every binary
/// of lb-ebpf).
static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench"));

/// Names in the `lb-bench` object (lb-ebpf/src/bench.rs).
mod bench {
    pub const REFLECT: &str = "xlb_bench_reflect";
    pub const RESET: &str = "xlb_bench_reset";
    pub const TX: &str = "xlb_bench_tx";
    pub const GEN: &str = "xlb_bench_gen";
    pub const SINK: &str = "xlb_bench_sink";
    pub const FLOW_HIT: &str = "xlb_bench_flow_hit";
    pub const FLOW_INSERT: &str = "xlb_bench_flow_insert";
    pub const FLOW_TOUCH: &str = "xlb_bench_flow_touch";
    pub const LRU_HIT: &str = "xlb_bench_lru_hit";
    pub const LRU_INSERT: &str = "xlb_bench_lru_insert";
    pub const FWD: &str = "xlb_bench_fwd";
    pub const PROGRAMS: [&str; 11] = [
        REFLECT,
        RESET,
        TX,
        GEN,
        SINK,
        FLOW_HIT,
        FLOW_INSERT,
        FLOW_TOUCH,
        LRU_HIT,
        LRU_INSERT,
        FWD,
    ];

    pub const FLOWS: &str = "XLB_BENCH_FLOWS";
    pub const FLOW_BUCKETS: &str = "XLB_BENCH_FLOW_BUCKETS";
    pub const LRU: &str = "XLB_BENCH_LRU";
    pub const JUMP: &str = "XLB_BENCH_JUMP";
    pub const PORTS: &str = "XLB_BENCH_PORTS";
    pub const COUNT: &str = "XLB_BENCH_COUNT";
    pub const FWD_MACS: &str = "XLB_BENCH_FWD_MACS";
    pub const FWD_N: &str = "XLB_BENCH_FWD_N";
    pub const FWD_ADDR: &str = "XLB_BENCH_FWD_ADDR_BE";
    pub const FWD_PORT: &str = "XLB_BENCH_FWD_PORT_BE";
    /// `XLB_BENCH_COUNT` slots.
    pub const COUNT_GEN: u32 = 0;
    pub const COUNT_SINK: u32 = 1;
}

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0xc8, 0, 0x01];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0xc8, 0, 0x02];
const CLIENT4: [u8; 4] = [10, 200, 0, 1];
const VIP4: [u8; 4] = [10, 200, 100, 1];
const NOT_VIP4: [u8; 4] = [10, 200, 100, 99];
/// Flow table of the kernel benchmark: 2^20 entries, so one run of a
/// million new flows fits and the next ones run at capacity.
const FLOW_TABLE_SIZE: u32 = 1 << 20;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// 1 VIP, 3 backends, the default ring size and VIP slots, 2^20 flows.
/// `lo`: BPF_PROG_TEST_RUN reports the loopback device as ingress, so the
/// backends are reached by XDP_TX.
/// `flow_table_size` of the second load balancer the in-kernel benchmark
/// loads: 2048 buckets of 256 bytes, 512 KiB that stay in the CPU caches.
const CACHED_FLOW_TABLE_SIZE: u32 = 4096;

fn kernel_config(flow_table_size: u32) -> String {
    format!(
        "
interface: lo
datapath:
  ring_size: {DEFAULT_RING_SIZE}
  flow_table_size: {flow_table_size}
vips:
  - name: bench
    address: 10.200.100.1
    port: 80
    protocol: tcp
    backends:
      - {{ address: 10.200.0.11, mac: '02:00:00:c8:00:11' }}
      - {{ address: 10.200.0.12, mac: '02:00:00:c8:00:12' }}
      - {{ address: 10.200.0.13, mac: '02:00:00:c8:00:13' }}
"
    )
}

const VETH_NETNS: &str = "xlb-bench-veth";
const VETH_GEN: &str = "bgen";
const VETH_LB: &str = "blb";
const VETH_PORT: u16 = 53;
const GEN_BATCH: u32 = 64;
const GEN_CPU: usize = 0;
const WARMUP: Duration = Duration::from_millis(300);
/// Ethernet minimum without FCS is 60; 64 is the customary small frame.
const VETH_FRAME_LEN: usize = 64;

/// Microbenchmarks of the xdplb datapath (needs root). Each subcommand
/// prints one JSON object on stdout and a summary on stderr.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Shorter runs (repeat 200000, 1 s per veth run); the number of runs
    /// stays.
    #[arg(long, global = true)]
    quick: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// ns/packet through BPF_PROG_TEST_RUN: established TCP flow, new flow,
    /// packet to no VIP, and the MAC-swapping reflector as reference.
    Kernel {
        /// Repetitions per test run (the kernel reports their average).
        /// Default 1000000, 200000 with --quick.
        #[arg(long)]
        repeat: Option<u32>,
        /// Runs per case, interleaved across cases.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
        runs: u32,
    },
    /// Mpps over a veth pair in namespace `xlb-bench-veth`: the load
    /// balancer against the reflector, fed by a live-frame generator on
    /// CPU 0.
    Veth {
        /// Measured seconds per run. Default 3, 1 with --quick.
        #[arg(long)]
        seconds: Option<f64>,
        /// Runs per case, alternating load balancer and reflector.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
        runs: u32,
        /// Run blb's receive path (its XDP program) in a NAPI thread pinned
        /// to this CPU. Default: softirq on the generator's CPU 0, so one
        /// CPU does all the work and 1/rate is the cost per packet. (Split
        /// across CPUs it was slower and noisier here: cross-CPU wakeups
        /// and page recycling in a VM.)
        #[arg(long, value_name = "CPU")]
        napi_cpu: Option<usize>,
    },
    /// Compares datapath builds in one process: loads each object (the
    /// `lb-ebpf` file a build leaves in
    /// target/release/build/lb-userspace-*/out/), each with maps of its own
    /// and a flow table for 2^20 flows (`--flows`), programs one VIP with three
    /// backends into each, then times them in alternation, each round
    /// starting with another: (a) established TCP, (b) a new flow behind
    /// the reset step (net of it), (c) not a VIP. Prints per object the
    /// medians, the median of its paired differences with the first, and
    /// its program's size (the instructions the verifier walked to accept
    /// it, which a faster build must not push towards the kernel's limit of
    /// one million). Give one object twice to see the resolution.
    Ab {
        /// Rounds.
        #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
        /// Repetitions per test run of (a) and (c).
        #[arg(long, default_value_t = 200_000)]
        repeat: u32,
        /// Repetitions per test run of (b), each a new flow.
        #[arg(long, default_value_t = 100_000)]
        new_flows: u32,
        /// Flows each object's flow table is sized for, within the
        /// daemon's range of `datapath.flow_table_size`. A few thousand
        /// keep the table in the CPU caches, so (b) shows the new flow's
        /// own work without the wait for its buckets.
        #[arg(long, default_value_t = FLOW_TABLE_SIZE,
              value_parser = clap::value_parser!(u32).range(1024..=100_000_000))]
        flows: u32,
        /// Datapath objects; the first is the base.
        #[arg(required = true, num_args = 2..)]
        objects: Vec<std::path::PathBuf>,
    },
    /// For tests of the flow table's migration: replaces the pinned flow
    /// table PIN_DIR/XLB_FLOWS by a copy in the layout of builds before
    /// 64-byte slots, each flow in the same bucket and way, as a daemon of
    /// such a build would have left it. (A program still attached keeps
    /// the table it has.)
    #[command(hide = true)]
    LegacyFlowTable {
        #[arg(long)]
        pin_dir: std::path::PathBuf,
        /// The datapath's `flow_table_size`.
        #[arg(long)]
        flow_table_size: u32,
    },
    /// For tests of the conversion of per-VIP counters: pins per-CPU VIP
    /// counters at PIN_DIR/XLB_VIP_STATS as a daemon of a build that
    /// counted packets on VIPs too would have left them, with `packets`
    /// packets (64 bytes each, a new flow in ten) for every VIP in
    /// PIN_DIR/XLB_VIPS, spread over the CPUs.
    #[command(hide = true)]
    LegacyVipStats {
        #[arg(long)]
        pin_dir: std::path::PathBuf,
        #[arg(long)]
        packets: u64,
    },
    /// The end-to-end benchmark's baseline forwarder: attaches
    /// `xlb_bench_fwd` in native mode to IFACE (in this process's network
    /// namespace), forwarding TCP to VIP to the backends' MACs, and holds
    /// it until the process is killed (the kernel then detaches it). Prints
    /// no JSON.
    #[command(hide = true)]
    Fwd {
        #[arg(long)]
        iface: String,
        /// The forwarded IPv4 address and TCP port.
        #[arg(long)]
        vip: std::net::SocketAddrV4,
        /// IFACE's MAC: the forwarded frames' source.
        #[arg(long, value_parser = parse_mac)]
        src_mac: MacAddr,
        /// A backend's MAC; one flag per backend.
        #[arg(long = "backend-mac", required = true, value_parser = parse_mac)]
        backend_macs: Vec<MacAddr>,
    },
    /// Maglev table build time (65537 slots) for 10, 100 and 1000 backends,
    /// against allocating and filling the same table.
    Maglev {
        /// Runs per case, interleaved across cases.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
        runs: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XDPLB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Kernel { repeat, runs } => {
            let repeat = repeat.unwrap_or(if cli.quick { 200_000 } else { 1_000_000 });
            kernel(repeat, runs)
        }
        Command::Veth {
            seconds,
            runs,
            napi_cpu,
        } => {
            let seconds = seconds.unwrap_or(if cli.quick { 1.0 } else { 3.0 });
            veth(seconds, runs, napi_cpu)
        }
        Command::Maglev { runs } => maglev_bench(runs),
        Command::Fwd {
            iface,
            vip,
            src_mac,
            backend_macs,
        } => fwd(&iface, vip, src_mac, &backend_macs),
        Command::LegacyFlowTable {
            pin_dir,
            flow_table_size,
        } => legacy_flow_table(&pin_dir, flow_table_size),
        Command::LegacyVipStats { pin_dir, packets } => legacy_vip_stats(&pin_dir, packets),
        Command::Ab {
            rounds,
            repeat,
            new_flows,
            flows,
            objects,
        } => ab(&objects, rounds, repeat, new_flows, flows),
    };
    match result {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).expect("a JSON value serializes")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xdplb-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------- machine

/// Facts about the machine, taken at start; `finish` adds the load at end.
struct Machine {
    kernel: String,
    cpu_model: String,
    nproc: usize,
    loadavg_start: Vec<f64>,
    /// (steal, total) jiffies over all CPUs at start.
    steal_start: (u64, u64),
}

/// (steal, total) jiffies over all CPUs, from /proc/stat: in a VM, time
/// the hypervisor gave to someone else.
fn steal() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    (v.get(7).copied().unwrap_or(0), v.iter().take(8).sum())
}

fn loadavg() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|s| s.parse().ok())
        .collect()
}

impl Machine {
    fn start() -> Machine {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        // SAFETY: sysconf has no preconditions.
        let nproc = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
        Machine {
            kernel,
            cpu_model,
            nproc,
            loadavg_start: loadavg(),
            steal_start: steal(),
        }
    }

    fn finish(&self) -> Value {
        let ((s0, t0), (s1, t1)) = (self.steal_start, steal());
        let steal_percent =
            100.0 * s1.saturating_sub(s0) as f64 / t1.saturating_sub(t0).max(1) as f64;
        json!({
            "kernel": self.kernel,
            "cpu_model": self.cpu_model,
            "nproc": self.nproc,
            "loadavg_start": self.loadavg_start,
            "loadavg_end": loadavg(),
            "steal_percent": round(steal_percent, 2),
        })
    }
}

/// Pins the calling thread to one CPU.
fn pin_thread(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("pinning to CPU {cpu}"));
    }
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn rounded(values: &[f64], digits: i32) -> Vec<f64> {
    values.iter().map(|&x| round(x, digits)).collect()
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "xdplb-bench needs root (BPF programs and maps, XDP, network namespaces)"
    );
    Ok(())
}

// ---------------------------------------------------------------- packets

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

/// Ethernet + IPv4 (no options, valid checksum) + `l4`.
fn frame4(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(34 + l4.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00]); // id, DF
    ip.extend_from_slice(&[64, proto, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(l4);
    f
}

/// A TCP segment without payload (checksum not filled: the datapath does
/// not check it).
fn tcp_frame(dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&1u32.to_be_bytes());
    h.extend_from_slice(&1u32.to_be_bytes());
    h.extend_from_slice(&[5 << 4, flags]);
    h.extend_from_slice(&64240u16.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0]);
    frame4(LB_MAC, CLIENT_MAC, CLIENT4, dst, PROTO_TCP, &h)
}

/// A UDP datagram padded to `len` bytes of frame.
fn udp_frame(dst_mac: [u8; 6], src_mac: [u8; 6], dport: u16, len: usize) -> Vec<u8> {
    let payload = len.saturating_sub(14 + 20 + 8);
    let mut h = Vec::with_capacity(8 + payload);
    h.extend_from_slice(&40000u16.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]); // no checksum (allowed for UDP over IPv4)
    h.resize(8 + payload, 0xab);
    frame4(dst_mac, src_mac, CLIENT4, VIP4, PROTO_UDP, &h)
}

// ---------------------------------------------------------------- objects

/// Interfaces given by name, MACs never resolved (every backend has its
/// `mac:` in the config).
struct FixedResolver(Vec<Interface>);

impl Resolver for FixedResolver {
    fn interface(&mut self, name: &str) -> Result<Interface, NetError> {
        self.0
            .iter()
            .find(|i| i.name == name)
            .cloned()
            .ok_or_else(|| NetError::NoInterface(name.into()))
    }
    fn mac(&mut self, address: IpAddr, interface: &str) -> Result<MacAddr, NetError> {
        Err(NetError::Unresolved {
            address,
            interface: interface.into(),
            waited_ms: 0,
        })
    }
}

/// The production datapath, programmed from `yaml`.
fn load_lb(yaml: &str, resolver: &mut FixedResolver) -> Result<(Dataplane, State)> {
    let cfg = Config::parse(yaml, "benchmark config").context("parsing the benchmark config")?;
    let mut dp = Dataplane::load(cfg.datapath, None).context("loading the xdplb datapath")?;
    let mut state = State::default();
    state
        .apply(&mut dp, &cfg, resolver)
        .context("programming the benchmark config")?;
    Ok((dp, state))
}

/// The counters of every VIP of the load balancer's configuration (the
/// configs have one VIP).
fn vip_totals((dp, state): (&Dataplane, &State)) -> Result<Counters> {
    let mut total = Counters::default();
    for vip in state.config().map_or(&[][..], |c| c.vips.as_slice()) {
        total.add(
            &state
                .vip_counters(dp, &vip_key(vip))
                .context("reading VIP counters")?,
        );
    }
    Ok(total)
}

/// The helper object with every program loaded (verified).
struct BenchObject {
    ebpf: Ebpf,
}

impl BenchObject {
    /// Loads the helper object; its flow table is sized for
    /// `flow_table_size` flows like the load balancer's, and its LRU hash
    /// holds as many.
    fn load(flow_table_size: u32) -> Result<BenchObject> {
        let buckets = buckets_for(flow_table_size);
        let ebpf = EbpfLoader::new()
            .map_max_entries(bench::FLOWS, buckets)
            .override_global(bench::FLOW_BUCKETS, &buckets, true)
            .map_max_entries(bench::LRU, flow_table_size)
            .load(BENCH_OBJECT)
            .context("loading the lb-bench object")?;
        let mut object = BenchObject { ebpf };
        for name in bench::PROGRAMS {
            object
                .xdp(name)?
                .load()
                .with_context(|| format!("verifying program {name}"))?;
        }
        Ok(object)
    }

    /// Program `name` of the object, as XDP.
    fn xdp(&mut self, name: &str) -> Result<&mut Xdp> {
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} is missing from the lb-bench object"))?
            .try_into()
            .with_context(|| format!("program {name} is not XDP"))
    }

    fn program(&mut self, name: &str) -> &mut Xdp {
        self.xdp(name).expect("checked at load")
    }

    fn take_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
        &mut self,
        name: &str,
    ) -> Result<T> {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or_else(|| anyhow!("map {name} is missing from the lb-bench object"))?;
        T::try_from(map).with_context(|| format!("map {name}"))
    }
}

fn parse_mac(s: &str) -> Result<MacAddr, String> {
    s.parse()
        .map_err(|()| format!("{s:?} is not a MAC address (six hex pairs with colons)"))
}

/// `fwd`: returns only if attaching fails.
fn fwd(
    iface: &str,
    vip: std::net::SocketAddrV4,
    src_mac: MacAddr,
    backend_macs: &[MacAddr],
) -> Result<Value> {
    let n = u32::try_from(backend_macs.len())
        .ok()
        .filter(|n| *n <= BENCH_FWD_BACKENDS)
        .with_context(|| {
            format!(
                "at most {BENCH_FWD_BACKENDS} backends, got {}",
                backend_macs.len()
            )
        })?;
    // As the program loads them from the packet: network order in memory.
    let addr = u32::from_ne_bytes(vip.ip().octets());
    let port = u16::from_ne_bytes(vip.port().to_be_bytes());
    // Only this program is loaded (verified).
    let mut object = BenchObject {
        ebpf: EbpfLoader::new()
            .override_global(bench::FWD_N, &n, true)
            .override_global(bench::FWD_ADDR, &addr, true)
            .override_global(bench::FWD_PORT, &port, true)
            .load(BENCH_OBJECT)
            .context("loading the lb-bench object")?,
    };
    let mut macs: Array<MapData, [u8; 12]> = object.take_map(bench::FWD_MACS)?;
    for (i, dst) in (0..).zip(backend_macs) {
        let mut pair = [0u8; 12];
        pair[..6].copy_from_slice(&dst.0);
        pair[6..].copy_from_slice(&src_mac.0);
        macs.set(i, pair, 0).context("writing the backends' MACs")?;
    }
    let program = object.xdp(bench::FWD)?;
    program
        .load()
        .with_context(|| format!("verifying {}", bench::FWD))?;
    program
        .attach(iface, XdpMode::Driver)
        .with_context(|| format!("attaching {} to {iface} (native)", bench::FWD))?;
    eprintln!(
        "xdplb-bench: {} on {iface} (native): TCP to {vip} over {n} backends, until killed",
        bench::FWD
    );
    loop {
        thread::park();
    }
}

fn per_cpu_sum(map: &PerCpuArray<MapData, u64>, slot: u32) -> Result<u64> {
    Ok(map
        .get(&slot, 0)
        .context("reading bench counters")?
        .iter()
        .sum())
}

// ---------------------------------------------------------------- kernel

/// The program as the kernel holds it: its size after the verifier's
/// rewrites (what `bpftool prog dump xlated` lists; 8 bytes per
/// instruction, a 64-bit immediate load takes two), JIT-compiled, and the
/// instructions the verifier walked to accept it.
fn program_size(program: &Xdp) -> Result<Value> {
    let info = program.info().context("xlb_lb program info")?;
    Ok(json!({
        "xlated_insns": info.size_translated().map(|b| b / 8),
        "jited_bytes": info.size_jitted(),
        "verifier_insns_processed": info.verified_instruction_count(),
    }))
}

/// One test run of `repeat` repetitions: the kernel's average per
/// repetition, in (integer) ns. It excludes the fixed cost of the call
/// (here ~15 ms: the kernel swaps its XDP dispatcher around each run), so
/// it is also the right number for small `repeat`.
fn time_run(program: &mut Xdp, packet: &[u8], repeat: u32, expect: u32, case: &str) -> Result<f64> {
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            repeat,
            ..TestRunOptions::default()
        })
        .with_context(|| format!("{case}: BPF_PROG_TEST_RUN"))?;
    ensure!(
        result.return_value == expect,
        "{case}: the program returned {} instead of {expect}",
        result.return_value
    );
    Ok(result.duration.as_nanos() as f64)
}

/// One table's floors in one run, raw ns per packet: `hit` timed on the
/// established frame, whose key `insert` (re)inserts first (inserts may
/// have evicted it), then `insert` timed behind the reset step (a fresh
/// 5-tuple each repetition; the caller subtracts the reset step).
fn table_floors(
    obj: &mut BenchObject,
    jump: &mut ProgramArray<MapData>,
    (hit, insert): (&str, &str),
    (established, new_flow): (&[u8], &[u8]),
    repeat: u32,
    label: &str,
) -> Result<(f64, f64)> {
    let first = obj
        .program(insert)
        .test_run(TestRunOptions {
            data_in: Some(established),
            ..TestRunOptions::default()
        })
        .with_context(|| format!("{label}_hit (first packet): BPF_PROG_TEST_RUN"))?;
    // XDP_TX: inserted; XDP_PASS: still there.
    ensure!(
        matches!(first.return_value, XDP_TX | XDP_PASS),
        "{label}_hit: inserting the key failed (returned {})",
        first.return_value
    );
    let hit_ns = time_run(
        obj.program(hit),
        established,
        repeat,
        XDP_TX,
        &format!("{label}_hit"),
    )?;
    let insert_ns = time_behind_reset(
        obj,
        jump,
        insert,
        new_flow,
        repeat,
        &format!("{label}_insert"),
    )?;
    Ok((hit_ns, insert_ns))
}

/// Raw ns per packet of `program` (of the helper object) behind the reset
/// step: a fresh 5-tuple each repetition, every one expected XDP_TX. The
/// caller subtracts the reset step.
fn time_behind_reset(
    obj: &mut BenchObject,
    jump: &mut ProgramArray<MapData>,
    program: &str,
    frame: &[u8],
    repeat: u32,
    case: &str,
) -> Result<f64> {
    let fd = obj
        .program(program)
        .fd()
        .with_context(|| format!("{program} fd"))?
        .try_clone()?;
    jump.set(0, &fd, 0)
        .with_context(|| format!("jump slot -> {program}"))?;
    time_run(obj.program(bench::RESET), frame, repeat, XDP_TX, case)
}

/// `repeat` new flows through the load balancer `lb` (program fd `lb_fd`)
/// behind the reset step: its raw ns per packet. Every repetition must
/// have been a new flow, counted with its packet on the VIP.
fn time_new_flows(
    obj: &mut BenchObject,
    jump: &mut ProgramArray<MapData>,
    lb_fd: &aya::programs::ProgramFd,
    lb: (&Dataplane, &State),
    frame: &[u8],
    repeat: u32,
    case: &str,
) -> Result<f64> {
    jump.set(0, lb_fd, 0)
        .with_context(|| format!("{case}: jump slot -> xlb_lb"))?;
    let before = vip_totals(lb)?;
    let ns = time_run(obj.program(bench::RESET), frame, repeat, XDP_TX, case)?;
    let after = vip_totals(lb)?;
    let (counted, packets) = (
        after.new_flows - before.new_flows,
        after.packets - before.packets,
    );
    ensure!(
        counted == u64::from(repeat) && packets == u64::from(repeat),
        "{case}: {repeat} repetitions but {counted} new flows and {packets} packets counted: \
         not every repetition was a new flow"
    );
    Ok(ns)
}

/// A case timed behind the reset step: its raw runs, and the same runs
/// net of the reset step's run by run (`net_ns_per_packet`, `net_median`),
/// which its ratio to the reference uses. Returns the JSON and the net runs.
fn net_case_json(raw: &[f64], reset: &[f64], reference: f64) -> (Value, Vec<f64>) {
    let net: Vec<f64> = raw.iter().zip(reset).map(|(r, z)| r - z).collect();
    let net_median = median(&net);
    let mut v = case_json(raw, reference);
    v["ratio_to_reference"] = json!(round(net_median / reference, 3));
    v["net_ns_per_packet"] = json!(net);
    v["net_median"] = json!(net_median);
    (v, net)
}

fn case_json(ns: &[f64], reference: f64) -> Value {
    let m = median(ns);
    json!({
        "ns_per_packet": ns,
        "median": m,
        "ratio_to_reference": round(m / reference, 3),
    })
}

fn kernel(repeat: u32, runs: u32) -> Result<Value> {
    require_root()?;
    ensure!(repeat >= 1, "--repeat must be at least 1");
    let machine = Machine::start();
    // One CPU for every run: the reset step's counter is per CPU, and the
    // cases share the same caches.
    let cpu = machine.nproc - 1;
    pin_thread(cpu)?;

    let mut resolver = FixedResolver(vec![Interface {
        name: "lo".into(),
        ifindex: 1,
        mac: MacAddr(LB_MAC),
    }]);
    let (mut dp, state) = load_lb(&kernel_config(FLOW_TABLE_SIZE), &mut resolver)?;
    let table_size = dp.settings().flow_table_size;
    ensure!(
        table_size >= FLOW_TABLE_SIZE,
        "the flow table must hold at least {FLOW_TABLE_SIZE} entries"
    );
    // The same datapath and VIP with a flow table small enough to stay in
    // the caches: (b) without its memory latency.
    let (mut cached_dp, cached_state) =
        load_lb(&kernel_config(CACHED_FLOW_TABLE_SIZE), &mut resolver)?;
    let mut obj = BenchObject::load(table_size)?;
    let mut jump: ProgramArray<MapData> = obj.take_map(bench::JUMP)?;
    let lb_fd = dp.program_mut().fd().context("xlb_lb fd")?.try_clone()?;
    let cached_fd = cached_dp
        .program_mut()
        .fd()
        .context("xlb_lb fd (cached table)")?
        .try_clone()?;
    let slots = slots_for(table_size);
    let program = program_size(dp.program_mut())?;

    let established = tcp_frame(VIP4, 40000, 80, TCP_ACK);
    let new_flow = tcp_frame(VIP4, 40001, 80, TCP_SYN);
    let not_vip = tcp_frame(NOT_VIP4, 40000, 80, TCP_ACK);

    let (mut a, mut b, mut c, mut d, mut reset) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // (b) into the cached table.
    let mut b_cached = Vec::new();
    // The flow table alone: one hit, one insert (net of the reset step).
    let (mut hit, mut insert) = (Vec::new(), Vec::new());
    // Under the insert: one read of each of the flow's two buckets.
    let mut touch = Vec::new();
    // The same on a kernel LRU hash (what the flow table was before).
    let (mut lru_hit, mut lru_insert) = (Vec::new(), Vec::new());
    let mut flow_entries = Vec::new();
    let mut new_flows_counted = Vec::new();
    let mut evicting = Vec::new();
    let mut inserted = 0u64;
    let started = Instant::now();
    for run in 1..=runs {
        // (a) Established: the first packet creates the flow (again: the
        // new-flow runs may have evicted it), the timed ones must all hit.
        time_run(
            dp.program_mut(),
            &established,
            1,
            XDP_TX,
            "established_tcp (first packet)",
        )?;
        let before = vip_totals((&dp, &state))?;
        a.push(time_run(
            dp.program_mut(),
            &established,
            repeat,
            XDP_TX,
            "established_tcp",
        )?);
        let after = vip_totals((&dp, &state))?;
        ensure!(
            after.packets - before.packets == u64::from(repeat)
                && after.new_flows == before.new_flows,
            "established_tcp: expected {repeat} packets and no new flow, counted {} packets and \
             {} new flows",
            after.packets - before.packets,
            after.new_flows - before.new_flows
        );

        // (b) New flow: reset step -> xlb_lb, every repetition a new 5-tuple.
        // Once the table is full, every insert also evicts.
        evicting.push(inserted + 1 + u64::from(repeat) > u64::from(table_size));
        b.push(time_new_flows(
            &mut obj,
            &mut jump,
            &lb_fd,
            (&dp, &state),
            &new_flow,
            repeat,
            "new_flow",
        )?);
        new_flows_counted.push(u64::from(repeat));
        inserted += u64::from(repeat);
        // Every key, one syscall each: ~1 s for a full table, not timed.
        let entries = dp.flow_count() as u64;
        // The established flow is in the table too. Past half full, a few
        // new flows find both their buckets full and evict.
        let expected = (inserted + 1).min(u64::from(slots));
        ensure!(
            entries as f64 >= 0.9 * expected as f64 && entries <= expected,
            "new_flow: the flow table holds {entries} entries, expected about {expected}"
        );
        flow_entries.push(entries);

        // (b) again into the table for CACHED_FLOW_TABLE_SIZE flows, which
        // every repetition after the first 8192 evicts from.
        b_cached.push(time_new_flows(
            &mut obj,
            &mut jump,
            &cached_fd,
            (&cached_dp, &cached_state),
            &new_flow,
            repeat,
            "new_flow_cached",
        )?);

        // (c) Not a VIP: parse, flow-table miss, VIP filter miss, pass.
        c.push(time_run(
            dp.program_mut(),
            &not_vip,
            repeat,
            XDP_PASS,
            "non_vip_pass",
        )?);

        // (d) Reference: swap MACs, XDP_TX.
        d.push(time_run(
            obj.program(bench::REFLECT),
            &established,
            repeat,
            XDP_TX,
            "reference_reflect",
        )?);

        // The floors under (a) and (b): xdplb's flow table alone, then the
        // same on the kernel's LRU hash.
        let (h, i) = table_floors(
            &mut obj,
            &mut jump,
            (bench::FLOW_HIT, bench::FLOW_INSERT),
            (&established, &new_flow),
            repeat,
            "flow_table",
        )?;
        hit.push(h);
        insert.push(i);
        touch.push(time_behind_reset(
            &mut obj,
            &mut jump,
            bench::FLOW_TOUCH,
            &new_flow,
            repeat,
            "flow_table_touch",
        )?);
        let (h, i) = table_floors(
            &mut obj,
            &mut jump,
            (bench::LRU_HIT, bench::LRU_INSERT),
            (&established, &new_flow),
            repeat,
            "lru",
        )?;
        lru_hit.push(h);
        lru_insert.push(i);

        // The reset step alone: reset -> xlb_bench_tx.
        let before = vip_totals((&dp, &state))?;
        reset.push(time_behind_reset(
            &mut obj,
            &mut jump,
            bench::TX,
            &new_flow,
            repeat,
            "reset_only",
        )?);
        ensure!(
            vip_totals((&dp, &state))?.packets == before.packets,
            "reset_only: the load balancer ran (the jump slot was not switched)"
        );
        let last = |v: &Vec<f64>| v[v.len() - 1];
        eprintln!(
            "run {run}/{runs}: established {} ns, new_flow {} ns (reset {} ns, cached table {} \
             ns), non_vip {} ns, reflect {} ns, table hit {} ns, table insert {} ns, table touch \
             {} ns, LRU hit {} ns, LRU insert {} ns, flow table {entries} entries",
            last(&a),
            last(&b),
            last(&reset),
            last(&b_cached),
            last(&c),
            last(&d),
            last(&hit),
            last(&insert),
            last(&touch),
            last(&lru_hit),
            last(&lru_insert),
        );
    }
    let elapsed = started.elapsed();

    let reference = median(&d);
    let (mut new_flow_json, net) = net_case_json(&b, &reset, reference);
    let net_median = median(&net);
    new_flow_json["flow_entries_after"] = json!(flow_entries);
    new_flow_json["new_flows_counted"] = json!(new_flows_counted);
    new_flow_json["evicting"] = json!(evicting);
    // Filling an empty table and replacing entries of a full one cost
    // differently; --quick never fills it.
    let net_where = |want: bool| {
        let v: Vec<f64> = net
            .iter()
            .zip(&evicting)
            .filter(|(_, &e)| e == want)
            .map(|(&n, _)| n)
            .collect();
        (!v.is_empty()).then(|| median(&v))
    };
    new_flow_json["net_median_filling"] = json!(net_where(false));
    new_flow_json["net_median_evicting"] = json!(net_where(true));

    let (cached_json, cached_net) = net_case_json(&b_cached, &reset, reference);
    let (insert_json, insert_net) = net_case_json(&insert, &reset, reference);
    let (touch_json, touch_net) = net_case_json(&touch, &reset, reference);
    let (lru_insert_json, lru_insert_net) = net_case_json(&lru_insert, &reset, reference);

    eprintln!(
        "\nkernel: repeat {repeat}, {runs} runs on CPU {cpu} in {:.1} s; median ns/packet:",
        elapsed.as_secs_f64()
    );
    for (name, ns) in [
        ("established_tcp", Some(median(&a))),
        ("new_flow (raw)", Some(median(&b))),
        ("reset_only", Some(median(&reset))),
        ("new_flow (net)", Some(net_median)),
        ("  while filling", net_where(false)),
        ("  while evicting", net_where(true)),
        ("  cached table", Some(median(&cached_net))),
        ("non_vip_pass", Some(median(&c))),
        ("reference_reflect", Some(reference)),
        ("table hit alone", Some(median(&hit))),
        ("table insert (net)", Some(median(&insert_net))),
        ("table touch (net)", Some(median(&touch_net))),
        ("LRU hit", Some(median(&lru_hit))),
        ("LRU insert (net)", Some(median(&lru_insert_net))),
    ] {
        let Some(ns) = ns else { continue };
        eprintln!("  {name:<18} {ns:>6} ns  x{:.2} reference", ns / reference);
    }

    Ok(json!({
        "benchmark": "kernel",
        "machine": machine.finish(),
        "method": "BPF_PROG_TEST_RUN, `repeat` repetitions per run; ns_per_packet is the \
                   kernel's average per repetition (integer ns). Runs interleave the cases. \
                   new_flow: xlb_bench_reset (fresh source address and port) tail-calls \
                   xlb_lb; reset_only: the same reset tail-calls xlb_bench_tx; net = new_flow \
                   - reset_only of the same run, and new_flow's ratio_to_reference uses it. \
                   new_flow.evicting: the run took the flow table past flow_table_size \
                   flows; net_median_filling / net_median_evicting split the runs by it. \
                   new_flow_cached: the same, net of the same reset runs, into a second \
                   load balancer (same object and VIP) whose flow table holds \
                   cached_flow_table_size flows (512 KiB, which stays in the CPU caches; \
                   every repetition past the first 8192 evicts): (b)'s own work without its \
                   memory latency. \
                   flow_table_hit / flow_table_insert: the floor under (a) and (b), the flow \
                   table alone (xlb_bench_flow_hit: parse, one lookup, MAC swap; \
                   xlb_bench_flow_insert behind the same reset step, net of it: one insert) \
                   with the load balancer's table code and size, filled in step with its \
                   table. flow_table_touch: under the insert, net of the reset step, \
                   xlb_bench_flow_touch: the same key, one 8-byte read of each of its two \
                   buckets in that table and nothing else, the memory floor of any \
                   two-choice table of this size. lru_hit / lru_insert: the same on a kernel LRU hash of FlowKey -> \
                   FlowValue with flow_table_size entries (BPF_NOEXIST insert), what the \
                   flow table was before.",
        "repeat": repeat,
        "runs": runs,
        "cpu": cpu,
        "flow_table_size": table_size,
        "cached_flow_table_size": CACHED_FLOW_TABLE_SIZE,
        "program": program,
        "elapsed_s": round(elapsed.as_secs_f64(), 2),
        "cases": {
            "established_tcp": case_json(&a, reference),
            "new_flow": new_flow_json,
            "new_flow_cached": cached_json,
            "non_vip_pass": case_json(&c, reference),
            "reference_reflect": case_json(&d, reference),
            "reset_only": case_json(&reset, reference),
            "flow_table_hit": case_json(&hit, reference),
            "flow_table_insert": insert_json,
            "flow_table_touch": touch_json,
            "lru_hit": case_json(&lru_hit, reference),
            "lru_insert": lru_insert_json,
        },
    }))
}

// ---------------------------------------------------------------- legacy

fn legacy_flow_table(dir: &Path, flow_table_size: u32) -> Result<Value> {
    require_root()?;
    let path = dir.join(maps::FLOWS);
    let buckets = buckets_for(flow_table_size);
    let info = aya::maps::MapInfo::from_pin(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    ensure!(
        info.max_entries() == buckets,
        "{} has {} buckets, flow_table_size {flow_table_size} needs {buckets}",
        path.display(),
        info.max_entries()
    );
    let map = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let table: Array<MapData, lb_common::FlowBucket> = aya::maps::Map::Array(map)
        .try_into()
        .with_context(|| format!("{} is not a flow table of this build", path.display()))?;
    let flows = xdplb::flows::FlowTable::new(table, buckets)?.placed();
    std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
    // Kept mapped until the pin holds the map.
    let _older = xdplb::flows::LegacyFixture::pin(&path, buckets, &flows)
        .with_context(|| format!("pinning the older table at {}", path.display()))?;
    eprintln!(
        "{}: {} flows, now in the 72-byte-slot layout",
        path.display(),
        flows.len()
    );
    Ok(json!({ "pin": path.display().to_string(), "flows": flows.len() }))
}

fn legacy_vip_stats(dir: &Path, packets: u64) -> Result<Value> {
    require_root()?;
    let vips_path = dir.join(maps::VIPS);
    let map = MapData::from_pin(&vips_path)
        .with_context(|| format!("opening {}", vips_path.display()))?;
    let vips: aya::maps::HashMap<MapData, VipKey, VipInfo> = aya::maps::Map::HashMap(map)
        .try_into()
        .with_context(|| format!("{} is not this build's VIP table", vips_path.display()))?;
    let ids: Vec<u32> = vips
        .iter()
        .map(|r| r.map(|(_, info)| info.id))
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", vips_path.display()))?;
    // As many VIP ids as the daemon's `max_vips`, which sized this map.
    let retired = dir.join(maps::VIP_RETIRED);
    let max_vips = aya::maps::MapInfo::from_pin(&retired)
        .with_context(|| format!("opening {}", retired.display()))?
        .max_entries();
    let counted = lb_common::Counters {
        packets,
        bytes: packets * 64,
        new_flows: packets / 10,
        ..Default::default()
    };
    let path = dir.join(maps::LEGACY_VIP_STATS);
    let counters: Vec<(u32, lb_common::Counters)> = ids.iter().map(|&id| (id, counted)).collect();
    xdplb::dataplane::pin_legacy_vip_stats(&path, max_vips, &counters)
        .with_context(|| format!("pinning {}", path.display()))?;
    eprintln!(
        "{}: VIP ids {ids:?} counted {packets} packets each",
        path.display()
    );
    Ok(json!({ "pin": path.display().to_string(), "vip_ids": ids, "packets": packets }))
}

// ---------------------------------------------------------------- ab

/// Map `name` of an object loaded from `path`.
fn map_of<'a>(ebpf: &'a mut Ebpf, path: &Path, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("{}: no map {name}", path.display()))
}

/// Loads the datapath object at `path` with this benchmark's sizes and
/// programs one VIP (`VIP4`:80/tcp, id 0) with backends 1 to 3 by writing
/// its maps directly: objects of other builds may lay the flow table out
/// differently, so neither `Dataplane` nor the flow table is used.
fn load_object(path: &Path, flow_table_size: u32) -> Result<Ebpf> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let chunks = ring_chunks_for(DEFAULT_RING_SIZE);
    let buckets = buckets_for(flow_table_size);
    let mut ebpf = EbpfLoader::new()
        .override_global(globals::RING_SIZE, &DEFAULT_RING_SIZE, true)
        .override_global(globals::RING_CHUNKS, &chunks, true)
        .override_global(globals::FLOW_BUCKETS, &buckets, true)
        .map_max_entries(maps::FLOWS, buckets)
        .load(&bytes)
        .with_context(|| format!("loading {}", path.display()))?;
    let program: &mut Xdp = ebpf
        .program_mut(programs::LB)
        .ok_or_else(|| anyhow!("{}: no program {}", path.display(), programs::LB))?
        .try_into()?;
    program
        .load()
        .with_context(|| format!("verifying {} of {}", programs::LB, path.display()))?;
    let key = VipKey {
        addr: [u32::from_ne_bytes(VIP4), 0, 0, 0],
        port_be: 80u16.to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
    };
    let info = VipInfo::default();
    let bit = key.filter_slot();
    // Each conversion checks the map's value size against this build's.
    let set = |r: Result<(), aya::maps::MapError>, map: &str| {
        r.with_context(|| format!("{}: writing {map}", path.display()))
    };
    let mut vips: aya::maps::HashMap<_, VipKey, VipInfo> =
        map_of(&mut ebpf, path, maps::VIPS)?.try_into()?;
    set(vips.insert(key, info, 0), maps::VIPS)?;
    let mut filter: Array<_, u64> = map_of(&mut ebpf, path, maps::VIP_FILTER)?.try_into()?;
    set(
        filter.set(bit / 64, 1u64 << (bit % 64), 0),
        maps::VIP_FILTER,
    )?;
    let mut index: Array<_, u32> = map_of(&mut ebpf, path, maps::VIP_INDEX)?.try_into()?;
    set(index.set(vip_index_slot(bit), 1, 0), maps::VIP_INDEX)?;
    let mut by_id: Array<_, VipEntry> = map_of(&mut ebpf, path, maps::VIP_BY_ID)?.try_into()?;
    set(by_id.set(0, VipEntry { key, info }, 0), maps::VIP_BY_ID)?;
    let mut backends: Array<_, Backend> = map_of(&mut ebpf, path, maps::BACKENDS)?.try_into()?;
    for id in 1..=3u32 {
        let backend = Backend {
            dst_mac: [0x02, 0, 0, 0xc8, 0, 0x10 + id as u8],
            src_mac: LB_MAC,
            ifindex: 1,
            generation: 1,
            family: FAMILY_V4,
            ..Backend::default()
        };
        set(backends.set(id, backend, 0), maps::BACKENDS)?;
    }
    let mut rings: Array<_, RingChunk> = map_of(&mut ebpf, path, maps::RINGS)?.try_into()?;
    for c in 0..chunks {
        let mut chunk = [EMPTY_SLOT; RING_CHUNK_SLOTS as usize];
        for (i, slot) in chunk.iter_mut().enumerate() {
            *slot = (c * RING_CHUNK_SLOTS + i as u32) % 3 + 1;
        }
        let at = ring_chunk_index(0, 0, chunks, c * RING_CHUNK_SLOTS);
        set(rings.set(at, chunk, 0), maps::RINGS)?;
    }
    Ok(ebpf)
}

fn ab(
    objects: &[std::path::PathBuf],
    rounds: u32,
    repeat: u32,
    new_flows: u32,
    flows: u32,
) -> Result<Value> {
    require_root()?;
    ensure!(
        repeat >= 1 && new_flows >= 1,
        "repetitions must be at least 1"
    );
    let machine = Machine::start();
    let cpu = machine.nproc - 1;
    pin_thread(cpu)?;
    let mut lbs: Vec<Ebpf> = objects
        .iter()
        .map(|p| load_object(p, flows))
        .collect::<Result<_>>()?;
    let mut obj = BenchObject::load(1024)?;
    let mut jump: ProgramArray<MapData> = obj.take_map(bench::JUMP)?;
    let established = tcp_frame(VIP4, 40000, 80, TCP_ACK);
    let new_flow = tcp_frame(VIP4, 40001, 80, TCP_SYN);
    let not_vip = tcp_frame(NOT_VIP4, 40000, 80, TCP_ACK);
    let k = lbs.len();
    let (mut a, mut b, mut c) = (
        vec![Vec::new(); k],
        vec![Vec::new(); k],
        vec![Vec::new(); k],
    );
    let started = Instant::now();
    for round in 0..rounds as usize {
        let reset = time_behind_reset(
            &mut obj,
            &mut jump,
            bench::TX,
            &new_flow,
            new_flows,
            "reset",
        )?;
        for j in 0..k {
            let i = (j + round) % k;
            let program: &mut Xdp = lbs[i]
                .program_mut(programs::LB)
                .and_then(|p| p.try_into().ok())
                .expect("checked at load");
            // The first packet makes the flow (again, after evictions).
            time_run(program, &established, 1, XDP_TX, "established (first)")?;
            a[i].push(time_run(
                program,
                &established,
                repeat,
                XDP_TX,
                "established",
            )?);
            c[i].push(time_run(program, &not_vip, repeat, XDP_PASS, "not a VIP")?);
            let fd = program.fd().context("xlb_lb fd")?.try_clone()?;
            jump.set(0, &fd, 0).context("jump slot")?;
            let raw = time_run(
                obj.program(bench::RESET),
                &new_flow,
                new_flows,
                XDP_TX,
                "new flow",
            )?;
            b[i].push(raw - reset);
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "ab: {rounds} rounds on CPU {cpu} in {:.1} s; medians, and the median of the paired \
         differences with {}:",
        elapsed.as_secs_f64(),
        objects[0].display()
    );
    let mut rows = Vec::new();
    for i in 0..k {
        let case = |runs: &[Vec<f64>]| {
            let diffs: Vec<f64> = runs[i].iter().zip(&runs[0]).map(|(x, y)| x - y).collect();
            json!({"median": median(&runs[i]), "paired_difference": median(&diffs), "ns_per_packet": runs[i]})
        };
        let program: &Xdp = lbs[i]
            .program(programs::LB)
            .and_then(|p| p.try_into().ok())
            .expect("checked at load");
        let row = json!({
            "object": objects[i].display().to_string(),
            "program": program_size(program)?,
            "established_tcp": case(&a),
            "new_flow_net": case(&b),
            "non_vip_pass": case(&c),
        });
        let f = |case: &str, what: &str| row[case][what].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "  {:<40} (a) {:6.1} ({:+6.1})  (b) {:6.1} ({:+6.1})  (c) {:6.1} ({:+6.1})  \
             verifier walked {}",
            objects[i].display(),
            f("established_tcp", "median"),
            f("established_tcp", "paired_difference"),
            f("new_flow_net", "median"),
            f("new_flow_net", "paired_difference"),
            f("non_vip_pass", "median"),
            f("non_vip_pass", "paired_difference"),
            row["program"]["verifier_insns_processed"],
        );
        rows.push(row);
    }
    Ok(json!({
        "benchmark": "ab",
        "machine": machine.finish(),
        "method": "BPF_PROG_TEST_RUN of each object's xlb_lb in one process, in rounds; each \
                   round times every object once per case, starting with a different object. \
                   new_flow_net: behind xlb_bench_reset (a fresh 5-tuple each repetition), \
                   minus the reset step alone timed at the start of the round. \
                   paired_difference: median over rounds of (object - first object).",
        "rounds": rounds,
        "flow_table_size": flows,
        "repeat": repeat,
        "new_flows": new_flows,
        "cpu": cpu,
        "elapsed_s": round(elapsed.as_secs_f64(), 2),
        "objects": rows,
    }))
}

// ---------------------------------------------------------------- veth

fn run_cmd(args: &[&str]) -> Result<()> {
    let out = Process::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    ensure!(
        out.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn setns(file: &File) -> io::Result<()> {
    // SAFETY: a valid namespace file descriptor; affects this thread only.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A named network namespace this process created and the calling thread
/// entered. Threads and commands started from this thread afterwards run
/// in it. Dropping returns the thread home and deletes the namespace (and
/// with it the veth pair).
struct Netns {
    name: &'static str,
    home: File,
}

impl Netns {
    fn create_and_enter(name: &'static str) -> Result<Netns> {
        let home = File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
        if Path::new("/run/netns").join(name).exists() {
            // Left by an interrupted run: the name is ours.
            run_cmd(&["ip", "netns", "del", name])?;
        }
        run_cmd(&["ip", "netns", "add", name])?;
        let ns = Netns { name, home };
        let file = File::open(format!("/run/netns/{name}"))
            .with_context(|| format!("opening netns {name}"))?;
        setns(&file).with_context(|| format!("entering netns {name}"))?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.home) {
            eprintln!("xdplb-bench: returning to the original netns: {e}");
        }
        if let Err(e) = run_cmd(&["ip", "netns", "del", self.name]) {
            eprintln!("xdplb-bench: removing netns {}: {e:#}", self.name);
        }
    }
}

fn napi_threads(dev: &str) -> Vec<u32> {
    let prefix = format!("napi/{dev}-");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        comm.starts_with(&prefix).then_some(pid)
    })
    .collect()
}

/// Moves `dev`'s receive processing (where its XDP program runs) into a
/// NAPI kernel thread pinned to `cpu`, off the generator's CPU. veth has a
/// NAPI instance outside XDP only with GRO on; sysfs is written through
/// `ip netns exec`, which mounts the namespace's own /sys.
fn thread_napi(dev: &str, cpu: usize) -> Result<()> {
    run_cmd(&["ethtool", "-K", dev, "gro", "on"])?;
    let before = napi_threads(dev);
    run_cmd(&[
        "ip",
        "netns",
        "exec",
        VETH_NETNS,
        "sh",
        "-c",
        &format!("echo 1 > /sys/class/net/{dev}/threaded"),
    ])?;
    let new: Vec<u32> = napi_threads(dev)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    let [pid] = new[..] else {
        anyhow::bail!("expected one new NAPI thread for {dev}, found {new:?}");
    };
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(
            pid as libc::pid_t,
            std::mem::size_of::<libc::cpu_set_t>(),
            &set,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("pinning NAPI thread {pid} of {dev} to CPU {cpu}"));
    }
    Ok(())
}

fn mac_text(mac: [u8; 6]) -> String {
    MacAddr(mac).to_string()
}

/// (busy, total) jiffies per CPU from /proc/stat.
fn cpu_times() -> Vec<(u64, u64)> {
    std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            // idle and iowait
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

/// One measured window of a veth run.
struct VethSample {
    /// Busy fraction of each CPU over the window.
    cpu_busy: Vec<f64>,
    /// Frames the generator sent.
    offered: u64,
    /// Frames that came back to the sink on `bgen`.
    returned: u64,
    /// Packets the load balancer counted on its VIP (LB runs only).
    processed: Option<u64>,
    seconds: f64,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {}

/// Makes `STOP_SIGNAL` interrupt a running test run (BPF_PROG_TEST_RUN
/// checks for pending signals between batches and returns EINTR) without
/// killing the process.
fn install_stop_signal() -> Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler and an empty mask;
    // the handler does nothing, so it is async-signal-safe. No SA_RESTART.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(STOP_SIGNAL, &action, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("installing the SIGUSR1 handler");
    }
    Ok(())
}

const STOP_SIGNAL: libc::c_int = libc::SIGUSR1;

fn is_eintr(e: &aya::programs::ProgramError) -> bool {
    matches!(e, aya::programs::ProgramError::SyscallError(s)
        if s.io_error.raw_os_error() == Some(libc::EINTR))
}

/// Runs the generator on CPU 0 while the main thread measures `seconds`
/// after a warm-up. The generator is one test run of up to 2^32 frames,
/// stopped by a signal: each BPF_PROG_TEST_RUN call costs ~15 ms of fixed
/// overhead here (the kernel swaps its XDP dispatcher), which must not
/// fall inside the measured window.
fn veth_window(
    generator: &mut Xdp,
    frame: &[u8],
    seconds: f64,
    counts: &PerCpuArray<MapData, u64>,
    lb: Option<(&Dataplane, &State)>,
) -> Result<VethSample> {
    let stop = AtomicBool::new(false);
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    thread::scope(|scope| {
        let stop = &stop;
        let handle = scope.spawn(move || -> Result<()> {
            pin_thread(GEN_CPU)?;
            // SAFETY: pthread_self has no preconditions.
            let _ = tid_tx.send(unsafe { libc::pthread_self() });
            while !stop.load(Ordering::SeqCst) {
                match generator.test_run(TestRunOptions {
                    data_in: Some(frame),
                    repeat: u32::MAX,
                    attrs: TestRunAttrs::new().xdp_live_frames(GEN_BATCH),
                    ..TestRunOptions::default()
                }) {
                    Ok(_) => {}
                    Err(e) if is_eintr(&e) => {}
                    Err(e) => {
                        return Err(e).context(
                            "generator: BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES \
                             (xlb_bench_gen redirecting into bgen)",
                        )
                    }
                }
            }
            Ok(())
        });
        let tid = tid_rx.recv().ok();
        let measured = (|| -> Result<VethSample> {
            thread::sleep(WARMUP);
            ensure!(
                !handle.is_finished(),
                "the generator stopped during warm-up"
            );
            let read = || -> Result<(u64, u64, Option<u64>, Instant)> {
                let processed = lb.map(vip_totals).transpose()?.map(|c| c.packets);
                Ok((
                    per_cpu_sum(counts, bench::COUNT_GEN)?,
                    per_cpu_sum(counts, bench::COUNT_SINK)?,
                    processed,
                    Instant::now(),
                ))
            };
            let c0 = cpu_times();
            let (g0, s0, p0, t0) = read()?;
            let deadline = t0 + Duration::from_secs_f64(seconds);
            while Instant::now() < deadline {
                ensure!(!INTERRUPTED.load(Ordering::Relaxed), "interrupted");
                ensure!(!handle.is_finished(), "the generator stopped early");
                thread::sleep(Duration::from_millis(20).min(deadline - Instant::now()));
            }
            let (g1, s1, p1, t1) = read()?;
            let cpu_busy = cpu_times()
                .iter()
                .zip(&c0)
                .map(|(&(b1, t1), &(b0, t0))| (b1 - b0) as f64 / (t1 - t0).max(1) as f64)
                .collect();
            Ok(VethSample {
                cpu_busy,
                offered: g1 - g0,
                returned: s1 - s0,
                processed: p0.zip(p1).map(|(a, b)| b - a),
                seconds: (t1 - t0).as_secs_f64(),
            })
        })();
        stop.store(true, Ordering::SeqCst);
        // Repeated: a signal that lands just before the thread enters the
        // syscall interrupts nothing.
        while !handle.is_finished() {
            if let Some(tid) = tid {
                // SAFETY: the thread is alive (not finished, and joined
                // only below).
                unsafe { libc::pthread_kill(tid, STOP_SIGNAL) };
            }
            thread::sleep(Duration::from_millis(5));
        }
        let generated = handle
            .join()
            .map_err(|_| anyhow!("the generator thread panicked"))?;
        // The generator's own error explains an early stop best.
        generated?;
        measured
    })
}

fn veth(seconds: f64, runs: u32, napi_cpu: Option<usize>) -> Result<Value> {
    require_root()?;
    ensure!(seconds > 0.0, "--seconds must be positive");
    let machine = Machine::start();
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed));
    install_stop_signal()?;

    // Dropped last: everything below lives in the namespace.
    let _netns = Netns::create_and_enter(VETH_NETNS)?;
    let gen_mac = [0x02, 0, 0, 0xc8, 0x01, 0x01];
    let lb_mac = [0x02, 0, 0, 0xc8, 0x01, 0x02];
    run_cmd(&["ip", "link", "set", "lo", "up"])?;
    run_cmd(&[
        "ip",
        "link",
        "add",
        VETH_GEN,
        "address",
        &mac_text(gen_mac),
        "type",
        "veth",
        "peer",
        "name",
        VETH_LB,
        "address",
        &mac_text(lb_mac),
    ])?;
    run_cmd(&["ip", "link", "set", VETH_GEN, "up"])?;
    run_cmd(&["ip", "link", "set", VETH_LB, "up"])?;
    if let Some(cpu) = napi_cpu {
        thread_napi(VETH_LB, cpu)?;
    }
    let gen_if = netdev::interface(VETH_GEN)?;
    let lb_if = netdev::interface(VETH_LB)?;

    // One VIP, one backend: the generator's side, reached by XDP_TX.
    let yaml = format!(
        "
interface: {VETH_LB}
datapath:
  ring_size: {DEFAULT_RING_SIZE}
  flow_table_size: {FLOW_TABLE_SIZE}
vips:
  - name: bench
    address: 10.200.100.1
    port: {VETH_PORT}
    protocol: udp
    backends:
      - {{ address: 10.200.0.1, mac: '{}' }}
",
        mac_text(gen_mac)
    );
    let mut resolver = FixedResolver(vec![lb_if.clone()]);
    let (mut dp, state) = load_lb(&yaml, &mut resolver)?;
    // The veth benchmark does not use the helper flow table.
    // The flow-table floors are not run here: the smallest valid table.
    let mut obj = BenchObject::load(FLOW_WAYS)?;
    let mut ports: DevMap<MapData> = obj.take_map(bench::PORTS)?;
    ports
        .set(0, gen_if.ifindex, None, 0)
        .context("generator port -> bgen")?;
    let counts: PerCpuArray<MapData, u64> = obj.take_map(bench::COUNT)?;
    // Frames XDP_TX'd by blb reach bgen only if bgen runs XDP: the sink
    // counts and drops them.
    obj.program(bench::SINK)
        .attach(VETH_GEN, XdpMode::Driver)
        .context("attaching the sink to bgen (native)")?;

    let frame = udp_frame(lb_mac, gen_mac, VETH_PORT, VETH_FRAME_LEN);
    let mut lb = Vec::new();
    let mut reference = Vec::new();
    let started = Instant::now();
    for run in 1..=runs {
        let link = dp
            .program_mut()
            .attach(VETH_LB, XdpMode::Driver)
            .context("attaching xlb_lb to blb (native)")?;
        let sample = veth_window(
            obj.program(bench::GEN),
            &frame,
            seconds,
            &counts,
            Some((&dp, &state)),
        );
        dp.program_mut().detach(link).context("detaching xlb_lb")?;
        let sample = sample?;
        ensure!(
            sample.returned > 0 && sample.processed.unwrap_or(0) > 0,
            "lb: no frame came back through the load balancer ({} offered, {} processed)",
            sample.offered,
            sample.processed.unwrap_or(0)
        );
        lb.push(sample);

        let link = obj
            .program(bench::REFLECT)
            .attach(VETH_LB, XdpMode::Driver)
            .context("attaching xlb_bench_reflect to blb (native)")?;
        let sample = veth_window(obj.program(bench::GEN), &frame, seconds, &counts, None);
        obj.program(bench::REFLECT)
            .detach(link)
            .context("detaching xlb_bench_reflect")?;
        let sample = sample?;
        ensure!(
            sample.returned > 0,
            "reference: no frame came back through the reflector ({} offered)",
            sample.offered
        );
        reference.push(sample);
        let mpps = |s: &VethSample| s.returned as f64 / s.seconds / 1e6;
        let (l, r) = (&lb[lb.len() - 1], &reference[reference.len() - 1]);
        eprintln!(
            "run {run}/{runs}: lb {:.3} Mpps (offered {:.3}, CPUs busy {:?}), reference {:.3} \
             Mpps (offered {:.3}, CPUs busy {:?})",
            mpps(l),
            l.offered as f64 / l.seconds / 1e6,
            rounded(&l.cpu_busy, 2),
            mpps(r),
            r.offered as f64 / r.seconds / 1e6,
            rounded(&r.cpu_busy, 2),
        );
    }
    let elapsed = started.elapsed();

    let rate = |v: &[VethSample], f: &dyn Fn(&VethSample) -> u64| -> Vec<f64> {
        v.iter().map(|s| f(s) as f64 / s.seconds / 1e6).collect()
    };
    let lb_mpps = rate(&lb, &|s| s.returned);
    let ref_mpps = rate(&reference, &|s| s.returned);
    let (lb_median, ref_median) = (median(&lb_mpps), median(&ref_mpps));
    let case = |samples: &[VethSample], mpps: &[f64], extra: Option<Vec<f64>>| {
        let mut v = json!({
            "mpps": rounded(mpps, 3),
            "median": round(median(mpps), 3),
            "offered_mpps": rounded(&rate(samples, &|s| s.offered), 3),
            "seconds": rounded(&samples.iter().map(|s| s.seconds).collect::<Vec<_>>(), 3),
            "cpu_busy": samples.iter().map(|s| rounded(&s.cpu_busy, 2)).collect::<Vec<_>>(),
        });
        if let Some(p) = extra {
            v["processed_mpps"] = json!(rounded(&p, 3));
            v["processed_median"] = json!(round(median(&p), 3));
        }
        v
    };
    let processed = rate(&lb, &|s| s.processed.unwrap_or(0));
    // One CPU does everything only when NAPI runs in softirq beside the
    // generator: then 1/rate is that CPU's time per packet.
    let extra_ns = napi_cpu
        .is_none()
        .then(|| 1e3 / lb_median - 1e3 / ref_median);
    eprintln!(
        "\nveth: {runs} runs of {seconds} s in {:.1} s; median lb {lb_median:.3} Mpps, \
         reference {ref_median:.3} Mpps, ratio {:.3}{}",
        elapsed.as_secs_f64(),
        lb_median / ref_median,
        extra_ns.map_or(String::new(), |ns| format!(
            ", the load balancer costs {ns:.0} ns/packet more"
        ))
    );
    Ok(json!({
        "benchmark": "veth",
        "machine": machine.finish(),
        "method": format!(
            "netns {VETH_NETNS}, veth {VETH_GEN} <-> {VETH_LB}, native XDP on both. Generator: \
             xlb_bench_gen run by BPF_PROG_TEST_RUN with live frames (batch {GEN_BATCH}, \
             one call stopped by a signal) on CPU {GEN_CPU}, redirecting one {VETH_FRAME_LEN}-byte \
             UDP frame to the VIP into {VETH_GEN}. On {VETH_LB} ({}): xlb_lb (1 VIP, 1 backend = \
             {VETH_GEN}'s MAC, one flow: established path) or xlb_bench_reflect, both XDP_TX \
             back to {VETH_GEN}, whose xlb_bench_sink counts and drops. mpps = frames counted \
             by the sink per second, after a {} ms warm-up; processed_mpps = the VIP's packet \
             counter; offered_mpps = frames the generator sent (veth drops what the receiver \
             cannot take). With one CPU doing all the work (softirq mode), 1000 / mpps is \
             its ns per packet, and lb_extra_ns_per_packet = 1000 / lb - 1000 / reference \
             (medians).",
            match napi_cpu {
                Some(cpu) => format!("threaded NAPI pinned to CPU {cpu}"),
                None => format!("NAPI in softirq on the generator's CPU {GEN_CPU}"),
            },
            WARMUP.as_millis()
        ),
        "generator_cpu": GEN_CPU,
        "napi_cpu": napi_cpu.map_or(json!("softirq"), |c| json!(c)),
        "seconds": seconds,
        "runs": runs,
        "frame_len": VETH_FRAME_LEN,
        "elapsed_s": round(elapsed.as_secs_f64(), 2),
        "cases": {
            "lb": case(&lb, &lb_mpps, Some(processed)),
            "reference_reflect": case(&reference, &ref_mpps, None),
        },
        "ratio_lb_to_reference": round(lb_median / ref_median, 3),
        "lb_extra_ns_per_packet": extra_ns.map(|ns| round(ns, 1)),
    }))
}

// ---------------------------------------------------------------- maglev

fn maglev_bench(runs: u32) -> Result<Value> {
    let machine = Machine::start();
    let size = DEFAULT_RING_SIZE;
    let sizes = [10u32, 100, 1000];
    let members: Vec<Vec<maglev::Member>> = sizes
        .iter()
        .map(|&n| {
            (0..n)
                .map(|i| maglev::Member {
                    identity: format!("10.200.{}.{}", i / 256, i % 256).into_bytes(),
                    weight: 1,
                    id: i,
                })
                .collect()
        })
        .collect();
    let mut baseline = Vec::new();
    let mut builds: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    // Untimed warm-up: the first allocation of a table faults its pages in.
    for m in &members {
        black_box(maglev::build(m, size).context("building a Maglev table")?);
    }
    let started = Instant::now();
    for run in 1..=runs {
        let t = Instant::now();
        let mut table = vec![EMPTY_SLOT; size as usize];
        for (i, slot) in table.iter_mut().enumerate() {
            *slot = i as u32 % 10;
        }
        black_box(&table);
        drop(table);
        baseline.push(t.elapsed().as_secs_f64() * 1e6);
        for (k, m) in members.iter().enumerate() {
            let t = Instant::now();
            let table = maglev::build(black_box(m), size).context("building a Maglev table")?;
            builds[k].push(t.elapsed().as_secs_f64() * 1e6);
            ensure!(
                table.iter().all(|&id| id < sizes[k]),
                "a Maglev table of {} backends has an empty slot",
                sizes[k]
            );
        }
        eprintln!(
            "run {run}/{runs}: fill {:.1} us, {}",
            baseline[baseline.len() - 1],
            sizes
                .iter()
                .zip(&builds)
                .map(|(n, b)| format!("{n} backends {:.1} us", b[b.len() - 1]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let base = median(&baseline);
    let mut cases = serde_json::Map::new();
    cases.insert(
        "baseline_fill".into(),
        json!({ "us": rounded(&baseline, 1), "median": round(base, 1) }),
    );
    eprintln!("\nmaglev build, {size} slots, {runs} runs, median:");
    eprintln!("  {:<14} {base:>10.1} us", "fill (baseline)");
    for (n, b) in sizes.iter().zip(&builds) {
        let m = median(b);
        eprintln!(
            "  {:<14} {m:>10.1} us  x{:.0} baseline",
            format!("{n} backends"),
            m / base
        );
        cases.insert(
            format!("backends_{n}"),
            json!({
                "us": rounded(b, 1),
                "median": round(m, 1),
                "ratio_to_baseline": round(m / base, 1),
            }),
        );
    }
    Ok(json!({
        "benchmark": "maglev",
        "machine": machine.finish(),
        "method": "lb_common::maglev::build with equal weights; baseline_fill = allocate a \
                   table of the same size and write every slot. Wall time in microseconds.",
        "ring_size": size,
        "runs": runs,
        "elapsed_s": round(started.elapsed().as_secs_f64(), 2),
        "cases": Value::Object(cases),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn frames_have_the_announced_length() {
        assert_eq!(udp_frame(LB_MAC, CLIENT_MAC, 53, 64).len(), 64);
        assert_eq!(tcp_frame(VIP4, 1, 80, TCP_ACK).len(), 54);
    }
}
