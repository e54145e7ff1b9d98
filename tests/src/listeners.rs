//! Where the test bed's processes listen. The test bed's rule is loopback only: every
//! listening socket of every process it started (its pid files) is bound to 127.0.0.0/8
//! or ::1. A component that binds 0.0.0.0 by default (Argo CD's controller metrics did)
//! fails the test bed's tests instead of being trusted.
//!
//! Caveats: TCP only (nothing in the test bed serves UDP); a process's children are not
//! followed (every component runs as the process its pid file names).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// A listening TCP socket a test-bed process holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// The pid file's name: the component.
    pub component: String,
    pub address: IpAddr,
    pub port: u16,
}

/// Every listening TCP socket held by a process of the test bed in `testbed` (its
/// `pids/*.pid` files).
pub fn of_testbed(testbed: &Path) -> std::io::Result<Vec<Listener>> {
    let listening = [("/proc/net/tcp", false), ("/proc/net/tcp6", true)]
        .iter()
        .filter_map(|(path, v6)| std::fs::read_to_string(path).ok().map(|t| (t, *v6)))
        .flat_map(|(text, v6)| parse_listening(&text, v6))
        .collect::<Vec<_>>();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(testbed.join("pids"))? {
        let path = entry?.path();
        let Some(component) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let text = std::fs::read_to_string(&path)?;
        let Some(pid) = text.split_whitespace().next() else {
            continue;
        };
        let inodes = socket_inodes(pid);
        out.extend(
            listening
                .iter()
                .filter(|l| inodes.contains(&l.inode))
                .map(|l| Listener {
                    component: component.to_string(),
                    address: l.address,
                    port: l.port,
                }),
        );
    }
    Ok(out)
}

/// Why the test bed breaks its loopback rule, if it does: a listener outside loopback, or
/// one of `required` (pid-file names) holding no listener at all (so the check saw it).
pub fn check_loopback_only(testbed: &Path, required: &[&str]) -> Result<(), String> {
    let listeners =
        of_testbed(testbed).map_err(|e| format!("cannot read the test bed's pid files: {e}"))?;
    if let Some(missing) = required
        .iter()
        .find(|c| !listeners.iter().any(|l| l.component == **c))
    {
        return Err(format!("no listener of {missing} found: {listeners:?}"));
    }
    let exposed: Vec<_> = listeners
        .iter()
        .filter(|l| !l.address.is_loopback())
        .collect();
    match exposed.is_empty() {
        true => Ok(()),
        false => Err(format!("listening outside loopback: {exposed:?}")),
    }
}

/// The socket inodes a process holds (none when it is gone).
fn socket_inodes(pid: &str) -> HashSet<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

#[derive(Debug, PartialEq)]
struct Listening {
    address: IpAddr,
    port: u16,
    inode: u64,
}

/// The LISTEN rows of `/proc/net/tcp` or `tcp6`.
fn parse_listening(text: &str, v6: bool) -> Vec<Listening> {
    const LISTEN: &str = "0A";
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
            if *state != LISTEN {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            Some(Listening {
                address: parse_address(addr, v6)?,
                port: u16::from_str_radix(port, 16).ok()?,
                inode: inode.parse().ok()?,
            })
        })
        .collect()
}

/// The kernel prints addresses as 32-bit words in host byte order (little-endian here).
fn parse_address(hex: &str, v6: bool) -> Option<IpAddr> {
    let words: Vec<u32> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    if v6 {
        let octets: [u8; 16] = bytes.try_into().ok()?;
        let v6 = Ipv6Addr::from(octets);
        // A v4-mapped address is judged as the v4 address it maps.
        Some(match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        })
    } else {
        let octets: [u8; 4] = bytes.try_into().ok()?;
        Some(IpAddr::V4(Ipv4Addr::from(octets)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_rows_are_read_with_their_addresses() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:A028 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0 100 0 0 10 0
   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1002 1 0 100 0 0 10 0
   2: 0100007F:A028 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0 100 0 0 10 0
   3: 0B08117F:2382 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1004 1 0 100 0 0 10 0";
        let got = parse_listening(tcp, false);
        let want = vec![
            Listening {
                address: "127.0.0.1".parse().unwrap(),
                port: 41000,
                inode: 1001,
            },
            Listening {
                address: "0.0.0.0".parse().unwrap(),
                port: 8080,
                inode: 1002,
            },
            Listening {
                address: "127.17.8.11".parse().unwrap(),
                port: 9090,
                inode: 1004,
            },
        ];
        assert_eq!(got, want);
        assert!(!got[1].address.is_loopback());
        assert!(got[2].address.is_loopback());
    }

    #[test]
    fn v6_rows_map_v4_and_know_any_from_loopback() {
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2001 1 0 100 0 0 10 0
   1: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2002 1 0 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:1F92 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2003 1 0 100 0 0 10 0";
        let got: Vec<(String, bool)> = parse_listening(tcp6, true)
            .into_iter()
            .map(|l| (l.address.to_string(), l.address.is_loopback()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("::".to_string(), false),
                ("::1".to_string(), true),
                ("127.0.0.1".to_string(), true),
            ]
        );
    }
}
