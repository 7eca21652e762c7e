//! `cargo xtask demo`: builds xdplb, runs it on the namespace topology with
//! `deploy/examples/demo.yaml`, sends real traffic through the VIP and
//! explains what happened, from the client's and the load balancer's side.

use std::time::Instant;

use anyhow::{bail, Result};

use crate::{
    daemon::{self, vip_label, Daemon, ExitStats, VipStats},
    deps,
    e2e::{probe_short, target, TopologyGuard},
    probe::ShortReport,
    topology::{self, VIP4, VIP6},
};

const BACKENDS: usize = 3;
const PORT: u16 = 8080;
/// (VIP, protocol, flows)
const TRAFFIC: [(&str, &str, usize); 4] = [
    (VIP4, "tcp", 300),
    (VIP4, "udp", 300),
    (VIP6, "tcp", 100),
    (VIP6, "udp", 100),
];

const INTRO: &str = "\
What this demo does
-------------------
It builds a small lab out of Linux network namespaces joined by one bridge (a
single Ethernet segment): a client (xlb-client), the load balancer (xlb-lb)
and three backends (xlb-b1..b3). Each backend runs an echo server that answers
every request with its own name (b1, b2, b3) and also owns the virtual IP
(VIP) 10.200.100.1 / fd00:200::100 on its loopback. The client reaches the VIP
through the load balancer.

xdplb attaches an XDP program to the load balancer's eth0. For the first
packet of every flow to the VIP it picks a backend by Maglev consistent
hashing, weighted 1:2:1 here (so b2 should get about half of the flows),
remembers the choice in a connection table, rewrites only the destination MAC
address and sends the packet straight back out to that backend. The backend
answers the client directly (direct server return): replies never pass
through the load balancer, which therefore only counts client->backend
packets.
";

pub fn run() -> Result<()> {
    let started = Instant::now();
    println!("{INTRO}");
    deps::run()?;
    daemon::build_release()?;

    println!("\nStarting the topology ({BACKENDS} backends)...");
    let _topology = TopologyGuard::up(BACKENDS)?;
    topology::print_addresses(BACKENDS);

    let config = daemon::workspace_root().join("deploy/examples/demo.yaml");
    println!("\nStarting xdplb in xlb-lb with {}...", config.display());
    let daemon = Daemon::start(&config)?;
    println!("xdplb is attached (pid {}).", daemon.pid());

    println!("\nSending traffic from xlb-client...");
    let mut reports = Vec::new();
    for (vip, proto, count) in TRAFFIC {
        let t = target(vip, PORT);
        let r = probe_short(&t, proto, count);
        match &r {
            Ok(r) => println!("  {count:>3} {proto} flows to {t:<22} {} answered", r.ok),
            Err(e) => println!("  {count:>3} {proto} flows to {t:<22} FAILED: {e:#}"),
        }
        reports.push(r);
    }

    println!("\nStopping xdplb (it detaches and prints its counters)...");
    let stats = ExitStats::from_json(&daemon.stop()?)?;

    println!("\nResults");
    println!("-------");
    println!(
        "answered = flows whose reply came from that backend (the client saw its name);\n\
         LB flows = new flows the XDP program sent to that backend; LB packets = packets it\n\
         forwarded there (requests, handshakes, ACKs; never replies)."
    );
    let mut failed_flows = 0;
    let mut errors = Vec::new();
    for ((vip, proto, count), report) in TRAFFIC.iter().zip(reports) {
        let label = vip_label(vip, PORT, proto);
        println!("\n{label}  ({count} {})", flow_word(proto));
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                println!("  traffic failed: {e:#}");
                failed_flows += count;
                errors.push(format!("{label}: {e:#}"));
                continue;
            }
        };
        failed_flows += report.failed;
        match stats.vip(&label) {
            Ok(v) => print_vip(&report, v),
            Err(e) => {
                println!("  {e:#}");
                errors.push(format!("{e:#}"));
            }
        }
    }

    let reasons = stats.nonzero_reasons();
    if !reasons.is_empty() {
        println!("\nPackets the XDP program did not load-balance (passed to the LB's own stack or dropped):");
        for (name, n) in reasons {
            println!("  {name:<22} {n:>6}  {}", explain_reason(name));
        }
    }

    println!(
        "\nTearing down the topology. Demo took {:.1} s.",
        started.elapsed().as_secs_f64()
    );
    if failed_flows > 0 || !errors.is_empty() {
        bail!(
            "{failed_flows} flows got no answer{}",
            if errors.is_empty() {
                String::new()
            } else {
                format!("; {}", errors.join("; "))
            }
        );
    }
    Ok(())
}

fn flow_word(proto: &str) -> &'static str {
    if proto == "tcp" {
        "TCP connections"
    } else {
        "UDP flows, one request each"
    }
}

fn print_vip(report: &ShortReport, vip: &VipStats) {
    let total_w: u32 = vip.backends.iter().map(|b| b.weight).sum();
    println!(
        "  {:<8} {:<14} {:<17} {:>6} {:>9} {:>17} {:>9} {:>10}",
        "backend", "address", "MAC", "weight", "expected", "answered", "LB flows", "LB packets"
    );
    let by = vip.by_backend();
    let mut answered_total = 0;
    for (name, b) in &by {
        let answered = report.per_backend.get(name).copied().unwrap_or(0);
        answered_total += answered;
        let expected = 100.0 * f64::from(b.weight) / f64::from(total_w.max(1));
        let share = 100.0 * answered as f64 / report.ok.max(1) as f64;
        println!(
            "  {:<8} {:<14} {:<17} {:>6} {:>8.1}% {:>8} ({:>5.1}%) {:>9} {:>10}",
            name, b.address, b.mac, b.weight, expected, answered, share, b.new_flows, b.packets
        );
    }
    println!(
        "  {:<8} {:<14} {:<17} {:>6} {:>9} {:>8} {:>8} {:>9} {:>10}  ({} bytes)",
        "total",
        "",
        "",
        total_w,
        "100.0%",
        answered_total,
        "",
        vip.new_flows,
        vip.packets,
        vip.bytes
    );
    let strangers: Vec<String> = report
        .per_backend
        .iter()
        .filter(|(n, _)| !by.contains_key(*n))
        .map(|(n, c)| format!("{n}={c}"))
        .collect();
    if !strangers.is_empty() {
        println!(
            "  answers from hosts that are not backends of this VIP: {}",
            strangers.join(" ")
        );
    }

    let all = if report.failed == 0 {
        format!("all {} answered", report.count)
    } else {
        format!(
            "{} of {} NOT answered (first errors: {:?})",
            report.failed, report.count, report.errors
        )
    };
    let lb_flows: u64 = vip.backends.iter().map(|b| b.new_flows).sum();
    let mismatched: Vec<&str> = by
        .iter()
        .filter(|(n, b)| report.per_backend.get(*n).copied().unwrap_or(0) as u64 != b.new_flows)
        .map(|(n, _)| n.as_str())
        .collect();
    let agree = if mismatched.is_empty() && answered_total == report.ok {
        format!("answers match the LB's flow counts ({lb_flows} new flows)")
    } else if report.proto == crate::probe::Proto::Udp && lb_flows <= report.ok as u64 {
        format!(
            "the LB counted {lb_flows} new flows for {} answers: a client source port reused \
             by two probe flows makes them one flow to the LB (expected now and then for UDP)",
            report.ok
        )
    } else {
        format!(
            "answers and LB flow counts DIFFER for {} ({lb_flows} LB flows, {} answers)",
            mismatched.join(", "),
            report.ok
        )
    };
    println!("  => {all}; {agree}.");
}

fn explain_reason(name: &str) -> &'static str {
    match name {
        "pass_non_ip" => "not IP (ARP, ...): left to the LB's kernel",
        "pass_not_vip" => "TCP/UDP not addressed to a VIP (e.g. to the LB's own address)",
        "pass_ipv4_fragment" => "IPv4 fragment: passed by policy",
        "pass_ipv6_ext_header" => "IPv6 with extension headers: passed by policy",
        "pass_not_tcp_udp" => "IP but neither TCP nor UDP (ICMP, IPv6 neighbour discovery)",
        "pass_ttl_expired" => "TTL/hop limit would expire",
        "pass_truncated" => "headers cut short",
        "pass_malformed" => "malformed headers",
        "drop_no_backend" => "VIP has no backend with weight > 0: dropped",
        "drop_backend_invalid" => "backend entry unusable: dropped",
        "drop_redirect_failed" => "sending to the backend failed: dropped",
        _ => "",
    }
}
