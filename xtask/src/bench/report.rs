//! `docs/benchmarks.md`, `docs/benchmarks.png` and the stdout summary.

use std::{fmt::Write as _, path::Path};

use anyhow::{anyhow, Context, Result};
use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use super::{
    http::{HttpResults, Way},
    Results, BACKENDS,
};

/// Target ratios of the end-to-end benchmark (requests/s medians).
const TARGET_A_OVER_B: f64 = 0.9;
const TARGET_A_OVER_C: f64 = 1.5;

/// The chart's font, read at run time (fonts-dejavu-core): plotters'
/// ab_glyph text needs no fontconfig.
const FONT_FILE: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT_BOLD_FILE: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf";
const FONT: &str = "sans-serif";

/// `s` with the workspace root removed from paths (`target/release/...`).
pub fn clean(s: &str) -> String {
    s.replace(
        &format!("{}/", crate::daemon::workspace_root().display()),
        "",
    )
}

fn f(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "n/a".into()
    }
}

fn list(v: &[f64], digits: usize) -> String {
    v.iter()
        .map(|x| f(*x, digits))
        .collect::<Vec<_>>()
        .join(", ")
}

fn yes_no(ok: bool) -> &'static str {
    if ok {
        "yes"
    } else {
        "**no**"
    }
}

fn ratio_rows(h: &HttpResults) -> Vec<(String, f64, Option<f64>)> {
    vec![
        (
            "A / B (xdplb vs no LB)".into(),
            h.ratio(Way::Xdplb, Way::Direct),
            Some(TARGET_A_OVER_B),
        ),
        (
            "A / C (xdplb vs HAProxy)".into(),
            h.ratio(Way::Xdplb, Way::Haproxy),
            Some(TARGET_A_OVER_C),
        ),
        (
            "A / D (xdplb vs nftables DNAT)".into(),
            h.ratio(Way::Xdplb, Way::Nft),
            None,
        ),
        (
            "A / E (xdplb vs a bare XDP forwarder on the same hop)".into(),
            h.ratio(Way::Xdplb, Way::Fwd),
            None,
        ),
        (
            "E / B (the bare forwarder vs no LB)".into(),
            h.ratio(Way::Fwd, Way::Direct),
            None,
        ),
    ]
}

/// The stdout summary: every table, compact.
pub fn summary(r: &Results) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(
        s,
        "== xdplb benchmarks{} ({}) ==\nmachine: kernel {}, {}, {} CPUs, {} GiB; loadavg before \
         [{}] after [{}]; steal {}%",
        if r.quick { ", quick" } else { "" },
        r.date,
        m.kernel,
        m.cpu_model,
        m.nproc,
        m.mem_gib,
        m.loadavg_before,
        m.loadavg_after,
        f(m.steal_percent, 2)
    );
    let _ = writeln!(
        s,
        "\n1. in-kernel ns/packet (median of runs), ratio to (d):"
    );
    match &r.kernel {
        Ok(k) => {
            for c in &k.cases {
                let _ = writeln!(
                    s,
                    "   ({}) {:<36} {:>7} ns  x{}",
                    c.label,
                    c.what,
                    f(c.median_ns, 0),
                    f(c.ratio, 2)
                );
            }
        }
        Err(e) => {
            let _ = writeln!(s, "   FAILED: {e}");
        }
    }
    let _ = writeln!(s, "\n2. veth Mpps (median):");
    match &r.veth {
        Ok(v) => {
            let _ = writeln!(
                s,
                "   xdplb {} Mpps, reference reflector {} Mpps, ratio {}{}",
                f(v.lb_mpps, 3),
                f(v.reference_mpps, 3),
                f(v.ratio, 3),
                v.extra_ns
                    .map(|n| format!(" (+{} ns/packet)", f(n, 0)))
                    .unwrap_or_default()
            );
        }
        Err(e) => {
            let _ = writeln!(s, "   FAILED: {e}");
        }
    }
    let _ = writeln!(
        s,
        "\n3. HTTP, new connection per request (medians of {} interleaved runs):",
        r.runs
    );
    match &r.http {
        Ok(h) => {
            for w in &h.ways {
                let _ = writeln!(
                    s,
                    "   {} {:<22} {:>8} req/s  p50 {:>6} ms  p99 {:>6} ms  CPU {:>3}% {:>4} \
                     us/req  errors {}  SYN retransmits {}",
                    w.way.letter(),
                    w.way.name(),
                    f(w.rps(), 0),
                    f(w.p50(), 2),
                    f(w.p99(), 2),
                    f(w.cpu_busy() * 100.0, 0),
                    f(w.cpu_us_per_request(), 0),
                    w.errors(),
                    w.syn_retrans()
                );
            }
            for (name, v, target) in ratio_rows(h) {
                let t = target
                    .map(|t| {
                        format!(
                            " (target >= {t}: {})",
                            if v >= t { "met" } else { "NOT met" }
                        )
                    })
                    .unwrap_or_default();
                let _ = writeln!(s, "   {name:<32} {}{t}", f(v, 2));
            }
            let _ = writeln!(
                s,
                "   xdplb new flows per backend during A: {}",
                h.a_new_flows
                    .iter()
                    .map(|(b, n)| format!("{b}={n}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        Err(e) => {
            let _ = writeln!(s, "   FAILED: {e}");
        }
    }
    let _ = writeln!(s, "\n4. control plane:");
    match &r.maglev {
        Ok(m) => {
            let _ = writeln!(
                s,
                "   Maglev build ({} slots): {}; fill baseline {} ms",
                m.ring_size,
                m.builds
                    .iter()
                    .map(|(n, med, _)| format!("{n} backends {} ms", f(med / 1e3, 2)))
                    .collect::<Vec<_>>()
                    .join(", "),
                f(m.baseline_us / 1e3, 3)
            );
        }
        Err(e) => {
            let _ = writeln!(s, "   Maglev FAILED: {e}");
        }
    }
    match &r.drain {
        Ok(d) => {
            let _ = writeln!(
                s,
                "   drain -> no new connection to b1: {} ms (median of {}; last b1 connection at \
                 {} ms; CLI {} ms; resolution {} ms; b1 after CLI returned: {})",
                f(d.visible_ms(), 2),
                d.runs.len(),
                f(d.last_b1_ms(), 2),
                f(d.cli_ms(), 2),
                f(d.gap_ms(), 3),
                d.b1_after_cli()
            );
        }
        Err(e) => {
            let _ = writeln!(s, "   drain FAILED: {e}");
        }
    }
    let _ = writeln!(
        s,
        "\ntotal {:.1} s (measurements {:.1} s: {})",
        r.total_s,
        r.measure_s,
        r.part_s
            .iter()
            .map(|(n, t)| format!("{n} {t:.1} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    s
}

fn failed(md: &mut String, e: &str) {
    let _ = writeln!(md, "**This part failed in this run:**\n\n```\n{e}\n```\n");
}

/// `docs/benchmarks.md`.
#[expect(clippy::too_many_lines, reason = "one linear document")]
pub fn markdown(r: &Results, chart_ok: bool) -> String {
    let mut md = String::new();
    let m = &r.machine;
    let cmd = if r.quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let _ = writeln!(
        md,
        "# xdplb benchmarks\n\n<!-- Generated by `{cmd}`; every run rewrites this file and \
         benchmarks.png. Do not edit by hand. -->\n"
    );
    if r.quick {
        let _ = writeln!(
            md,
            "> **Quick run** (`cargo xtask bench --quick`): the same number of runs, each \
             shorter, so these numbers are noisier than a full `cargo xtask bench`.\n"
        );
    }
    let _ = writeln!(
        md,
        "Run on {} with `{cmd}`{}. Every figure stands beside a baseline measured in the same \
         run; each value is the median of {} runs (the individual runs are listed).\n",
        r.date,
        if r.quick { " (quick)" } else { " (full)" },
        r.runs
    );

    let _ = writeln!(md, "## Machine\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| kernel | {} |", m.kernel);
    let _ = writeln!(md, "| CPU | {} |", m.cpu_model);
    let _ = writeln!(md, "| CPUs (nproc) | {} |", m.nproc);
    let _ = writeln!(md, "| memory | {} GiB |", m.mem_gib);
    let _ = writeln!(md, "| /proc/loadavg before | `{}` |", m.loadavg_before);
    let _ = writeln!(md, "| /proc/loadavg after | `{}` |", m.loadavg_after);
    let _ = writeln!(
        md,
        "| CPU steal during the run | {} % |",
        f(m.steal_percent, 2)
    );
    let _ = writeln!(
        md,
        "| CPU performance counters (PMU) | {} |",
        if m.cpu_pmu {
            "present"
        } else {
            "none (no `cpu` device under /sys/bus/event_source/devices)"
        }
    );
    let _ = writeln!(
        md,
        "| time | {:.0} s in all, {:.0} s measuring ({}) |\n",
        r.total_s,
        r.measure_s,
        r.part_s
            .iter()
            .map(|(n, t)| format!("{n} {t:.0} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        md,
        "A virtual machine with {} CPUs: the load generators, the servers, the load balancer \
         and the kernel's softirq work all share them, and other tenants may too (load average \
         and steal above). Absolute numbers are this machine's; the ratios to the same-run \
         baselines are what carries over.\n",
        m.nproc
    );

    if chart_ok {
        let _ = writeln!(md, "![benchmark chart](benchmarks.png)\n");
    }

    commands(&mut md, r, cmd);

    // ---- 1
    let _ = writeln!(md, "## 1. In-kernel cost per packet\n");
    match &r.kernel {
        Ok(k) => {
            let _ = writeln!(
                md,
                "`{}`: the production `xlb_lb` program and maps through BPF_PROG_TEST_RUN, \
                 {} repetitions per run, {} runs interleaved across the cases, on CPU {}. \
                 Baseline: (d), a program that only swaps the MAC addresses and returns \
                 XDP_TX. Targets (issue 4): (a) at most 60 ns and at most 3x (d); (b) at \
                 most 350 ns per new flow.\n",
                clean(&k.command),
                k.repeat,
                k.runs,
                k.cpu
            );
            let _ = writeln!(
                md,
                "| case | what | ns/packet (median) | ratio to (d) | runs (ns) |\n|---|---|--:|--:|---|"
            );
            for c in &k.cases {
                let _ = writeln!(
                    md,
                    "| ({}) | {} | {} | {} | {} |",
                    c.label,
                    c.what,
                    f(c.median_ns, 0),
                    f(c.ratio, 2),
                    list(&c.runs_ns, 0)
                );
            }
            let case = |label: &str| k.cases.iter().find(|c| c.label == label);
            let _ = writeln!(md, "\n| target | measured | met |\n|---|--:|---|");
            if let Some(a) = case("a") {
                let _ = writeln!(
                    md,
                    "| (a) established TCP at most 60 ns | {} ns | {} |",
                    f(a.median_ns, 0),
                    yes_no(a.median_ns <= 60.0)
                );
                let _ = writeln!(
                    md,
                    "| (a) established TCP at most 3x (d) | {}x | {} |",
                    f(a.ratio, 2),
                    yes_no(a.ratio <= 3.0)
                );
            }
            if let Some(b) = case("b") {
                let _ = writeln!(
                    md,
                    "| (b) new flow at most 350 ns | {} ns | {} |",
                    f(b.median_ns, 0),
                    yes_no(b.median_ns <= 350.0)
                );
            }
            if let (
                Some(a),
                Some(b),
                Some(d),
                Some(a0),
                Some(b0),
                Some(bm),
                Some(bc),
                Some(al),
                Some(bl),
            ) = (
                case("a"),
                case("b"),
                case("d"),
                case("a0"),
                case("b0"),
                case("bM"),
                case("bC"),
                case("aL"),
                case("bL"),
            ) {
                let _ = writeln!(
                    md,
                    "\n(a0) and (b0) are the floor under (a) and (b): the flow table alone, in \
                     the same runs, with xdplb's own table code and size. A program parses the \
                     same frame, builds the same flow key and does one lookup in (a0) (then \
                     swaps the MACs, XDP_TX), or one insert (both bucket locks, victim slot, \
                     write) behind the same reset step in (b0). One flow-table hit costs {} ns \
                     here, {} ns more than (d); xdplb's whole established path adds {} ns to \
                     it (backend entry, counters, rewrite). One insert costs {} ns; \
                     xdplb's new-flow path adds {} ns to it (the VIP filter and entry, \
                     Maglev slot, backend entry, counters, rewrite).\n\n\
                     (bM) is the memory under (b0): the same key, one 8-byte read of each of \
                     its two buckets in the same table and nothing else, {} ns. That is what \
                     reading two random places of a table this size costs on this machine, \
                     before any lock, compare or write: mostly the memory's latency (the two \
                     reads overlap), with a TLB miss each on 4 KiB pages under the \
                     hypervisor's nested paging.\n\n\
                     (bC) is (b) again, net of the same reset step, into a second load \
                     balancer of the same object and VIP whose flow table holds 4096 flows \
                     (512 KiB, which stays in the CPU caches), evicting like (b) once full: \
                     {} ns. That is the new-flow path's own work (the VIP, the Maglev slot, \
                     both bucket locks, the lookup under them, the choice of a slot, the \
                     write, counters and rewrite); the other {} ns of (b) are the wait for \
                     the flow's buckets, close to what (bM) costs alone.\n\n\
                     (aL) and (bL) do the same on a kernel LRU hash of the same key and value \
                     with 2^20 entries, what the flow table was before this release: one hit \
                     {} ns, one `BPF_NOEXIST` insert {} ns. The kernel's hash map costs a \
                     helper call, jhash over the 40-byte key and a memcmp call per lookup \
                     (each call and return goes through this VM's retpoline and return-thunk \
                     mitigations), and an LRU insert touches free lists and evicts across the \
                     table; xdplb's table is inlined array reads and a few multiplies.",
                    f(a0.median_ns, 0),
                    f(a0.median_ns - d.median_ns, 0),
                    f(a.median_ns - a0.median_ns, 0),
                    f(b0.median_ns, 0),
                    f(b.median_ns - b0.median_ns, 0),
                    f(bm.median_ns, 0),
                    f(bc.median_ns, 0),
                    f(b.median_ns - bc.median_ns, 0),
                    f(al.median_ns, 0),
                    f(bl.median_ns, 0),
                );
            }
            let _ = writeln!(
                md,
                "\n(b) sends a TCP SYN with a fresh source address and port each time: the \
                 VIP's entry (two array reads: index slot, then entry by id; no hash \
                 lookup), a Maglev lookup, then under the flow's two bucket locks the \
                 lookup that finds no entry and an insert into the flow table sized for \
                 2^20 flows (2^21 slots of one 64-byte cache line each, in buckets of 4; a \
                 packet looks its two buckets up once and reaches their slots through those \
                 two pointers; the Maglev slot comes from the same hash; a SYN skips the \
                 lockless lookup other packets make first). The reset \
                 step that rewrites the packet ({} ns) is measured alone and subtracted from \
                 the raw figure ({} ns). {}\n",
                f(k.reset_ns, 0),
                f(k.new_flow_raw_ns, 0),
                new_flow_split(k)
            );
            program_paragraph(&mut md, k, m.cpu_pmu);
        }
        Err(e) => failed(&mut md, e),
    }

    // ---- 2
    let _ = writeln!(md, "## 2. Packets per second over veth\n");
    match &r.veth {
        Ok(v) => {
            let _ = writeln!(
                md,
                "`{}`: 64-byte UDP frames to the VIP, generated in the kernel (live-frame \
                 BPF_PROG_TEST_RUN) into one veth of a pair, native XDP on the other end \
                 sending them back with XDP_TX; {} runs of {} s alternating xdplb and the \
                 reference MAC-swap reflector. One CPU does all the work (generator and NAPI), \
                 so 1000 / Mpps is that CPU's ns per packet.\n",
                clean(&v.command),
                v.runs,
                f(v.seconds, 1)
            );
            let _ = writeln!(
                md,
                "| program | Mpps (median) | ratio to reflector | runs (Mpps) |\n|---|--:|--:|---|"
            );
            let _ = writeln!(
                md,
                "| xdplb (established flow, XDP_TX) | {} | {} | {} |",
                f(v.lb_mpps, 3),
                f(v.ratio, 3),
                list(&v.lb_runs, 3)
            );
            let _ = writeln!(
                md,
                "| reference: MAC-swap reflector | {} | 1.000 | {} |\n",
                f(v.reference_mpps, 3),
                list(&v.reference_runs, 3)
            );
            if let Some(ns) = v.extra_ns {
                let _ = writeln!(
                    md,
                    "xdplb costs {} ns per packet more than the reflector on this path. No \
                     target was set.\n",
                    f(ns, 0)
                );
            }
        }
        Err(e) => failed(&mut md, e),
    }

    // ---- 3
    let _ = writeln!(
        md,
        "## 3. End to end: HTTP requests per second, one new TCP connection per request\n"
    );
    match &r.http {
        Ok(h) => http_section(&mut md, h, r.kernel.as_ref().ok(), m.nproc),
        Err(e) => failed(&mut md, e),
    }

    // ---- 4
    let _ = writeln!(md, "## 4. Control plane\n");
    let _ = writeln!(md, "### Maglev table build\n");
    match &r.maglev {
        Ok(mg) => {
            let _ = writeln!(
                md,
                "`{}`: `lb_common::maglev::build` with equal weights, {} slots, {} runs \
                 interleaved. Baseline: allocating a table of the same size and writing every \
                 slot.\n",
                clean(&mg.command),
                mg.ring_size,
                mg.runs
            );
            let _ = writeln!(
                md,
                "| backends | build (ms, median) | ratio to baseline | runs (ms) |\n|--:|--:|--:|---|"
            );
            for (n, med, runs) in &mg.builds {
                let ms: Vec<f64> = runs.iter().map(|u| u / 1e3).collect();
                let _ = writeln!(
                    md,
                    "| {n} | {} | {} | {} |",
                    f(med / 1e3, 2),
                    f(med / mg.baseline_us, 0),
                    list(&ms, 2)
                );
            }
            let _ = writeln!(
                md,
                "| baseline: fill | {} | 1 | |\n",
                f(mg.baseline_us / 1e3, 3)
            );
        }
        Err(e) => failed(&mut md, e),
    }
    let _ = writeln!(
        md,
        "### From `xdplb backend drain` to the first connection that avoids the backend\n"
    );
    match &r.drain {
        Ok(d) => drain_section(&mut md, d),
        Err(e) => failed(&mut md, e),
    }

    // ---- notes
    let _ = writeln!(md, "## What is not measured\n");
    let _ = writeln!(
        md,
        "- Real NICs, RSS across queues, multi-core scaling: everything here is veth on a \
         {}-CPU VM. Line-rate numbers of a physical NIC cannot be inferred from these.\n\
         - Long-lived connections and throughput in bytes: part 3 is the new-connection rate \
         with tiny responses, the case where a load balancer's per-flow work matters most.\n\
         - IPv6, UDP and large flow tables under memory pressure end to end (the in-kernel \
         case (b) covers the flow-table insert).\n\
         - Health checks, the daemon's flow-table sweep and metrics under load (metrics were \
         off).\n\
         - HAProxy and nftables with tuning beyond the configurations listed under part 3; HAProxy \
         has more features (L7, retries, health checks), nftables keeps per-connection state \
         in conntrack, xdplb's DSR replies bypass the load balancer entirely.\n\
         - Tail latency under overload: wrk keeps a fixed {} connections busy (closed loop), \
         so the latency figures include queueing at the achieved rate, not at a fixed \
         offered rate.\n",
        m.nproc, 32
    );
    md
}

/// The commands behind each part, as run (paths relative to the
/// workspace; `$TMP` is the run's temporary directory).
fn commands(md: &mut String, r: &Results, cmd: &str) {
    let _ = writeln!(
        md,
        "## Commands\n\n`{cmd}` (as root) builds `xdplb` and `xdplb-bench` (`cargo build \
         --release -p lb-userspace`), then runs, in this order:\n"
    );
    let code = |c: &str| format!("`{c}`");
    let mut lines = Vec::new();
    if let Ok(k) = &r.kernel {
        lines.push(("1", code(&clean(&k.command))));
    }
    if let Ok(v) = &r.veth {
        lines.push(("2", code(&clean(&v.command))));
    }
    if let Ok(m) = &r.maglev {
        lines.push(("4", code(&clean(&m.command))));
    }
    lines.push((
        "3 and 4",
        format!(
            "the topology of `cargo xtask topology up --backends {BACKENDS}` (plus \
             `net.ipv4.tcp_tw_reuse=1` in xlb-client) and way E's forwarder host `{}` (its \
             address {} on every backend's lo, the client's route to it), nginx in each \
             backend, HAProxy and `xdplb run` in xlb-lb, `xdplb-bench fwd` in `{}`",
            crate::topology::FWD_NS,
            crate::topology::FWD_VIP4,
            crate::topology::FWD_NS
        ),
    ));
    if let Ok(h) = &r.http {
        lines.push(("3", code(&h.wrk_example)));
    }
    if let Ok(d) = &r.drain {
        lines.push(("4", code(&clean(&d.drain_cmd))));
    }
    for (part, l) in lines {
        let _ = writeln!(md, "- part {part}: {l}");
    }
    let _ = writeln!(
        md,
        "\nThe configurations of nginx, HAProxy, nftables, the forwarder and xdplb are under \
         part 3. \
         Everything is removed at the end (or on error or Ctrl-C): the namespaces, the \
         processes, the nft table and the daemon's pins in /sys/fs/bpf/xdplb-bench.\n"
    );
}

/// The load balancer's program as this run loaded it, and how its time
/// can be profiled on this machine.
fn program_paragraph(md: &mut String, k: &super::micro::Kernel, cpu_pmu: bool) {
    let opt = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |n| n.to_string());
    let _ = writeln!(
        md,
        "The load balancer's program, as the kernel held it in this run: {} BPF instructions \
         after the verifier's rewrites (what `bpftool prog dump xlated` lists; a 64-bit \
         immediate load counts twice), {} bytes of x86-64 code; the verifier walked {} \
         instructions to accept it (its limit is 1000000). {}\n",
        opt(k.program_insns),
        opt(k.program_jited_bytes),
        opt(k.verifier_insns),
        if cpu_pmu {
            "This machine exposes CPU performance counters, so `bpftool prog profile` can \
             count the program's cycles and instructions; the figures above still come from \
             BPF_PROG_TEST_RUN's timing."
        } else {
            "This machine exposes no CPU performance counters, so neither `perf` nor \
             `bpftool prog profile` can count cycles here. Where the time goes is measured \
             by ablation instead: datapath builds with one part removed, timed in one process \
             in alternation with the full build (`xdplb-bench ab`; the README's Performance \
             section lists what each change saved)."
        }
    );
}

/// Which regime the new-flow runs measured: a filling table, a full one
/// (every insert evicts), or both.
fn new_flow_split(k: &super::micro::Kernel) -> String {
    match (k.new_flow_filling, k.new_flow_evicting) {
        (Some((fill, nf)), Some((evict, ne))) if nf > 0 && ne > 0 => format!(
            "The table is sized for 2^20 flows (2^21 slots) and each run adds {} of them, so \
             {} stayed within that size ({} ns, median) and the other {ne} went past it, to \
             a full table where every insert evicts the flow seen longest ago in its two \
             buckets ({} ns, median); the table shows the median over all runs.",
            k.repeat,
            if nf == 1 {
                "the first run".to_owned()
            } else {
                format!("the first {nf} runs")
            },
            f(fill, 0),
            f(evict, 0)
        ),
        _ if k.evicting => "Every run went past the table's 2^20 flows (inserts evict the \
                            flow seen longest ago in their two buckets)."
            .into(),
        _ => "No run went past the table's 2^20 flows, so eviction is not included: a full \
              run (`cargo xtask bench`) measures both."
            .into(),
    }
}

fn http_section(
    md: &mut String,
    h: &HttpResults,
    kernel: Option<&super::micro::Kernel>,
    nproc: usize,
) {
    let _ = writeln!(
        md,
        "On the namespace topology (client, LB and {BACKENDS} backends on one bridge) with \
         nginx on each backend answering `bN\\n` on port 8090. wrk runs in the client \
         namespace with `Connection: close`, so every request is a new TCP connection: \
         `{}`. {} runs of {} s per way, interleaved {letters} {letters} …, after one untimed \
         {} s round of each.\n",
        h.wrk_example,
        h.runs,
        h.seconds,
        h.warmup_s,
        letters = Way::ALL.map(Way::letter).join(" ")
    );
    let _ = writeln!(
        md,
        "| way | path | requests/s (median) | p50 ms | p99 ms | CPU busy | CPU µs / request | errors | SYN retransmits | requests | runs (req/s) |\n\
         |---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"
    );
    for w in &h.ways {
        let rps: Vec<f64> = w.runs.iter().map(|x| x.rps).collect();
        let _ = writeln!(
            md,
            "| {} | {} → `{}` | {} | {} | {} | {}% | {} | {} | {} | {} | {} |",
            w.way.letter(),
            w.way.name(),
            w.way.addr(),
            f(w.rps(), 0),
            f(w.p50(), 2),
            f(w.p99(), 2),
            f(w.cpu_busy() * 100.0, 0),
            f(w.cpu_us_per_request(), 0),
            w.errors(),
            w.syn_retrans(),
            w.requests(),
            list(&rps, 0)
        );
    }
    let _ = writeln!(
        md,
        "\n| ratio of requests/s | value | target | met |\n|---|--:|--:|---|"
    );
    for (name, v, target) in ratio_rows(h) {
        match target {
            Some(t) => {
                let _ = writeln!(md, "| {name} | {} | ≥ {t} | {} |", f(v, 2), yes_no(v >= t));
            }
            None => {
                let _ = writeln!(md, "| {name} | {} | none | |", f(v, 2));
            }
        }
    }
    let errors: Vec<String> = h
        .ways
        .iter()
        .filter(|w| w.errors() > 0)
        .map(|w| {
            let sum = |g: fn(&super::http::Wrk) -> u64| w.runs.iter().map(g).sum::<u64>();
            format!(
                "{}: connect {}, read {}, write {}, timeout {}, non-2xx {}",
                w.way.letter(),
                sum(|x| x.connect_errors),
                sum(|x| x.read_errors),
                sum(|x| x.write_errors),
                sum(|x| x.timeouts),
                sum(|x| x.non_2xx)
            )
        })
        .collect();
    let _ = writeln!(
        md,
        "\nErrors (wrk's socket errors and non-2xx answers, all runs): {}. SYN retransmits \
         are the client's (TcpExt TCPSynRetrans over each run): a refused or lost handshake \
         costs a 1 s retransmission timeout that wrk counts neither as an error nor in its \
         latency (which starts once connected), so they are counted separately. CPU busy is \
         the share of all {nproc} CPUs not idle during the run (/proc/stat, machine-wide, so \
         anything else running on the machine counts too); CPU µs / request divides that busy \
         time by the requests completed: the whole machine's cost of one request — wrk, \
         nginx, the load balancer and the kernel's network path together.\n",
        if errors.is_empty() {
            "none in any way".to_owned()
        } else {
            errors.join("; ")
        },
    );
    let pre: Vec<String> = h
        .ways
        .iter()
        .map(|w| {
            format!(
                "{}: {}",
                w.way.letter(),
                w.preflight
                    .iter()
                    .map(|(b, n)| format!("{b}×{n}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        })
        .collect();
    let _ = writeln!(
        md,
        "Which backends answered (sequential GETs before measuring): {}. New flows xdplb \
         scheduled per backend during the A runs (`xdplb backend list -o json`, after minus \
         before): {}. Over the daemon's whole life (its `--exit-stats json`): {}; non-zero \
         pass/drop reasons: {}.\n",
        pre.join("; "),
        join_counts(&h.a_new_flows),
        join_counts(&h.exit_new_flows),
        if h.exit_reasons.is_empty() {
            "none".to_owned()
        } else {
            join_counts(&h.exit_reasons)
        }
    );
    read_http(md, h, kernel, nproc);
    let _ = writeln!(
        md,
        "The client namespace runs with `net.ipv4.tcp_tw_reuse=1`. Without it C collapsed \
         after about 15 s of load to ~400 requests/s at 100 % CPU: behind HAProxy wrk closes \
         first (HAProxy's FIN trails the response), so the client's 28k ephemeral ports sat \
         in TIME_WAIT for 60 s and connect() spun looking for a free one. That is a limit of \
         one client machine, not of HAProxy; where the server closes first (A, B, D) the \
         setting changes nothing.\n"
    );
    let _ = writeln!(
        md,
        "D's SNAT uses an address of its own ({snat}), not the LB's 10.200.0.2: HAProxy (C) \
         connects to the backends from 10.200.0.2 with ports of the same ephemeral range as \
         the client's, which D's SNAT keeps. nginx closes first, so each backend holds those \
         4-tuples in TIME_WAIT for 60 s, and a SYN that reuses one with a sequence number and \
         timestamp from a different sender is refused (an ACK for the old connection, a RST, \
         a 1 s retransmission). Sharing 10.200.0.2, D fell to a few hundred requests/s, run \
         after run, with ~800 SYN retransmits per 2 s run: an interaction of two baselines \
         sharing one address, not a property of either. With its own address D's translated \
         4-tuples only follow D's own, whose sequence numbers keep increasing (same client \
         4-tuple), as TIME_WAIT reuse requires. (A NAT load balancer serving many clients \
         from one SNAT address meets this for real.)\n",
        snat = super::http::NAT_SNAT4
    );
    let _ = writeln!(
        md,
        "The xdplb daemon stayed attached to the LB's eth0 during all five ways, so B and E \
         never cross the LB, while C and D's packets (not for the VIP) pass through xdplb's \
         XDP program first: case (c) of part 1, tens of ns per packet. E's forwarder stayed \
         attached to its own host's eth0 throughout, and only E's packets reach it.\n"
    );
    let _ = writeln!(
        md,
        "<details><summary>Configurations and commands</summary>\n"
    );
    let _ = writeln!(
        md,
        "xdplb (A), started in the LB namespace:\n\n```\n{}\n```\n\n```yaml\n{}```\n",
        h.daemon_argv, h.daemon_config
    );
    let _ = writeln!(
        md,
        "nginx (b1; b2 and b3 alike), with its own temp, pid and log paths:\n\n```\n{}\n```\n\n\
         ```nginx\n{}```\n",
        h.nginx_argv_b1, h.nginx_conf_b1
    );
    let _ = writeln!(
        md,
        "HAProxy (C):\n\n```\n{}\n```\n\n```\n{}```\n",
        h.haproxy_argv, h.haproxy_conf
    );
    let _ = writeln!(
        md,
        "The bare XDP forwarder (E), `xdplb-bench fwd` (lb-ebpf/src/bench.rs, \
         `xlb_bench_fwd`), started in the namespace `{}`, a host of its own on the bridge \
         (eth0 {}/24, veth and switch port set up like the LB's); {} is on every backend's \
         lo like the VIP, and the client routes it via {}. IPv4 TCP to that address and \
         port goes to backend (source address + source port) mod {BACKENDS} by rewriting \
         both MACs and XDP_TX; anything else passes:\n\n```\n{}\n```\n",
        crate::topology::FWD_NS,
        crate::topology::FWD4,
        crate::topology::FWD_VIP4,
        crate::topology::FWD4,
        h.fwd_argv
    );
    let _ = writeln!(
        md,
        "nftables (D), loaded with `nft -f` in `xlb-lb` for each D run together with \
         `net.ipv4.ip_forward=1` and the SNAT address (`ip -n xlb-lb addr add {snat}/24 dev \
         eth0`), all removed (forwarding back to 0) right after it, so that neither \
         conntrack, routing nor that address exists in the LB namespace during A, B and C:\n\n\
         ```\n{}```\n\n</details>\n",
        h.nft_ruleset,
        snat = super::http::NAT_SNAT4
    );
}

/// The paragraph that explains the end-to-end numbers from what this run
/// measured.
fn read_http(
    md: &mut String,
    h: &HttpResults,
    kernel: Option<&super::micro::Kernel>,
    nproc: usize,
) {
    let cpu = |w: Way| h.way(w).map_or(f64::NAN, |x| x.cpu_us_per_request());
    let busy = |w: Way| h.way(w).map_or(f64::NAN, |x| x.cpu_busy() * 100.0);
    let (a, b) = (cpu(Way::Xdplb), cpu(Way::Direct));
    #[expect(clippy::cast_precision_loss, reason = "counter ratio")]
    let per_flow = if h.exit_vip_new_flows > 0 {
        h.exit_vip_packets as f64 / h.exit_vip_new_flows as f64
    } else {
        f64::NAN
    };
    let program = kernel.and_then(|k| {
        let est = k.cases.iter().find(|c| c.label == "a")?.median_ns;
        let new = k
            .new_flow_filling
            .map_or(k.cases.get(1)?.median_ns, |x| x.0);
        Some((new, est, (new + (per_flow - 1.0) * est) / 1e3))
    });
    let e = cpu(Way::Fwd);
    let a_b = h.ratio(Way::Xdplb, Way::Direct);
    let e_b = h.ratio(Way::Fwd, Way::Direct);
    let signed = |v: f64| {
        let v = v.round() + 0.0;
        if v > 0.0 {
            format!("+{}", f(v, 0))
        } else {
            f(v, 0)
        }
    };
    let verdict = if a_b >= TARGET_A_OVER_B {
        format!("the {TARGET_A_OVER_B} target is met")
    } else if e_b < TARGET_A_OVER_B {
        format!(
            "the {TARGET_A_OVER_B} target is not met, and on the same kind of hop the bare \
             forwarder, which does none of xdplb's work, misses it too (E / B = {}; A / E = \
             {})",
            f(e_b, 2),
            f(h.ratio(Way::Xdplb, Way::Fwd), 2)
        )
    } else {
        format!(
            "the {TARGET_A_OVER_B} target is not met, while the bare forwarder on the same kind \
             of hop meets it (E / B = {}; A / E = {})",
            f(e_b, 2),
            f(h.ratio(Way::Xdplb, Way::Fwd), 2)
        )
    };
    let _ = writeln!(
        md,
        "How to read this. All five ways share the same {nproc} CPUs with wrk, the nginx \
         processes and all of the kernel's network work, so requests/s here is largely the \
         inverse of what one request costs the whole machine (CPU µs / request). B, served \
         by a single nginx process, leaves the CPUs partly idle ({} % busy, A {} %). In B \
         a request goes client → bridge → nginx. In A the client's packets take one more \
         hop, client → bridge → LB → bridge → backend: on the LB's veth, native XDP takes the \
         frame out of an skb, runs xdplb and XDP_TX's it to the bridge port, which turns it \
         back into an skb; the replies go straight to the client (DSR). A cost {} µs of CPU \
         per request against B's {} µs ({} µs).{} E takes the same kind of extra hop (a host \
         of its own on the bridge, set up like the LB) through a forwarder that does none of \
         xdplb's work (no flow table, no Maglev, no counters) and cost {} µs per request: \
         A − E = {} µs is what xdplb's work adds end to end, to within the run-to-run \
         spread the runs column shows, and E − B = {} µs what the hop and three nginx processes instead \
         of one cost without it. With a real NIC the load balancer is a machine of its own \
         and none of this is taken from the client or the servers; here the extra veth hop \
         competes with them for the same {nproc} CPUs. A / B = {}: {verdict}. C terminates every client connection on the \
         LB and opens a second one to a backend (two handshakes and user-space copies per \
         request): {} µs per request. D sends every packet of both directions through \
         conntrack and NAT on the LB: {} µs.\n",
        f(busy(Way::Direct), 0),
        f(busy(Way::Xdplb), 0),
        f(a, 0),
        f(b, 0),
        signed(a - b),
        match program {
            Some((new, est, us)) if us.is_finite() => format!(
                " xdplb's counters show {} packets per connection; at part 1's costs ({} ns \
                 for a flow's first packet, {} ns for each further one) its program accounts \
                 for about {} µs of that.",
                f(per_flow, 1),
                f(new, 0),
                f(est, 0),
                f(us, 1)
            ),
            _ => String::new(),
        },
        f(e, 0),
        signed(a - e),
        signed(e - b),
        f(a_b, 2),
        f(cpu(Way::Haproxy), 0),
        f(cpu(Way::Nft), 0),
    );
}

fn join_counts(v: &[(String, u64)]) -> String {
    if v.is_empty() {
        return "n/a".into();
    }
    v.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn drain_section(md: &mut String, d: &super::control::DrainResults) {
    let _ = writeln!(
        md,
        "With the bench daemon running, a client in `xlb-client` (this xtask's hidden \
         `bench-client`) opens one short HTTP connection to the VIP after another and records \
         the CLOCK_MONOTONIC time just before each `connect()` and which backend answered. \
         The coordinator reads the same clock just before it starts `{}`. b1 first gets \
         weight 1000 against 1 for b2 and b3 (`xdplb backend weight`), so that before the \
         drain nearly every new connection goes to b1 and the switch shows within one \
         connection.\n\n\
         **Definition:** *visible after* = start of the first connection after the last \
         connection that reached b1, minus the CLI's start. Every connection that started \
         from then on avoided b1. The switch happened between *last b1* and *visible after* \
         (*gap*): normally one connection interval, more when the client loop was not \
         scheduled while the CLI and the daemon ran on the same two CPUs. *CLI* is the CLI \
         process from start to exit. b1 is undrained between runs.\n",
        clean(&d.drain_cmd)
    );
    let _ = writeln!(
        md,
        "| run | visible after (ms) | last b1 (ms) | gap (ms) | CLI (ms) | connections | interval (ms) | to b1 before | b1 after CLI returned | errors |\n\
         |--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    );
    for (i, r) in d.runs.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {}% | {} | {} |",
            i + 1,
            f(r.visible_ms, 2),
            f(r.last_b1_ms, 2),
            f(r.visible_ms - r.last_b1_ms, 2),
            f(r.cli_ms, 2),
            r.connections,
            f(r.gap_ms, 3),
            f(r.pre_b1_share * 100.0, 1),
            r.b1_after_cli,
            r.errors
        );
    }
    let _ = writeln!(
        md,
        "| **median** | **{}** | {} | {} | {} | | {} | | {} | {} |\n",
        f(d.visible_ms(), 2),
        f(d.last_b1_ms(), 2),
        f(d.med(|r| r.visible_ms - r.last_b1_ms), 2),
        f(d.cli_ms(), 2),
        f(d.gap_ms(), 3),
        d.b1_after_cli(),
        d.errors()
    );
    let _ = writeln!(
        md,
        "So the drain took effect {}–{} ms (medians) after the CLI was started; the CLI \
         exited after {} ms. No target was set. The time includes starting the CLI process, \
         its HTTP request over the control socket, validation, the Maglev rebuild (3 \
         backends, see the table above) and the ring swap. A connection that reached b1 after \
         the CLI had returned would mean the CLI acknowledged a change before it was in \
         effect; there were {} such connections in all runs.\n",
        f(d.last_b1_ms(), 1),
        f(d.visible_ms(), 1),
        f(d.cli_ms(), 1),
        d.b1_after_cli()
    );
}

// ---------------------------------------------------------------- chart

fn load_fonts() -> Result<()> {
    for (file, style) in [
        (FONT_FILE, FontStyle::Normal),
        (FONT_BOLD_FILE, FontStyle::Bold),
    ] {
        let bytes = std::fs::read(file).with_context(|| {
            format!("reading {file} (install fonts-dejavu-core: `cargo xtask deps`)")
        })?;
        // The font registry wants 'static data; two fonts, once per run.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FONT, style, bytes)
            .map_err(|_| anyhow!("{file} is not a usable font"))?;
    }
    Ok(())
}

const XDPLB: RGBColor = RGBColor(31, 119, 180);
const BASELINE: RGBColor = RGBColor(150, 150, 150);
const HAPROXY: RGBColor = RGBColor(255, 127, 14);
const NFT: RGBColor = RGBColor(44, 160, 44);
const FWD: RGBColor = RGBColor(148, 103, 189);

struct Bar {
    label: String,
    value: f64,
    /// Printed on top of the bar.
    text: String,
    /// A second, smaller line above `text`.
    note: Option<String>,
    color: RGBColor,
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    bars: &[Bar],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let max = bars
        .iter()
        .map(|b| b.value)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let ymax = if max > 0.0 { max * 1.22 } else { 1.0 };
    let n = bars.len();
    // A segmented range of integers is inclusive: 0..n-1 gives n bars.
    let last = n.saturating_sub(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 22).into_font().style(FontStyle::Bold))
        .margin(18)
        .x_label_area_size(70)
        .y_label_area_size(80)
        .build_cartesian_2d((0..last).into_segmented(), 0.0..ymax)
        .map_err(|e| anyhow!("{e}"))?;
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    let fmt_x = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(RGBColor(230, 230, 230))
        .x_labels(n)
        .x_label_formatter(&fmt_x)
        .y_labels(8)
        .y_label_formatter(&|v: &f64| {
            if ymax >= 20.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .y_desc(y_desc)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 17))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let v = if b.value.is_finite() { b.value } else { 0.0 };
            let mut r = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), v),
                ],
                b.color.filled(),
            );
            r.set_margin(0, 0, 14, 14);
            r
        }))
        .map_err(|e| anyhow!("{e}"))?;
    let style = TextStyle::from((FONT, 17).into_font().style(FontStyle::Bold))
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let v = if b.value.is_finite() { b.value } else { 0.0 };
            Text::new(
                b.text.clone(),
                (SegmentValue::CenterOf(i), v + ymax * 0.015),
                style.clone(),
            )
        }))
        .map_err(|e| anyhow!("{e}"))?;
    let small = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart
        .draw_series(bars.iter().enumerate().filter_map(|(i, b)| {
            let v = if b.value.is_finite() { b.value } else { 0.0 };
            let note = b.note.clone()?;
            Some(Text::new(
                note,
                (SegmentValue::CenterOf(i), v + ymax * 0.065),
                small.clone(),
            ))
        }))
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// `docs/benchmarks.png`: in-kernel ns/packet, veth Mpps and end-to-end
/// requests/s, one panel each.
pub fn chart(r: &Results, path: &Path) -> Result<()> {
    load_fonts()?;
    let root = BitMapBackend::new(path, (3100, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let title = format!(
        "xdplb benchmarks{} — {} — kernel {}, {} × {}",
        if r.quick { " (quick run)" } else { "" },
        r.date,
        r.machine.kernel,
        r.machine.nproc,
        r.machine.cpu_model
    );
    let root = root
        .titled(&title, (FONT, 26).into_font().style(FontStyle::Bold))
        .map_err(|e| anyhow!("{e}"))?;
    // The in-kernel panel has ten bars with labels; the end-to-end panel
    // five bars with two lines of text each.
    let (kernel_area, rest) = root.split_horizontally(1520);
    let (veth_area, http_area) = rest.split_horizontally(620);

    let kernel_bars: Vec<Bar> = match &r.kernel {
        Ok(k) => k
            .cases
            .iter()
            .map(|c| Bar {
                label: format!(
                    "({}) {}",
                    c.label,
                    match c.label {
                        "a" => "established",
                        "b" => "new flow",
                        "c" => "non-VIP",
                        "a0" => "hit only",
                        "b0" => "insert only",
                        "bM" => "2 reads only",
                        "bC" => "cached table",
                        "aL" => "LRU hit",
                        "bL" => "LRU insert",
                        _ => "MAC swap",
                    }
                ),
                value: c.median_ns,
                text: format!("{} ns", f(c.median_ns, 0)),
                note: Some(if c.label == "d" {
                    "baseline".into()
                } else {
                    format!("×{} (d)", f(c.ratio, 1))
                }),
                // (d) and the floors are baselines, not xdplb.
                color: if matches!(c.label, "d" | "a0" | "b0" | "bM" | "aL" | "bL") {
                    BASELINE
                } else {
                    XDPLB
                },
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    panel(
        &kernel_area,
        "1. In-kernel cost (BPF_PROG_TEST_RUN)",
        "ns per packet (median, lower is better)",
        &kernel_bars,
    )?;

    let veth_bars: Vec<Bar> = match &r.veth {
        Ok(v) => vec![
            Bar {
                label: "xdplb".into(),
                value: v.lb_mpps,
                text: format!("{} Mpps", f(v.lb_mpps, 2)),
                note: Some(format!("×{} reflector", f(v.ratio, 2))),
                color: XDPLB,
            },
            Bar {
                label: "MAC-swap reflector".into(),
                value: v.reference_mpps,
                text: format!("{} Mpps", f(v.reference_mpps, 2)),
                note: Some("baseline".into()),
                color: BASELINE,
            },
        ],
        Err(_) => Vec::new(),
    };
    panel(
        &veth_area,
        "2. veth, 64-byte frames, XDP_TX, one CPU",
        "million packets per second (median, higher is better)",
        &veth_bars,
    )?;

    let http_bars: Vec<Bar> = match &r.http {
        Ok(h) => h
            .ways
            .iter()
            .map(|w| Bar {
                label: format!("{} {}", w.way.letter(), w.way.short()),
                value: w.rps(),
                text: format!("{} req/s", f(w.rps(), 0)),
                note: Some(format!("p50 {} / p99 {} ms", f(w.p50(), 1), f(w.p99(), 1))),
                color: match w.way {
                    Way::Xdplb => XDPLB,
                    Way::Direct => BASELINE,
                    Way::Haproxy => HAPROXY,
                    Way::Nft => NFT,
                    Way::Fwd => FWD,
                },
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    panel(
        &http_area,
        "3. HTTP, new TCP connection per request (3 backends)",
        "requests per second (median, higher is better)",
        &http_bars,
    )?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
