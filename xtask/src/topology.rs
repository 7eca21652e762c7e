//! The namespace test topology: a client, a load balancer and N backends,
//! each with one veth (`eth0`) into a bridge that lives in its own namespace.
//!
//! ```text
//!  xlb-client ─┐
//!  xlb-lb     ─┤ br0 in xlb-sw (ports p-client, p-lb, p-b1 …)
//!  xlb-b1..N  ─┘
//! ```
//!
//! Nothing here touches the host's namespace: every link is created inside
//! `xlb-sw` with its peer placed directly into the target namespace, and no
//! namespace gets a default route.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::util::{self, ip, run};

pub const CLIENT_NS: &str = "xlb-client";
pub const LB_NS: &str = "xlb-lb";
pub const SWITCH_NS: &str = "xlb-sw";

pub const VIP4: &str = "10.200.100.1";
pub const VIP6: &str = "fd00:200::100";
pub const CLIENT4: &str = "10.200.0.1";
pub const CLIENT6: &str = "fd00:200::1";
pub const LB4: &str = "10.200.0.2";
pub const LB6: &str = "fd00:200::2";

/// The benchmark's baseline forwarder host (`add_forwarder_host`), absent
/// from the topology `up` builds.
pub const FWD_NS: &str = "xlb-fwd";
pub const FWD4: &str = "10.200.0.4";
pub const FWD6: &str = "fd00:200::4";
/// The address the forwarder host forwards to the backends, as the LB does
/// VIP4: on every backend's lo, and reached by the client through FWD4.
pub const FWD_VIP4: &str = "10.200.100.2";

/// Ports every backend echo server listens on, TCP and UDP.
pub const SERVICE_PORTS: [u16; 2] = [8080, 8081];
/// Interface name of the topology link inside every host namespace.
pub const LB_IF: &str = "eth0";
/// Bridge inside the switch namespace.
pub const BRIDGE: &str = "br0";
pub const MAX_BACKENDS: usize = 9;

/// Where `up` records what it started, so `down` removes exactly that.
pub const STATE_DIR: &str = "/run/xlb-topology";
const PIDS_FILE: &str = "servers.pids";
const STATE_FILE: &str = "state";

const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
const SERVER_STOP_GRACE: Duration = Duration::from_secs(2);
const TENTATIVE_TIMEOUT: Duration = Duration::from_secs(5);

pub fn backend_ns(i: usize) -> String {
    format!("xlb-b{i}")
}

pub fn backend_name(i: usize) -> String {
    format!("b{i}")
}

pub fn backend_addr4(i: usize) -> String {
    format!("10.200.0.{}", 10 + i)
}

/// The host part is the decimal number written as hex digits (b1 ->
/// `fd00:200::11`), so v4 and v6 addresses of a backend read alike.
pub fn backend_addr6(i: usize) -> String {
    format!("fd00:200::{}", 10 + i)
}

/// Name of the bridge port (in `xlb-sw`) that leads to namespace `ns`.
pub fn switch_port(ns: &str) -> String {
    format!("p-{}", ns.trim_start_matches("xlb-"))
}

/// A command that runs `argv` inside namespace `ns`.
///
/// `nsenter --net` rather than `ip netns exec`: the latter remounts /sys,
/// which hides the bpffs mount and breaks pinning.
pub fn exec_in(ns: &str, argv: &[&str]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .args(argv);
    cmd
}

fn state_dir() -> &'static Path {
    Path::new(STATE_DIR)
}

/// Log file of backend `i`'s echo server.
pub fn server_log(i: usize) -> PathBuf {
    state_dir().join(format!("{}.log", backend_name(i)))
}

struct Host {
    ns: String,
    addr4: String,
    addr6: String,
    role: String,
}

fn hosts(backends: usize) -> Vec<Host> {
    let mut v = vec![
        Host {
            ns: CLIENT_NS.into(),
            addr4: CLIENT4.into(),
            addr6: CLIENT6.into(),
            role: "client".into(),
        },
        Host {
            ns: LB_NS.into(),
            addr4: LB4.into(),
            addr6: LB6.into(),
            role: "load balancer".into(),
        },
    ];
    v.extend((1..=backends).map(|i| Host {
        ns: backend_ns(i),
        addr4: backend_addr4(i),
        addr6: backend_addr6(i),
        role: format!("backend {}", backend_name(i)),
    }));
    v
}

fn check_backends(backends: usize) -> Result<()> {
    if !(1..=MAX_BACKENDS).contains(&backends) {
        bail!("backends must be between 1 and {MAX_BACKENDS}, got {backends}");
    }
    Ok(())
}

/// Builds the topology with `backends` backends and starts their echo
/// servers. Idempotent: a complete topology of the same size is left alone;
/// anything else of ours is torn down and rebuilt.
pub fn up(backends: usize) -> Result<()> {
    check_backends(backends)?;
    if is_up(backends) {
        eprintln!("topology already up with {backends} backends");
        return Ok(());
    }
    if !our_namespaces()?.is_empty() || state_dir().exists() {
        eprintln!("rebuilding topology with {backends} backends");
    }
    down().context("removing the previous topology")?;
    build(backends).context("building the topology (`cargo xtask topology down` cleans up)")
}

fn build(backends: usize) -> Result<()> {
    fs::create_dir_all(state_dir()).with_context(|| format!("creating {STATE_DIR}"))?;

    create_netns(SWITCH_NS)?;
    // The switch is pure L2: without IPv6 on it, br0 and the ports get no
    // link-local addresses and never answer anything themselves.
    util::sysctl(
        SWITCH_NS,
        &[
            ("net.ipv6.conf.all.disable_ipv6", "1"),
            ("net.ipv6.conf.default.disable_ipv6", "1"),
        ],
    )?;
    ip(&["-n", SWITCH_NS, "link", "set", "lo", "up"])
        .with_context(|| format!("bringing up lo in {SWITCH_NS}"))?;
    ip(&[
        "-n",
        SWITCH_NS,
        "link",
        "add",
        BRIDGE,
        "type",
        "bridge",
        "mcast_snooping",
        "0",
    ])
    .with_context(|| format!("creating bridge {BRIDGE} in {SWITCH_NS}"))?;
    ip(&["-n", SWITCH_NS, "link", "set", BRIDGE, "up"])
        .with_context(|| format!("bringing up {BRIDGE}"))?;

    let all = hosts(backends);
    for h in &all {
        build_host(h).with_context(|| format!("setting up namespace {}", h.ns))?;
    }

    ip(&[
        "-n",
        CLIENT_NS,
        "route",
        "add",
        &format!("{VIP4}/32"),
        "via",
        LB4,
    ])
    .context("adding the client's IPv4 VIP route")?;
    // More specific than the on-link /64, so VIP6 traffic goes to the LB's MAC.
    ip(&[
        "-n",
        CLIENT_NS,
        "-6",
        "route",
        "add",
        &format!("{VIP6}/128"),
        "via",
        LB6,
    ])
    .context("adding the client's IPv6 VIP route")?;

    // The LB must not route VIP traffic itself: only its XDP program may.
    util::sysctl(
        LB_NS,
        &[
            ("net.ipv4.ip_forward", "0"),
            ("net.ipv6.conf.all.forwarding", "0"),
        ],
    )?;

    for i in 1..=backends {
        configure_backend(i).with_context(|| format!("configuring backend {}", backend_ns(i)))?;
    }

    attach_pass_programs(&all).context("attaching XDP pass programs to the switch ports")?;

    for h in &all {
        wait_not_tentative(&h.ns)?;
    }

    start_servers(backends)?;

    fs::write(
        state_dir().join(STATE_FILE),
        format!("backends {backends}\n"),
    )
    .context("recording topology state")?;
    eprintln!("topology up with {backends} backends");
    Ok(())
}

/// Adds the benchmark's forwarder host to the topology `up` built with
/// `backends` backends: a namespace on the bridge like the LB's (a veth
/// `eth0`, a pass program on its switch port, no forwarding), FWD_VIP4 on
/// every backend's lo, and the client's route to it through FWD4. What
/// runs on its eth0 is the caller's. `down` removes it with the rest.
pub fn add_forwarder_host(backends: usize) -> Result<()> {
    check_backends(backends)?;
    let host = Host {
        ns: FWD_NS.into(),
        addr4: FWD4.into(),
        addr6: FWD6.into(),
        role: "forwarder".into(),
    };
    build_host(&host).with_context(|| format!("setting up namespace {FWD_NS}"))?;
    util::sysctl(
        FWD_NS,
        &[
            ("net.ipv4.ip_forward", "0"),
            ("net.ipv6.conf.all.forwarding", "0"),
        ],
    )?;
    for i in 1..=backends {
        ip(&[
            "-n",
            &backend_ns(i),
            "addr",
            "add",
            &format!("{FWD_VIP4}/32"),
            "dev",
            "lo",
        ])
        .with_context(|| format!("adding {FWD_VIP4} to lo in {}", backend_ns(i)))?;
    }
    ip(&[
        "-n",
        CLIENT_NS,
        "route",
        "add",
        &format!("{FWD_VIP4}/32"),
        "via",
        FWD4,
    ])
    .context("adding the client's route to the forwarder")?;
    attach_pass_programs(std::slice::from_ref(&host))
        .context("attaching an XDP pass program to the forwarder's switch port")?;
    wait_not_tentative(FWD_NS)
}

/// `ip -j link show dev DEV` in namespace `ns`: the link's JSON object.
fn link_json(ns: &str, dev: &str) -> Result<serde_json::Value> {
    let out = ip(&["-n", ns, "-j", "link", "show", "dev", dev])?;
    let mut v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("parsing `ip -j link show`: {out}"))?;
    v.get_mut(0)
        .map(serde_json::Value::take)
        .with_context(|| format!("`ip -j link show dev {dev}` in {ns} listed nothing"))
}

/// The MAC address of `eth0` in namespace `ns`.
pub fn mac_of(ns: &str) -> Result<String> {
    let link = link_json(ns, LB_IF)?;
    link.get("address")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("no address for {LB_IF} in {ns}: {link}"))
}

/// Whether `dev` in namespace `ns` has an XDP program attached.
pub fn has_xdp(ns: &str, dev: &str) -> Result<bool> {
    Ok(link_json(ns, dev)?.get("xdp").is_some())
}

fn create_netns(ns: &str) -> Result<()> {
    ip(&["netns", "add", ns]).with_context(|| format!("creating namespace {ns}"))?;
    Ok(())
}

fn build_host(h: &Host) -> Result<()> {
    create_netns(&h.ns)?;
    // Before eth0 exists, so it inherits `default`; `all` too, since DAD is
    // skipped only when both say so. Addresses must be usable immediately.
    util::sysctl(
        &h.ns,
        &[
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ],
    )?;
    let port = switch_port(&h.ns);
    // Creating the pair inside the switch with the peer placed straight into
    // the host namespace means no interface ever appears in the root
    // namespace, not even briefly.
    ip(&[
        "-n", SWITCH_NS, "link", "add", &port, "type", "veth", "peer", "name", LB_IF, "netns",
        &h.ns,
    ])
    .with_context(|| format!("creating veth pair {port} <-> {}:{LB_IF}", h.ns))?;
    ip(&[
        "-n", SWITCH_NS, "link", "set", &port, "master", BRIDGE, "up",
    ])
    .with_context(|| format!("enslaving {port} to {BRIDGE}"))?;

    ip(&["-n", &h.ns, "link", "set", "lo", "up"]).context("bringing up lo")?;
    ip(&[
        "-n",
        &h.ns,
        "addr",
        "add",
        &format!("{}/24", h.addr4),
        "dev",
        LB_IF,
    ])
    .context("adding IPv4 address")?;
    ip(&[
        "-n",
        &h.ns,
        "addr",
        "add",
        &format!("{}/64", h.addr6),
        "dev",
        LB_IF,
        "nodad",
    ])
    .context("adding IPv6 address")?;
    ip(&["-n", &h.ns, "link", "set", LB_IF, "up"]).context("bringing up eth0")?;

    // Local sockets hand veth frames with partial checksums; an XDP_TX'd
    // copy would keep them and arrive corrupt. Full checksums and no
    // super-frames from every sender avoid that.
    run(&mut exec_in(
        &h.ns,
        &[
            "ethtool", "-K", LB_IF, "tx", "off", "tso", "off", "gso", "off",
        ],
    ))
    .context("disabling checksum offload and segmentation offload on eth0")?;
    Ok(())
}

fn configure_backend(i: usize) -> Result<()> {
    let ns = backend_ns(i);
    // The VIP lives on lo so the kernel accepts DSR traffic addressed to it;
    // the sysctls keep the backend from answering ARP for it or using it as
    // an ARP source, which would steal the VIP from the LB.
    ip(&["-n", &ns, "addr", "add", &format!("{VIP4}/32"), "dev", "lo"])
        .context("adding IPv4 VIP to lo")?;
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{VIP6}/128"),
        "dev",
        "lo",
        "nodad",
    ])
    .context("adding IPv6 VIP to lo")?;
    util::sysctl(
        &ns,
        &[
            ("net.ipv4.conf.all.arp_ignore", "1"),
            ("net.ipv4.conf.all.arp_announce", "2"),
            ("net.ipv4.conf.eth0.arp_ignore", "1"),
            ("net.ipv4.conf.eth0.arp_announce", "2"),
            // Requests arrive from the client's address via the LB's MAC;
            // strict reverse-path checks have no reason to drop them, but be
            // explicit so a future asymmetric path cannot trip them.
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.eth0.rp_filter", "0"),
        ],
    )
}

/// Source of the XDP program put on every switch port. veth delivers an
/// XDP_TX'd or redirected frame only if the receiving peer runs XDP itself;
/// a program that passes everything satisfies that.
const XDP_PASS_C: &str = r#"// Generated by `cargo xtask topology up`.
#include <linux/bpf.h>

#define SEC(name) __attribute__((section(name), used))

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
"#;

fn find_clang() -> Result<&'static str> {
    ["clang", "clang-14", "/usr/lib/llvm-14/bin/clang"]
        .into_iter()
        .find(|c| util::run_quiet_ok(&mut util::cmd(c, &["--version"])))
        .context("no clang found (tried clang, clang-14); run `cargo xtask deps` to install it")
}

fn compile_pass_program(dir: &Path) -> Result<PathBuf> {
    if !Path::new("/usr/include/linux/bpf.h").exists() {
        bail!(
            "/usr/include/linux/bpf.h is missing: install the Debian package \
             linux-libc-dev (or run `cargo xtask deps`)"
        );
    }
    let clang = find_clang()?;
    let src = dir.join("xdp_pass.c");
    let obj = dir.join("xdp_pass.o");
    fs::write(&src, XDP_PASS_C).with_context(|| format!("writing {}", src.display()))?;
    let mut cmd = util::cmd(clang, &["-O2", "-g", "-target", "bpf", "-c"]);
    // Debian keeps asm/types.h under the multiarch directory, which clang
    // does not search when targeting bpf.
    let multiarch = Path::new("/usr/include/x86_64-linux-gnu");
    if multiarch.is_dir() {
        cmd.arg("-I").arg(multiarch);
    }
    cmd.arg(&src).arg("-o").arg(&obj);
    run(&mut cmd).context("compiling the XDP pass program")?;
    Ok(obj)
}

fn attach_pass_programs(all: &[Host]) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("xlb-xdp-pass.{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = (|| -> Result<()> {
        let obj = compile_pass_program(&dir)?;
        let obj = obj.to_str().context("temp path is not valid UTF-8")?;
        for h in all {
            let port = switch_port(&h.ns);
            let native = ip(&[
                "-n", SWITCH_NS, "link", "set", "dev", &port, "xdpdrv", "obj", obj, "sec", "xdp",
            ]);
            if let Err(e) = native {
                eprintln!("native XDP on {port} failed, using generic mode: {e:#}");
                ip(&[
                    "-n",
                    SWITCH_NS,
                    "link",
                    "set",
                    "dev",
                    &port,
                    "xdpgeneric",
                    "obj",
                    obj,
                    "sec",
                    "xdp",
                ])
                .with_context(|| format!("attaching XDP pass program to {port}"))?;
            }
            if !port_has_xdp(&port)? {
                bail!("{port} shows no XDP program after attaching one");
            }
        }
        Ok(())
    })();
    let _ = fs::remove_dir_all(&dir);
    result
}

fn port_has_xdp(port: &str) -> Result<bool> {
    has_xdp(SWITCH_NS, port)
}

fn wait_not_tentative(ns: &str) -> Result<()> {
    let deadline = Instant::now() + TENTATIVE_TIMEOUT;
    loop {
        let out = ip(&["-n", ns, "-6", "addr", "show", "tentative"])?;
        if out.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("IPv6 addresses in {ns} still tentative after {TENTATIVE_TIMEOUT:?}:\n{out}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn server_argv(i: usize, exe: &str) -> Vec<String> {
    let mut argv = vec![
        exe.to_owned(),
        "serve".into(),
        "--name".into(),
        backend_name(i),
    ];
    for p in SERVICE_PORTS {
        argv.extend(["--port".into(), p.to_string()]);
    }
    for b in [VIP4.into(), VIP6.into(), backend_addr4(i), backend_addr6(i)] {
        argv.extend(["--bind".into(), b]);
    }
    argv
}

fn xtask_exe() -> Result<String> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    Ok(exe
        .to_str()
        .context("xtask binary path is not valid UTF-8")?
        .to_owned())
}

/// Spawns backend `i`'s echo server with its output going to `log`.
fn spawn_server(i: usize, exe: &str, log: fs::File) -> Result<Child> {
    let argv = server_argv(i, exe);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut cmd = exec_in(&backend_ns(i), &argv);
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicating log handle")?)
        .stderr(log)
        // Own process group: a Ctrl-C aimed at the caller's terminal
        // must not take the servers down with it.
        .process_group(0);
    cmd.spawn()
        .with_context(|| format!("starting echo server: {}", util::display(&cmd)))
}

fn write_pids(servers: &[(String, i32)]) -> Result<()> {
    let text: String = servers
        .iter()
        .map(|(name, pid)| format!("{name} {pid}\n"))
        .collect();
    fs::write(state_dir().join(PIDS_FILE), text).context("recording server PIDs")
}

fn start_servers(backends: usize) -> Result<()> {
    let exe = xtask_exe()?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut pids = Vec::new();
    for i in 1..=backends {
        let log_path = server_log(i);
        let log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = spawn_server(i, &exe, log)?;
        // nsenter execs the target without forking, so this PID is the
        // server itself.
        pids.push((backend_name(i), i32::try_from(child.id())?));
        // Record as we go: if a later step fails, `down` still finds these.
        write_pids(&pids)?;
        children.push((i, child));
    }
    for (i, child) in &mut children {
        wait_server_ready(*i, child)?;
    }
    Ok(())
}

/// Stops backend `i`'s echo server (only the PID recorded for it, and only
/// if that is still our server) and waits until it is gone. Its namespace
/// and addresses stay, so connections to it are refused.
pub fn stop_server(i: usize) -> Result<()> {
    let name = backend_name(i);
    let pid = recorded_servers()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, pid)| pid)
        .with_context(|| format!("no echo server recorded for {name} (is the topology up?)"))?;
    if !is_our_server(&name, pid) {
        bail!("the echo server recorded for {name} (pid {pid}) is not running");
    }
    util::signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + SERVER_STOP_GRACE;
    let mut killed = false;
    loop {
        util::reap_if_child(pid);
        if !is_our_server(&name, pid) {
            return Ok(());
        }
        if Instant::now() > deadline {
            if killed {
                bail!("echo server {name} (pid {pid}) survived SIGKILL");
            }
            util::signal(pid, libc::SIGKILL);
            killed = true;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Starts backend `i`'s echo server again with the arguments `up` gave it,
/// records its new PID (so `down` stops it) and waits until it answers.
pub fn start_server(i: usize) -> Result<()> {
    let name = backend_name(i);
    let mut servers = recorded_servers();
    if let Some((_, pid)) = servers.iter().find(|(n, _)| *n == name) {
        if is_our_server(&name, *pid) {
            bail!("echo server {name} is already running (pid {pid})");
        }
    }
    let log_path = server_log(i);
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut child = spawn_server(i, &xtask_exe()?, log)?;
    let pid = i32::try_from(child.id())?;
    match servers.iter_mut().find(|(n, _)| *n == name) {
        Some(entry) => entry.1 = pid,
        None => servers.push((name, pid)),
    }
    write_pids(&servers)?;
    wait_server_ready(i, &mut child)
}

/// Asks backend `i`'s server for its name over TCP from the client
/// namespace, which proves both the server and the bridge path work.
fn server_answers(i: usize, timeout: Duration) -> Result<bool> {
    let addr: SocketAddr = format!("{}:{}", backend_addr4(i), SERVICE_PORTS[0]).parse()?;
    let want = backend_name(i);
    util::in_netns(CLIENT_NS, move || -> Result<bool> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"hello\n")?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line.trim_end() == want)
    })?
}

fn wait_server_ready(i: usize, child: &mut Child) -> Result<()> {
    let log = server_log(i);
    let deadline = Instant::now() + SERVER_READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "echo server {} exited ({status}); see {}:\n{}",
                backend_name(i),
                log.display(),
                fs::read_to_string(&log).unwrap_or_default().trim_end()
            );
        }
        if server_answers(i, Duration::from_millis(300)).unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "echo server {} did not answer on {}:{} within {SERVER_READY_TIMEOUT:?}; see {}",
                backend_name(i),
                backend_addr4(i),
                SERVICE_PORTS[0],
                log.display()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Namespaces whose names this module owns, as currently listed by `ip`.
pub fn our_namespaces() -> Result<BTreeSet<String>> {
    let out = ip(&["netns", "list"]).context("listing network namespaces")?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| is_our_namespace(n))
        .map(str::to_owned)
        .collect())
}

fn is_our_namespace(name: &str) -> bool {
    if [CLIENT_NS, LB_NS, SWITCH_NS, FWD_NS].contains(&name) {
        return true;
    }
    name.strip_prefix("xlb-b")
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Backend servers recorded by `up`: (name, pid).
fn recorded_servers() -> Vec<(String, i32)> {
    let Ok(text) = fs::read_to_string(state_dir().join(PIDS_FILE)) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let (name, pid) = l.split_once(' ')?;
            Some((name.to_owned(), pid.trim().parse().ok()?))
        })
        .collect()
}

/// Whether `pid` is still the echo server we recorded under `name`, so a
/// recycled PID is never signalled.
fn is_our_server(name: &str, pid: i32) -> bool {
    util::pid_alive(pid)
        && util::pid_cmdline(pid).is_some_and(|argv| {
            argv.iter().any(|a| a == "serve")
                && argv.windows(2).any(|w| w[0] == "--name" && w[1] == name)
        })
}

fn is_up(backends: usize) -> bool {
    let expected: BTreeSet<String> = hosts(backends)
        .into_iter()
        .map(|h| h.ns)
        .chain([SWITCH_NS.to_owned()])
        .collect();
    if our_namespaces().ok() != Some(expected) {
        return false;
    }
    let recorded = fs::read_to_string(state_dir().join(STATE_FILE)).unwrap_or_default();
    if recorded.trim() != format!("backends {backends}") {
        return false;
    }
    let servers = recorded_servers();
    if servers.len() != backends || !servers.iter().all(|(n, p)| is_our_server(n, *p)) {
        return false;
    }
    hosts(backends)
        .iter()
        .all(|h| port_has_xdp(&switch_port(&h.ns)).unwrap_or(false))
        && (1..=backends).all(|i| server_answers(i, Duration::from_millis(500)).unwrap_or(false))
}

fn stop_servers() {
    let servers: Vec<_> = recorded_servers()
        .into_iter()
        .filter(|(n, p)| is_our_server(n, *p))
        .collect();
    for (_, pid) in &servers {
        util::signal(*pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + SERVER_STOP_GRACE;
    loop {
        for (_, pid) in &servers {
            util::reap_if_child(*pid);
        }
        let left: Vec<_> = servers
            .iter()
            .filter(|(n, p)| is_our_server(n, *p))
            .collect();
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            for (name, pid) in left {
                eprintln!("echo server {name} (pid {pid}) ignored SIGTERM; killing it");
                util::signal(*pid, libc::SIGKILL);
                util::reap_if_child(*pid);
            }
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the recorded echo servers and deletes every namespace of ours that
/// exists. Tolerates any partial state; fails only if something that exists
/// could not be removed.
pub fn down() -> Result<()> {
    stop_servers();
    let mut failures = Vec::new();
    match our_namespaces() {
        Ok(names) => {
            for ns in names {
                if let Err(e) = ip(&["netns", "del", &ns]) {
                    failures.push(format!("deleting namespace {ns}: {e:#}"));
                }
            }
        }
        Err(e) => failures.push(format!("{e:#}")),
    }
    if state_dir().exists() {
        if let Err(e) = fs::remove_dir_all(state_dir()) {
            failures.push(format!("removing {STATE_DIR}: {e}"));
        }
    }
    if !failures.is_empty() {
        bail!("tearing down the topology:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

pub fn print_addresses(backends: usize) {
    println!(
        "{:<12} {:<6} {:<15} {:<16} role",
        "namespace", "if", "IPv4", "IPv6"
    );
    for h in hosts(backends) {
        println!(
            "{:<12} {:<6} {:<15} {:<16} {}",
            h.ns, LB_IF, h.addr4, h.addr6, h.role
        );
    }
    println!(
        "{:<12} {:<6} {:<15} {:<16} switch (bridge, no addresses)",
        SWITCH_NS, BRIDGE, "-", "-"
    );
    let ports: Vec<String> = SERVICE_PORTS.iter().map(u16::to_string).collect();
    println!(
        "VIPs: {VIP4} and {VIP6} (on lo in every backend), ports {} TCP+UDP",
        ports.join(", ")
    );
}

/// Probes every backend's own addresses (bypassing the load balancer) over
/// TCP and UDP, v4 and v6, from the client namespace. A smoke test of the
/// topology itself, independent of any XDP program on the LB.
pub fn check(backends: usize, count: usize) -> Result<()> {
    check_backends(backends)?;
    let count_arg = count.to_string();
    let mut bad = Vec::new();
    for i in 1..=backends {
        for target in [
            format!("{}:{}", backend_addr4(i), SERVICE_PORTS[0]),
            format!("[{}]:{}", backend_addr6(i), SERVICE_PORTS[1]),
        ] {
            for proto in ["tcp", "udp"] {
                let report: crate::probe::ShortReport = crate::probe::run_in_client(&[
                    "--target",
                    &target,
                    "--proto",
                    proto,
                    "--count",
                    &count_arg,
                    "--timeout-ms",
                    "1000",
                ])
                .with_context(|| format!("probing {target} over {proto}"))?;
                let only_self = report.per_backend.keys().all(|n| *n == backend_name(i));
                let verdict = if report.ok == count && only_self {
                    "ok"
                } else {
                    bad.push(format!("{proto} {target}"));
                    "FAIL"
                };
                println!(
                    "{verdict:<4} {proto} {target:<22} ok={} failed={} per_backend={:?} errors={:?}",
                    report.ok, report.failed, report.per_backend, report.errors
                );
            }
        }
    }
    if !bad.is_empty() {
        bail!("backends did not answer correctly: {}", bad.join(", "));
    }
    Ok(())
}
