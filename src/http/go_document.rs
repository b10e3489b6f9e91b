//! `/routes.json` and `/routes.yaml` exactly as the Go implementation writes
//! them (`json.MarshalIndent(js, "", "  ")` and `yaml.v2`'s `Marshal` of the
//! same struct), so a script written against the Go server reads ours
//! unchanged. `../shared/go-routes.json` and `go-routes.yaml` are the
//! reference.
//!
//! Owns: the document's shape (field names and order, value types), the
//! ordering rules of both encoders, YAML quoting as `yaml.v2` does it, and
//! Go's JSON string escaping. Written by hand because the shape is fixed and
//! small, and no Rust serializer reproduces Go's key ordering (string order
//! for JSON integer keys, numeric order for YAML ones) or `yaml.v2`'s quoting.
//!
//! Must never: change the shape for taste (a cleaner document would go under
//! a new path), or render anything but what the `RouteTableView` holds.
//!
//! Ordering, as the Go encoders produce it:
//! - VNI keys: JSON sorts map keys by their text ("10" before "9"); YAML
//!   sorts integer keys numerically (9 before 10).
//! - Destination keys are the JSON text `{"IPVersion":4,"Prefix":"10.0.23.0/24"}`,
//!   in text order in both (Go's YAML leaves struct keys in map order, which
//!   is random; we use the JSON order, which is what the reference shows).
//! - Next hops of a destination are sorted by their Go `String()`:
//!   `<address>`, or `<address> (VNI: <n>)` when the target VNI is not 0.

use std::fmt::Write as _;
use std::time::SystemTime;

use crate::telemetry::status::{format_date, DestinationView, RouteTableView, VniRoutesView};
use crate::types::{IpNet, NextHop, NextHopKind};

/// One destination ready to print: its Go map key and its sorted next hops.
struct GoDestination<'a> {
    /// `{"IPVersion":4,"Prefix":"10.0.23.0/24"}`.
    key: String,
    /// Next hops in Go `String()` order.
    hops: Vec<&'a NextHop>,
}

/// The Go `Destination` JSON text used as map key.
fn destination_key(prefix: &IpNet) -> String {
    let version = match prefix {
        IpNet::V4(_) => 4,
        IpNet::V6(_) => 6,
    };
    format!("{{\"IPVersion\":{version},\"Prefix\":\"{prefix}\"}}")
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

/// A JSON string as Go's `encoding/json` escapes it (HTML-safe: `<`, `>`,
/// `&`, U+2028 and U+2029 as `\uXXXX`).
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
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
        let v = |n| crate::types::Vni::new(n).unwrap();
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
        let json = json(&t, SystemTime::UNIX_EPOCH, "v");
        assert!(json.find("\"10\": {").unwrap() < json.find("\"9\": {").unwrap());
        let yaml = yaml(&t, SystemTime::UNIX_EPOCH, "v");
        assert!(yaml.find("\n  9:\n").unwrap() < yaml.find("\n  10:\n").unwrap());
        // Both parse, and hold the same six routes.
        let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(doc["vnet"]["9"].as_object().unwrap().len(), 3);
        assert!(yaml.starts_with("date: \"1970-01-01 00:00:00\"\nvnet:\n"));
    }

    #[test]
    fn next_hops_sort_by_go_text_and_destinations_by_key_text() {
        let t = table();
        let json = json(&t, SystemTime::UNIX_EPOCH, "v");
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
            json(&t, SystemTime::UNIX_EPOCH, "v"),
            "{\n  \"date\": \"1970-01-01 00:00:00\",\n  \"vnet\": {},\n  \"metalbondVersion\": \"v\"\n}"
        );
        assert_eq!(
            yaml(&t, SystemTime::UNIX_EPOCH, "v"),
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
}
