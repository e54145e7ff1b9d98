//! Pod IP allocation for the simulated agent pods.
//!
//! KWOK hands out IPs for ordinary pods from the bottom of each node's `podCIDR`; the
//! simulator takes its IPs from the top, going down, like a `host-local` IPAM plugin
//! whose cursor runs the other way, so the two never meet on a node with a sane number of
//! pods. IPs seen on any pod of the node (KWOK's included) are never handed out twice.

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network, e.g. `127.16.3.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    base: u32,
    prefix: u8,
}

impl Cidr {
    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix) == self.base
    }

    /// True when every address of the network is in 127.0.0.0/8: the only range the
    /// test bed may bind to.
    pub fn is_loopback(&self) -> bool {
        self.prefix >= 8 && self.base >> 24 == 127
    }

    /// First and last usable host address (network and broadcast excluded where the
    /// network is large enough to have them).
    fn host_range(&self) -> (u32, u32) {
        let last = self.base | !Self::mask(self.prefix);
        if self.prefix >= 31 {
            (self.base, last)
        } else {
            (self.base + 1, last - 1)
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an IPv4 CIDR"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 CIDR"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{s:?} has a bad prefix length"))?;
        Ok(Self {
            base: u32::from(ip) & Self::mask(prefix),
            prefix,
        })
    }
}

/// Which IP each pod holds, per node.
#[derive(Debug, Default)]
pub struct Ipam {
    by_uid: HashMap<String, (String, Ipv4Addr)>,
    by_node: HashMap<String, HashMap<Ipv4Addr, String>>,
    /// Next candidate per node: allocation continues below the last IP handed out, so a
    /// replacement pod gets a fresh IP instead of its predecessor's.
    cursor: HashMap<String, u32>,
}

impl Ipam {
    /// Record an IP some pod holds. Returns false (and records nothing) when another pod
    /// already holds it on that node.
    pub fn claim(&mut self, uid: &str, node: &str, ip: Ipv4Addr) -> bool {
        if let Some((old_node, old_ip)) = self.by_uid.get(uid)
            && old_node == node
            && *old_ip == ip
        {
            return true;
        }
        let holders = self.by_node.entry(node.to_string()).or_default();
        if holders.get(&ip).is_some_and(|holder| holder != uid) {
            return false;
        }
        self.release(uid);
        self.by_node
            .entry(node.to_string())
            .or_default()
            .insert(ip, uid.to_string());
        self.by_uid.insert(uid.to_string(), (node.to_string(), ip));
        true
    }

    /// A free IP in `cidr` for `uid` on `node`, from the top of the range downward.
    pub fn allocate(&mut self, uid: &str, node: &str, cidr: Cidr) -> Option<Ipv4Addr> {
        if let Some((held_node, ip)) = self.by_uid.get(uid)
            && held_node == node
            && cidr.contains(*ip)
        {
            return Some(*ip);
        }
        let (first, last) = cidr.host_range();
        let size = last - first + 1;
        let start = self
            .cursor
            .get(node)
            .copied()
            .filter(|c| (first..=last).contains(c))
            .unwrap_or(last);
        let used = self.by_node.get(node);
        let found = (0..size)
            .map(|i| {
                // Walk down from the cursor, wrapping to the top of the range.
                let offset = (start - first + size - i) % size;
                first + offset
            })
            .find(|candidate| used.is_none_or(|u| !u.contains_key(&Ipv4Addr::from(*candidate))))?;
        let next = if found == first { last } else { found - 1 };
        self.cursor.insert(node.to_string(), next);
        let ip = Ipv4Addr::from(found);
        self.claim(uid, node, ip).then_some(ip)
    }

    /// A pod of ours kept `ip` across a simulator restart: continue allocating below it,
    /// so a replacement does not get an IP that was in use a moment ago.
    pub fn seed_cursor(&mut self, node: &str, ip: Ipv4Addr, cidr: Cidr) {
        let (first, last) = cidr.host_range();
        let below = u32::from(ip).saturating_sub(1).clamp(first, last);
        let cursor = self.cursor.entry(node.to_string()).or_insert(below);
        *cursor = (*cursor).min(below);
    }

    /// Forget the IP of `uid` (its pod is gone, or its process has exited for good).
    pub fn release(&mut self, uid: &str) {
        if let Some((node, ip)) = self.by_uid.remove(uid)
            && let Some(holders) = self.by_node.get_mut(&node)
        {
            if holders.get(&ip).is_some_and(|h| h == uid) {
                holders.remove(&ip);
            }
            if holders.is_empty() {
                self.by_node.remove(&node);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks_loopback() {
        let cidr: Cidr = "127.16.3.0/24".parse().unwrap();
        assert!(cidr.is_loopback());
        assert!(cidr.contains(Ipv4Addr::new(127, 16, 3, 200)));
        assert!(!cidr.contains(Ipv4Addr::new(127, 16, 4, 1)));
        assert!(!"10.0.0.0/8".parse::<Cidr>().unwrap().is_loopback());
        assert!(!"0.0.0.0/0".parse::<Cidr>().unwrap().is_loopback());
        assert!("127.0.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/64".parse::<Cidr>().is_err());
    }

    #[test]
    fn allocates_from_the_top_and_never_twice() {
        let cidr: Cidr = "127.16.0.0/24".parse().unwrap();
        let mut ipam = Ipam::default();
        assert!(ipam.claim("kwok-pod", "n0", Ipv4Addr::new(127, 16, 0, 253)));
        let a = ipam.allocate("a", "n0", cidr).unwrap();
        assert_eq!(a, Ipv4Addr::new(127, 16, 0, 254));
        assert_eq!(ipam.allocate("a", "n0", cidr), Some(a), "idempotent");
        let b = ipam.allocate("b", "n0", cidr).unwrap();
        assert_eq!(b, Ipv4Addr::new(127, 16, 0, 252), "skips KWOK's IP");
        ipam.release("a");
        let c = ipam.allocate("c", "n0", cidr).unwrap();
        assert_eq!(
            c,
            Ipv4Addr::new(127, 16, 0, 251),
            "a replacement gets a fresh IP"
        );
        assert!(!ipam.claim("d", "n0", c), "taken");
        ipam.seed_cursor("n0", Ipv4Addr::new(127, 16, 0, 200), cidr);
        assert_eq!(
            ipam.allocate("f", "n0", cidr),
            Some(Ipv4Addr::new(127, 16, 0, 199))
        );
        // Another node has its own range and cursor.
        let other: Cidr = "127.16.1.0/24".parse().unwrap();
        assert_eq!(
            ipam.allocate("e", "n1", other),
            Some(Ipv4Addr::new(127, 16, 1, 254))
        );
    }

    #[test]
    fn wraps_and_runs_out() {
        let cidr: Cidr = "127.16.0.0/30".parse().unwrap();
        let mut ipam = Ipam::default();
        assert_eq!(
            ipam.allocate("a", "n", cidr),
            Some(Ipv4Addr::new(127, 16, 0, 2))
        );
        assert_eq!(
            ipam.allocate("b", "n", cidr),
            Some(Ipv4Addr::new(127, 16, 0, 1))
        );
        assert_eq!(ipam.allocate("c", "n", cidr), None);
        ipam.release("a");
        assert_eq!(
            ipam.allocate("c", "n", cidr),
            Some(Ipv4Addr::new(127, 16, 0, 2))
        );
    }
}
