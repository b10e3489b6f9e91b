//! `KernelLink`: what the netlink thread's logic needs of the kernel (a
//! batch of requests with one verdict each, and dumps), so that logic runs
//! against the real socket here and against `fake_kernel::FakeKernel` in
//! unit tests.
//!
//! Owns: the trait and its implementation for `RouteSocket`. Must never:
//! interpret requests (that is `state.rs` and the thread's functions).

use std::io;

use netlink_packet_core::Emitable;

use super::socket::{KernelError, Request, RouteSocket};

/// Something that executes netlink requests: the real socket, or a kernel
/// in memory in tests.
pub trait KernelLink {
    /// Sends `requests` and returns the kernel's answer to each, in order.
    fn execute(&mut self, requests: &[Request]) -> io::Result<Vec<Result<(), KernelError>>>;

    /// Runs a dump request (`message_type`, e.g. `RTM_GETROUTE`, with
    /// `payload`) and returns the payload of every reply of `reply_type`.
    fn dump(
        &mut self,
        message_type: u16,
        reply_type: u16,
        payload: &impl Emitable,
    ) -> io::Result<Vec<Vec<u8>>>;
}

impl KernelLink for RouteSocket {
    fn execute(&mut self, requests: &[Request]) -> io::Result<Vec<Result<(), KernelError>>> {
        RouteSocket::execute(self, requests)
    }

    fn dump(
        &mut self,
        message_type: u16,
        reply_type: u16,
        payload: &impl Emitable,
    ) -> io::Result<Vec<Vec<u8>>> {
        RouteSocket::dump(self, message_type, reply_type, payload)
    }
}
