//! Rules that can never match as written: earlier rules match every
//! address of their peers first (first match wins).
//!
//! Owns: `shadowed` (one warning per rule, for `policy check` and the
//! server's load) and the prefix trie it walks the rules with: each peer
//! prefix is looked up among the earlier rules' prefixes, then added, so
//! a file of n prefixes costs n walks of at most 128 steps (10,000 rules
//! are checked in milliseconds, not the seconds a pairwise comparison
//! takes).
//!
//! Must never: refuse a file (a shadowed rule is valid, just useless), or
//! guess: a prefix is reported only when it is covered entirely, by one
//! earlier prefix containing it or by earlier prefixes inside it that
//! together cover it.

use std::sync::Arc;

use super::rule::Rule;
use metalbond_wire::types::IpNet;

/// Warnings about rules whose peers earlier rules match first: "can never
/// match" when that is true of all of a rule's peers, "some of its peers
/// never reach it" otherwise, each naming the prefixes and the rules that
/// take them.
pub fn shadowed(rules: &[Arc<Rule>]) -> Vec<String> {
    let mut earlier = Trie::default();
    let mut warnings = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let mut hidden: Vec<String> = Vec::new();
        for p in &rule.peers {
            if let Some(by) = earlier.covered_by(p) {
                let names: Vec<String> =
                    by.iter().map(|&j| format!("{:?}", rules[j].name)).collect();
                hidden.push(format!("{p} by rule {}", names.join(", ")));
            }
        }
        for p in &rule.peers {
            earlier.insert(p, i);
        }
        if hidden.is_empty() {
            continue;
        }
        let head = format!("rule {} ({:?})", rule.position, rule.name);
        warnings.push(if hidden.len() == rule.peers.len() {
            format!(
                "{head} can never match: earlier rules match all its peers first ({})",
                hidden.join("; ")
            )
        } else {
            format!(
                "{head}: some of its peers never reach it, earlier rules match them first ({})",
                hidden.join("; ")
            )
        });
    }
    warnings
}

/// A binary trie of prefixes, one root per address family.
#[derive(Default)]
struct Trie {
    /// Node 0 is the IPv4 root, node 1 the IPv6 root (made on first use).
    nodes: Vec<Node>,
}

/// One bit position of the trie.
#[derive(Default, Clone, Copy)]
struct Node {
    /// Children for bit 0 and bit 1 (0: none; the roots are never
    /// children).
    child: [u32; 2],
    /// The first rule (index) with exactly this prefix.
    rule: Option<usize>,
    /// Every address below this node is in some inserted prefix.
    full: bool,
}

/// A prefix as the trie walks it: its root, its bits left-aligned in a
/// u128, its length.
fn key(p: &IpNet) -> (usize, u128, u8) {
    match p {
        IpNet::V4(n) => (0, u128::from(u32::from(n.network())) << 96, n.prefix_len()),
        IpNet::V6(n) => (1, u128::from(n.network()), n.prefix_len()),
    }
}

/// Bit `i` (0 = most significant) of `bits`.
fn bit(bits: u128, i: u8) -> usize {
    ((bits >> (127 - u32::from(i))) & 1) as usize
}

impl Trie {
    fn roots(&mut self) {
        if self.nodes.is_empty() {
            self.nodes = vec![Node::default(); 2];
        }
    }

    /// Adds `p` of rule `rule`. A prefix inside one already added adds
    /// nothing (it is covered whatever comes below).
    fn insert(&mut self, p: &IpNet, rule: usize) {
        self.roots();
        let (root, bits, len) = key(p);
        let mut path = vec![root];
        let mut at = root;
        for i in 0..len {
            if self.nodes[at].rule.is_some() {
                return;
            }
            let b = bit(bits, i);
            let next = self.nodes[at].child[b] as usize;
            at = if next == 0 {
                self.nodes.push(Node::default());
                let n = self.nodes.len() - 1;
                self.nodes[at].child[b] = n as u32;
                n
            } else {
                next
            };
            path.push(at);
        }
        let node = &mut self.nodes[at];
        if node.rule.is_some() {
            return;
        }
        node.rule = Some(rule);
        node.full = true;
        // The nodes above are full once both their halves are.
        for &n in path.iter().rev().skip(1) {
            let [a, b] = self.nodes[n].child;
            let full =
                a != 0 && b != 0 && self.nodes[a as usize].full && self.nodes[b as usize].full;
            if !full || self.nodes[n].full {
                break;
            }
            self.nodes[n].full = true;
        }
    }

    /// The rules whose prefixes cover all of `p`, in file order: the
    /// first one containing it, or else every one inside it when together
    /// they cover it. `None` when some address of `p` is in no added
    /// prefix.
    fn covered_by(&self, p: &IpNet) -> Option<Vec<usize>> {
        if self.nodes.is_empty() {
            return None;
        }
        let (root, bits, len) = key(p);
        let mut first: Option<usize> = None;
        let mut at = root;
        for i in 0..=len {
            let node = self.nodes[at];
            if let Some(r) = node.rule {
                first = Some(first.map_or(r, |f| f.min(r)));
            }
            if i == len {
                break;
            }
            let next = node.child[bit(bits, i)];
            if next == 0 {
                return first.map(|r| vec![r]);
            }
            at = next as usize;
        }
        if let Some(r) = first {
            return Some(vec![r]);
        }
        if !self.nodes[at].full {
            return None;
        }
        let mut rules = Vec::new();
        let mut stack = vec![at];
        while let Some(n) = stack.pop() {
            let node = self.nodes[n];
            rules.extend(node.rule);
            stack.extend(node.child.iter().filter(|&&c| c != 0).map(|&c| c as usize));
        }
        rules.sort_unstable();
        rules.dedup();
        Some(rules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Is `p` covered by `earlier`, the slow way: one of them contains it,
    /// or those inside it aggregate to it.
    fn covered_pairwise(earlier: &[IpNet], p: &IpNet) -> bool {
        if earlier.iter().any(|q| q.contains(p)) {
            return true;
        }
        let inside: Vec<IpNet> = earlier.iter().filter(|q| p.contains(*q)).copied().collect();
        IpNet::aggregate(&inside).iter().any(|a| a.contains(p))
    }

    #[test]
    fn the_trie_agrees_with_pairwise_comparison() {
        // Deterministic pseudo-random prefixes in 10.0.0.0/12 and
        // 2001:db8::/44, /12 to /16 long: dense enough that unions cover.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..50 {
            let mut trie = Trie::default();
            let mut seen: Vec<IpNet> = Vec::new();
            for i in 0..60 {
                let r = next();
                let len = 12 + (r % 5) as u8;
                let p: IpNet = if r & 1 == 0 {
                    let a = 0x0a00_0000u32 | ((r >> 8) as u32 & 0x000f_ffff);
                    ipnet::Ipv4Net::new(a.into(), len).unwrap().trunc().into()
                } else {
                    let a = (0x2001_0db8u128 << 96) | (u128::from(r >> 8 & 0xf_ffff) << 64);
                    ipnet::Ipv6Net::new(a.into(), 32 + len)
                        .unwrap()
                        .trunc()
                        .into()
                };
                let want = covered_pairwise(&seen, &p);
                assert_eq!(
                    trie.covered_by(&p).is_some(),
                    want,
                    "round {round}, prefix {i} {p} after {seen:?}"
                );
                trie.insert(&p, i);
                seen.push(p);
            }
        }
    }

    #[test]
    fn the_first_rule_containing_a_prefix_is_named() {
        let mut trie = Trie::default();
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        trie.insert(&net("10.0.0.0/25"), 0);
        trie.insert(&net("10.0.0.0/24"), 1);
        trie.insert(&net("2001:db8::/33"), 2);
        trie.insert(&net("2001:db8:8000::/33"), 3);
        assert_eq!(trie.covered_by(&net("10.0.0.0/26")), Some(vec![0]));
        assert_eq!(trie.covered_by(&net("10.0.0.128/25")), Some(vec![1]));
        assert_eq!(trie.covered_by(&net("10.0.0.0/23")), None);
        assert_eq!(trie.covered_by(&net("2001:db8::/32")), Some(vec![2, 3]));
        assert_eq!(trie.covered_by(&net("2001:db8::/31")), None);
        assert_eq!(trie.covered_by(&net("0.0.0.0/0")), None);
    }
}
