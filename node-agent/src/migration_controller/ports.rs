//! The TCP ports a migration target listens on: a free one in the configured range
//! for a new receiving VMM, and whether the one it was given listens yet.

use crate::Error;
use crate::context::Context;
use crate::vm_dir::{Role, VmDir};

/// The port a receiving VMM was told to listen on, from its recorded command line.
pub fn listen_port(dir: &VmDir) -> Option<u16> {
    let pid = VmDir::read_pid(&dir.vmm_pid())?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let listen = args.iter().skip_while(|a| *a != "--listen").nth(1)?;
    listen.rsplit_once(':')?.1.parse().ok()
}

/// A port in the configured range that no socket here uses and no other receiving
/// VMM of this host was given. Connected sockets count too: the range may overlap
/// the kernel's ephemeral ports, and a client's port there makes the bind fail.
pub fn free_port(ctx: &Context) -> Result<u16, Error> {
    let used = ports_in_use();
    let taken: Vec<u16> = ctx
        .supervisor
        .all()
        .into_iter()
        .filter(|l| matches!(l.meta.role, Role::Receive { .. }))
        .filter_map(|l| listen_port(&l.dir))
        .collect();
    let (low, high) = ctx.settings.migration_ports;
    (low..=high).find(|p| !used.contains(p) && !taken.contains(p)).ok_or(Error::NoFreePort { low, high })
}

/// TCP ports in LISTEN state in this network namespace.
pub fn listening_ports() -> Vec<u16> {
    tcp_ports(true)
}

/// Local TCP ports of every socket in this network namespace, whatever its state.
fn ports_in_use() -> Vec<u16> {
    tcp_ports(false)
}

/// Local ports from /proc/net/tcp{,6}, of listening sockets only or of all.
fn tcp_ports(only_listening: bool) -> Vec<u16> {
    let mut ports = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        ports.extend(local_ports(&text, only_listening));
    }
    ports
}

/// The local ports in a /proc/net/tcp table: the second column is `address:port`
/// in hex, the fourth the state (`0A` is LISTEN).
fn local_ports(table: &str, only_listening: bool) -> impl Iterator<Item = u16> + '_ {
    table.lines().skip(1).filter_map(move |line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if only_listening && fields.get(3) != Some(&"0A") {
            return None;
        }
        u16::from_str_radix(fields.get(1)?.rsplit_once(':')?.1, 16).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_ports_sees_a_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listening_ports().contains(&port));
    }

    #[test]
    fn a_connected_socket_port_is_in_use_but_not_listening() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let port = client.local_addr().unwrap().port();
        assert!(ports_in_use().contains(&port), "a client's ephemeral port must not be offered for a migration");
        assert!(!listening_ports().contains(&port));
    }

    #[test]
    fn local_ports_reads_the_proc_table() {
        let table = "  sl  local_address rem_address   st\n   0: 0100007F:C030 00000000:0000 0A\n   1: 0100007F:9C40 0100007F:C030 01\n";
        assert_eq!(local_ports(table, false).collect::<Vec<_>>(), vec![0xC030, 0x9C40]);
        assert_eq!(local_ports(table, true).collect::<Vec<_>>(), vec![0xC030]);
    }
}
