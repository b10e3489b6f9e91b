//! What the kernel holds for us, and how to move it to what we want.
//!
//! Owns: the installed routes and how each names its next hops: IPv4
//! routes inline (the Go client's multipath form, next hops in the route
//! itself), IPv6 routes by reference to a nexthop object. The IPv6 nexthop
//! objects we created: one encap object per underlay address and one group
//! per set of addresses, shared by every prefix with that next-hop set and
//! reference-counted so that objects nothing uses any more are deleted.
//! `apply` turns a batch of desired changes into up to four netlink batches
//! (create encap objects, create groups, replace/delete routes, delete unused
//! objects) and updates this state only from the kernel's acknowledgements,
//! so it never claims a route or object the kernel refused. `forget_changed`
//! compares our routes with a dump of the kernel's; `adopt` takes over what
//! an earlier run (ours, an earlier version's or the Go client's) left in the
//! kernel, so a restart keeps those routes instead of deleting them.
//!
//! Must never: open sockets (it is handed a `KernelLink`), know about VNIs or
//! servers, or retry by itself.
//!
//! ```text
//!  prefix A ─┐                      ┌─ encap obj 1 (dst hv1) ─┐
//!  prefix B ─┼─> group 10 {1,2} ────┤                         ├─ out of DEV
//!  prefix C ─┘                      └─ encap obj 2 (dst hv2) ─┘
//!  prefix D ───> encap obj 1 (single next hop: no group)
//!  (IPv6 prefixes above; an IPv4 prefix carries its next hops itself:
//!   10.0.0.0/24 nexthop encap ip6 dst hv1 dev DEV nexthop encap ip6 dst hv2 dev DEV)
//! ```

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::Ipv6Addr;

use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};

pub use super::link::KernelLink;
use super::nexthop::{
    NexthopAttribute, NexthopMessage, AF_INET, AF_INET6, RTM_DELNEXTHOP, RTM_NEWNEXTHOP,
};
use super::routes::{
    delete_route, replace_multipath_route, replace_nhid_route, DumpedRoute, KernelNextHops,
    KernelTable, PROTOCOL_METALBOND,
};
use super::socket::Request;

/// One kernel route's identity: a prefix in a table.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct RouteKey {
    /// The routing table (mapped from a VNI).
    pub table: KernelTable,
    /// The destination prefix.
    pub prefix: IpNet,
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} table {}", self.prefix, self.table)
    }
}

/// The desired next hops of one route; empty means "delete the route".
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RouteChange {
    /// Which route.
    pub key: RouteKey,
    /// Underlay addresses, sorted and without duplicates (the stable ECMP order).
    pub next_hops: Vec<Ipv6Addr>,
}

/// How an installed route names its next hops.
#[derive(Clone, PartialEq, Eq, Debug)]
enum InstalledForm {
    /// IPv6: the route references our nexthop object with this id.
    Object(u32),
    /// IPv4: the next hops are in the route (RTA_MULTIPATH), in this order
    /// (sorted), each `encap ip6 dst ADDR dev DEV`.
    Inline(Box<[Ipv6Addr]>),
}

/// A nexthop object's identity: what it does, not its id.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
enum ObjectKey {
    /// `encap ip6 dst ADDR dev DEV` for routes of `family`.
    Encap { family: u8, dst: Ipv6Addr },
    /// A multipath group of the encap objects of `members` (sorted, ≥ 2).
    Group { family: u8, members: Vec<Ipv6Addr> },
}

/// A nexthop object we created and the kernel acknowledged.
#[derive(Clone, Copy, Debug)]
struct NexthopObject {
    /// Kernel id (RTA_NH_ID / NHA_ID).
    id: u32,
    /// Routes referencing it directly, plus groups containing it (encap
    /// objects only). Zero means it can be deleted.
    users: u32,
}

/// Counts of one `apply`, for logs and tests.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ApplyReport {
    /// Routes created or replaced.
    pub replaced: usize,
    /// Routes deleted.
    pub deleted: usize,
    /// Requests the kernel refused (each logged with its error).
    pub failed: usize,
    /// Nexthop objects created.
    pub objects_created: usize,
    /// Nexthop objects deleted because nothing used them any more.
    pub objects_deleted: usize,
}

/// What `InstalledRoutes::adopt` made of an earlier run's kernel state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Routes taken over (now installed as far as the state knows).
    pub routes: Vec<RouteKey>,
    /// Nexthop objects taken over.
    pub objects: usize,
    /// Routes that cannot be taken over (a next hop not on our device, an
    /// object we do not know): the caller deletes them.
    pub unusable_routes: Vec<RouteKey>,
    /// Groups, then single objects, that cannot be taken over (other
    /// device, duplicate, malformed): the caller deletes them in this order
    /// after `unusable_routes`.
    pub unusable_objects: Vec<u32>,
}

/// The kernel state we own, mirrored from acknowledgements.
pub struct InstalledRoutes {
    /// Index of the tunnel device every next hop leaves through.
    oif: u32,
    /// Routes the kernel acknowledged, with their next hops as installed.
    routes: HashMap<RouteKey, InstalledForm>,
    /// Our nexthop objects by identity.
    objects: HashMap<ObjectKey, NexthopObject>,
    /// Our nexthop objects by id (for reference counting on replace/delete).
    by_id: HashMap<u32, ObjectKey>,
    /// Ids used by nexthop objects that are not ours: never allocated.
    foreign_ids: HashSet<u32>,
    /// Next id to try.
    next_id: u32,
    /// Routes whose last change the kernel refused: retried periodically,
    /// logged as errors once and at debug level while they keep failing.
    failing: HashSet<RouteKey>,
    /// Nexthop objects the kernel refused, for the same once-only logging.
    failing_objects: HashSet<ObjectKey>,
}

fn family_of(prefix: &IpNet) -> u8 {
    match prefix {
        IpNet::V4(_) => AF_INET,
        IpNet::V6(_) => AF_INET6,
    }
}

fn object_for(family: u8, next_hops: &[Ipv6Addr]) -> ObjectKey {
    match next_hops {
        [one] => ObjectKey::Encap { family, dst: *one },
        many => ObjectKey::Group {
            family,
            members: many.to_vec(),
        },
    }
}

impl InstalledRoutes {
    /// Empty state for next hops out of device `oif`; `foreign_ids` are
    /// nexthop ids someone else uses.
    pub fn new(oif: u32, foreign_ids: HashSet<u32>) -> InstalledRoutes {
        InstalledRoutes {
            oif,
            routes: HashMap::new(),
            objects: HashMap::new(),
            by_id: HashMap::new(),
            foreign_ids,
            next_id: 1,
            failing: HashSet::new(),
            failing_objects: HashSet::new(),
        }
    }

    /// Takes over what an earlier run left: our protocol's nexthop `objects`
    /// (from a nexthop dump) that leave through our device, and `routes`
    /// (protocol 254, in our tables) whose next hops are such objects or
    /// inline `encap ip6 dst` hops out of our device. Call on a fresh state,
    /// before any `apply`. What it takes over is kept as installed: a later
    /// `apply` with the same next hops sends nothing, with other next hops
    /// replaces the route (never deletes it first). Objects no adopted route
    /// uses are deleted by the next `apply`, as any unused object.
    pub fn adopt(&mut self, objects: &[NexthopMessage], routes: &[DumpedRoute]) -> Adoption {
        let mut adoption = Adoption::default();
        let mut unusable_singles = Vec::new();
        for msg in objects.iter().filter(|m| !m.is_group()) {
            let Some(id) = msg.id() else { continue };
            let mut dst = None;
            let mut oif = None;
            for attribute in &msg.attributes {
                match attribute {
                    NexthopAttribute::EncapIp6Dst(d) => dst = Some(*d),
                    NexthopAttribute::Oif(o) => oif = Some(*o),
                    _ => {}
                }
            }
            let family = msg.header.family;
            let key = match (dst, oif) {
                (Some(dst), Some(oif))
                    if oif == self.oif && (family == AF_INET6 || family == AF_INET) =>
                {
                    ObjectKey::Encap { family, dst }
                }
                _ => {
                    unusable_singles.push(id);
                    continue;
                }
            };
            if self.objects.contains_key(&key) || self.by_id.contains_key(&id) {
                unusable_singles.push(id);
                continue;
            }
            self.objects
                .insert(key.clone(), NexthopObject { id, users: 0 });
            self.by_id.insert(id, key);
            adoption.objects += 1;
        }
        for msg in objects.iter().filter(|m| m.is_group()) {
            let Some(id) = msg.id() else { continue };
            match self.group_key(msg) {
                Some(key) if !self.objects.contains_key(&key) && !self.by_id.contains_key(&id) => {
                    if let ObjectKey::Group { family, members } = &key {
                        for dst in members {
                            if let Some(o) = self.objects.get_mut(&ObjectKey::Encap {
                                family: *family,
                                dst: *dst,
                            }) {
                                o.users += 1;
                            }
                        }
                    }
                    self.objects
                        .insert(key.clone(), NexthopObject { id, users: 0 });
                    self.by_id.insert(id, key);
                    adoption.objects += 1;
                }
                _ => adoption.unusable_objects.push(id),
            }
        }
        adoption.unusable_objects.extend(unusable_singles);
        for route in routes {
            let key = RouteKey {
                table: route.table,
                prefix: route.prefix,
            };
            let form = match &route.next_hops {
                KernelNextHops::Object(id) if self.by_id.contains_key(id) => {
                    Some(InstalledForm::Object(*id))
                }
                KernelNextHops::Object(_) => None,
                KernelNextHops::Inline(hops) => {
                    let dsts: Option<Vec<Ipv6Addr>> = hops
                        .iter()
                        .map(|h| h.encap_dst.filter(|_| h.oif == self.oif))
                        .collect();
                    match dsts {
                        Some(mut dsts) if !dsts.is_empty() => {
                            dsts.sort_unstable();
                            dsts.dedup();
                            Some(InstalledForm::Inline(dsts.into_boxed_slice()))
                        }
                        _ => None,
                    }
                }
            };
            match form {
                Some(form) if !self.routes.contains_key(&key) => {
                    if let InstalledForm::Object(id) = form {
                        self.add_user(id);
                    }
                    self.routes.insert(key, form);
                    adoption.routes.push(key);
                }
                _ => adoption.unusable_routes.push(key),
            }
        }
        adoption
    }

    /// The identity of a dumped group whose members are all encap objects
    /// we know, of one family; `None` otherwise.
    fn group_key(&self, msg: &NexthopMessage) -> Option<ObjectKey> {
        let members = msg.attributes.iter().find_map(|a| match a {
            NexthopAttribute::Group(m) => Some(m),
            _ => None,
        })?;
        let mut family = None;
        let mut dsts = Vec::with_capacity(members.len());
        for member in members {
            match self.by_id.get(&member.id) {
                Some(ObjectKey::Encap { family: f, dst }) if family.is_none_or(|x| x == *f) => {
                    family = Some(*f);
                    dsts.push(*dst);
                }
                _ => return None,
            }
        }
        dsts.sort_unstable();
        dsts.dedup();
        if dsts.len() < 2 || dsts.len() != members.len() {
            return None;
        }
        Some(ObjectKey::Group {
            family: family?,
            members: dsts,
        })
    }

    /// Forgets every route and object (the kernel flushed them, e.g. the
    /// device went down): the caller sweeps leftovers and re-applies.
    /// Foreign ids are replaced by `foreign_ids` from a fresh dump.
    pub fn reset(&mut self, foreign_ids: HashSet<u32>) {
        self.routes.clear();
        self.objects.clear();
        self.by_id.clear();
        self.foreign_ids = foreign_ids;
        self.failing_objects.clear();
    }

    /// Ids of every nexthop object we believe exists.
    pub fn object_ids(&self) -> Vec<u32> {
        self.objects.values().map(|o| o.id).collect()
    }

    /// Routes whose last change was refused, to retry.
    pub fn failing_keys(&self) -> Vec<RouteKey> {
        self.failing.iter().copied().collect()
    }

    /// Picks an unused id (ours or foreign).
    pub fn allocate_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if !self.by_id.contains_key(&id) && !self.foreign_ids.contains(&id) {
                return id;
            }
        }
    }

    /// Another process took `id` since our dump (the kernel said EEXIST):
    /// never hand it out.
    pub fn id_taken_elsewhere(&mut self, id: u32) {
        self.foreign_ids.insert(id);
    }

    /// Number of routes installed.
    #[cfg(test)]
    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    /// Number of nexthop objects (encap and groups) we own.
    #[cfg(test)]
    pub fn object_count(&self) -> usize {
        self.objects.len()
    }

    /// Every installed route with its next hops, sorted (for status and tests).
    pub fn snapshot(&self) -> Vec<RouteChange> {
        let mut out: Vec<RouteChange> = self
            .routes
            .iter()
            .map(|(key, form)| RouteChange {
                key: *key,
                next_hops: match form {
                    InstalledForm::Inline(hops) => hops.to_vec(),
                    InstalledForm::Object(id) => match self.by_id.get(id) {
                        Some(ObjectKey::Encap { dst, .. }) => vec![*dst],
                        Some(ObjectKey::Group { members, .. }) => members.clone(),
                        None => Vec::new(),
                    },
                },
            })
            .collect();
        out.sort_by_key(|a| a.key);
        out
    }

    /// Does the route at `key`, as the kernel acknowledged it, leave
    /// through underlay address `next_hop`?
    pub fn routes_via(&self, key: &RouteKey, next_hop: Ipv6Addr) -> bool {
        match self.routes.get(key) {
            None => false,
            Some(InstalledForm::Inline(hops)) => hops.contains(&next_hop),
            Some(InstalledForm::Object(id)) => match self.by_id.get(id) {
                Some(ObjectKey::Encap { dst, .. }) => *dst == next_hop,
                Some(ObjectKey::Group { members, .. }) => members.contains(&next_hop),
                None => false,
            },
        }
    }

    /// Was the last change of the route at `key` refused (and waits for a
    /// retry)?
    pub fn is_failing(&self, key: &RouteKey) -> bool {
        self.failing.contains(key)
    }

    /// Is a route installed (as far as the kernel acknowledged) at `key`?
    pub fn has(&self, key: &RouteKey) -> bool {
        self.routes.contains_key(key)
    }

    /// Keys of every installed route.
    pub fn keys(&self) -> Vec<RouteKey> {
        self.routes.keys().copied().collect()
    }

    /// Moves the kernel to `changes` (each the complete desired next-hop set
    /// of its route). Returns `Err` only when the socket fails; refused
    /// requests are logged and counted.
    pub fn apply(
        &mut self,
        kernel: &mut impl KernelLink,
        changes: &[RouteChange],
    ) -> io::Result<ApplyReport> {
        let mut report = ApplyReport::default();
        self.create_objects(kernel, changes, &mut report)?;
        self.update_routes(kernel, changes, &mut report)?;
        self.delete_unused_objects(kernel, &mut report)?;
        Ok(report)
    }

    fn create_objects(
        &mut self,
        kernel: &mut impl KernelLink,
        changes: &[RouteChange],
        report: &mut ApplyReport,
    ) -> io::Result<()> {
        let mut singles = BTreeSet::new();
        let mut groups = BTreeSet::new();
        // Only IPv6 routes use objects; IPv4 routes carry their next hops.
        let with_objects = changes
            .iter()
            .filter(|c| !c.next_hops.is_empty() && family_of(&c.key.prefix) == AF_INET6);
        for change in with_objects {
            let family = AF_INET6;
            for dst in &change.next_hops {
                let key = ObjectKey::Encap { family, dst: *dst };
                if !self.objects.contains_key(&key) {
                    singles.insert(key);
                }
            }
            let key = object_for(family, &change.next_hops);
            if matches!(key, ObjectKey::Group { .. }) && !self.objects.contains_key(&key) {
                groups.insert(key);
            }
        }
        // Encap objects first: groups reference them.
        let mut planned = Vec::new();
        let mut requests = Vec::new();
        for key in singles {
            let ObjectKey::Encap { family, dst } = key else {
                continue;
            };
            let id = self.allocate_id();
            let msg = NexthopMessage::encap_ip6(family, id, self.oif, dst, PROTOCOL_METALBOND);
            requests.push(Request::new(
                RTM_NEWNEXTHOP,
                NLM_F_CREATE | NLM_F_EXCL,
                &msg,
            ));
            // Reserve the id while the batch is in flight.
            self.by_id.insert(id, key.clone());
            planned.push((key, id));
        }
        self.record_created(kernel, planned, &requests, report)?;

        let mut planned = Vec::new();
        let mut requests = Vec::new();
        for key in groups {
            let ObjectKey::Group { family, members } = &key else {
                continue;
            };
            let ids: Option<Vec<u32>> = members
                .iter()
                .map(|dst| {
                    self.objects
                        .get(&ObjectKey::Encap {
                            family: *family,
                            dst: *dst,
                        })
                        .map(|o| o.id)
                })
                .collect();
            let Some(ids) = ids else {
                continue; // a member failed; its routes are reported below
            };
            let id = self.allocate_id();
            let msg = NexthopMessage::group(id, &ids, PROTOCOL_METALBOND);
            requests.push(Request::new(
                RTM_NEWNEXTHOP,
                NLM_F_CREATE | NLM_F_EXCL,
                &msg,
            ));
            self.by_id.insert(id, key.clone());
            planned.push((key, id));
        }
        self.record_created(kernel, planned, &requests, report)
    }

    fn record_created(
        &mut self,
        kernel: &mut impl KernelLink,
        planned: Vec<(ObjectKey, u32)>,
        requests: &[Request],
        report: &mut ApplyReport,
    ) -> io::Result<()> {
        if requests.is_empty() {
            return Ok(());
        }
        let verdicts = kernel.execute(requests);
        let verdicts = match verdicts {
            Ok(v) => v,
            Err(e) => {
                for (_, id) in &planned {
                    self.by_id.remove(id);
                }
                return Err(e);
            }
        };
        for ((key, id), verdict) in planned.into_iter().zip(verdicts) {
            match verdict {
                Ok(()) => {
                    if let ObjectKey::Group {
                        family, members, ..
                    } = &key
                    {
                        for dst in members {
                            if let Some(o) = self.objects.get_mut(&ObjectKey::Encap {
                                family: *family,
                                dst: *dst,
                            }) {
                                o.users += 1;
                            }
                        }
                    }
                    self.failing_objects.remove(&key);
                    tracing::debug!(id, object = ?key, "nexthop object created");
                    self.objects.insert(key, NexthopObject { id, users: 0 });
                    report.objects_created += 1;
                }
                Err(e) => {
                    self.by_id.remove(&id);
                    if e.errno == libc::EEXIST {
                        // Someone else took the id since our dump.
                        self.id_taken_elsewhere(id);
                    }
                    if self.failing_objects.insert(key.clone()) {
                        tracing::error!(id, object = ?key, error = %e, "kernel refused nexthop object");
                    } else {
                        tracing::debug!(id, object = ?key, error = %e, "kernel still refuses nexthop object");
                    }
                    report.failed += 1;
                }
            }
        }
        Ok(())
    }

    fn update_routes(
        &mut self,
        kernel: &mut impl KernelLink,
        changes: &[RouteChange],
        report: &mut ApplyReport,
    ) -> io::Result<()> {
        // (key, new form or None for delete)
        let mut planned: Vec<(RouteKey, Option<InstalledForm>)> = Vec::new();
        let mut requests = Vec::new();
        for change in changes {
            let current = self.routes.get(&change.key);
            if change.next_hops.is_empty() {
                self.failing.remove(&change.key);
                if current.is_some() {
                    requests.push(delete_route(change.key.table, change.key.prefix));
                    planned.push((change.key, None));
                }
                continue;
            }
            let target = if family_of(&change.key.prefix) == AF_INET {
                InstalledForm::Inline(change.next_hops.clone().into_boxed_slice())
            } else {
                let object = object_for(AF_INET6, &change.next_hops);
                match self.objects.get(&object) {
                    Some(o) => InstalledForm::Object(o.id),
                    None => {
                        if self.failing.insert(change.key) {
                            tracing::error!(
                                route = %change.key,
                                next_hops = ?change.next_hops,
                                "route not installed: its nexthop object was refused"
                            );
                        }
                        report.failed += 1;
                        continue;
                    }
                }
            };
            if current == Some(&target) {
                self.failing.remove(&change.key);
                continue;
            }
            requests.push(match &target {
                InstalledForm::Object(id) => {
                    replace_nhid_route(change.key.table, change.key.prefix, *id)
                }
                InstalledForm::Inline(hops) => {
                    replace_multipath_route(change.key.table, change.key.prefix, self.oif, hops)
                }
            });
            planned.push((change.key, Some(target)));
        }
        if requests.is_empty() {
            return Ok(());
        }
        let verdicts = kernel.execute(&requests)?;
        for ((key, target), verdict) in planned.into_iter().zip(verdicts) {
            match (target, verdict) {
                (Some(form), Ok(())) => {
                    if let InstalledForm::Object(id) = form {
                        self.add_user(id);
                    }
                    tracing::debug!(route = %key, next_hops = ?form, "kernel route replaced");
                    if let Some(InstalledForm::Object(old)) = self.routes.insert(key, form) {
                        self.drop_user(old);
                    }
                    if self.failing.remove(&key) {
                        tracing::info!(route = %key, "kernel route installed after earlier refusal");
                    }
                    report.replaced += 1;
                }
                (None, Ok(())) => {
                    self.forget_route(&key);
                    tracing::debug!(route = %key, "kernel route deleted");
                    report.deleted += 1;
                }
                (None, Err(e)) if e.is_not_found() => {
                    // Already gone (deleted by someone else): the kernel agrees.
                    self.forget_route(&key);
                    report.deleted += 1;
                }
                (target, Err(e)) => {
                    let verb = if target.is_some() {
                        "replace"
                    } else {
                        "delete"
                    };
                    if self.failing.insert(key) {
                        tracing::error!(route = %key, error = %e, "kernel refused route {verb}");
                    } else {
                        tracing::debug!(route = %key, error = %e, "kernel still refuses route {verb}");
                    }
                    report.failed += 1;
                }
            }
        }
        Ok(())
    }

    /// Forgets every installed route that `in_kernel` (a dump of our
    /// tables' protocol-254 routes) no longer has, or has with other next
    /// hops than we installed (replaced by hand or by another client), and
    /// returns those keys, so that the caller can have them installed again.
    pub fn forget_changed(
        &mut self,
        in_kernel: &HashMap<RouteKey, KernelNextHops>,
    ) -> Vec<RouteKey> {
        let missing: Vec<RouteKey> = self
            .routes
            .iter()
            .filter(|(key, form)| {
                !in_kernel
                    .get(key)
                    .is_some_and(|kernel| self.matches(form, kernel))
            })
            .map(|(key, _)| *key)
            .collect();
        for key in &missing {
            self.forget_route(key);
        }
        missing
    }

    /// Does the kernel's view of a route's next hops say what we installed?
    fn matches(&self, ours: &InstalledForm, kernel: &KernelNextHops) -> bool {
        match (ours, kernel) {
            (InstalledForm::Object(id), KernelNextHops::Object(theirs)) => id == theirs,
            (InstalledForm::Inline(hops), KernelNextHops::Inline(theirs)) => {
                let mut dsts: Vec<Ipv6Addr> = Vec::with_capacity(theirs.len());
                for hop in theirs {
                    match hop.encap_dst {
                        Some(dst) if hop.oif == self.oif => dsts.push(dst),
                        _ => return false,
                    }
                }
                dsts.sort_unstable();
                dsts.dedup();
                *dsts == **hops
            }
            _ => false,
        }
    }

    fn forget_route(&mut self, key: &RouteKey) {
        if let Some(InstalledForm::Object(old)) = self.routes.remove(key) {
            self.drop_user(old);
        }
    }

    fn add_user(&mut self, id: u32) {
        if let Some(o) = self.by_id.get(&id).and_then(|k| self.objects.get_mut(k)) {
            o.users += 1;
        }
    }

    fn drop_user(&mut self, id: u32) {
        if let Some(o) = self.by_id.get(&id).and_then(|k| self.objects.get_mut(k)) {
            o.users = o.users.saturating_sub(1);
        }
    }

    fn delete_unused_objects(
        &mut self,
        kernel: &mut impl KernelLink,
        report: &mut ApplyReport,
    ) -> io::Result<()> {
        // Groups first: deleting them releases their members.
        for groups in [true, false] {
            let unused: Vec<(ObjectKey, u32)> = self
                .objects
                .iter()
                .filter(|(k, o)| o.users == 0 && matches!(k, ObjectKey::Group { .. }) == groups)
                .map(|(k, o)| (k.clone(), o.id))
                .collect();
            if unused.is_empty() {
                continue;
            }
            let requests: Vec<Request> = unused
                .iter()
                .map(|(_, id)| Request::new(RTM_DELNEXTHOP, 0, &NexthopMessage::delete(*id)))
                .collect();
            let verdicts = kernel.execute(&requests)?;
            for ((key, id), verdict) in unused.into_iter().zip(verdicts) {
                match verdict {
                    Err(e) if !e.is_not_found() => {
                        tracing::error!(id, object = ?key, error = %e, "kernel refused nexthop delete");
                        report.failed += 1;
                    }
                    _ => {
                        if let ObjectKey::Group { family, members } = &key {
                            for dst in members {
                                if let Some(o) = self.objects.get_mut(&ObjectKey::Encap {
                                    family: *family,
                                    dst: *dst,
                                }) {
                                    o.users = o.users.saturating_sub(1);
                                }
                            }
                        }
                        self.objects.remove(&key);
                        self.by_id.remove(&id);
                        tracing::debug!(id, "unused nexthop object deleted");
                        report.objects_deleted += 1;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::{RTM_DELROUTE, RTM_NEWROUTE};

    use crate::fake_kernel::FakeKernel as ScriptedKernel;

    fn key(prefix: &str) -> RouteKey {
        RouteKey {
            table: KernelTable(100),
            prefix: prefix.parse().unwrap(),
        }
    }

    fn hv(n: u16) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n)
    }

    fn change(prefix: &str, hops: &[Ipv6Addr]) -> RouteChange {
        RouteChange {
            key: key(prefix),
            next_hops: hops.to_vec(),
        }
    }

    #[test]
    fn prefixes_with_the_same_next_hops_share_objects() {
        let mut k = ScriptedKernel::default();
        let mut s = InstalledRoutes::new(3, HashSet::new());
        let r = s
            .apply(
                &mut k,
                &[
                    change("2001:db8:10::/64", &[hv(1), hv(2)]),
                    change("2001:db8:11::/64", &[hv(1), hv(2)]),
                    change("2001:db8:12::/64", &[hv(1)]),
                ],
            )
            .unwrap();
        // Two encap objects + one group, three routes.
        assert_eq!(r.objects_created, 3);
        assert_eq!(r.replaced, 3);
        assert_eq!(s.object_count(), 3);
        assert_eq!(k.count(RTM_NEWROUTE), 3);
        let snap = s.snapshot();
        assert_eq!(snap[0].next_hops, vec![hv(1), hv(2)]);
        assert_eq!(snap[2].next_hops, vec![hv(1)]);
    }

    #[test]
    fn unused_objects_are_deleted_groups_before_members() {
        let mut k = ScriptedKernel::default();
        let mut s = InstalledRoutes::new(3, HashSet::new());
        s.apply(&mut k, &[change("2001:db8:10::/64", &[hv(1), hv(2)])])
            .unwrap();
        k.sent.clear();
        // The prefix drops hv2: route moves to encap obj 1, group and obj 2 go.
        let r = s
            .apply(&mut k, &[change("2001:db8:10::/64", &[hv(1)])])
            .unwrap();
        assert_eq!(r.replaced, 1);
        assert_eq!(r.objects_deleted, 2);
        assert_eq!(s.object_count(), 1);
        let dels: Vec<u32> = k
            .sent
            .iter()
            .filter(|r| r.message_type == RTM_DELNEXTHOP)
            .map(|r| NexthopMessage::parse(&r.payload).unwrap().id().unwrap())
            .collect();
        assert_eq!(dels, vec![3, 2], "group (id 3) before member (id 2)");
        // Last next hop gone: route deleted, object deleted.
        let r = s.apply(&mut k, &[change("2001:db8:10::/64", &[])]).unwrap();
        assert_eq!((r.deleted, r.objects_deleted), (1, 1));
        assert_eq!((s.route_count(), s.object_count()), (0, 0));
        assert_eq!(k.count(RTM_DELROUTE), 1);
    }

    #[test]
    fn ipv4_routes_carry_their_next_hops_and_use_no_objects() {
        let mut k = ScriptedKernel::default();
        let mut s = InstalledRoutes::new(3, HashSet::new());
        let r = s
            .apply(
                &mut k,
                &[
                    change("10.0.0.0/24", &[hv(1), hv(2)]),
                    change("10.0.1.0/24", &[hv(1)]),
                    change("2001:db8:9::/64", &[hv(1)]),
                ],
            )
            .unwrap();
        assert_eq!((r.objects_created, r.replaced), (1, 3), "one v6 object");
        assert_eq!(k.count(RTM_NEWROUTE), 3);
        let inline = |r: &Request| {
            r.message_type == RTM_NEWROUTE
                && matches!(
                    crate::routes::parse_dumped(&r.payload).unwrap().next_hops,
                    KernelNextHops::Inline(_)
                )
        };
        assert_eq!(k.sent.iter().filter(|r| inline(r)).count(), 2);
        assert_eq!(s.snapshot()[0].next_hops, vec![hv(1), hv(2)]);
        // The same next hops again: nothing to send.
        k.sent.clear();
        s.apply(&mut k, &[change("10.0.0.0/24", &[hv(1), hv(2)])])
            .unwrap();
        assert!(k.sent.is_empty());
        // Fewer next hops: one replace, still no object.
        let r = s.apply(&mut k, &[change("10.0.0.0/24", &[hv(2)])]).unwrap();
        assert_eq!((r.replaced, r.objects_created), (1, 0));
        assert_eq!(k.count(RTM_NEWNEXTHOP), 0);
    }

    #[test]
    fn read_back_finds_missing_and_changed_routes() {
        use crate::routes::InlineNextHop;
        let mut k = ScriptedKernel::default();
        let mut s = InstalledRoutes::new(3, HashSet::new());
        s.apply(
            &mut k,
            &[
                change("10.0.0.0/24", &[hv(1), hv(2)]),
                change("10.0.1.0/24", &[hv(1)]),
                change("10.0.2.0/24", &[hv(1)]),
                change("2001:db8:9::/64", &[hv(1)]),
                change("2001:db8:8::/64", &[hv(1)]),
            ],
        )
        .unwrap();
        let hop = |oif, n| InlineNextHop {
            oif,
            encap_dst: Some(hv(n)),
        };
        let v6_id = s.object_ids()[0];
        let kernel: HashMap<RouteKey, KernelNextHops> = [
            // Same next hops in another order: ours.
            (
                key("10.0.0.0/24"),
                KernelNextHops::Inline(vec![hop(3, 2), hop(3, 1)]),
            ),
            // Replaced by hand with another address: not ours any more.
            (key("10.0.1.0/24"), KernelNextHops::Inline(vec![hop(3, 9)])),
            // 10.0.2.0/24 missing. Right next hop, wrong device:
            (
                key("2001:db8:9::/64"),
                KernelNextHops::Inline(vec![hop(4, 1)]),
            ),
            (key("2001:db8:8::/64"), KernelNextHops::Object(v6_id)),
        ]
        .into_iter()
        .collect();
        let mut changed = s.forget_changed(&kernel);
        changed.sort();
        assert_eq!(
            changed,
            vec![
                key("10.0.1.0/24"),
                key("10.0.2.0/24"),
                key("2001:db8:9::/64")
            ]
        );
        assert_eq!(s.route_count(), 2);
    }

    #[test]
    fn refused_object_means_route_not_claimed() {
        let mut k = ScriptedKernel::default();
        k.refuse_dst = Some(hv(2));
        let mut s = InstalledRoutes::new(3, HashSet::new());
        let r = s
            .apply(
                &mut k,
                &[
                    change("2001:db8:10::/64", &[hv(1), hv(2)]),
                    change("2001:db8:11::/64", &[hv(1)]),
                ],
            )
            .unwrap();
        assert_eq!(r.replaced, 1);
        assert!(r.failed >= 2);
        assert_eq!(s.keys(), vec![key("2001:db8:11::/64")]);
        assert_eq!(s.object_count(), 1);
    }

    #[test]
    fn ids_skip_foreign_objects() {
        let mut s = InstalledRoutes::new(3, [1, 2, 4].into_iter().collect());
        assert_eq!(s.allocate_id(), 3);
        assert_eq!(s.allocate_id(), 5);
    }
}
