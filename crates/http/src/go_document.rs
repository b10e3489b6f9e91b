//! `/routes.json` and `/routes.yaml` exactly as the Go implementation writes
//! them (`json.MarshalIndent(js, "", "  ")` and `yaml.v2`'s `Marshal` of the
//! same struct), so a script written against the Go server reads ours
//! unchanged. `../shared/go-routes.json` and `go-routes.yaml` are the
//! reference.
//!
//! Owns: the document's shape (field names and order, value types), the
//! ordering rules of both encoders (`GoOrder`), YAML quoting as `yaml.v2`
//! does it, Go's JSON string escaping, and writing a document piece by piece
//! (`DocumentCursor`): a reader of a 200,000-route table is sent chunks of
//! `fill`'s limit, never the whole 48 MB document at once. Written by hand
//! because the shape is fixed and small, and no Rust serializer reproduces
//! Go's key ordering (string order for JSON integer keys, numeric order for
//! YAML ones) or `yaml.v2`'s quoting.
//!
//! Must never: change the shape for taste (a cleaner document would go under
//! a new path), render anything but what the `RouteTableView` holds, or
//! write more than one next hop past `fill`'s limit.
//!
//! Ordering, as the Go encoders produce it:
//! - VNI keys: JSON sorts map keys by their text ("10" before "9"); YAML
//!   sorts integer keys numerically (9 before 10).
//! - Destination keys are the JSON text `{"IPVersion":4,"Prefix":"10.0.23.0/24"}`,
//!   in text order in both (Go's YAML leaves struct keys in map order, which
//!   is random; we use the JSON order, which is what the reference shows).
//! - Next hops of a destination are sorted by their Go `String()`:
//!   `<address>`, or `<address> (VNI: <n>)` when the target VNI is not 0.
//!
//! ```text
//!  RouteTableView ──GoOrder::new (once per snapshot)──► key orders
//!        │                                                  │
//!        └──────────► DocumentCursor::fill(limit) ◄─────────┘  (one per reader)
//!                       head, VNI, destination, next hop, ..., tail
//! ```

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::SystemTime;

use metalbond_telemetry::status::{format_date, RouteTableView};
use metalbond_wire::types::{IpNet, NextHop, NextHopKind};

/// Which of the two documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `/routes.json`.
    Json,
    /// `/routes.yaml`.
    Yaml,
}

/// The order in which the Go encoders write a table's keys, computed once
/// per snapshot and shared by every reader of it (sorting 200,000
/// destination keys takes longer than writing them).
#[derive(Debug, Default)]
pub struct GoOrder {
    /// Indexes into `RouteTableView::vnis` in JSON key order (as text); YAML
    /// writes them in the view's own (numeric) order.
    json_vnis: Vec<usize>,
    /// Per VNI (same index as the view), its destinations' indexes in Go
    /// key-text order (the same in both documents).
    destinations: Vec<Vec<usize>>,
}

impl GoOrder {
    /// Sorts `table`'s keys as the Go encoders do.
    pub fn new(table: &RouteTableView) -> GoOrder {
        let mut json_vnis: Vec<usize> = (0..table.vnis.len()).collect();
        json_vnis.sort_by_cached_key(|&i| table.vnis[i].vni.get().to_string());
        let destinations = table
            .vnis
            .iter()
            .map(|v| {
                let mut order: Vec<usize> = (0..v.destinations.len()).collect();
                order.sort_by_cached_key(|&i| destination_key(&v.destinations[i].prefix));
                order
            })
            .collect();
        GoOrder {
            json_vnis,
            destinations,
        }
    }
}

/// One document to write: the table, its key order and the header values.
#[derive(Clone, Copy)]
pub struct GoDocument<'a> {
    /// The routes.
    pub table: &'a RouteTableView,
    /// `GoOrder::new(table)`.
    pub order: &'a GoOrder,
    /// The `date` field (when the table was copied).
    pub date: SystemTime,
    /// The `metalbondVersion` field.
    pub version: &'a str,
}

/// What the cursor writes next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// `date` and the opening of `vnet`.
    Head,
    /// The key of the VNI at `vni` (in the format's VNI order).
    Vni,
    /// The key of the destination at `dest` of that VNI.
    Destination,
    /// The next hop at `hop` of that destination.
    Hop,
    /// The closing of `vnet`, `metalbondVersion` and the end.
    Tail,
    /// Everything is written.
    Done,
}

/// A position in one document of one snapshot: lets a reader be sent the
/// document a chunk at a time, each chunk written when the previous one has
/// gone, so a slow reader holds one chunk, not the document.
#[derive(Debug)]
pub struct DocumentCursor {
    /// Which document.
    format: Format,
    /// What comes next.
    stage: Stage,
    /// Position in the format's VNI order.
    vni: usize,
    /// Position in the current VNI's destination order.
    dest: usize,
    /// Position in `hops`.
    hop: usize,
    /// The current destination's next hops (indexes) in Go `String()` order.
    hops: Vec<usize>,
    /// Reused for keys and addresses (no allocation per route).
    scratch: String,
    /// Next hop addresses as last written, quoted for the format: a fleet
    /// has far fewer next hops (hypervisors) than routes, and formatting
    /// and quoting an IPv6 address is most of a route's cost.
    addresses: AddressMemo,
}

/// Slots of `AddressMemo` (direct-mapped; about 4 KiB per reader).
const ADDRESS_MEMO_SLOTS: usize = 64;

/// A small direct-mapped cache from a next hop address to its text as the
/// document writes it (quotes included).
#[derive(Debug, Default)]
struct AddressMemo {
    /// Slot `hash(address) % ADDRESS_MEMO_SLOTS`: the address and its text.
    slots: Vec<Option<(IpAddr, String)>>,
}

impl AddressMemo {
    /// Appends `address` to `out` as `format` writes it, from the memo or
    /// written (and remembered) now.
    fn push(&mut self, out: &mut String, address: IpAddr, format: Format, scratch: &mut String) {
        if self.slots.is_empty() {
            self.slots = vec![None; ADDRESS_MEMO_SLOTS];
        }
        let slot = &mut self.slots[address_slot(&address)];
        if let Some((cached, text)) = slot {
            if *cached == address {
                out.push_str(text);
                return;
            }
        }
        scratch.clear();
        push_ip(scratch, address);
        let mut text = String::with_capacity(scratch.len() + 2);
        match format {
            Format::Json => push_json_string(&mut text, scratch),
            Format::Yaml => push_yaml_string(&mut text, scratch),
        }
        out.push_str(&text);
        *slot = Some((address, text));
    }
}

/// The memo slot of an address (FNV-1a of its bytes).
fn address_slot(address: &IpAddr) -> usize {
    let mut h: u32 = 0x811c_9dc5;
    let mut mix = |b: u8| {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    };
    match address {
        IpAddr::V4(a) => a.octets().into_iter().for_each(&mut mix),
        IpAddr::V6(a) => a.octets().into_iter().for_each(&mut mix),
    }
    h as usize % ADDRESS_MEMO_SLOTS
}

impl DocumentCursor {
    /// A cursor at the start of a document.
    pub fn new(format: Format) -> DocumentCursor {
        DocumentCursor {
            format,
            stage: Stage::Head,
            vni: 0,
            dest: 0,
            hop: 0,
            hops: Vec::new(),
            scratch: String::new(),
            addresses: AddressMemo::default(),
        }
    }

    /// Whether the whole document has been written.
    pub fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }

    /// Appends the document's next pieces to `out` until `out` holds at
    /// least `limit` bytes or the document ends. A piece is at most one next
    /// hop (about 200 bytes), or a VNI or destination key, so `out` ends
    /// below `limit` plus one piece. `doc` must be the same on every call.
    pub fn fill(&mut self, doc: &GoDocument<'_>, out: &mut String, limit: usize) {
        while out.len() < limit && self.stage != Stage::Done {
            match self.format {
                Format::Json => self.json_step(doc, out),
                Format::Yaml => self.yaml_step(doc, out),
            }
        }
    }

    /// The whole document's length in bytes, written through a small buffer
    /// (for `Content-Length`, without holding the document).
    pub fn document_len(format: Format, doc: &GoDocument<'_>) -> usize {
        let mut cursor = DocumentCursor::new(format);
        let mut buf = String::with_capacity(64 * 1024);
        let mut len = 0;
        while !cursor.is_done() {
            buf.clear();
            cursor.fill(doc, &mut buf, 60 * 1024);
            len += buf.len();
        }
        len
    }

    /// The VNI at the cursor, as an index into the view.
    fn vni_index(&self, doc: &GoDocument<'_>) -> usize {
        match self.format {
            Format::Json => doc.order.json_vnis[self.vni],
            Format::Yaml => self.vni,
        }
    }

    /// Moves to the next VNI, or to the tail after the last.
    fn next_vni(&mut self, doc: &GoDocument<'_>) {
        self.vni += 1;
        self.dest = 0;
        self.stage = if self.vni < doc.table.vnis.len() {
            Stage::Vni
        } else {
            Stage::Tail
        };
    }

    /// Enters the destination at the cursor: sorts its next hops.
    fn enter_destination<'a>(&mut self, doc: &GoDocument<'a>) -> &'a IpNet {
        let v = self.vni_index(doc);
        let d = &doc.table.vnis[v].destinations[doc.order.destinations[v][self.dest]];
        self.hops.clear();
        self.hop = 0;
        if d.next_hops.len() == 1 {
            self.hops.push(0);
        } else {
            let mut keyed: Vec<(String, usize)> = d
                .next_hops
                .iter()
                .enumerate()
                .map(|(i, h)| (go_hop_text(h), i))
                .collect();
            keyed.sort_by(|a, b| {
                a.0.cmp(&b.0)
                    .then_with(|| d.next_hops[a.1].cmp(&d.next_hops[b.1]))
            });
            self.hops.extend(keyed.into_iter().map(|(_, i)| i));
        }
        &d.prefix
    }

    /// The next hop at the cursor.
    fn current_hop<'a>(&self, doc: &GoDocument<'a>) -> &'a NextHop {
        let v = self.vni_index(doc);
        let d = &doc.table.vnis[v].destinations[doc.order.destinations[v][self.dest]];
        &d.next_hops[self.hops[self.hop]]
    }

    /// Moves to the next destination of the VNI; `vni_end` closes the VNI
    /// after its last one.
    fn next_destination(&mut self, doc: &GoDocument<'_>, out: &mut String, vni_end: &str) {
        self.dest += 1;
        let v = self.vni_index(doc);
        if self.dest < doc.table.vnis[v].destinations.len() {
            self.stage = Stage::Destination;
        } else {
            out.push_str(vni_end);
            self.next_vni(doc);
        }
    }

    /// Writes one piece of `/routes.json`: Go's `json.MarshalIndent(js, "",
    /// "  ")` (no trailing newline, as the Go handler writes it).
    fn json_step(&mut self, doc: &GoDocument<'_>, out: &mut String) {
        match self.stage {
            Stage::Head => {
                out.push_str("{\n  \"date\": ");
                push_json_string(out, &format_date(doc.date));
                out.push_str(",\n  \"vnet\": ");
                if doc.table.vnis.is_empty() {
                    out.push_str("{}");
                    self.stage = Stage::Tail;
                } else {
                    out.push('{');
                    self.stage = Stage::Vni;
                }
            }
            Stage::Vni => {
                // encoding/json sorts map keys by their text, integer keys too.
                let view = &doc.table.vnis[self.vni_index(doc)];
                out.push_str(if self.vni == 0 { "\n    " } else { ",\n    " });
                // A number as a JSON string: nothing to escape.
                out.push('"');
                push_u64(out, view.vni.get().into());
                out.push_str("\": ");
                if view.destinations.is_empty() {
                    out.push_str("{}");
                    self.next_vni(doc);
                    if self.stage == Stage::Tail {
                        out.push_str("\n  }");
                    }
                } else {
                    out.push('{');
                    self.stage = Stage::Destination;
                }
            }
            Stage::Destination => {
                out.push_str(if self.dest == 0 {
                    "\n      "
                } else {
                    ",\n      "
                });
                let prefix = *self.enter_destination(doc);
                // The key `{"IPVersion":4,"Prefix":"10.0.23.0/24"}` as a JSON
                // string: its quotes escaped, the prefix text needs nothing.
                out.push_str("\"{\\\"IPVersion\\\":");
                out.push(ip_version_digit(&prefix));
                out.push_str(",\\\"Prefix\\\":\\\"");
                push_prefix(out, &prefix);
                out.push_str("\\\"}\": [");
                if self.hops.is_empty() {
                    out.push(']');
                    self.json_next_destination(doc, out);
                } else {
                    self.stage = Stage::Hop;
                }
            }
            Stage::Hop => {
                let hop = self.current_hop(doc);
                let (from, to) = nat_ports(hop.kind);
                out.push_str(if self.hop == 0 {
                    "\n        {"
                } else {
                    ",\n        {"
                });
                out.push_str("\n          \"TargetAddress\": ");
                self.addresses
                    .push(out, hop.target, Format::Json, &mut self.scratch);
                out.push_str(",\n          \"TargetVNI\": ");
                push_u64(out, hop.target_vni.into());
                out.push_str(",\n          \"Type\": ");
                push_u64(out, type_number(hop.kind).into());
                out.push_str(",\n          \"NATPortRangeFrom\": ");
                push_u64(out, from.into());
                out.push_str(",\n          \"NATPortRangeTo\": ");
                push_u64(out, to.into());
                out.push_str("\n        }");
                self.hop += 1;
                if self.hop == self.hops.len() {
                    out.push_str("\n      ]");
                    self.json_next_destination(doc, out);
                }
            }
            Stage::Tail => {
                out.push_str(",\n  \"metalbondVersion\": ");
                push_json_string(out, doc.version);
                out.push_str("\n}");
                self.stage = Stage::Done;
            }
            Stage::Done => {}
        }
    }

    /// JSON: the next destination, or the VNI's (and maybe `vnet`'s) end.
    fn json_next_destination(&mut self, doc: &GoDocument<'_>, out: &mut String) {
        self.next_destination(doc, out, "\n    }");
        if self.stage == Stage::Tail {
            out.push_str("\n  }");
        }
    }

    /// Writes one piece of `/routes.yaml`: `yaml.v2`'s `Marshal` of the Go
    /// struct (field names lower-cased, indentless sequences, trailing
    /// newline).
    fn yaml_step(&mut self, doc: &GoDocument<'_>, out: &mut String) {
        match self.stage {
            Stage::Head => {
                out.push_str("date: ");
                push_yaml_string(out, &format_date(doc.date));
                out.push('\n');
                // yaml.v2 sorts integer keys numerically; the view is
                // ascending by VNI.
                if doc.table.vnis.is_empty() {
                    out.push_str("vnet: {}\n");
                    self.stage = Stage::Tail;
                } else {
                    out.push_str("vnet:\n");
                    self.stage = Stage::Vni;
                }
            }
            Stage::Vni => {
                let view = &doc.table.vnis[self.vni];
                out.push_str("  ");
                push_u64(out, view.vni.get().into());
                out.push(':');
                if view.destinations.is_empty() {
                    out.push_str(" {}\n");
                    self.next_vni(doc);
                } else {
                    out.push('\n');
                    self.stage = Stage::Destination;
                }
            }
            Stage::Destination => {
                out.push_str("    ");
                let prefix = *self.enter_destination(doc);
                // yaml.v2 single-quotes the key (it starts with `{`, which a
                // plain scalar may not; it holds no `'` to double).
                out.push_str("'{\"IPVersion\":");
                out.push(ip_version_digit(&prefix));
                out.push_str(",\"Prefix\":\"");
                push_prefix(out, &prefix);
                out.push_str("\"}'");
                if self.hops.is_empty() {
                    out.push_str(": []\n");
                    self.next_destination(doc, out, "");
                } else {
                    out.push_str(":\n");
                    self.stage = Stage::Hop;
                }
            }
            Stage::Hop => {
                let hop = self.current_hop(doc);
                let (from, to) = nat_ports(hop.kind);
                out.push_str("    - targetaddress: ");
                self.addresses
                    .push(out, hop.target, Format::Yaml, &mut self.scratch);
                out.push_str("\n      targetvni: ");
                push_u64(out, hop.target_vni.into());
                out.push_str("\n      type: ");
                push_u64(out, type_number(hop.kind).into());
                out.push_str("\n      natportrangefrom: ");
                push_u64(out, from.into());
                out.push_str("\n      natportrangeto: ");
                push_u64(out, to.into());
                out.push('\n');
                self.hop += 1;
                if self.hop == self.hops.len() {
                    self.next_destination(doc, out, "");
                }
            }
            Stage::Tail => {
                out.push_str("metalbondversion: ");
                push_yaml_string(out, doc.version);
                out.push('\n');
                self.stage = Stage::Done;
            }
            Stage::Done => {}
        }
    }
}

/// The whole document in one string (tests; the server streams it).
#[cfg(test)]
pub fn render(format: Format, table: &RouteTableView, date: SystemTime, version: &str) -> String {
    let order = GoOrder::new(table);
    let doc = GoDocument {
        table,
        order: &order,
        date,
        version,
    };
    let mut out = String::new();
    let mut cursor = DocumentCursor::new(format);
    cursor.fill(&doc, &mut out, usize::MAX);
    out
}

/// The Go `Destination` JSON text used as map key.
fn destination_key(prefix: &IpNet) -> String {
    let mut key = String::new();
    write_destination_key(&mut key, prefix);
    key
}

/// `destination_key` into a reused buffer (cleared first).
fn write_destination_key(key: &mut String, prefix: &IpNet) {
    let version = match prefix {
        IpNet::V4(_) => 4,
        IpNet::V6(_) => 6,
    };
    key.clear();
    let _ = write!(key, "{{\"IPVersion\":{version},\"Prefix\":\"{prefix}\"}}");
}

/// `4` or `6`: the key's `IPVersion`.
fn ip_version_digit(prefix: &IpNet) -> char {
    match prefix {
        IpNet::V4(_) => '4',
        IpNet::V6(_) => '6',
    }
}

/// A prefix as `Display` writes it (`10.0.23.0/24`), IPv4 without the
/// formatting machinery (most keys are IPv4 prefixes).
fn push_prefix(out: &mut String, prefix: &IpNet) {
    push_ip(out, prefix.addr());
    out.push('/');
    push_u64(out, prefix.prefix_len().into());
}

/// An address as `Display` writes it; IPv4 by hand.
fn push_ip(out: &mut String, address: IpAddr) {
    match address {
        IpAddr::V4(a) => {
            for (i, octet) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_u64(out, octet.into());
            }
        }
        IpAddr::V6(a) => {
            let _ = write!(out, "{a}");
        }
    }
}

/// A number in decimal, as `Display` writes it.
fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
}

/// Go's `NextHop.String()`, the next hops' sort key.
fn go_hop_text(hop: &NextHop) -> String {
    if hop.target_vni != 0 {
        format!("{} (VNI: {})", hop.target, hop.target_vni)
    } else {
        hop.target.to_string()
    }
}

/// The protobuf enum number of a next hop's type (`Type` in the document).
fn type_number(kind: NextHopKind) -> u8 {
    match kind {
        NextHopKind::Standard => 0,
        NextHopKind::Nat { .. } => 1,
        NextHopKind::LoadBalancerTarget => 2,
    }
}

/// NAT port range (0, 0 unless NAT), as the Go struct holds it.
fn nat_ports(kind: NextHopKind) -> (u16, u16) {
    match kind {
        NextHopKind::Nat { from, to } => (from, to),
        _ => (0, 0),
    }
}

/// A JSON string as Go's `encoding/json` escapes it (HTML-safe: `<`, `>`,
/// `&`, U+2028 and U+2029 as `\uXXXX`).
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    let plain =
        |b: &u8| (0x20..0x80).contains(b) && !matches!(b, b'"' | b'\\' | b'<' | b'>' | b'&');
    if s.as_bytes().iter().all(plain) {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A string scalar styled as `yaml.v2` styles it: plain when it reads back
/// as the same string and the emitter allows it, double-quoted when it would
/// read back as something else (number, bool, null, timestamp, base-60
/// float), single-quoted when plain is not allowed (e.g. it starts with `{`).
fn push_yaml_string(out: &mut String, s: &str) {
    let has_control = s.chars().any(|c| c.is_control());
    if has_control || yaml_v2_resolves_to_non_string(s) || is_base60_float(s) {
        push_yaml_double_quoted(out, s);
    } else if yaml_plain_allowed(s) {
        out.push_str(s);
    } else {
        out.push('\'');
        out.push_str(&s.replace('\'', "''"));
        out.push('\'');
    }
}

/// A double-quoted YAML scalar with libyaml's escapes.
fn push_yaml_double_quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{b}' => out.push_str("\\v"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            '\u{1b}' => out.push_str("\\e"),
            '\u{85}' => out.push_str("\\N"),
            '\u{a0}' => out.push_str("\\_"),
            '\u{2028}' => out.push_str("\\L"),
            '\u{2029}' => out.push_str("\\P"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Whether `yaml.v2`'s resolver reads the plain scalar `s` as something
/// other than a string (bool, null, int, float, timestamp, merge key).
fn yaml_v2_resolves_to_non_string(s: &str) -> bool {
    const WORDS: &[&str] = &[
        "y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON", "n", "N", "no",
        "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF", "", "~", "null", "Null",
        "NULL", ".nan", ".NaN", ".NAN", ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", "-.inf",
        "-.Inf", "-.INF", "<<",
    ];
    if WORDS.contains(&s) {
        return true;
    }
    let Some(first) = s.chars().next() else {
        return true;
    };
    if !(first.is_ascii_digit() || first == '+' || first == '-' || first == '.') {
        return false;
    }
    let plain: String = s.chars().filter(|&c| c != '_').collect();
    is_go_int(&plain) || is_yaml_float(&plain) || (first.is_ascii_digit() && is_timestamp(s))
}

/// `strconv.ParseInt(s, 0, 64)` (or ParseUint) would accept it: optional
/// sign, then `0x` hex, `0o`/`0` octal, `0b` binary or decimal digits.
fn is_go_int(s: &str) -> bool {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    let all = |t: &str, f: fn(char) -> bool| !t.is_empty() && t.chars().all(f);
    if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        return all(hex, |c| c.is_ascii_hexdigit());
    }
    if let Some(oct) = digits
        .strip_prefix("0o")
        .or_else(|| digits.strip_prefix("0O"))
    {
        return all(oct, |c| ('0'..='7').contains(&c));
    }
    if let Some(bin) = digits
        .strip_prefix("0b")
        .or_else(|| digits.strip_prefix("0B"))
    {
        return all(bin, |c| c == '0' || c == '1');
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return all(digits, |c| ('0'..='7').contains(&c));
    }
    all(digits, |c| c.is_ascii_digit())
}

/// `yaml.v2`'s float pattern:
/// `^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$`.
fn is_yaml_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    let digits_from = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        i
    };
    if b.get(i) == Some(&b'.') {
        let end = digits_from(i + 1);
        if end == i + 1 {
            return false;
        }
        i = end;
    } else {
        let end = digits_from(i);
        if end == i {
            return false;
        }
        i = end;
        if b.get(i) == Some(&b'.') {
            i = digits_from(i + 1);
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let end = digits_from(i);
        if end == i {
            return false;
        }
        i = end;
    }
    i == b.len()
}

/// Looks like a YAML timestamp `yaml.v2` would parse: four-digit year, `-`,
/// month, `-`, day, optionally followed by a time (`T`, `t` or space).
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 8 || !b[..4].iter().all(u8::is_ascii_digit) || b[4] != b'-' {
        return false;
    }
    let mut i = 5;
    for part in 0..2 {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || i - start > 2 {
            return false;
        }
        if part == 0 {
            if b.get(i) != Some(&b'-') {
                return false;
            }
            i += 1;
        }
    }
    i == b.len() || matches!(b[i], b'T' | b't' | b' ')
}

/// `yaml.v2`'s `isBase60Float`:
/// `^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$` (e.g. `1:20`).
fn is_base60_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    if !b.get(i).is_some_and(u8::is_ascii_digit) {
        return false;
    }
    i += 1;
    while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'_') {
        i += 1;
    }
    let mut groups = 0;
    while b.get(i) == Some(&b':') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() && i - start < 2 {
            i += 1;
        }
        let group = &b[start..i];
        let ok = match group.len() {
            1 => true,
            2 => (b'0'..=b'5').contains(&group[0]),
            _ => false,
        };
        if !ok {
            return false;
        }
        groups += 1;
    }
    if groups == 0 {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'_') {
            i += 1;
        }
    }
    i == b.len()
}

/// Whether libyaml's emitter allows `s` as a plain scalar in block context
/// (one line, no indicator at the start, no `: ` or ` #` inside, no leading
/// or trailing space).
fn yaml_plain_allowed(s: &str) -> bool {
    let chars: Vec<char> = s.chars().collect();
    let Some(&first) = chars.first() else {
        return false;
    };
    if s.starts_with("---") || s.starts_with("...") {
        return false;
    }
    let blank_or_end = |i: usize| chars.get(i).is_none_or(|c| *c == ' ' || *c == '\t');
    if matches!(
        first,
        '#' | ','
            | '['
            | ']'
            | '{'
            | '}'
            | '&'
            | '*'
            | '!'
            | '|'
            | '>'
            | '\''
            | '"'
            | '%'
            | '@'
            | '`'
    ) {
        return false;
    }
    if matches!(first, '?' | ':' | '-') && blank_or_end(1) {
        return false;
    }
    if first == ' ' || chars.last() == Some(&' ') {
        return false;
    }
    for (i, &c) in chars.iter().enumerate() {
        if c.is_control() || c == '\u{feff}' {
            return false;
        }
        if c == ':' && blank_or_end(i + 1) {
            return false;
        }
        if c == '#' && i > 0 && (chars[i - 1] == ' ' || chars[i - 1] == '\t') {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-piece renderer that `DocumentCursor` replaced (main before
    /// the slow-reader work), kept as the reference the streamed documents
    /// must equal byte for byte.
    mod oracle {
        use std::fmt::Write as _;
        use std::time::SystemTime;

        use super::super::{
            destination_key, go_hop_text, nat_ports, push_json_string, push_yaml_string,
            type_number,
        };
        use metalbond_telemetry::status::{
            format_date, DestinationView, RouteTableView, VniRoutesView,
        };
        use metalbond_wire::types::NextHop;

        /// One destination ready to print: its Go map key and its sorted next hops.
        struct GoDestination<'a> {
            /// `{"IPVersion":4,"Prefix":"10.0.23.0/24"}`.
            key: String,
            /// Next hops in Go `String()` order.
            hops: Vec<&'a NextHop>,
        }

        /// A VNI's destinations with keys, in key text order, hops sorted.
        fn go_destinations(dests: &[DestinationView]) -> Vec<GoDestination<'_>> {
            let mut out: Vec<GoDestination<'_>> = dests
                .iter()
                .map(|d| {
                    let mut hops: Vec<(String, &NextHop)> =
                        d.next_hops.iter().map(|h| (go_hop_text(h), h)).collect();
                    hops.sort();
                    GoDestination {
                        key: destination_key(&d.prefix),
                        hops: hops.into_iter().map(|(_, h)| h).collect(),
                    }
                })
                .collect();
            out.sort_by(|a, b| a.key.cmp(&b.key));
            out
        }

        /// The `/routes.json` document: Go's `json.MarshalIndent(js, "", "  ")`
        /// (no trailing newline, as the Go handler writes it).
        pub fn json(table: &RouteTableView, date: SystemTime, version: &str) -> String {
            let mut out = String::with_capacity(256 + table.route_count() * 220);
            out.push_str("{\n  \"date\": ");
            push_json_string(&mut out, &format_date(date));
            out.push_str(",\n  \"vnet\": ");
            // encoding/json sorts map keys by their text, integer keys included.
            let mut vnis: Vec<(String, &VniRoutesView)> = table
                .vnis
                .iter()
                .map(|v| (v.vni.get().to_string(), v))
                .collect();
            vnis.sort_by(|a, b| a.0.cmp(&b.0));
            if vnis.is_empty() {
                out.push_str("{}");
            } else {
                out.push('{');
                for (i, (vni, view)) in vnis.iter().enumerate() {
                    out.push_str(if i == 0 { "\n    " } else { ",\n    " });
                    push_json_string(&mut out, vni);
                    out.push_str(": ");
                    push_json_vni(&mut out, view);
                }
                out.push_str("\n  }");
            }
            out.push_str(",\n  \"metalbondVersion\": ");
            push_json_string(&mut out, version);
            out.push_str("\n}");
            out
        }

        /// One VNI's destination map at depth 2.
        fn push_json_vni(out: &mut String, view: &VniRoutesView) {
            let dests = go_destinations(&view.destinations);
            if dests.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, d) in dests.iter().enumerate() {
                out.push_str(if i == 0 { "\n      " } else { ",\n      " });
                push_json_string(out, &d.key);
                out.push_str(": [");
                for (j, hop) in d.hops.iter().enumerate() {
                    let (from, to) = nat_ports(hop.kind);
                    out.push_str(if j == 0 {
                        "\n        {"
                    } else {
                        ",\n        {"
                    });
                    out.push_str("\n          \"TargetAddress\": ");
                    push_json_string(out, &hop.target.to_string());
                    let _ = write!(
                        out,
                        ",\n          \"TargetVNI\": {},\n          \"Type\": {},\n          \"NATPortRangeFrom\": {from},\n          \"NATPortRangeTo\": {to}\n        }}",
                        hop.target_vni,
                        type_number(hop.kind),
                    );
                }
                out.push_str(if d.hops.is_empty() { "]" } else { "\n      ]" });
            }
            out.push_str("\n    }");
        }

        /// The `/routes.yaml` document: `yaml.v2`'s `Marshal` of the Go struct
        /// (field names lower-cased, indentless sequences, trailing newline).
        pub fn yaml(table: &RouteTableView, date: SystemTime, version: &str) -> String {
            let mut out = String::with_capacity(256 + table.route_count() * 160);
            out.push_str("date: ");
            push_yaml_string(&mut out, &format_date(date));
            out.push('\n');
            // yaml.v2 sorts integer keys numerically; the view is ascending by VNI.
            if table.vnis.is_empty() {
                out.push_str("vnet: {}\n");
            } else {
                out.push_str("vnet:\n");
                for view in &table.vnis {
                    let _ = write!(out, "  {}:", view.vni.get());
                    let dests = go_destinations(&view.destinations);
                    if dests.is_empty() {
                        out.push_str(" {}\n");
                        continue;
                    }
                    out.push('\n');
                    for d in &dests {
                        out.push_str("    ");
                        push_yaml_string(&mut out, &d.key);
                        if d.hops.is_empty() {
                            out.push_str(": []\n");
                            continue;
                        }
                        out.push_str(":\n");
                        for hop in &d.hops {
                            let (from, to) = nat_ports(hop.kind);
                            out.push_str("    - targetaddress: ");
                            push_yaml_string(&mut out, &hop.target.to_string());
                            let _ = write!(
                                out,
                                "\n      targetvni: {}\n      type: {}\n      natportrangefrom: {from}\n      natportrangeto: {to}\n",
                                hop.target_vni,
                                type_number(hop.kind),
                            );
                        }
                    }
                }
            }
            out.push_str("metalbondversion: ");
            push_yaml_string(&mut out, version);
            out.push('\n');
            out
        }
    }

    fn yaml_scalar(s: &str) -> String {
        let mut out = String::new();
        push_yaml_string(&mut out, s);
        out
    }

    #[test]
    fn yaml_quoting_follows_yaml_v2() {
        assert_eq!(
            yaml_scalar("2026-11-30 10:38:16"),
            "\"2026-11-30 10:38:16\""
        );
        assert_eq!(yaml_scalar("11ad382"), "11ad382");
        assert_eq!(yaml_scalar("0.1.0"), "0.1.0");
        assert_eq!(yaml_scalar("1.0"), "\"1.0\"");
        assert_eq!(yaml_scalar("123"), "\"123\"");
        assert_eq!(yaml_scalar("0x1f"), "\"0x1f\"");
        assert_eq!(yaml_scalar("true"), "\"true\"");
        assert_eq!(yaml_scalar("~"), "\"~\"");
        assert_eq!(yaml_scalar(""), "\"\"");
        assert_eq!(yaml_scalar("2001:db8::1"), "2001:db8::1");
        assert_eq!(yaml_scalar("::1"), "::1");
        assert_eq!(yaml_scalar("10.0.0.1"), "10.0.0.1");
        assert_eq!(yaml_scalar("1:2:3:4:5:6:7:8"), "\"1:2:3:4:5:6:7:8\"");
        assert_eq!(
            yaml_scalar("{\"IPVersion\":4,\"Prefix\":\"10.0.23.0/24\"}"),
            "'{\"IPVersion\":4,\"Prefix\":\"10.0.23.0/24\"}'"
        );
        assert_eq!(yaml_scalar("a: b"), "'a: b'");
        assert_eq!(yaml_scalar("- x"), "'- x'");
    }

    fn hop(target: &str, target_vni: u32) -> NextHop {
        NextHop {
            target: target.parse().unwrap(),
            target_vni,
            kind: NextHopKind::Standard,
        }
    }

    fn table() -> RouteTableView {
        let v = |n| metalbond_wire::types::Vni::new(n).unwrap();
        let p = |s: &str| s.parse::<IpNet>().unwrap();
        RouteTableView::from_routes([
            (v(10), p("10.0.10.0/24"), hop("2001:db8::a", 0)),
            (v(9), p("10.0.9.0/24"), hop("2001:db8::10", 0)),
            (v(9), p("10.0.9.0/24"), hop("2001:db8::1", 5)),
            (v(9), p("10.0.9.0/24"), hop("2001:db8::2", 0)),
            (v(9), p("2001:db8:9::/48"), hop("2001:db8::2", 0)),
            (v(9), p("9.0.0.0/8"), hop("2001:db8::2", 0)),
        ])
    }

    #[test]
    fn vni_keys_sort_as_text_in_json_and_as_numbers_in_yaml() {
        let t = table();
        let json = render(Format::Json, &t, SystemTime::UNIX_EPOCH, "v");
        assert!(json.find("\"10\": {").unwrap() < json.find("\"9\": {").unwrap());
        let yaml = render(Format::Yaml, &t, SystemTime::UNIX_EPOCH, "v");
        assert!(yaml.find("\n  9:\n").unwrap() < yaml.find("\n  10:\n").unwrap());
        // Both parse, and hold the same six routes.
        let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(doc["vnet"]["9"].as_object().unwrap().len(), 3);
        assert!(yaml.starts_with("date: \"1970-01-01 00:00:00\"\nvnet:\n"));
    }

    #[test]
    fn next_hops_sort_by_go_text_and_destinations_by_key_text() {
        let t = table();
        let json = render(Format::Json, &t, SystemTime::UNIX_EPOCH, "v");
        // "2001:db8::1 (VNI: 5)" < "2001:db8::10" < "2001:db8::2" as text.
        let a = json.find("\"2001:db8::1\"").unwrap();
        let b = json.find("\"2001:db8::10\"").unwrap();
        let c = json.find("\"2001:db8::2\"").unwrap();
        assert!(a < b && b < c, "{json}");
        assert!(json[a..].starts_with("\"2001:db8::1\",\n          \"TargetVNI\": 5,"));
        // Keys as text: IPVersion 4 before 6, then "10.0.9.0/24" before "9.0.0.0/8".
        let k4a = json.find("10.0.9.0/24").unwrap();
        let k4b = json.find("9.0.0.0/8").unwrap();
        let k6 = json.find("2001:db8:9::/48").unwrap();
        assert!(k4a < k4b && k4b < k6, "{json}");
    }

    #[test]
    fn empty_table() {
        let t = RouteTableView::default();
        assert_eq!(
            render(Format::Json, &t, SystemTime::UNIX_EPOCH, "v"),
            "{\n  \"date\": \"1970-01-01 00:00:00\",\n  \"vnet\": {},\n  \"metalbondVersion\": \"v\"\n}"
        );
        assert_eq!(
            render(Format::Yaml, &t, SystemTime::UNIX_EPOCH, "v"),
            "date: \"1970-01-01 00:00:00\"\nvnet: {}\nmetalbondversion: v\n"
        );
    }

    #[test]
    fn json_strings_escape_as_go_does() {
        let mut out = String::new();
        push_json_string(&mut out, "a\"b\\<&>\n\u{1}");
        assert_eq!(out, r#""a\"b\\\u003c\u0026\u003e\n\u0001""#);
    }

    #[test]
    fn float_and_int_patterns() {
        for s in ["1", "-1", "0o17", "0b101", "017", "1_000"] {
            let plain: String = s.chars().filter(|&c| c != '_').collect();
            assert!(is_go_int(&plain), "{s}");
        }
        for s in ["1.5", ".5", "1e3", "1.", "09", "-2.5E-3"] {
            assert!(is_yaml_float(s), "{s}");
        }
        for s in ["1.2.3", "e3", ".", "1e", "v1"] {
            assert!(!is_yaml_float(s) && !is_go_int(s), "{s}");
        }
        assert!(is_base60_float("1:20"));
        assert!(is_base60_float("190:20:30.15"));
        assert!(!is_base60_float("1:60"));
        assert!(!is_base60_float("2001:db8::1"));
    }

    /// A table with what the orderings must get right: VNIs whose text and
    /// numeric orders differ, prefixes whose text and numeric orders differ,
    /// IPv4 and IPv6, ECMP hops with and without a target VNI, NAT and
    /// load-balancer hops, and one destination with many hops (a piece per
    /// hop, so one destination spans several chunks).
    fn varied_table(seed: u64) -> RouteTableView {
        let mut x = seed | 1;
        let mut next = move || {
            // xorshift64: deterministic, no dependency.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut routes = Vec::new();
        for i in 0..600u64 {
            let r = next();
            let vni = metalbond_wire::types::Vni::new([9, 10, 100, 1000, 23, 2][(r % 6) as usize])
                .unwrap();
            let prefix: IpNet = if r % 5 == 0 {
                format!("2001:db8:{:x}::/{}", (r >> 8) % 300, 40 + (r >> 20) % 25)
                    .parse()
                    .unwrap()
            } else {
                format!(
                    "10.{}.{}.0/{}",
                    (r >> 8) % 12,
                    (r >> 16) % 256,
                    16 + (r >> 24) % 9
                )
                .parse()
                .unwrap()
            };
            let kind = match (r >> 32) % 7 {
                0 => NextHopKind::Nat {
                    from: 1024,
                    to: 2047,
                },
                1 => NextHopKind::LoadBalancerTarget,
                _ => NextHopKind::Standard,
            };
            let target_vni = if (r >> 36) % 4 == 0 {
                (r >> 40) as u32 % 50
            } else {
                0
            };
            let target = if (r >> 50) % 5 == 0 {
                format!("192.0.2.{}", (r >> 44) % 20)
            } else {
                format!("2001:db8::{:x}", (r >> 44) % 20)
            };
            let hop = NextHop {
                target: target.parse().unwrap(),
                target_vni,
                kind,
            };
            routes.push((vni, prefix, hop));
            if i % 100 == 0 {
                // The same destination again, by another hop (ECMP).
                routes.push((vni, prefix, hop_from(i)));
            }
        }
        for i in 0..40 {
            routes.push((
                metalbond_wire::types::Vni::new(7).unwrap(),
                "192.0.2.0/24".parse().unwrap(),
                hop_from(i),
            ));
        }
        RouteTableView::from_routes(routes)
    }

    fn hop_from(i: u64) -> NextHop {
        hop(&format!("2001:db8:ffff::{i:x}"), (i % 3) as u32)
    }

    /// The whole document written with `fill` limits of `limit`, chunk by
    /// chunk, checking that no chunk passes the limit by more than a piece.
    fn streamed(format: Format, table: &RouteTableView, limit: usize) -> String {
        let order = GoOrder::new(table);
        let doc = GoDocument {
            table,
            order: &order,
            date: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
            version: "v1 <&>",
        };
        let mut whole = String::new();
        let mut cursor = DocumentCursor::new(format);
        let mut chunk = String::new();
        while !cursor.is_done() {
            chunk.clear();
            cursor.fill(&doc, &mut chunk, limit);
            assert!(!chunk.is_empty(), "fill wrote nothing before the end");
            assert!(
                chunk.len() < limit.saturating_add(400),
                "a {} byte chunk for a limit of {limit}",
                chunk.len()
            );
            whole.push_str(&chunk);
        }
        assert_eq!(DocumentCursor::document_len(format, &doc), whole.len());
        whole
    }

    #[test]
    fn streamed_documents_equal_the_one_piece_renderer_at_every_chunk_size() {
        let date = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let mut tables = vec![RouteTableView::default(), table()];
        tables.extend((1..6).map(varied_table));
        for t in &tables {
            let json = oracle::json(t, date, "v1 <&>");
            let yaml = oracle::yaml(t, date, "v1 <&>");
            for limit in [1, 7, 100, 333, 4096, 32 * 1024, usize::MAX] {
                assert_eq!(
                    streamed(Format::Json, t, limit),
                    json,
                    "JSON, limit {limit}"
                );
                assert_eq!(
                    streamed(Format::Yaml, t, limit),
                    yaml,
                    "YAML, limit {limit}"
                );
            }
        }
        // The varied tables are not trivial: both orders differ from the
        // view's somewhere, and one destination has 40 hops.
        let t = varied_table(1);
        assert!(t
            .vnis
            .iter()
            .any(|v| v.destinations.iter().any(|d| d.next_hops.len() >= 40)));
        let json = oracle::json(&t, date, "v");
        assert!(json.find("\"10\": {").unwrap() < json.find("\"9\": {").unwrap());
    }
}
