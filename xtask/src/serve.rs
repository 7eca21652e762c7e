//! Backend echo server: answers every TCP line and every UDP datagram with its
//! own name, so a client can tell which backend the load balancer picked.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::Args;

/// A request line longer than this is treated as a protocol error; it keeps a
/// misbehaving client from growing our buffer without bound.
const MAX_LINE: u64 = 64 * 1024;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Name sent back to clients (e.g. `b2`).
    #[arg(long)]
    pub name: String,
    /// Port to listen on, TCP and UDP; repeat for several.
    #[arg(long = "port", required = true)]
    pub ports: Vec<u16>,
    /// Address to bind; repeat for several. Specific addresses, not wildcards:
    /// a UDP reply leaves from the address its socket is bound to, and DSR
    /// needs the reply to come from the VIP.
    #[arg(long = "bind", required = true)]
    pub binds: Vec<IpAddr>,
}

pub fn run(args: ServeArgs) -> Result<()> {
    if args.binds.iter().any(IpAddr::is_unspecified) {
        bail!("--bind must be a specific address, not a wildcard");
    }
    // Every connection thread needs the reply for the life of the process.
    let reply: &'static [u8] = format!("{}\n", args.name).into_bytes().leak();

    // Bind everything before serving anything, so a bad address fails the
    // whole process at once (the topology waits for it and reports the log).
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for &ip in &args.binds {
        for &port in &args.ports {
            let addr = SocketAddr::new(ip, port);
            // std sets SO_REUSEADDR on Unix listeners, so a restarted server
            // can rebind while old connections sit in TIME_WAIT. Binding
            // specific v6 addresses never overlaps a v4 bind, so IPV6_V6ONLY
            // does not matter here.
            tcp.push(TcpListener::bind(addr).with_context(|| format!("binding TCP {addr}"))?);
            udp.push(UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?);
        }
    }

    let mut threads = Vec::new();
    for listener in tcp {
        let local = listener.local_addr()?;
        eprintln!("{}: TCP listening on {local}", args.name);
        threads.push(thread::spawn(move || accept_loop(listener, reply)));
    }
    for socket in udp {
        let local = socket.local_addr()?;
        eprintln!("{}: UDP listening on {local}", args.name);
        threads.push(thread::spawn(move || udp_loop(socket, reply)));
    }
    for t in threads {
        // The loops never return; a panic is reported by the runtime already.
        let _ = t.join();
    }
    bail!("all listeners stopped")
}

fn accept_loop(listener: TcpListener, reply: &'static [u8]) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                thread::spawn(move || {
                    if let Err(e) = serve_tcp(stream, reply) {
                        eprintln!("TCP {peer}: {e:#}");
                    }
                });
            }
            Err(e) => {
                eprintln!("accept on {:?}: {e}", listener.local_addr());
                // Typically EMFILE: back off instead of spinning.
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn serve_tcp(stream: TcpStream, reply: &'static [u8]) -> Result<()> {
    // Request/response on tiny lines: don't let Nagle hold replies back.
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    let mut writer = stream.try_clone().context("cloning stream")?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader
            .by_ref()
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .context("reading")?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            if n as u64 >= MAX_LINE {
                bail!("line longer than {MAX_LINE} bytes");
            }
            // Peer closed mid-line: nothing to answer.
            return Ok(());
        }
        writer.write_all(reply).context("writing reply")?;
    }
}

fn udp_loop(socket: UdpSocket, reply: &'static [u8]) {
    let mut buf = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                if let Err(e) = socket.send_to(reply, peer) {
                    eprintln!("UDP reply to {peer}: {e}");
                }
            }
            Err(e) => {
                eprintln!("UDP receive on {:?}: {e}", socket.local_addr());
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
