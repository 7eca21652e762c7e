//! Helpers for running external commands and entering network namespaces.

use std::{
    ffi::OsStr,
    fs::File,
    os::fd::AsRawFd,
    path::Path,
    process::{Command, Output, Stdio},
};

use anyhow::{anyhow, bail, Context, Result};

/// Renders a command the way a user would type it, for error messages.
pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&shell_word(arg));
    }
    s
}

fn shell_word(arg: &OsStr) -> String {
    let a = arg.to_string_lossy();
    let plain = !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,[]".contains(c));
    if plain {
        a.into_owned()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null());
    cmd.output().with_context(|| {
        format!(
            "cannot start `{}` (is `{}` installed?)",
            display(cmd),
            cmd.get_program().to_string_lossy()
        )
    })
}

/// Runs `cmd` to completion and returns its stdout. A non-zero exit becomes an
/// error carrying the full command line and its stderr, so callers only add
/// *why* they ran it.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let detail = match (stderr.trim(), stdout.trim()) {
            ("", "") => String::new(),
            ("", o) => format!(": {o}"),
            (e, _) => format!(": {e}"),
        };
        bail!("`{}` failed ({}){detail}", display(cmd), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd`, discarding its output; true if it started and exited with 0.
/// For probes whose failure is an answer, not an error.
pub fn run_quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Builds a command from a program and its arguments.
pub fn cmd<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// Shorthand for `ip ARGS...`, run to completion.
pub fn ip(args: &[&str]) -> Result<String> {
    run(&mut cmd("ip", args))
}

/// Runs `f` on a fresh thread that has joined the network namespace pinned at
/// `/run/netns/NS`. `setns(CLONE_NEWNET)` only affects the calling thread, so
/// the rest of the process stays in its own namespace. Sockets created and
/// `/proc/sys/net` files opened inside `f` belong to that namespace.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = Path::new("/run/netns").join(ns);
    let file = File::open(&path).with_context(|| {
        format!(
            "opening network namespace {} (does it exist?)",
            path.display()
        )
    })?;
    let ns_name = ns.to_owned();
    let handle = std::thread::spawn(move || -> Result<T> {
        // SAFETY: setns only reads the descriptor, which `file` keeps open for
        // the duration of the call; it changes this thread's namespace only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("entering network namespace {ns_name}"));
        }
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| anyhow!("thread running inside namespace {ns} panicked"))?
}

/// Writes sysctls (keys in dotted form, e.g. `net.ipv4.ip_forward`) inside
/// namespace `ns`. Done in-process so it needs neither procps nor a shell.
pub fn sysctl(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let owned: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    in_netns(ns, move || -> Result<()> {
        for (key, value) in &owned {
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            std::fs::write(&path, value).with_context(|| format!("setting {key}={value}"))?;
        }
        Ok(())
    })?
    .with_context(|| format!("sysctl in namespace {ns}"))
}

/// Whether `pid` names a live (non-zombie) process.
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name, which may
        // itself contain spaces or parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The NUL-separated command line of `pid`, as a vector of arguments.
pub fn pid_cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Sends `sig` to `pid`; true if the signal was delivered.
pub fn signal(pid: i32, sig: libc::c_int) -> bool {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Reaps `pid` if it is our own exited child, so a kill followed by a
/// liveness check within one process does not see a zombie forever.
pub fn reap_if_child(pid: i32) {
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer; WNOHANG makes this non-blocking
    // and it fails harmlessly with ECHILD for processes that are not ours.
    unsafe {
        libc::waitpid(pid, &mut status, libc::WNOHANG);
    }
}
