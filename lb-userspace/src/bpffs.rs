//! The BPF filesystem the datapath is pinned in.

use std::{ffi::CString, path::Path};

use anyhow::{bail, Context as _, Result};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: zeroed statfs is a valid out-parameter; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type == BPF_FS_MAGIC
}

/// Makes sure `dir` can hold pins: mounts bpffs on /sys/fs/bpf when `dir`
/// is under it and nothing is mounted there (some systems leave it
/// unmounted), then creates `dir`.
pub fn ensure_mounted(dir: &Path) -> Result<()> {
    let root = Path::new(DEFAULT_MOUNT);
    if dir.starts_with(root) && !is_bpffs(root) {
        let src = CString::new("bpf").expect("literal");
        let target = CString::new(DEFAULT_MOUNT).expect("literal");
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            bail!(
                "mounting bpffs on {DEFAULT_MOUNT}: {} (mount it with `mount -t bpf bpf {DEFAULT_MOUNT}`, \
                 or run without pinning: --no-pin)",
                std::io::Error::last_os_error()
            );
        }
        tracing::info!("mounted bpffs on {DEFAULT_MOUNT}");
    }
    let parent = dir.parent().unwrap_or(dir);
    if !is_bpffs(parent) && !is_bpffs(dir) {
        bail!(
            "{} is not on a BPF filesystem (pins need bpffs; `ip netns exec` hides it, use nsenter --net)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}
