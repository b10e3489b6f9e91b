//! The versioned JSON API under `/api/v1/`: what `metalbond diff` (and an
//! operator with `curl | jq`) reads. The Go-compatible documents
//! (`/routes.json`, `/routes.yaml`) stay exactly as they are; this is the
//! place for fields the Go binary never had.
//!
//! Owns: the JSON shapes of `/api/v1/...` and their errors (a JSON object
//! `{"error": "..."}` with a 4xx status).
//!
//! Must never: copy the route table. `/api/v1/summary` is built from the
//! per-VNI counts and digests the roles keep as routes change
//! (`StatusSource::vni_summaries`) and the peer list.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::telemetry::{StatusSource, VniSummaryView};
use crate::version::{GIT_COMMIT, VERSION};

/// `GET /api/v1/summary`.
#[derive(Serialize, Debug)]
pub(crate) struct Summary {
    /// Crate version.
    version: &'static str,
    /// Git commit of the build.
    commit: &'static str,
    /// `server` or `client`.
    role: &'static str,
    /// Seconds since the status port opened (at process start).
    uptime_seconds: u64,
    /// Sessions by state (server: its peers, live and departed ones held
    /// by `--peer-grace`; client: its servers).
    sessions: BTreeMap<&'static str, u64>,
    /// Routes in all VNIs (server: its table; client: received).
    routes: u64,
    /// The peer policy's `revision` (server with `--policy` and a revision
    /// in the file), else null.
    policy_revision: Option<String>,
    /// Every VNI with routes (or, on the server, subscribers).
    vnis: Vec<VniEntry>,
}

/// One VNI of the summary.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub(crate) struct VniEntry {
    /// The VNI.
    vni: u32,
    /// Routes in it.
    routes: u64,
    /// Peers subscribed (server only).
    #[serde(skip_serializing_if = "Option::is_none")]
    subscribers: Option<u64>,
    /// The route-set digest, 16 hex digits (`crate::digest`): equal on two
    /// replicas exactly when they hold the same routes (but for a 2⁻⁶⁴
    /// chance).
    digest: String,
}

impl From<VniSummaryView> for VniEntry {
    fn from(v: VniSummaryView) -> VniEntry {
        VniEntry {
            vni: v.vni.get(),
            routes: v.digest.routes(),
            subscribers: v.subscribers,
            digest: v.digest.to_string(),
        }
    }
}

/// The summary of `source` now.
pub(crate) fn summary(source: &dyn StatusSource, uptime: Duration) -> Summary {
    let mut sessions = BTreeMap::new();
    for p in source.peers() {
        *sessions.entry(p.state.name()).or_insert(0u64) += 1;
    }
    let vnis: Vec<VniEntry> = source
        .vni_summaries()
        .into_iter()
        .map(VniEntry::from)
        .collect();
    Summary {
        version: VERSION,
        commit: GIT_COMMIT,
        role: source.role().name(),
        uptime_seconds: uptime.as_secs(),
        sessions,
        routes: vnis.iter().map(|v| v.routes).sum(),
        policy_revision: source.policy().and_then(|p| p.revision),
        vnis,
    }
}

/// The body of an API error: `{"error": "..."}` and a newline.
pub(crate) fn error_body(message: &str) -> String {
    let mut body = serde_json::json!({ "error": message }).to_string();
    body.push('\n');
    body
}
