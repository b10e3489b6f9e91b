//! `/metrics`: a `MetricsView` rendered in the Prometheus text exposition
//! format (version 0.0.4).
//!
//! Owns: label escaping and the layout of every family (`# HELP`, `# TYPE`,
//! samples). Names and help texts come from `telemetry::families`.
//!
//! Must never: gather data (it only formats the view it is given) or emit a
//! name or label value that a Prometheus parser would reject.

use std::fmt::Write;

use metalbond_telemetry::families::{self, Family};
use metalbond_telemetry::status::{MetricFamily, MetricKind, MetricsView, StatusRole};
use metalbond_telemetry::HistogramView;

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders everything `view` holds, plus `metalbond_build_info`.
pub fn render(view: &MetricsView, role: StatusRole, version: &str) -> String {
    let mut out = Text::default();
    out.declare(&families::BUILD_INFO);
    out.sample(
        families::BUILD_INFO.name,
        &[("version", version), ("role", role.name())],
        1,
    );

    out.declare(&families::PEERS);
    for (state, n) in &view.peers_by_state {
        out.sample(families::PEERS.name, &[("state", state)], *n);
    }

    out.declare(&families::ROUTES);
    out.sample(families::ROUTES.name, &[], view.routes_total);

    out.declare(&families::VNI_ROUTES);
    for (vni, n) in &view.routes_per_vni {
        out.sample(families::VNI_ROUTES.name, &[("vni", &vni.to_string())], *n);
    }

    let counters: [(&Family, Option<u64>); 6] = [
        (&families::UPDATES_RECEIVED, view.updates_in),
        (&families::UPDATES_SENT, view.updates_out),
        (&families::FRAMES_WRITTEN, view.frames_written),
        (&families::BYTES_WRITTEN, view.bytes_written),
        (&families::FRAMES_READ, view.frames_read),
        (&families::BYTES_READ, view.bytes_read),
    ];
    for (family, value) in counters {
        if let Some(v) = value {
            out.declare(family);
            out.sample(family.name, &[], v);
        }
    }

    out.declare(&families::DISCONNECTS);
    for (reason, n) in &view.disconnects_by_reason {
        out.sample(families::DISCONNECTS.name, &[("reason", reason)], *n);
    }

    if let Some(h) = &view.fanout_latency {
        out.declare(&families::FANOUT_LATENCY);
        out.histogram(families::FANOUT_LATENCY.name, h);
    }

    let queue_depth = families::QUEUE_DEPTH.name;
    out.declare(&families::QUEUE_DEPTH);
    for q in &view.queue_depths {
        match q.shard {
            Some(shard) => out.sample(
                queue_depth,
                &[("queue", &q.queue), ("shard", &shard.to_string())],
                q.depth,
            ),
            None => out.sample(queue_depth, &[("queue", &q.queue)], q.depth),
        }
    }

    if let Some(nl) = &view.netlink {
        out.declare(&families::NETLINK_OPERATIONS);
        for (op, n) in &nl.operations {
            out.sample(families::NETLINK_OPERATIONS.name, &[("op", op)], *n);
        }
        out.declare(&families::NETLINK_ERRORS);
        for (op, n) in &nl.errors {
            out.sample(families::NETLINK_ERRORS.name, &[("op", op)], *n);
        }
    }

    for fam in &view.extra {
        out.free_family(fam);
    }
    out.0
}

/// The text being built.
#[derive(Default)]
struct Text(String);

impl Text {
    /// `# HELP` and `# TYPE` of a family of the table.
    fn declare(&mut self, family: &Family) {
        self.family(family.name, family.help, family.kind);
    }

    fn family(&mut self, name: &str, help: &str, kind: MetricKind) {
        let kind = match kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        };
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.sample_text(name, labels, &value.to_string());
    }

    fn sample_text(&mut self, name: &str, labels: &[(&str, &str)], value: &str) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{}=\"{}\"", sanitize_name(k), escape_label(v));
            }
            self.0.push('}');
        }
        self.0.push(' ');
        self.0.push_str(value);
        self.0.push('\n');
    }

    /// The samples of a histogram (declared before).
    fn histogram(&mut self, name: &str, h: &HistogramView) {
        let bucket = format!("{name}_bucket");
        for (le, n) in h.bounds_seconds.iter().zip(&h.cumulative_counts) {
            self.sample(&bucket, &[("le", &format_float(*le))], *n);
        }
        self.sample(&bucket, &[("le", "+Inf")], h.count);
        self.sample_text(&format!("{name}_sum"), &[], &format_float(h.sum_seconds));
        self.sample(&format!("{name}_count"), &[], h.count);
    }

    fn free_family(&mut self, fam: &MetricFamily) {
        let name = sanitize_name(&fam.name);
        self.family(&name, &fam.help, fam.kind);
        for s in &fam.samples {
            let labels: Vec<(String, &str)> = s
                .labels
                .iter()
                .map(|(k, v)| (sanitize_name(k), v.as_str()))
                .collect();
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            self.sample_text(&name, &labels, &format_float(s.value));
        }
    }
}

/// A metric or label name with every character outside `[a-zA-Z0-9_:]`
/// replaced by `_` (and a leading digit prefixed), so it always parses.
fn sanitize_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// Label value escaping: backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP escaping: backslash and newline.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A float as Prometheus writes it (`+Inf`, `-Inf`, `NaN`, else shortest).
fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalbond_telemetry::status::MetricSample;
    use metalbond_telemetry::NetlinkView;

    /// Every family the renderer declares, built-in or from a role's
    /// `extra`, is a row of the one table, with the table's help and type.
    #[test]
    fn every_declared_family_is_in_the_table() {
        let view = MetricsView {
            updates_in: Some(1),
            updates_out: Some(1),
            frames_written: Some(1),
            bytes_written: Some(1),
            frames_read: Some(1),
            bytes_read: Some(1),
            fanout_latency: Some(HistogramView::empty()),
            netlink: Some(NetlinkView::default()),
            extra: vec![MetricFamily::of(
                &families::STALE_ROUTES,
                vec![MetricSample::new(&[], 3)],
            )],
            ..MetricsView::default()
        };
        let text = render(&view, StatusRole::Server, "v");
        let mut declared = 0;
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap_or_default();
            let family = families::ALL.iter().find(|f| f.name == name);
            let Some(family) = family else {
                panic!("{name} is not in telemetry::families::ALL");
            };
            assert!(text.contains(&format!("# HELP {name} {}\n", family.help)));
            declared += 1;
        }
        assert_eq!(declared, 16, "{text}");
    }

    #[test]
    fn names_and_labels_are_made_safe() {
        assert_eq!(sanitize_name("a-b.c"), "a_b_c");
        assert_eq!(sanitize_name("1x"), "_1x");
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(format_float(f64::INFINITY), "+Inf");
        assert_eq!(format_float(0.5), "0.5");
        assert_eq!(format_float(3.0), "3");
    }
}
