//! A kernel in memory for unit tests: it keeps the routes and nexthop
//! objects it was sent (as the payloads a dump returns), answers dumps from
//! them, refuses what the real kernel refuses in the cases the tests need
//! (a missing route or object, an `NLM_F_EXCL` object that exists, a
//! scripted refusal), and records every request.
//!
//! Owns: nothing outside tests. Must never: be compiled into the library.

use std::collections::BTreeMap;
use std::io;
use std::net::Ipv6Addr;

use ipnet::IpNet;
use netlink_packet_core::{Emitable, NLM_F_EXCL};

use super::link::KernelLink;
use super::nexthop::{
    NexthopAttribute, NexthopMessage, AF_INET6, RTM_DELNEXTHOP, RTM_GETNEXTHOP, RTM_NEWNEXTHOP,
};
use super::routes::{
    parse_dumped, KernelNextHops, KernelTable, RTM_DELROUTE, RTM_GETROUTE, RTM_NEWROUTE,
};
use super::socket::{KernelError, Request};

/// What the fake kernel holds, and what it was sent.
#[derive(Default)]
pub(crate) struct FakeKernel {
    /// Every request executed, in order.
    pub(crate) sent: Vec<Request>,
    /// A `NEWNEXTHOP` encapsulating to this address is refused (EINVAL).
    pub(crate) refuse_dst: Option<Ipv6Addr>,
    /// Routes by (table, prefix): the payload the route was installed with.
    routes: BTreeMap<(KernelTable, IpNet), Vec<u8>>,
    /// Nexthop objects by id: the payload each was created with.
    objects: BTreeMap<u32, Vec<u8>>,
}

/// A kernel refusal with `errno`.
fn refused(errno: i32) -> Result<(), KernelError> {
    Err(KernelError {
        errno,
        message: None,
    })
}

impl FakeKernel {
    /// Requests of `message_type` sent so far.
    pub(crate) fn count(&self, message_type: u16) -> usize {
        self.sent
            .iter()
            .filter(|r| r.message_type == message_type)
            .count()
    }

    /// The routes the kernel holds, by key, with their next hops.
    pub(crate) fn routes(&self) -> BTreeMap<(KernelTable, IpNet), KernelNextHops> {
        self.routes
            .iter()
            .filter_map(|(k, p)| Some((*k, parse_dumped(p)?.next_hops)))
            .collect()
    }

    /// Ids of the nexthop objects the kernel holds.
    pub(crate) fn object_ids(&self) -> Vec<u32> {
        self.objects.keys().copied().collect()
    }

    /// Deletes a route as `ip route del` by hand would.
    pub(crate) fn delete_by_hand(&mut self, table: KernelTable, prefix: IpNet) -> bool {
        self.routes.remove(&(table, prefix)).is_some()
    }

    /// Adds a nexthop object of another program (protocol `protocol`).
    pub(crate) fn add_object(&mut self, id: u32, dst: Ipv6Addr, protocol: u8) {
        let msg = NexthopMessage::encap_ip6(AF_INET6, id, 3, dst, protocol);
        let mut payload = vec![0; msg.buffer_len()];
        msg.emit(&mut payload);
        self.objects.insert(id, payload);
    }

    /// Installs a route from a request payload, as an earlier run would
    /// have left it.
    pub(crate) fn add_route(&mut self, request: &Request) {
        let _ = self.execute(std::slice::from_ref(request));
    }

    /// The kernel's answer to one request (and its effect).
    fn apply(&mut self, r: &Request) -> Result<(), KernelError> {
        match r.message_type {
            RTM_NEWNEXTHOP => {
                let Ok(msg) = NexthopMessage::parse(&r.payload) else {
                    return refused(libc::EINVAL);
                };
                let dst = self.refuse_dst.unwrap_or(Ipv6Addr::UNSPECIFIED);
                if msg.attributes.contains(&NexthopAttribute::EncapIp6Dst(dst)) {
                    return Err(KernelError {
                        errno: libc::EINVAL,
                        message: Some("scripted refusal".into()),
                    });
                }
                let Some(id) = msg.id() else {
                    return refused(libc::EINVAL);
                };
                if r.flags & NLM_F_EXCL != 0 && self.objects.contains_key(&id) {
                    return refused(libc::EEXIST);
                }
                self.objects.insert(id, r.payload.clone());
                Ok(())
            }
            RTM_DELNEXTHOP => {
                let id = NexthopMessage::parse(&r.payload).ok().and_then(|m| m.id());
                match id.and_then(|id| self.objects.remove(&id).map(|_| id)) {
                    Some(id) => {
                        // As the kernel: routes on a deleted object go too.
                        self.routes.retain(|_, p| {
                            parse_dumped(p).map(|d| d.next_hops) != Some(KernelNextHops::Object(id))
                        });
                        Ok(())
                    }
                    None => refused(libc::ENOENT),
                }
            }
            RTM_NEWROUTE => match parse_dumped(&r.payload) {
                Some(d) => {
                    self.routes.insert((d.table, d.prefix), r.payload.clone());
                    Ok(())
                }
                None => refused(libc::EINVAL),
            },
            RTM_DELROUTE => match parse_dumped(&r.payload) {
                Some(d) if self.routes.remove(&(d.table, d.prefix)).is_some() => Ok(()),
                _ => refused(libc::ESRCH),
            },
            _ => refused(libc::EOPNOTSUPP),
        }
    }
}

impl KernelLink for FakeKernel {
    fn execute(&mut self, requests: &[Request]) -> io::Result<Vec<Result<(), KernelError>>> {
        self.sent.extend_from_slice(requests);
        Ok(requests.iter().map(|r| self.apply(r)).collect())
    }

    fn dump(
        &mut self,
        message_type: u16,
        _reply_type: u16,
        _payload: &impl Emitable,
    ) -> io::Result<Vec<Vec<u8>>> {
        match message_type {
            RTM_GETROUTE => Ok(self.routes.values().cloned().collect()),
            RTM_GETNEXTHOP => Ok(self.objects.values().cloned().collect()),
            _ => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
    }
}
