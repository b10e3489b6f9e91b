//! `--http ADDR` for the client: the shared status pages (`crate::http`:
//! `/`, `/routes.json`, `/routes.yaml`, `/peers`, `/metrics`) fed by the
//! client's state.
//!
//! Owns: `ClientStatusSource`, the mapping from the client's core (servers,
//! subscriptions, announcements, present routes) to the status views.
//!
//! Must never: hold the client lock while rendering or writing (each view
//! is copied under one short lock), or keep a stopped client alive (it
//! holds a `Weak`).

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use super::{Client, ClientInner};
use crate::http::{
    self, HttpError, HttpHandle, MetricsView, PeerView, RouteTableView, StatusRole, StatusSource,
};
use crate::session::SessionState;
use crate::types::Vni;

/// Starts the status pages for `client` on `addr` (own threads; stopped
/// when the returned handle is shut down or dropped).
pub fn serve(addr: SocketAddr, client: &Client) -> Result<HttpHandle, HttpError> {
    http::serve(
        addr,
        Arc::new(ClientStatusSource {
            inner: Arc::downgrade(&client.inner),
        }),
    )
}

/// The client as the status pages see it.
pub struct ClientStatusSource {
    /// The client's shared state; gone once the client is dropped.
    inner: Weak<ClientInner>,
}

impl StatusSource for ClientStatusSource {
    fn role(&self) -> StatusRole {
        StatusRole::Client
    }

    fn routes(&self) -> RouteTableView {
        let routes = match self.inner.upgrade() {
            Some(inner) => inner.lock().present.present(),
            None => Vec::new(),
        };
        RouteTableView::from_routes(
            routes
                .into_iter()
                .map(|r| (r.vni, r.destination, r.next_hop)),
        )
    }

    fn peers(&self) -> Vec<PeerView> {
        let Some(inner) = self.inner.upgrade() else {
            return Vec::new();
        };
        let core = inner.lock();
        let announced = core.announcements.len() as u64;
        let subscribed: Vec<Vni> = core.subscriptions.iter().copied().collect();
        core.servers
            .iter()
            .map(|(id, s)| PeerView {
                address: s.address.clone(),
                state: s.state,
                shard: None,
                keepalive: None,
                routes_announced: announced,
                routes_received: Some(core.present.held_by(*id) as u64),
                vnis_subscribed: subscribed.clone(),
                frames_in: None,
                bytes_in: None,
                frames_out: None,
                bytes_out: None,
                queued_bytes: None,
                connected_since: None,
            })
            .collect()
    }

    fn metrics(&self) -> MetricsView {
        let Some(inner) = self.inner.upgrade() else {
            return MetricsView::default();
        };
        let (states, present) = {
            let core = inner.lock();
            let states: Vec<SessionState> = core.servers.values().map(|s| s.state).collect();
            (states, core.present.present())
        };
        let mut peers_by_state: Vec<(String, u64)> = [
            SessionState::Connecting,
            SessionState::HelloSent,
            SessionState::Established,
            SessionState::Retry,
        ]
        .iter()
        .map(|st| (st.name().to_string(), 0))
        .collect();
        for st in states {
            match peers_by_state.iter_mut().find(|(n, _)| n == st.name()) {
                Some((_, c)) => *c += 1,
                None => peers_by_state.push((st.name().to_string(), 1)),
            }
        }
        let table = RouteTableView::from_routes(
            present
                .into_iter()
                .map(|r| (r.vni, r.destination, r.next_hop)),
        );
        MetricsView {
            peers_by_state,
            routes_per_vni: table
                .vnis
                .iter()
                .map(|v| (v.vni, v.route_count() as u64))
                .collect(),
            routes_total: table.route_count() as u64,
            ..MetricsView::default()
        }
    }
}
