//! Peer policy on the reflector (`metalbond server --policy FILE`): who may
//! subscribe to which VNIs and announce which routes, decided by the peer's
//! source address.
//!
//! Owns: the file format and its parsing (`file`), compiled rules and their
//! checks (`rule`), the live policy shared by every shard with reload and
//! counters (`PolicyStore`), the refusal log lines and their process-wide
//! budget (`peer`, `refusal_log`), the warnings about rules earlier rules
//! shadow (`shadow`), and `metalbond policy check` (`check`).
//!
//! How the server uses it: at session start a peer's source address is
//! resolved to its rule once (`Policy::rule_for`, first match) and the peer
//! keeps an `Arc<Rule>`; per UPDATE or SUBSCRIBE it asks that rule (a few
//! lookups). On reload (SIGHUP) the store swaps in the new policy and each
//! peer resolves its rule again. Without `--policy` the server never calls
//! into this module.
//!
//! Must never: touch sockets, sessions or tables (the server acts on the
//! answers), or let a file that does not parse replace a working policy.

#![deny(missing_docs)]

pub mod file;
pub mod peer;
pub mod refusal_log;
pub mod rule;
mod shadow;

pub use metalbond_telemetry::status::{PolicyStatus, RuleStatus, NO_RULE_LABEL};
use metalbond_utils::{LockOrRecover, RwLockOrRecover};
use metalbond_wire::types::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

pub use file::{PolicyError, FORMAT_VERSION};
pub use peer::{PeerPolicy, Verdict};
pub use refusal_log::RefusalLog;
pub use rule::{Denial, OnViolation, Rule, RuleAuth, RuleCounters, TargetVnis, UpdateRate, VniSet};

/// A compiled policy: rules in file order, first match wins; no match
/// denies.
#[derive(Debug, Default)]
pub struct Policy {
    /// The file's `revision`, if set.
    pub revision: Option<String>,
    /// The rules.
    pub rules: Vec<Arc<Rule>>,
    /// What a valid file does differently from how it reads, one line each
    /// naming the rule: an IPv4-mapped prefix matched as IPv4, a rule (or
    /// some of its peers) that earlier rules shadow. Printed by `policy
    /// check`, logged at warn by the server when it loads the file.
    pub warnings: Vec<String>,
}

impl Policy {
    /// The rule for a peer whose source address is `source` (any form: an
    /// IPv4-mapped IPv6 address is matched as IPv4).
    pub fn rule_for(&self, source: IpAddr) -> Option<&Arc<Rule>> {
        let source = source.to_canonical();
        self.rules
            .iter()
            .find(|r| r.matching_prefix(source).is_some())
    }

    /// Every keyed peer prefix and its key (rules with `auth`), for the
    /// listening sockets: one entry per prefix (the policy refuses two
    /// keys for one prefix).
    pub fn md5_keys(&self) -> Vec<(IpNet, metalbond_utils::tcp_md5::Md5Key)> {
        let mut out: Vec<(IpNet, metalbond_utils::tcp_md5::Md5Key)> = Vec::new();
        for rule in &self.rules {
            let Some(auth) = &rule.auth else { continue };
            for p in &rule.peers {
                if !out.iter().any(|(q, _)| q == p) {
                    out.push((*p, auth.key.clone()));
                }
            }
        }
        out
    }

    /// Parses `text` on its own (tests, `policy check`), with fresh counters.
    pub fn from_yaml(path: &str, text: &str) -> Result<Policy, PolicyError> {
        file::parse(path, text, &mut |_| Arc::new(RuleCounters::default()))
    }
}

/// The running policy, shared by every shard and the status pages.
#[derive(Debug)]
pub struct PolicyStore {
    /// The file, re-read on reload.
    path: PathBuf,
    /// The active policy (read at session start and on reload only).
    current: RwLock<Arc<Policy>>,
    /// Bumped by each successful load (1 for the first).
    generation: AtomicU64,
    /// When the active policy was loaded.
    loaded_at: Mutex<SystemTime>,
    /// Counters by rule name, kept across reloads.
    counters: Mutex<HashMap<String, Arc<RuleCounters>>>,
    /// Refusals of peers that no rule matches.
    unmatched: Arc<RuleCounters>,
    /// Reloads that failed (the old policy stayed).
    failed_reloads: AtomicU64,
    /// The process-wide budget of refusal log lines, shared by every peer.
    refusal_log: Arc<RefusalLog>,
}

impl PolicyStore {
    /// Loads `path`; an error names the place in the file.
    pub fn load(path: &Path) -> Result<PolicyStore, PolicyError> {
        let store = PolicyStore {
            path: path.to_path_buf(),
            current: RwLock::new(Arc::new(Policy::default())),
            generation: AtomicU64::new(0),
            loaded_at: Mutex::new(SystemTime::now()),
            counters: Mutex::new(HashMap::new()),
            unmatched: Arc::new(RuleCounters::default()),
            failed_reloads: AtomicU64::new(0),
            refusal_log: RefusalLog::new(),
        };
        store.read_and_swap()?;
        Ok(store)
    }

    /// A store holding `policy` (tests and embedders without a file;
    /// `reload` then fails).
    pub fn from_policy(policy: Policy) -> PolicyStore {
        let counters = policy
            .rules
            .iter()
            .map(|r| (r.name.clone(), r.counters.clone()))
            .collect();
        PolicyStore {
            path: PathBuf::new(),
            current: RwLock::new(Arc::new(policy)),
            generation: AtomicU64::new(1),
            loaded_at: Mutex::new(SystemTime::now()),
            counters: Mutex::new(counters),
            unmatched: Arc::new(RuleCounters::default()),
            failed_reloads: AtomicU64::new(0),
            refusal_log: RefusalLog::new(),
        }
    }

    fn read_and_swap(&self) -> Result<Arc<Policy>, PolicyError> {
        let policy = {
            let mut counters = self.counters.lock_or_recover();
            file::load(&self.path, &mut |name| {
                counters.entry(name.to_string()).or_default().clone()
            })?
        };
        for w in &policy.warnings {
            tracing::warn!(file = %self.path.display(), "policy: {w}");
        }
        let policy = Arc::new(policy);
        *self.current.write_or_recover() = policy.clone();
        *self.loaded_at.lock_or_recover() = SystemTime::now();
        self.generation.fetch_add(1, Ordering::Relaxed);
        Ok(policy)
    }

    /// Re-reads the file. On success the new policy is active (peers still
    /// have to be told: `ServerHandle::reload_policy` does both); on failure
    /// the old one stays and the error says where the file is wrong.
    pub fn reload(&self) -> Result<Arc<Policy>, PolicyError> {
        let r = self.read_and_swap();
        if r.is_err() {
            self.failed_reloads.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// The active policy.
    pub fn current(&self) -> Arc<Policy> {
        self.current.read_or_recover().clone()
    }

    /// Successful loads so far; a peer resolved in an older generation
    /// resolves its rule again.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Counters for refusals of peers no rule matches.
    pub fn unmatched(&self) -> &RuleCounters {
        &self.unmatched
    }

    /// The process-wide budget of refusal log lines.
    pub fn refusal_log(&self) -> &Arc<RefusalLog> {
        &self.refusal_log
    }

    /// What the status pages show: revision, generation, per-rule counts.
    pub fn status(&self) -> PolicyStatus {
        let policy = self.current();
        let counters = self.counters.lock_or_recover();
        let row = |name: &str, c: &RuleCounters, active: bool| RuleStatus {
            name: name.to_string(),
            active,
            hits: c.hits(),
            denied: Denial::ALL
                .iter()
                .map(|d| (d.label(), c.denied_count(*d)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            withdrawn: c.withdrawn_count(),
            updates_admitted: c.admitted_count(),
            throttled_seconds: c.throttled_seconds(),
        };
        let mut rules: Vec<RuleStatus> = policy
            .rules
            .iter()
            .map(|r| row(&r.name, &r.counters, true))
            .collect();
        // Rules removed by a reload keep their counters (Prometheus
        // counters never go back).
        let mut gone: Vec<RuleStatus> = counters
            .iter()
            .filter(|(name, _)| !policy.rules.iter().any(|r| &r.name == *name))
            .map(|(name, c)| row(name, c, false))
            .collect();
        gone.sort_by(|a, b| a.name.cmp(&b.name));
        rules.extend(gone);
        rules.push(row(NO_RULE_LABEL, &self.unmatched, true));
        PolicyStatus {
            path: self.path.display().to_string(),
            format_version: FORMAT_VERSION,
            revision: policy.revision.clone(),
            generation: self.generation.load(Ordering::Relaxed),
            loaded_at: *self.loaded_at.lock_or_recover(),
            failed_reloads: self.failed_reloads.load(Ordering::Relaxed),
            log_lines_suppressed: self.refusal_log.suppressed_total(),
            warnings: policy.warnings.clone(),
            rules,
        }
    }
}

#[cfg(test)]
mod tests;
