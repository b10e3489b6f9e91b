//! Waiting for the client's state: "until established", "until the VNI's
//! sync settled", awaitable (any async runtime) and blocking with a timeout.
//!
//! Owns: the conditions (`Check`) and the two ways to wait for them: async
//! (an `event_listener` listener, plus a `futures_timer::Delay` for the
//! quiet period) and blocking (the same listener with a deadline).
//!
//! Must never: hold the client lock while waiting, or need a particular
//! async runtime.
//!
//! "Settled": MetalBond has no end-of-table marker, so the client cannot
//! know that a server has sent all of a VNI's routes. A VNI counts as
//! settled when (1) we subscribe to it, (2) at least one server session is
//! ESTABLISHED, (3) for the quiet period nothing that starts a table dump
//! happened and no UPDATE for the VNI arrived: no subscription to it, no
//! session becoming ESTABLISHED, no UPDATE of that VNI from any server, and
//! (4) every change queued until then has reached the sink (so `routes(vni)`
//! holds the table). Called from inside the sink, (4) is skipped (the sink
//! cannot wait for itself).

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use event_listener::Listener;

use super::{Client, ClientError};
use metalbond_wire::session::SessionState;
use metalbond_wire::types::Vni;

/// Where a wait stands.
enum Check {
    /// Finished with this result.
    Done(Result<(), ClientError>),
    /// Look again after the next change of the client's state.
    WaitChange,
    /// Look again at this instant (a quiet period runs).
    WaitUntil(Instant),
}

impl Client {
    fn check_established(&self, address: Option<&str>) -> Check {
        let core = self.inner().lock();
        if core.shut_down {
            return Check::Done(Err(ClientError::ShutDown));
        }
        let done = match address {
            Some(address) => match core.servers.values().find(|s| s.address == address) {
                Some(slot) => slot.state == SessionState::Established,
                None => return Check::Done(Err(ClientError::UnknownServer(address.into()))),
            },
            None => core
                .servers
                .values()
                .any(|s| s.state == SessionState::Established),
        };
        if done {
            Check::Done(Ok(()))
        } else {
            Check::WaitChange
        }
    }

    fn check_settled(&self, vni: Vni, quiet: Duration) -> Check {
        let pushed = {
            let core = self.inner().lock();
            if core.shut_down {
                return Check::Done(Err(ClientError::ShutDown));
            }
            let Some(activity) = core.vni_activity.get(&vni) else {
                return Check::Done(Err(ClientError::NotSubscribed(vni)));
            };
            if !core
                .servers
                .values()
                .any(|s| s.state == SessionState::Established)
            {
                return Check::WaitChange;
            }
            let since = core
                .last_established
                .map_or(*activity, |e| e.max(*activity));
            let quiet_end = since + quiet;
            if Instant::now() < quiet_end {
                return Check::WaitUntil(quiet_end);
            }
            // Read under the core lock: every change of the VNI so far is
            // among these.
            core.delivery.pushed()
        };
        let delivery = &self.inner().delivery;
        if delivery.on_delivery_thread() || delivery.delivered() >= pushed {
            Check::Done(Ok(()))
        } else {
            Check::WaitChange
        }
    }

    /// Has `vni`'s table settled now (see the module doc: subscribed, a
    /// session ESTABLISHED, nothing for it for `quiet`, everything queued
    /// delivered)? Never waits; `false` also when not subscribed.
    pub fn is_settled(&self, vni: Vni, quiet: Duration) -> bool {
        matches!(self.check_settled(vni, quiet), Check::Done(Ok(())))
    }

    /// Awaits `check` (runtime-agnostic).
    async fn wait_async(&self, check: impl Fn() -> Check) -> Result<(), ClientError> {
        loop {
            // Listen before looking, so no change between the two is missed.
            let mut listener = self.inner().changed.listen();
            match check() {
                Check::Done(result) => return result,
                Check::WaitChange => (&mut listener).await,
                Check::WaitUntil(at) => {
                    let mut delay =
                        futures_timer::Delay::new(at.saturating_duration_since(Instant::now()));
                    // Whichever comes first: a change (e.g. shutdown) or the end of the quiet period.
                    std::future::poll_fn(|cx| {
                        if Pin::new(&mut listener).poll(cx).is_ready()
                            || Pin::new(&mut delay).poll(cx).is_ready()
                        {
                            Poll::Ready(())
                        } else {
                            Poll::Pending
                        }
                    })
                    .await;
                }
            }
        }
    }

    /// Blocks on `check` until `deadline`.
    fn wait_blocking(
        &self,
        deadline: Instant,
        check: impl Fn() -> Check,
    ) -> Result<(), ClientError> {
        loop {
            let listener = self.inner().changed.listen();
            let until = match check() {
                Check::Done(result) => return result,
                Check::WaitChange => deadline,
                Check::WaitUntil(at) => at.min(deadline),
            };
            if Instant::now() >= deadline {
                return Err(ClientError::TimedOut);
            }
            let _ = listener.wait_deadline(until);
        }
    }

    /// Resolves when the session to `address` is ESTABLISHED (at once if it
    /// is). Fails with `UnknownServer` if `address` is not (or no longer)
    /// one of ours, `ShutDown` when the client shuts down. Works in any
    /// async runtime; wrap it in the runtime's timeout for a bound.
    pub async fn established(&self, address: &str) -> Result<(), ClientError> {
        self.wait_async(|| self.check_established(Some(address)))
            .await
    }

    /// Resolves when any server session is ESTABLISHED.
    pub async fn any_established(&self) -> Result<(), ClientError> {
        self.wait_async(|| self.check_established(None)).await
    }

    /// Resolves when `vni`'s sync has settled: a session is ESTABLISHED, no
    /// UPDATE for `vni` (and no new session or subscription) for `quiet`,
    /// and the sink has been told everything (see the module doc for the
    /// exact rule). Fails with `NotSubscribed` if we do not (or no longer)
    /// subscribe to `vni`. After a reconnect, routes of the lost session
    /// that the new one did not send are still present (stale) until the
    /// `stale_hold` ends: settled does not wait for that.
    pub async fn settled(&self, vni: Vni, quiet: Duration) -> Result<(), ClientError> {
        self.wait_async(|| self.check_settled(vni, quiet)).await
    }

    /// Blocking `established`: `Err(TimedOut)` after `timeout`.
    pub fn wait_established(&self, address: &str, timeout: Duration) -> Result<(), ClientError> {
        self.wait_blocking(Instant::now() + timeout, || {
            self.check_established(Some(address))
        })
    }

    /// Blocking `any_established`: `Err(TimedOut)` after `timeout`.
    pub fn wait_any_established(&self, timeout: Duration) -> Result<(), ClientError> {
        self.wait_blocking(Instant::now() + timeout, || self.check_established(None))
    }

    /// Blocking `settled`: `Err(TimedOut)` after `timeout`.
    pub fn wait_settled(
        &self,
        vni: Vni,
        quiet: Duration,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        self.wait_blocking(Instant::now() + timeout, || self.check_settled(vni, quiet))
    }
}
