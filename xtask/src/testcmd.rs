//! `cargo xtask test`: every test layer in order — host unit tests and
//! in-kernel packet tests (`cargo test`), then the namespace end-to-end
//! scenarios — and one summary at the end.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::{daemon, deps, e2e, util};

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Only the end-to-end scenarios (skip `cargo test`).
    #[arg(long, conflicts_with = "no_e2e")]
    pub e2e_only: bool,
    /// Only `cargo test` (skip the end-to-end scenarios).
    #[arg(long)]
    pub no_e2e: bool,
}

/// Totals of the `test result:` lines of one `cargo test` run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct CargoTotals {
    passed: usize,
    failed: usize,
    /// Number of `test result:` lines seen (test binaries and doc-test runs).
    suites: usize,
}

impl CargoTotals {
    /// Adds one line of `cargo test` output if it is a result line:
    /// `test result: ok. 12 passed; 0 failed; 0 ignored; ...`.
    fn scan(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        let Some((_, counts)) = rest.split_once(". ") else {
            return;
        };
        let mut found = false;
        for part in counts.split(';') {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<usize>() else { continue };
            match what {
                "passed" => {
                    self.passed += n;
                    found = true;
                }
                "failed" => self.failed += n,
                _ => {}
            }
        }
        if found {
            self.suites += 1;
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A layer of tests run by `cargo test`.
struct CargoLayer {
    name: &'static str,
    args: &'static [&'static str],
    /// Fewer passing tests than this means tests were skipped or filtered
    /// away: a failure, never a quiet pass.
    at_least: usize,
}

const CARGO_LAYERS: [CargoLayer; 2] = [
    CargoLayer {
        name: "host unit",
        args: &["test", "--release", "--workspace", "--lib", "--bins"],
        at_least: 10,
    },
    CargoLayer {
        name: "in-kernel",
        args: &[
            "test",
            "--release",
            "-p",
            "lb-userspace",
            "--test",
            "datapath",
        ],
        at_least: 25,
    },
];

/// Runs one `cargo test` layer, echoing its stdout while counting the
/// results. Returns the totals and whether cargo succeeded.
fn cargo_test(layer: &CargoLayer) -> Result<(CargoTotals, bool)> {
    let mut cmd = daemon::cargo();
    cmd.args(layer.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    println!("running {}", util::display(&cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting `{}`", util::display(&cmd)))?;
    let stdout = child.stdout.take().context("cargo test stdout not piped")?;
    let mut totals = CargoTotals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        totals.scan(&line);
    }
    let status = child.wait().context("waiting for cargo test")?;
    Ok((totals, status.success()))
}

pub fn run(args: TestArgs) -> Result<()> {
    let started = Instant::now();
    deps::run()?;
    if !is_root() {
        bail!(
            "cargo xtask test needs root: the in-kernel and namespace tests load XDP programs \
             and create network namespaces"
        );
    }
    daemon::build_release()?;

    let mut summary = Vec::new();
    let mut passed = 0;
    let mut failed = 0;
    let mut ok = true;

    if !args.e2e_only {
        for layer in &CARGO_LAYERS {
            let t = Instant::now();
            let (totals, success) = cargo_test(layer)?;
            let secs = t.elapsed().as_secs_f64();
            passed += totals.passed;
            failed += totals.failed;
            let too_few = totals.passed < layer.at_least;
            // cargo can fail before running a single test (a compile error),
            // and a layer can run fewer tests than it has: both count as a
            // failure even though no test line says so.
            if (!success && totals.failed == 0) || too_few {
                failed += 1;
            }
            if !success || too_few {
                ok = false;
            }
            let verdict = if success && !too_few { "ok" } else { "FAILED" };
            let short = if too_few {
                format!(" (expected at least {})", layer.at_least)
            } else {
                String::new()
            };
            summary.push(format!(
                "{}: {} passed, {} failed{short}: {verdict} ({secs:.1} s)",
                layer.name, totals.passed, totals.failed
            ));
        }
    }

    if !args.no_e2e {
        let t = Instant::now();
        match e2e::run_all() {
            Ok((p, f)) => {
                passed += p;
                failed += f;
                if f > 0 {
                    ok = false;
                }
                summary.push(format!(
                    "e2e: {p} passed, {f} failed ({:.1} s)",
                    t.elapsed().as_secs_f64()
                ));
            }
            Err(e) => {
                ok = false;
                failed += 1;
                summary.push(format!("e2e: could not run: {e:#}"));
            }
        }
    }

    println!("\nsummary ({:.1} s):", started.elapsed().as_secs_f64());
    for line in &summary {
        println!("  {line}");
    }
    println!("xtask test: {passed} passed, {failed} failed");
    if !ok || failed > 0 {
        bail!("tests failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::CargoTotals;

    #[test]
    fn scans_cargo_result_lines() {
        let mut t = CargoTotals::default();
        for l in [
            "running 3 tests",
            "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            "test result: FAILED. 5 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out",
            "test foo ... ok",
        ] {
            t.scan(l);
        }
        assert_eq!(
            t,
            CargoTotals {
                passed: 8,
                failed: 2,
                suites: 2
            }
        );
    }
}
