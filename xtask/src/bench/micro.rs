//! Parts 1, 2 and the Maglev half of 4: `xdplb-bench kernel|veth|maglev`,
//! each printing one JSON object on stdout (its progress goes to our
//! stderr as it happens).

use std::process::Stdio;

use anyhow::{Context, Result};
use serde_json::Value;

use super::{check_interrupted, xdplb_bench_path};
use crate::util;

/// Runs `xdplb-bench [--quick] ARGS` and parses its JSON.
fn run_bench(quick: bool, args: &[&str]) -> Result<(Value, String)> {
    let exe = xdplb_bench_path()?;
    let mut cmd = std::process::Command::new(&exe);
    if quick {
        cmd.arg("--quick");
    }
    cmd.args(args).stderr(Stdio::inherit());
    let shown = util::display(&cmd);
    println!("bench: running {shown}");
    let out = util::run(&mut cmd);
    check_interrupted()?;
    let out = out?;
    let v = serde_json::from_str(out.trim())
        .with_context(|| format!("parsing the JSON of `{shown}`: {:?}", out.trim()))?;
    Ok((v, shown))
}

/// The value at `path` in the benchmark JSON.
fn at<'a>(v: &'a Value, path: &[&str]) -> Result<&'a Value> {
    let mut cur = v;
    for p in path {
        cur = cur
            .get(p)
            .with_context(|| format!("no `{}` in the benchmark JSON", path.join(".")))?;
    }
    Ok(cur)
}

fn f64_at(v: &Value, path: &[&str]) -> Result<f64> {
    let cur = at(v, path)?;
    cur.as_f64()
        .with_context(|| format!("`{}` is not a number: {cur}", path.join(".")))
}

fn f64s_at(v: &Value, path: &[&str]) -> Result<Vec<f64>> {
    at(v, path)?
        .as_array()
        .with_context(|| format!("`{}` is not an array", path.join(".")))?
        .iter()
        .map(|x| x.as_f64().context("not a number"))
        .collect()
}

/// One in-kernel case: median ns/packet, the runs, and the ratio to the
/// reference reflector.
#[derive(Debug, Clone)]
pub struct KernelCase {
    pub label: &'static str,
    pub what: &'static str,
    pub median_ns: f64,
    pub runs_ns: Vec<f64>,
    pub ratio: f64,
}

#[derive(Debug, Clone)]
pub struct Kernel {
    pub command: String,
    pub repeat: u64,
    pub runs: u64,
    pub cpu: u64,
    /// a, b, c, d, then the floors a0 and b0 (the flow table alone) and bM
    /// (the memory reads under b0), bC (b into a table that stays in the
    /// caches), then aL and bL (the same on a kernel LRU hash, the former
    /// flow table).
    pub cases: Vec<KernelCase>,
    /// The reset step subtracted from the new-flow case.
    pub reset_ns: f64,
    pub new_flow_raw_ns: f64,
    /// Whether any new-flow run filled the flow table past capacity.
    pub evicting: bool,
    /// New flow (net) split by whether the run found the flow table
    /// filling or full (LRU evicting): (median ns, runs).
    pub new_flow_filling: Option<(f64, usize)>,
    pub new_flow_evicting: Option<(f64, usize)>,
    /// The load balancer's program as loaded: instructions after the
    /// verifier's rewrites, bytes of machine code, and the instructions
    /// the verifier walked to accept it (each `None` if the kernel did not
    /// say).
    pub program_insns: Option<u64>,
    pub program_jited_bytes: Option<u64>,
    pub verifier_insns: Option<u64>,
}

pub fn kernel(quick: bool, runs: u32) -> Result<Kernel> {
    let (v, command) = run_bench(quick, &["kernel", "--runs", &runs.to_string()])?;
    let reference = f64_at(&v, &["cases", "reference_reflect", "median"])?;
    let case = |label, what, key: &str, median_key: &str, runs_key: &str| -> Result<KernelCase> {
        let m = f64_at(&v, &["cases", key, median_key])?;
        Ok(KernelCase {
            label,
            what,
            median_ns: m,
            runs_ns: f64s_at(&v, &["cases", key, runs_key])?,
            ratio: m / reference,
        })
    };
    let cases = vec![
        case(
            "a",
            "established TCP flow",
            "established_tcp",
            "median",
            "ns_per_packet",
        )?,
        case(
            "b",
            "new flow (net of the reset step)",
            "new_flow",
            "net_median",
            "net_ns_per_packet",
        )?,
        case(
            "c",
            "packet to no VIP (XDP_PASS)",
            "non_vip_pass",
            "median",
            "ns_per_packet",
        )?,
        case(
            "d",
            "reference: MAC-swap reflector",
            "reference_reflect",
            "median",
            "ns_per_packet",
        )?,
        case(
            "a0",
            "floor under (a): the flow table alone, one hit",
            "flow_table_hit",
            "median",
            "ns_per_packet",
        )?,
        case(
            "b0",
            "floor under (b): the flow table alone, one insert (net)",
            "flow_table_insert",
            "net_median",
            "net_ns_per_packet",
        )?,
        case(
            "bM",
            "floor under (b0): one read of each of the flow's two buckets (net)",
            "flow_table_touch",
            "net_median",
            "net_ns_per_packet",
        )?,
        case(
            "bC",
            "(b) into a flow table of 4096 flows, which stays in the caches (net)",
            "new_flow_cached",
            "net_median",
            "net_ns_per_packet",
        )?,
        case(
            "aL",
            "a kernel LRU hash alone (the former flow table), one hit",
            "lru_hit",
            "median",
            "ns_per_packet",
        )?,
        case(
            "bL",
            "a kernel LRU hash alone, one BPF_NOEXIST insert (net)",
            "lru_insert",
            "net_median",
            "net_ns_per_packet",
        )?,
    ];
    let flags: Vec<bool> = v["cases"]["new_flow"]["evicting"]
        .as_array()
        .map(|a| a.iter().map(|x| x.as_bool() == Some(true)).collect())
        .unwrap_or_default();
    let evicting = flags.iter().any(|&e| e);
    let split = |key: &str, want: bool| {
        let n = flags.iter().filter(|&&e| e == want).count();
        v["cases"]["new_flow"][key].as_f64().map(|m| (m, n))
    };
    Ok(Kernel {
        command,
        repeat: v["repeat"].as_u64().unwrap_or(0),
        runs: v["runs"].as_u64().unwrap_or(0),
        cpu: v["cpu"].as_u64().unwrap_or(0),
        cases,
        reset_ns: f64_at(&v, &["cases", "reset_only", "median"])?,
        new_flow_raw_ns: f64_at(&v, &["cases", "new_flow", "median"])?,
        evicting,
        new_flow_filling: split("net_median_filling", false),
        new_flow_evicting: split("net_median_evicting", true),
        program_insns: v["program"]["xlated_insns"].as_u64(),
        program_jited_bytes: v["program"]["jited_bytes"].as_u64(),
        verifier_insns: v["program"]["verifier_insns_processed"].as_u64(),
    })
}

#[derive(Debug, Clone)]
pub struct Veth {
    pub command: String,
    pub seconds: f64,
    pub runs: u64,
    pub lb_mpps: f64,
    pub lb_runs: Vec<f64>,
    pub reference_mpps: f64,
    pub reference_runs: Vec<f64>,
    pub ratio: f64,
    pub extra_ns: Option<f64>,
}

pub fn veth(quick: bool, runs: u32) -> Result<Veth> {
    let (v, command) = run_bench(quick, &["veth", "--runs", &runs.to_string()])?;
    Ok(Veth {
        command,
        seconds: v["seconds"].as_f64().unwrap_or(f64::NAN),
        runs: v["runs"].as_u64().unwrap_or(0),
        lb_mpps: f64_at(&v, &["cases", "lb", "median"])?,
        lb_runs: f64s_at(&v, &["cases", "lb", "mpps"])?,
        reference_mpps: f64_at(&v, &["cases", "reference_reflect", "median"])?,
        reference_runs: f64s_at(&v, &["cases", "reference_reflect", "mpps"])?,
        ratio: f64_at(&v, &["ratio_lb_to_reference"])?,
        extra_ns: v["lb_extra_ns_per_packet"].as_f64(),
    })
}

#[derive(Debug, Clone)]
pub struct Maglev {
    pub command: String,
    pub ring_size: u64,
    pub runs: u64,
    pub baseline_us: f64,
    /// (backends, median µs, runs µs).
    pub builds: Vec<(u32, f64, Vec<f64>)>,
}

pub fn maglev(runs: u32) -> Result<Maglev> {
    // Already fast; `--quick` would not change it.
    let (v, command) = run_bench(false, &["maglev", "--runs", &runs.to_string()])?;
    let builds = [10u32, 100, 1000]
        .into_iter()
        .map(|n| {
            let key = format!("backends_{n}");
            Ok((
                n,
                f64_at(&v, &["cases", &key, "median"])?,
                f64s_at(&v, &["cases", &key, "us"])?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Maglev {
        command,
        ring_size: v["ring_size"].as_u64().unwrap_or(0),
        runs: v["runs"].as_u64().unwrap_or(0),
        baseline_us: f64_at(&v, &["cases", "baseline_fill", "median"])?,
        builds,
    })
}
