//! What a panic does to a process running MetalBond: it ends it.
//!
//! Why: a panic unwinds only the thread it happens on. A server shard whose
//! task panicked leaves its peers unserved, its messages counted in the
//! shared pending total (every routing reader stalls once it passes the
//! high mark) and the other shards logging a closed channel; a netlink
//! thread that panicked leaves a client that receives routes and installs
//! none. Such a process answers its health checks and looks alive while it
//! has stopped doing its job. Restarting the failed part in place would
//! need every other part to rebuild what it shared with it; exiting at
//! once is simple and already covered: systemd's `Restart=` starts a new
//! process, and the hitless-restart rules (the server's grace for its
//! peers' routes, the client keeping its kernel routes) bridge the gap.
//!
//! So the binaries call `exit_on_panic` first thing: any panic on any
//! thread logs one error line (thread, message, location), prints the
//! usual panic report, and exits with status 101 (what a panicking `main`
//! returns). The one kind of panic that is not fatal is one the code
//! expects and turns into an error (glommio panics, rather than failing,
//! on some io_uring set-up errors): such code runs it in `catch_expected`.
//! An embedder chooses for its own process; `exit_on_panic` is public.
//!
//! `injected_fault` is the test-only hook that makes a named part panic
//! (`METALBOND_TEST_FAULT`), so the tests can show the policy holds.
//!
//! Must never: catch a panic outside `catch_expected`, or do more in the
//! hook than log and exit (the panicking thread may hold any lock).

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};

/// Exit status of a process ended by a panic (as a panicking `main`).
pub const PANIC_EXIT_STATUS: i32 = 101;

/// Environment variable naming a part to panic (`injected_fault`).
pub const FAULT_VAR: &str = "METALBOND_TEST_FAULT";

thread_local! {
    /// Depth of `catch_expected` calls on this thread: a panic inside one
    /// is the caller's to handle.
    static EXPECTED: Cell<u32> = const { Cell::new(0) };
}

/// Installs the process's panic hook: a panic outside `catch_expected`
/// logs, reports and exits the process with `PANIC_EXIT_STATUS`.
pub fn exit_on_panic() {
    let report = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        report(info);
        if EXPECTED.with(Cell::get) > 0 {
            return;
        }
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(
            thread = name,
            %location,
            "a thread panicked: {}; exiting (status {PANIC_EXIT_STATUS}) rather than \
             running on without it",
            payload_text(info.payload())
        );
        std::process::exit(PANIC_EXIT_STATUS);
    }));
}

/// Runs `f`, turning a panic in it into `Err` instead of ending the
/// process: for code whose panics are known failures the caller reports as
/// errors (the panic report is still printed).
pub fn catch_expected<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    EXPECTED.with(|d| d.set(d.get() + 1));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    EXPECTED.with(|d| d.set(d.get() - 1));
    result
}

/// True when `METALBOND_TEST_FAULT` names `part`: the caller then panics,
/// to test this policy (`shard`: a server shard's task; `netlink`: the
/// client's netlink thread). Never set it in production.
pub fn injected_fault(part: &str) -> bool {
    std::env::var(FAULT_VAR).is_ok_and(|v| v == part)
}

/// The text of a panic's payload (`panic!` with a message carries a
/// `&str` or a `String`).
fn payload_text(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expected_panic_is_returned_as_an_error() {
        // No hook installed here (it would end the test process): this
        // shows the depth counter is balanced after a caught panic.
        let r = catch_expected(|| panic!("expected"));
        assert!(r.is_err());
        assert_eq!(EXPECTED.with(Cell::get), 0);
        assert_eq!(catch_expected(|| 7).ok(), Some(7));
    }

    #[test]
    fn payload_text_reads_both_message_kinds() {
        let s: Box<dyn std::any::Any + Send> = Box::new("static");
        assert_eq!(payload_text(&*s), "static");
        let s: Box<dyn std::any::Any + Send> = Box::new(String::from("owned"));
        assert_eq!(payload_text(&*s), "owned");
        let s: Box<dyn std::any::Any + Send> = Box::new(5u8);
        assert_eq!(payload_text(&*s), "(no message)");
    }
}
