//! Interface and neighbour facts, read through iproute2's JSON output.
//!
//! sysfs is avoided on purpose: under `nsenter --net` it still shows the
//! namespace that mounted /sys, while `ip` asks the kernel over netlink in
//! the caller's own network namespace.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use serde::Deserialize;

use crate::config::{MacAddr, XdpMode};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("running `{command}`: {message}")]
    Command { command: String, message: String },
    #[error("interface {0:?} does not exist in this network namespace")]
    NoInterface(String),
    #[error("interface {name:?} has no usable MAC address ({address:?})")]
    BadInterfaceMac { name: String, address: String },
    #[error(
        "backend {address}: no neighbour entry on {interface} after {waited_ms} ms \
         (is it on the same L2 segment? otherwise give its `mac:` in the config)"
    )]
    Unresolved {
        address: IpAddr,
        interface: String,
        waited_ms: u128,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    pub mac: MacAddr,
}

fn ip_json(args: &[&str]) -> Result<Vec<serde_json::Value>, NetError> {
    let command = format!("ip -j {}", args.join(" "));
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .map_err(|e| NetError::Command {
            command: command.clone(),
            message: format!("{e} (iproute2 is required)"),
        })?;
    if !out.status.success() {
        return Err(NetError::Command {
            command,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(&text).map_err(|e| NetError::Command {
        command,
        message: format!("unexpected output: {e}"),
    })
}

pub fn interface(name: &str) -> Result<Interface, NetError> {
    #[derive(Deserialize)]
    struct Link {
        ifindex: u32,
        address: Option<String>,
    }
    let links = ip_json(&["link", "show", "dev", name]).map_err(|e| match e {
        NetError::Command { ref message, .. } if message.contains("does not exist") => {
            NetError::NoInterface(name.to_string())
        }
        other => other,
    })?;
    let link: Link = links
        .into_iter()
        .next()
        .and_then(|v| serde_json::from_value(v).ok())
        .ok_or_else(|| NetError::NoInterface(name.to_string()))?;
    let text = link.address.unwrap_or_default();
    let mac = text
        .parse::<MacAddr>()
        .ok()
        .filter(|m| m.0 != [0; 6])
        .ok_or(NetError::BadInterfaceMac {
            name: name.to_string(),
            address: text,
        })?;
    Ok(Interface {
        name: name.to_string(),
        ifindex: link.ifindex,
        mac,
    })
}

/// The mode of the XDP program attached to `name`: `None` if there is
/// none, or it is offloaded, or several are (modes other than driver and
/// generic, which xdplb never attaches in).
pub fn xdp_mode(name: &str) -> Result<Option<XdpMode>, NetError> {
    let links = ip_json(&["link", "show", "dev", name])?;
    // iproute2 prints the kernel's IFLA_XDP_ATTACHED: 1 driver, 2 generic.
    let mode = links
        .first()
        .and_then(|l| l.get("xdp"))
        .and_then(|x| x.get("mode"))
        .and_then(serde_json::Value::as_u64);
    Ok(match mode {
        Some(1) => Some(XdpMode::Native),
        Some(2) => Some(XdpMode::Generic),
        _ => None,
    })
}

/// The neighbour table's MAC for `address` on `interface`, if it is usable.
fn lookup_neighbour(address: IpAddr, interface: &str) -> Result<Option<MacAddr>, NetError> {
    #[derive(Deserialize)]
    struct Neigh {
        lladdr: Option<String>,
        #[serde(default)]
        state: Vec<String>,
    }
    let addr = address.to_string();
    let entries = ip_json(&["neigh", "show", "to", &addr, "dev", interface])?;
    for v in entries {
        let Ok(n) = serde_json::from_value::<Neigh>(v) else {
            continue;
        };
        let unusable = n.state.iter().any(|s| s == "FAILED" || s == "INCOMPLETE");
        if let (Some(ll), false) = (n.lladdr, unusable) {
            if let Ok(mac) = ll.parse() {
                return Ok(Some(mac));
            }
        }
    }
    Ok(None)
}

/// Resolves a backend's MAC: the neighbour table first; if absent, a UDP
/// datagram to the discard port makes the kernel run ARP / neighbour
/// discovery, then the table is polled until `timeout`.
pub fn resolve_mac(
    address: IpAddr,
    interface: &str,
    timeout: Duration,
) -> Result<MacAddr, NetError> {
    if let Some(mac) = lookup_neighbour(address, interface)? {
        return Ok(mac);
    }
    let start = Instant::now();
    let mut next_probe = start;
    loop {
        if Instant::now() >= next_probe {
            let bind: SocketAddr = match address {
                IpAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
                IpAddr::V6(_) => "[::]:0".parse().expect("literal"),
            };
            // Best effort: a send error (no route) shows up as "unresolved".
            if let Ok(sock) = UdpSocket::bind(bind) {
                let _ = sock.send_to(b"xdplb neighbour probe", SocketAddr::new(address, 9));
            }
            next_probe = Instant::now() + Duration::from_millis(500);
        }
        std::thread::sleep(Duration::from_millis(50));
        if let Some(mac) = lookup_neighbour(address, interface)? {
            return Ok(mac);
        }
        if start.elapsed() >= timeout {
            return Err(NetError::Unresolved {
                address,
                interface: interface.to_string(),
                waited_ms: start.elapsed().as_millis(),
            });
        }
    }
}
