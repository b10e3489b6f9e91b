//! Process-wide tracing set-up shared by every binary, and the build's
//! identity (version, git commit) that the start line and `--version` show.
//!
//! Owns: the log formats and the level policy: info by default (session
//! events), debug with `-v` (per-route detail), `RUST_LOG` overrides both.
//! Formats (`--log-format`):
//! - `text`: the human format; colours only when stderr is a terminal.
//! - `logfmt`: one `time=... level=... msg=... key=value` line per event,
//!   the shape the Go implementation (logrus) writes when stderr is not a
//!   terminal, so its log pipelines keep parsing; the default off a terminal.
//! - `json`: one JSON object per line, for log shippers.
//!
//! Must never: be called more than once per process (later calls are
//! no-ops), or write escape codes anywhere but a terminal.

use std::fmt::{self, Write as _};
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

pub use crate::version::{GIT_COMMIT, LONG_VERSION, VERSION};

/// How log lines are written (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable; coloured only on a terminal.
    Text,
    /// `time=... level=... msg=...` lines, as the Go implementation writes
    /// off a terminal.
    Logfmt,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The default: `text` when stderr is a terminal, `logfmt` otherwise
    /// (a file, a pipe, journald).
    pub fn for_stderr() -> LogFormat {
        if std::io::stderr().is_terminal() {
            LogFormat::Text
        } else {
            LogFormat::Logfmt
        }
    }
}

/// Installs the global subscriber writing to stderr in `format`.
pub fn init(verbose: bool, format: LogFormat) {
    let default = if verbose { "debug" } else { "info" };
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(crate_targets(&f)).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        // No colours in span fields either: logfmt is for machines.
        LogFormat::Logfmt => builder.with_ansi(false).event_format(Logfmt).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// `RUST_LOG` as written before the library became crates (targets like
/// `metalbond::server::peer`) → the targets the crates log under now
/// (`metalbond_server::peer`), so an operator's filter keeps selecting what
/// it did. A directive already naming a crate is left alone; `metalbond`
/// alone still selects everything (targets match by prefix).
pub fn crate_targets(filter: &str) -> String {
    /// Old module path → its crate's target, longest first where one is
    /// a prefix of another.
    const MOVED: &[(&str, &str)] = &[
        ("metalbond::panic_policy", "metalbond_utils::panic_policy"),
        ("metalbond::pacing", "metalbond_utils::pacing"),
        ("metalbond::util", "metalbond_utils"),
        ("metalbond::types", "metalbond_wire::types"),
        ("metalbond::codec", "metalbond_wire::codec"),
        ("metalbond::session", "metalbond_wire::session"),
        ("metalbond::digest", "metalbond_wire::digest"),
        ("metalbond::telemetry", "metalbond_telemetry"),
        ("metalbond::policy", "metalbond_policy"),
        ("metalbond::server", "metalbond_server"),
        ("metalbond::client", "metalbond_client"),
        ("metalbond::netlink", "metalbond_netlink"),
        ("metalbond::http", "metalbond_http"),
    ];
    filter
        .split(',')
        .map(|directive| {
            MOVED
                .iter()
                .find_map(|(old, new)| {
                    let rest = directive.strip_prefix(old)?;
                    // The whole module name, not a longer one that starts alike.
                    let boundary = rest.is_empty()
                        || rest.starts_with("::")
                        || rest.starts_with('=')
                        || rest.starts_with('[');
                    boundary.then(|| format!("{new}{rest}"))
                })
                .unwrap_or_else(|| directive.to_string())
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Logs the start line every run begins with: the Go binary's
/// `MetalBond Version: ...`, with version, commit and role as fields.
pub fn log_start(role: &'static str) {
    tracing::info!(
        version = VERSION,
        commit = GIT_COMMIT,
        role,
        "MetalBond Version: {LONG_VERSION}"
    );
}

/// The logfmt event format: `time="..." level=info msg="..." key=value`,
/// the fields of the event's spans (e.g. `server=...`) first.
struct Logfmt;

impl<S, N> FormatEvent<S, N> for Logfmt
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = LogfmtFields::default();
        event.record(&mut fields);
        let time = humantime::format_rfc3339_micros(std::time::SystemTime::now());
        // logrus's level names ("warning", not "warn"), so alert rules
        // written against the Go binary's logs keep matching.
        let level = match *meta.level() {
            tracing::Level::ERROR => "error",
            tracing::Level::WARN => "warning",
            tracing::Level::INFO => "info",
            tracing::Level::DEBUG => "debug",
            tracing::Level::TRACE => "trace",
        };
        write!(writer, "time=\"{time}\" level={level} msg=")?;
        write_value(&mut writer, &fields.message)?;
        write!(writer, " target={}", meta.target())?;
        // The fields of the spans the event is in (a session's peer or
        // server address), outermost first, before the event's own.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(span_fields) = extensions.get::<FormattedFields<N>>() {
                    if !span_fields.fields.is_empty() {
                        write!(writer, " {}", span_fields.fields)?;
                    }
                }
            }
        }
        writer.write_str(&fields.rest)?;
        writeln!(writer)
    }
}

/// An event's message and its other fields, rendered as ` key=value`.
#[derive(Default)]
struct LogfmtFields {
    /// The `message` field.
    message: String,
    /// Every other field, each as ` key=value`.
    rest: String,
}

impl Visit for LogfmtFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record(field, &format!("{value:?}"));
    }
}

impl LogfmtFields {
    fn record(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            let _ = write!(self.rest, " {}=", field.name());
            let _ = write_value(&mut self.rest, value);
        }
    }
}

/// Writes `value` bare when it needs no quoting, else quoted with `"`, `\`
/// and control characters escaped (so one event stays one line).
fn write_value(w: &mut impl fmt::Write, value: &str) -> fmt::Result {
    let bare = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=' && c != '\\');
    if bare {
        return w.write_str(value);
    }
    w.write_char('"')?;
    for c in value.chars() {
        match c {
            '"' => w.write_str("\\\"")?,
            '\\' => w.write_str("\\\\")?,
            '\n' => w.write_str("\\n")?,
            '\t' => w.write_str("\\t")?,
            c if c.is_control() => write!(w, "\\u{{{:x}}}", c as u32)?,
            c => w.write_char(c)?,
        }
    }
    w.write_char('"')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quoted(v: &str) -> String {
        let mut s = String::new();
        write_value(&mut s, v).unwrap();
        s
    }

    #[test]
    fn values_are_bare_when_safe_and_quoted_otherwise() {
        assert_eq!(quoted("127.0.0.1:4711"), "127.0.0.1:4711");
        assert_eq!(quoted("peer connected"), "\"peer connected\"");
        assert_eq!(quoted(""), "\"\"");
        assert_eq!(quoted("a=b"), "\"a=b\"");
        assert_eq!(quoted("say \"hi\"\n"), "\"say \\\"hi\\\"\\n\"");
        assert_eq!(quoted("\u{1b}[31m"), "\"\\u{1b}[31m\"");
    }

    #[test]
    fn filters_written_for_module_paths_select_the_crates() {
        assert_eq!(
            crate_targets("metalbond::server=debug,info"),
            "metalbond_server=debug,info"
        );
        assert_eq!(
            crate_targets("warn,metalbond::server::peer[peer]=trace,metalbond::codec=debug"),
            "warn,metalbond_server::peer[peer]=trace,metalbond_wire::codec=debug"
        );
        assert_eq!(crate_targets("metalbond=debug"), "metalbond=debug");
        assert_eq!(
            crate_targets("metalbond_client=debug,metalbond::serverless=info"),
            "metalbond_client=debug,metalbond::serverless=info"
        );
        // The translated filter selects what the module path used to.
        let filter = EnvFilter::try_new(crate_targets("metalbond::netlink=debug")).unwrap();
        assert_eq!(filter.to_string(), "metalbond_netlink=debug");
    }

    #[test]
    fn the_long_version_names_the_commit() {
        assert!(LONG_VERSION.starts_with(VERSION));
        assert!(LONG_VERSION.contains(GIT_COMMIT));
    }
}
