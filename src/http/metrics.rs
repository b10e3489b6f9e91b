//! `/metrics`: a `MetricsView` rendered in the Prometheus text exposition
//! format (version 0.0.4).
//!
//! Owns: metric names, help texts, label escaping, and the layout of every
//! family (`# HELP`, `# TYPE`, samples).
//!
//! Must never: gather data (it only formats the view it is given) or emit a
//! name or label value that a Prometheus parser would reject.

use std::fmt::Write;

use super::model::{MetricFamily, MetricKind, MetricsView, StatusRole};
use crate::telemetry::HistogramView;

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders everything `view` holds, plus `metalbond_build_info`.
pub fn render(view: &MetricsView, role: StatusRole, version: &str) -> String {
    let mut out = Text::default();
    out.family(
        "metalbond_build_info",
        "Version and role of this process (always 1).",
        MetricKind::Gauge,
    );
    out.sample(
        "metalbond_build_info",
        &[("version", version), ("role", role.name())],
        1,
    );

    out.family(
        "metalbond_peers",
        "Peers (sessions) per session state.",
        MetricKind::Gauge,
    );
    for (state, n) in &view.peers_by_state {
        out.sample("metalbond_peers", &[("state", state)], *n);
    }

    out.family(
        "metalbond_routes",
        "Routes (destination, next hop pairs) in all VNIs.",
        MetricKind::Gauge,
    );
    out.sample("metalbond_routes", &[], view.routes_total);

    out.family(
        "metalbond_vni_routes",
        "Routes (destination, next hop pairs) per VNI.",
        MetricKind::Gauge,
    );
    for (vni, n) in &view.routes_per_vni {
        out.sample("metalbond_vni_routes", &[("vni", &vni.to_string())], *n);
    }

    let counters: [(&str, &str, Option<u64>); 6] = [
        (
            "metalbond_updates_received_total",
            "UPDATE messages received from peers.",
            view.updates_in,
        ),
        (
            "metalbond_updates_sent_total",
            "UPDATE messages sent to peers.",
            view.updates_out,
        ),
        (
            "metalbond_frames_written_total",
            "Frames of any type written to peers.",
            view.frames_written,
        ),
        (
            "metalbond_bytes_written_total",
            "Bytes written to peers.",
            view.bytes_written,
        ),
        (
            "metalbond_frames_read_total",
            "Frames of any type read from peers.",
            view.frames_read,
        ),
        (
            "metalbond_bytes_read_total",
            "Bytes read from peers.",
            view.bytes_read,
        ),
    ];
    for (name, help, value) in counters {
        if let Some(v) = value {
            out.family(name, help, MetricKind::Counter);
            out.sample(name, &[], v);
        }
    }

    out.family(
        "metalbond_disconnects_total",
        "Sessions ended, by reason.",
        MetricKind::Counter,
    );
    for (reason, n) in &view.disconnects_by_reason {
        out.sample("metalbond_disconnects_total", &[("reason", reason)], *n);
    }

    if let Some(h) = &view.fanout_latency {
        out.histogram(
            "metalbond_fanout_latency_seconds",
            "Time from an UPDATE's arrival to its copies being written to subscribers.",
            h,
        );
    }

    out.family(
        "metalbond_queue_depth",
        "Items (or bytes, as the queue name says) waiting in a queue.",
        MetricKind::Gauge,
    );
    for q in &view.queue_depths {
        match q.shard {
            Some(shard) => out.sample(
                "metalbond_queue_depth",
                &[("queue", &q.queue), ("shard", &shard.to_string())],
                q.depth,
            ),
            None => out.sample("metalbond_queue_depth", &[("queue", &q.queue)], q.depth),
        }
    }

    if let Some(nl) = &view.netlink {
        out.family(
            "metalbond_netlink_operations_total",
            "Netlink requests acknowledged by the kernel, per operation.",
            MetricKind::Counter,
        );
        for (op, n) in &nl.operations {
            out.sample("metalbond_netlink_operations_total", &[("op", op)], *n);
        }
        out.family(
            "metalbond_netlink_errors_total",
            "Netlink requests refused by the kernel, per operation.",
            MetricKind::Counter,
        );
        for (op, n) in &nl.errors {
            out.sample("metalbond_netlink_errors_total", &[("op", op)], *n);
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
    fn family(&mut self, name: &str, help: &str, kind: MetricKind) {
        let kind = match kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
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

    fn histogram(&mut self, name: &str, help: &str, h: &HistogramView) {
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} histogram");
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
