//! One rtnetlink socket used as a batch interface: many requests per send,
//! every acknowledgement read back and matched to its request.
//!
//! Owns: the `NETLINK_ROUTE` socket (netlink-sys), sequence numbers, the
//! netlink header of each request, splitting a batch so its acks fit the
//! receive buffer, decoding acks (errno + the kernel's extended-ack message)
//! and dumps.
//!
//! Must never: interpret what a request means; callers pass payloads and get
//! one `Result` per request, in order.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use netlink_packet_core::{Emitable, NLM_F_ACK, NLM_F_DUMP, NLM_F_MULTIPART, NLM_F_REQUEST};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::counters::NetlinkCounters;
use super::walk::{self, Messages};

/// Size of `struct nlmsghdr`.
const NETLINK_HEADER_LEN: usize = 16;
/// `NLMSG_ERROR`: an acknowledgement (error 0) or a failure.
const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: end of a dump.
const NLMSG_DONE: u16 = 3;
/// Extended-ack attribute carrying the kernel's error text.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// Ack flag: the echoed request was capped to its header.
const NLM_F_CAPPED: u16 = 0x100;
/// Ack flag: extended-ack TLVs follow.
const NLM_F_ACK_TLVS: u16 = 0x200;

/// Most requests sent in one `send`: their acks (even with an error text
/// each) must fit the receive buffer, or the kernel drops them and we could
/// no longer tell what happened.
pub const MAX_REQUESTS_PER_SEND: usize = 256;
/// Longest wait for an ack or dump part before the batch counts as failed.
const RECV_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Receive buffer we ask for (root may exceed rmem_max with SO_RCVBUFFORCE).
const RECV_BUFFER_BYTES: i32 = 4 << 20;

/// What the kernel said about one request it refused.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error("{}{}", io::Error::from_raw_os_error(*errno), message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
pub struct KernelError {
    /// Positive errno (EEXIST, ENOENT, EPERM, ...).
    pub errno: i32,
    /// The extended-ack text, when the kernel gave one.
    pub message: Option<String>,
}

impl KernelError {
    /// The request named something that does not exist (already gone).
    pub fn is_not_found(&self) -> bool {
        self.errno == libc::ENOENT || self.errno == libc::ESRCH
    }
}

/// One request of a batch: message type, extra flags and the payload bytes.
#[derive(Clone, Debug)]
pub struct Request {
    /// RTM_* message type.
    pub message_type: u16,
    /// Flags beyond NLM_F_REQUEST | NLM_F_ACK (CREATE, REPLACE, EXCL ...).
    pub flags: u16,
    /// The emitted payload (route or nexthop message).
    pub payload: Vec<u8>,
}

impl Request {
    /// Emits `payload` into a new request.
    pub fn new(message_type: u16, flags: u16, payload: &impl Emitable) -> Request {
        let mut bytes = vec![0; payload.buffer_len()];
        payload.emit(&mut bytes);
        Request {
            message_type,
            flags,
            payload: bytes,
        }
    }
}

/// An rtnetlink socket bound to the network namespace of the thread that
/// opened it.
pub struct RouteSocket {
    /// The netlink-sys socket, connected to the kernel.
    socket: Socket,
    /// Next sequence number; acks are matched on it.
    seq: u32,
    /// Reused receive buffer.
    recv_buf: Vec<u8>,
    /// Reused send buffer.
    send_buf: Vec<u8>,
    /// Every verdict is counted here, per operation, for `/metrics`.
    counters: Arc<NetlinkCounters>,
}

impl RouteSocket {
    /// Opens and connects the socket, asking for capped acks with error texts.
    pub fn open() -> io::Result<RouteSocket> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        socket.set_cap_ack(true)?;
        socket.set_ext_ack(true)?;
        let size = RECV_BUFFER_BYTES;
        // SAFETY: plain setsockopt on our own fd with a correctly sized int.
        let forced = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if forced != 0 {
            socket.set_rx_buf_sz(size)?;
        }
        // A lost ack (receive buffer overrun) must not wedge the netlink
        // worker: a receive that waits this long fails, and the caller
        // retries. (SO_RCVBUFFORCE above has no socket2 call; this has.)
        socket2::SockRef::from(&socket).set_read_timeout(Some(RECV_TIMEOUT))?;
        Ok(RouteSocket {
            socket,
            seq: 1,
            recv_buf: Vec::with_capacity(1 << 20),
            send_buf: Vec::with_capacity(64 << 10),
            counters: Arc::new(NetlinkCounters::default()),
        })
    }

    /// The counters this socket records its verdicts in.
    pub(super) fn counters(&self) -> Arc<NetlinkCounters> {
        self.counters.clone()
    }

    fn next_seq(&mut self) -> u32 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(1);
        s
    }

    /// Sends every request (in chunks of `MAX_REQUESTS_PER_SEND`, several
    /// requests per syscall) and returns the kernel's verdict on each, in
    /// order. `Err` only when the socket itself fails. Every verdict is
    /// counted; when the socket fails, every request of the call counts as
    /// refused (none of them is known to have been applied).
    pub fn execute(&mut self, requests: &[Request]) -> io::Result<Vec<Result<(), KernelError>>> {
        let outcome = self.execute_uncounted(requests);
        match &outcome {
            Ok(verdicts) => {
                for (req, verdict) in requests.iter().zip(verdicts) {
                    self.counters.record(req.message_type, verdict.is_ok());
                }
            }
            Err(_) => {
                for req in requests {
                    self.counters.record(req.message_type, false);
                }
            }
        }
        outcome
    }

    fn execute_uncounted(
        &mut self,
        requests: &[Request],
    ) -> io::Result<Vec<Result<(), KernelError>>> {
        let mut results = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(MAX_REQUESTS_PER_SEND) {
            self.send_buf.clear();
            let first = self.seq;
            for req in chunk {
                let seq = self.next_seq();
                push_header(
                    &mut self.send_buf,
                    req.message_type,
                    NLM_F_REQUEST | NLM_F_ACK | req.flags,
                    seq,
                    req.payload.len(),
                );
                self.send_buf.extend_from_slice(&req.payload);
            }
            self.send_all()?;
            let mut verdicts: Vec<Option<Result<(), KernelError>>> = vec![None; chunk.len()];
            let mut missing = chunk.len();
            while missing > 0 {
                self.receive()?;
                for msg in Messages::new(&self.recv_buf) {
                    if msg.message_type != NLMSG_ERROR {
                        continue;
                    }
                    let index = msg.seq.wrapping_sub(first) as usize;
                    if index >= chunk.len() {
                        continue; // an ack of an older, abandoned batch
                    }
                    if verdicts[index].is_none() {
                        verdicts[index] = Some(parse_ack(msg.flags, msg.payload));
                        missing -= 1;
                    }
                }
            }
            results.extend(verdicts.into_iter().flatten());
        }
        Ok(results)
    }

    /// Runs a dump request and returns the payload of every reply message of
    /// type `reply_type`.
    pub fn dump(
        &mut self,
        message_type: u16,
        reply_type: u16,
        payload: &impl Emitable,
    ) -> io::Result<Vec<Vec<u8>>> {
        let seq = self.next_seq();
        self.send_buf.clear();
        let mut body = vec![0; payload.buffer_len()];
        payload.emit(&mut body);
        push_header(
            &mut self.send_buf,
            message_type,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            body.len(),
        );
        self.send_buf.extend_from_slice(&body);
        self.send_all()?;
        let mut replies = Vec::new();
        loop {
            self.receive()?;
            for msg in Messages::new(&self.recv_buf) {
                if msg.seq != seq {
                    continue;
                }
                match msg.message_type {
                    NLMSG_DONE => return Ok(replies),
                    NLMSG_ERROR => {
                        return match parse_ack(msg.flags, msg.payload) {
                            Ok(()) => Ok(replies),
                            Err(e) => Err(io::Error::from_raw_os_error(e.errno)),
                        }
                    }
                    t if t == reply_type => replies.push(msg.payload.to_vec()),
                    _ => {}
                }
                if msg.flags & NLM_F_MULTIPART == 0 && msg.message_type == reply_type {
                    return Ok(replies);
                }
            }
        }
    }

    fn send_all(&mut self) -> io::Result<()> {
        let sent = self.socket.send(&self.send_buf, 0)?;
        if sent != self.send_buf.len() {
            return Err(io::Error::other(format!(
                "netlink send took {sent} of {} bytes",
                self.send_buf.len()
            )));
        }
        Ok(())
    }

    fn receive(&mut self) -> io::Result<()> {
        self.recv_buf.clear();
        loop {
            match self.socket.recv(&mut self.recv_buf, 0) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Appends a `nlmsghdr` for a payload of `payload_len` bytes.
fn push_header(buf: &mut Vec<u8>, message_type: u16, flags: u16, seq: u32, payload_len: usize) {
    let len = (NETLINK_HEADER_LEN + payload_len) as u32;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&message_type.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
}

/// Decodes the body of an NLMSG_ERROR: errno 0 is success.
fn parse_ack(flags: u16, payload: &[u8]) -> Result<(), KernelError> {
    let Some(code) = payload.get(0..4) else {
        return Err(KernelError {
            errno: libc::EPROTO,
            message: Some("truncated netlink ack".into()),
        });
    };
    let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
    if code == 0 {
        return Ok(());
    }
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        // errno, then the echoed request: its header only when capped.
        let echoed = if flags & NLM_F_CAPPED != 0 {
            NETLINK_HEADER_LEN
        } else {
            payload
                .get(4..8)
                .map(|l| u32::from_ne_bytes([l[0], l[1], l[2], l[3]]) as usize)
                .unwrap_or(NETLINK_HEADER_LEN)
        };
        let tlvs = payload.get(4 + ((echoed + 3) & !3)..).unwrap_or_default();
        // A malformed TLV ends the walk: the errno is what matters, the text
        // is a courtesy.
        for tlv in walk::attributes(tlvs).map_while(Result::ok) {
            if tlv.kind() == NLMSGERR_ATTR_MSG {
                let text = tlv.value().split(|&b| b == 0).next().unwrap_or_default();
                message = Some(String::from_utf8_lossy(text).into_owned());
            }
        }
    }
    Err(KernelError {
        errno: -code,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_is_nlmsghdr() {
        let mut buf = Vec::new();
        push_header(&mut buf, 24, 0x0505, 7, 12);
        assert_eq!(buf.len(), 16);
        assert_eq!(&buf[0..4], &28u32.to_ne_bytes());
        assert_eq!(&buf[4..6], &24u16.to_ne_bytes());
        assert_eq!(&buf[6..8], &0x0505u16.to_ne_bytes());
        assert_eq!(&buf[8..12], &7u32.to_ne_bytes());
    }

    #[test]
    fn ack_with_extended_message_is_decoded() {
        let mut payload = (-17i32).to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0u8; 16]); // capped echoed header
        let text = b"Nexthop id already exists\0";
        payload.extend_from_slice(&((4 + text.len()) as u16).to_ne_bytes());
        payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend_from_slice(text);
        let e = parse_ack(NLM_F_CAPPED | NLM_F_ACK_TLVS, &payload).unwrap_err();
        assert_eq!(e.errno, libc::EEXIST);
        assert_eq!(e.message.as_deref(), Some("Nexthop id already exists"));
        assert!(e.to_string().contains("Nexthop id already exists"));
        assert_eq!(parse_ack(0, &0i32.to_ne_bytes()), Ok(()));
        assert!(parse_ack(0, &[1]).is_err());
    }

    #[test]
    fn message_walk_stops_at_garbage() {
        let mut buf = Vec::new();
        push_header(&mut buf, 2, 0, 1, 4);
        buf.extend_from_slice(&0i32.to_ne_bytes());
        buf.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f, 1, 2]);
        let msgs: Vec<_> = Messages::new(&buf).collect();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].seq, 1);
    }
}
