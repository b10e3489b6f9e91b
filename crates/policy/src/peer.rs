//! One session's view of the policy: its rule, resolved once from its
//! source address, the verdicts on its messages, counting and rate-limited
//! logging of refusals.
//!
//! Owns: `PeerPolicy` (held by a server peer's reader for the session, or
//! until a reload makes it resolve again) and `Verdict`.
//!
//! Logging: a refusal (a refused UPDATE or SUBSCRIBE, or a session the
//! policy closes: no rule matches, or a `close` rule was violated) is one
//! warn line, at most one per peer and reason every `LOG_EVERY`, and only
//! while the process-wide budget (`RefusalLog`, shared by every peer) has
//! room; the budget reports what it suppressed.
//!
//! Must never: touch the session or tables itself (the server acts on the
//! verdict), or log more than one line per peer, reason and
//! `LOG_EVERY` (a peer announcing a million forbidden routes costs
//! counters, not a million log lines), or write a refusal line the
//! process-wide budget has no room for (300 refused sessions cost a
//! handful of lines, not 300).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::refusal_log::RefusalLog;
use super::rule::{Denial, OnViolation, Rule};
use super::PolicyStore;
use metalbond_wire::types::{Route, Vni};

/// At most one log line per peer and reason this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// What the server does with a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Handle it as without a policy.
    Allow,
    /// Drop it (already counted and, rate-limited, logged).
    Refuse,
    /// Close the session with this reason (the rule says `close`).
    Close(String),
}

/// A session's rule and its refusal log state.
#[derive(Debug)]
pub struct PeerPolicy {
    /// The rule its source address resolved to.
    rule: Arc<Rule>,
    /// Its source address, canonical (for `self` next hops).
    source: IpAddr,
    /// The store generation the rule was resolved in.
    generation: u64,
    /// Per reason: when a line was last logged and refusals since.
    logged: HashMap<Denial, (Option<Instant>, u64)>,
    /// The process-wide budget of refusal lines (the store's).
    log: Arc<RefusalLog>,
}

impl PeerPolicy {
    /// Resolves the rule for `peer`. `Err` is the close reason when no rule
    /// matches (counted as `no_rule`, logged within the process-wide
    /// budget): such a peer gets nothing at all.
    pub fn resolve(store: &PolicyStore, peer: SocketAddr) -> Result<PeerPolicy, String> {
        let generation = store.generation();
        let policy = store.current();
        let source = peer.ip().to_canonical();
        match policy.rule_for(source) {
            Some(rule) => {
                rule.counters.hit();
                tracing::debug!(peer = %peer, rule = %rule.name, "policy rule resolved");
                Ok(PeerPolicy {
                    rule: rule.clone(),
                    source,
                    generation,
                    logged: HashMap::new(),
                    log: store.refusal_log().clone(),
                })
            }
            None => {
                store.unmatched().denied(Denial::NoRule);
                let reason = format!("policy: no rule matches {source}; the peer may do nothing");
                if store.refusal_log().admit() {
                    tracing::warn!(peer = %source, reason = %reason, "closing peer");
                }
                Err(reason)
            }
        }
    }

    /// The rule.
    pub fn rule(&self) -> &Rule {
        &self.rule
    }

    /// The store generation this was resolved in (a newer one means: resolve
    /// again).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Does the rule allow `route`? Pure (no counting): reloads use it to
    /// find routes that became forbidden.
    pub fn allows(&self, route: &Route) -> bool {
        self.rule.check_announce(route, self.source).is_ok()
    }

    /// May `vni` be subscribed to? Pure.
    pub fn allows_subscribe(&self, vni: Vni) -> bool {
        self.rule.may_subscribe(vni)
    }

    /// The verdict on an ADD of `route` from `peer`.
    pub fn on_announce(&mut self, peer: SocketAddr, route: &Route) -> Verdict {
        match self.rule.check_announce(route, self.source) {
            Ok(()) => Verdict::Allow,
            Err(why) => self.refused(peer, why, &route.to_string()),
        }
    }

    /// The verdict on a SUBSCRIBE of `vni` from `peer`.
    pub fn on_subscribe(&mut self, peer: SocketAddr, vni: Vni) -> Verdict {
        if self.rule.may_subscribe(vni) {
            Verdict::Allow
        } else {
            self.refused(peer, Denial::SubscribeVni, &format!("SUBSCRIBE vni {vni}"))
        }
    }

    /// The rule's routes limit, replacing `--max-routes-per-peer`.
    pub fn route_limit(&self) -> Option<usize> {
        self.rule.limits.max_routes
    }

    /// The rule's subscriptions limit, replacing
    /// `--max-subscriptions-per-peer`.
    pub fn subscription_limit(&self) -> Option<usize> {
        self.rule.limits.max_subscriptions
    }

    /// The rule's update rate, replacing `--max-updates-per-second`.
    pub fn update_rate(&self) -> Option<crate::UpdateRate> {
        self.rule.limits.update_rate
    }

    /// The rule's counters (shared across reloads by rule name).
    pub fn counters(&self) -> &std::sync::Arc<crate::RuleCounters> {
        &self.rule.counters
    }

    /// Where a limit of the rule is set (`key`: `max_routes`,
    /// `max_subscriptions`), for the close reason of a peer above it.
    pub fn limit_origin(&self, key: &str) -> String {
        format!("policy rule {:?} limits.{key}", self.rule.name)
    }

    fn refused(&mut self, peer: SocketAddr, why: Denial, what: &str) -> Verdict {
        self.rule.counters.denied(why);
        if self.rule.on_violation == OnViolation::Close {
            let reason = format!(
                "policy violation (rule {:?}): {}: {what}",
                self.rule.name,
                why.describe()
            );
            if self.log.admit() {
                tracing::warn!(peer = %peer, reason = %reason, "closing peer");
            }
            return Verdict::Close(reason);
        }
        let now = Instant::now();
        let entry = self.logged.entry(why).or_insert((None, 0));
        entry.1 += 1;
        if entry
            .0
            .is_none_or(|last| now.duration_since(last) >= LOG_EVERY)
        {
            // Due for this peer; written if the process-wide budget has
            // room. Either way the peer's count starts again, so a peer
            // whose line was suppressed asks the budget again only after
            // `LOG_EVERY`, not per refusal.
            if self.log.admit() {
                tracing::warn!(
                peer = %peer,
                rule = %self.rule.name,
                reason = why.label(),
                refused = entry.1,
                example = %what,
                "policy refused: {} (one line per peer and reason every {}s; `refused` counts since the last)",
                why.describe(),
                LOG_EVERY.as_secs()
                );
            }
            *entry = (Some(now), 0);
        }
        Verdict::Refuse
    }
}
