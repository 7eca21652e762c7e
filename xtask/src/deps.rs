//! `cargo xtask deps`: installs what a fresh Debian 12 machine lacks to build
//! and test xdplb. Checks first and acts only on what is missing, so it is
//! cheap to run before every other task.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::util;

/// Debian packages: LLVM 22 for bpf-linker, clang and the kernel UAPI headers
/// for the topology's XDP pass program, and the tools the topology runs
/// (`ip`, `ethtool`, `nsenter` from util-linux); for `cargo xtask bench`, the
/// HTTP load generator, the web server on the backends, the two baseline load
/// balancers and the font its chart is drawn with. (nginx and haproxy are only
/// ever run by hand inside the test namespaces; on a systemd machine their
/// packages also enable a service in the root namespace, which the bench
/// neither needs nor touches.)
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "clang",
    "linux-libc-dev",
    "iproute2",
    "ethtool",
    "util-linux",
    "wrk",
    "nginx",
    "haproxy",
    "nftables",
    "fonts-dejavu-core",
];

/// The LLVM bpf-linker must be built against (the Debian package's prefix).
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const NIGHTLY: &str = "nightly";
/// Pinned: the version measured to build with rustc 1.95 against LLVM 22;
/// a newer release may need a newer toolchain than these machines have.
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    let mut installed = Vec::new();
    install_debian_packages(&mut installed)?;
    install_rust_src(&mut installed)?;
    install_bpf_linker(&mut installed)?;
    if installed.is_empty() {
        println!("deps: all present");
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Packages of `DEBIAN_PACKAGES` that dpkg does not report as installed.
fn missing_debian_packages() -> Result<Vec<&'static str>> {
    // One dpkg-query for all: it lists the known packages and complains on
    // stderr (exit 1) about unknown ones, which are exactly the missing ones.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(DEBIAN_PACKAGES)
        .output()
        .context("running dpkg-query (is this a Debian system?)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let present: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("install ok installed"))
        .filter_map(|l| l.split_whitespace().next())
        // dpkg may print `name:arch` for multi-arch packages.
        .map(|n| n.split(':').next().unwrap_or(n))
        .collect();
    Ok(DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !present.contains(p))
        .collect())
}

fn install_debian_packages(installed: &mut Vec<String>) -> Result<()> {
    let missing = missing_debian_packages()?;
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "Debian packages missing: {}; installing them needs root \
             (run `cargo xtask deps` as root, or apt-get install them)",
            missing.join(" ")
        );
    }
    eprintln!("deps: installing Debian packages: {}", missing.join(" "));
    util::run(&mut util::cmd("apt-get", &["update"])).context("apt-get update")?;
    let mut cmd = util::cmd("apt-get", &["install", "-y", "--no-install-recommends"]);
    cmd.args(&missing).env("DEBIAN_FRONTEND", "noninteractive");
    util::run(&mut cmd).context("installing Debian packages")?;
    let still = missing_debian_packages()?;
    if !still.is_empty() {
        bail!(
            "apt-get succeeded but these are still not installed: {}",
            still.join(" ")
        );
    }
    for p in missing {
        println!("deps: installed Debian package {p}");
        installed.push(p.to_owned());
    }
    Ok(())
}

fn install_rust_src(installed: &mut Vec<String>) -> Result<()> {
    let toolchains = util::run(&mut util::cmd("rustup", &["toolchain", "list"]))
        .context("listing rustup toolchains (is rustup installed?)")?;
    if !toolchains
        .lines()
        .any(|l| l.starts_with("nightly-") || l.starts_with("nightly "))
    {
        bail!(
            "the rustup toolchain `{NIGHTLY}` is not installed; the eBPF program is built with \
             it (`rustup run nightly`). Toolchains cannot be downloaded on these machines: \
             install one where you can (`rustup toolchain install nightly`)"
        );
    }
    let components = util::run(&mut util::cmd(
        "rustup",
        &["component", "list", "--toolchain", NIGHTLY, "--installed"],
    ))
    .context("listing nightly components")?;
    if components.lines().any(|l| l.trim() == "rust-src") {
        return Ok(());
    }
    util::run(&mut util::cmd(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", NIGHTLY],
    ))
    .context("adding rust-src to the nightly toolchain (needed to build core for BPF)")?;
    println!("deps: installed rust-src for the {NIGHTLY} toolchain");
    installed.push("rust-src".into());
    Ok(())
}

/// `$CARGO_HOME/bin`, defaulting to `~/.cargo/bin`.
fn cargo_bin_dir() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|d| d.join("bin"))
}

/// Makes sure `dir` is in this process's PATH, so the cargo builds we start
/// (whose build scripts run `bpf-linker` by name) find it.
fn add_to_path(dir: &Path) -> Result<()> {
    let old = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&old).any(|p| p == dir) {
        return Ok(());
    }
    let new: OsString =
        std::env::join_paths(std::iter::once(dir.to_path_buf()).chain(std::env::split_paths(&old)))
            .context("building PATH")?;
    eprintln!("deps: adding {} to PATH for this run", dir.display());
    std::env::set_var("PATH", new);
    Ok(())
}

fn install_bpf_linker(installed: &mut Vec<String>) -> Result<()> {
    if util::run_quiet_ok(&mut util::cmd("bpf-linker", &["--version"])) {
        return Ok(());
    }
    let bin_dir = cargo_bin_dir().context("neither CARGO_HOME nor HOME is set")?;
    let in_cargo_bin = bin_dir.join("bpf-linker");
    if util::run_quiet_ok(&mut util::cmd(
        &in_cargo_bin.to_string_lossy(),
        &["--version"],
    )) {
        return add_to_path(&bin_dir);
    }
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        bail!("{LLVM_PREFIX} has no llvm-config; install llvm-22-dev first");
    }
    eprintln!(
        "deps: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a minute or two): \
         LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker --version {BPF_LINKER_VERSION} \
         --locked --no-default-features --features llvm-22"
    );
    // Plain `cargo install bpf-linker` picks LLVM 14 here and fails.
    let mut cmd = crate::daemon::cargo();
    cmd.args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
        "--no-default-features",
        "--features",
        "llvm-22",
    ])
    .env("LLVM_PREFIX", LLVM_PREFIX);
    let status = cmd
        .status()
        .with_context(|| format!("starting `{}`", util::display(&cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", util::display(&cmd));
    }
    add_to_path(&bin_dir)?;
    if !util::run_quiet_ok(&mut util::cmd("bpf-linker", &["--version"])) {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` still fails; look in {}",
            bin_dir.display()
        );
    }
    println!("deps: installed bpf-linker");
    installed.push("bpf-linker".into());
    Ok(())
}
