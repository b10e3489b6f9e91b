//! `/`: the route table as an HTML page for people, grouped by VNI, with
//! counts, a VNI / text filter and paging so that 100,000 routes stay one
//! small page; it reloads itself every few seconds.
//!
//! Owns: the page's query parameters (`vni`, `q`, `page`), its layout and
//! HTML escaping.
//!
//! Must never: put any text into the page unescaped (query parameters are
//! reflected, so they are attacker-controlled), run scripts, or render more
//! than `ROWS_PER_PAGE` route rows whatever the table size.

use std::fmt::Write;
use std::time::SystemTime;

use metalbond_wire::types::{NextHopKind, Vni};

use metalbond_telemetry::status::{format_date, kind_name, RouteTableView, StatusRole};

/// Route rows on one page: enough to read, small enough to load instantly.
pub const ROWS_PER_PAGE: usize = 500;

/// VNI summary rows shown at most (a fleet has far fewer VNIs than routes,
/// but the page must stay bounded either way).
pub const MAX_VNI_SUMMARY_ROWS: usize = 1000;

/// Seconds between automatic reloads.
pub const REFRESH_SECONDS: u32 = 5;

/// What the reader asked for in the query string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageQuery {
    /// Only this VNI (`?vni=23`).
    pub vni: Option<Vni>,
    /// Only routes whose destination or next hop contains this text (`?q=`).
    pub filter: Option<String>,
    /// 1-based page number (`?page=2`).
    pub page: usize,
    /// A parameter that could not be understood, shown instead of ignored.
    pub problem: Option<String>,
}

impl PageQuery {
    /// Reads `vni`, `q` and `page` from a raw query string (no leading `?`).
    /// Unknown parameters are ignored; bad values are reported on the page.
    pub fn parse(query: &str) -> PageQuery {
        let mut q = PageQuery {
            page: 1,
            ..PageQuery::default()
        };
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let value = value.trim();
            match &*key {
                "vni" if !value.is_empty() => match value.parse::<Vni>() {
                    Ok(v) => q.vni = Some(v),
                    Err(e) => q.problem = Some(e),
                },
                "q" if !value.is_empty() => q.filter = Some(value.to_string()),
                "page" if !value.is_empty() => match value.parse::<usize>() {
                    Ok(p) if p >= 1 => q.page = p,
                    _ => q.problem = Some(format!("page '{value}' is not a page number")),
                },
                _ => {}
            }
        }
        q
    }

    /// The query string for the same view on page `page`.
    fn with_page(&self, page: usize) -> String {
        let mut s = form_urlencoded::Serializer::new(String::new());
        if let Some(v) = self.vni {
            s.append_pair("vni", &v.to_string());
        }
        if let Some(f) = &self.filter {
            s.append_pair("q", f);
        }
        s.append_pair("page", &page.to_string());
        s.finish()
    }
}

/// Facts about the process shown in the page header.
pub struct PageHeader<'a> {
    /// Server or client.
    pub role: StatusRole,
    /// Our version.
    pub version: &'a str,
    /// When the snapshot was taken.
    pub now: SystemTime,
    /// Peers connected (any state).
    pub peers: usize,
    /// One line about the active peer policy (`policy_summary`), if any.
    pub policy: Option<String>,
}

/// The page's line about the active peer policy: file, revision,
/// generation, load time, rule count and the refusals so far.
pub fn policy_summary(p: &metalbond_telemetry::status::PolicyStatus) -> String {
    let active = p
        .rules
        .iter()
        .filter(|r| r.active && r.name != metalbond_telemetry::status::NO_RULE_LABEL)
        .count();
    let denied: u64 = p.rules.iter().flat_map(|r| r.denied.values()).sum();
    format!(
        "peer policy {} (format version {}, revision {}, generation {}, loaded {} UTC): {} rules, {} refusals, {} failed reloads",
        p.path,
        p.format_version,
        p.revision.as_deref().unwrap_or("unset"),
        p.generation,
        format_date(p.loaded_at),
        active,
        denied,
        p.failed_reloads
    )
}

/// Renders the page.
pub fn render(table: &RouteTableView, header: &PageHeader<'_>, query: &PageQuery) -> String {
    let mut h = String::with_capacity(64 * 1024);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <title>MetalBond {role} route table</title>\
         <style>body{{font-family:sans-serif;margin:1em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left}}\
         th{{background:#eee}}.problem{{color:#a00}}</style></head><body>\n",
        role = header.role.name()
    );
    let _ = write!(
        h,
        "<h1>MetalBond {role} route table</h1>\n<p id=\"summary\">{date} UTC, version {version}: \
         <b id=\"route-count\">{routes}</b> routes to <b>{dests}</b> destinations in \
         <b id=\"vni-count\">{vnis}</b> VNIs; {peers} peers. \
         <a href=\"/routes.json\">JSON</a> <a href=\"/routes.yaml\">YAML</a> \
         <a href=\"/peers\">peers</a> <a href=\"/metrics\">metrics</a></p>\n",
        role = header.role.name(),
        date = format_date(header.now),
        version = escape(header.version),
        routes = table.route_count(),
        dests = table.destination_count(),
        vnis = table.vnis.len(),
        peers = header.peers,
    );
    if let Some(policy) = &header.policy {
        let _ = writeln!(
            h,
            "<p id=\"policy\">{} <a href=\"/policy\">rules and hits</a></p>",
            escape(policy)
        );
    }

    // The filter form keeps the current values.
    let _ = writeln!(
        h,
        "<form method=\"get\" action=\"/\">VNI <input name=\"vni\" size=\"8\" value=\"{vni}\"> \
         contains <input name=\"q\" size=\"24\" value=\"{q}\"> \
         <button type=\"submit\">show</button> <a href=\"/\">all</a></form>",
        vni = query.vni.map(|v| v.to_string()).unwrap_or_default(),
        q = escape(query.filter.as_deref().unwrap_or("")),
    );
    if let Some(p) = &query.problem {
        let _ = writeln!(h, "<p class=\"problem\">{}</p>", escape(p));
    }

    vni_summary(&mut h, table);
    route_rows(&mut h, table, query);
    h.push_str("</body></html>\n");
    h
}

/// The per-VNI counts table, each VNI linking to its own view.
fn vni_summary(h: &mut String, table: &RouteTableView) {
    h.push_str(
        "<h2>VNIs</h2>\n<table id=\"vnis\"><tr><th>VNI</th><th>destinations</th><th>routes</th></tr>\n",
    );
    for v in table.vnis.iter().take(MAX_VNI_SUMMARY_ROWS) {
        let _ = writeln!(
            h,
            "<tr><td><a href=\"/?vni={vni}\">{vni}</a></td><td>{d}</td><td>{r}</td></tr>",
            vni = v.vni,
            d = v.destinations.len(),
            r = v.route_count(),
        );
    }
    h.push_str("</table>\n");
    if table.vnis.len() > MAX_VNI_SUMMARY_ROWS {
        let _ = writeln!(
            h,
            "<p>Showing the first {MAX_VNI_SUMMARY_ROWS} of {} VNIs; enter a VNI above.</p>",
            table.vnis.len()
        );
    }
}

/// The route rows of the requested page, grouped under one heading per VNI.
fn route_rows(h: &mut String, table: &RouteTableView, query: &PageQuery) {
    let needle = query.filter.as_ref().map(|f| f.to_ascii_lowercase());
    let first = (query.page - 1).saturating_mul(ROWS_PER_PAGE);
    let mut matched = 0usize;
    let mut shown_vni: Option<Vni> = None;
    let mut body = String::new();

    for v in &table.vnis {
        if query.vni.is_some_and(|want| want != v.vni) {
            continue;
        }
        for d in &v.destinations {
            let prefix = d.prefix.to_string();
            for hop in &d.next_hops {
                if let Some(n) = &needle {
                    let hit = prefix.contains(n.as_str())
                        || hop.to_string().to_ascii_lowercase().contains(n.as_str());
                    if !hit {
                        continue;
                    }
                }
                matched += 1;
                if matched <= first || matched > first + ROWS_PER_PAGE {
                    continue;
                }
                if shown_vni != Some(v.vni) {
                    if shown_vni.is_some() {
                        body.push_str("</table>\n");
                    }
                    let _ = write!(
                        body,
                        "<h3 id=\"vni-{vni}\">VNI {vni}</h3>\n<table class=\"routes\"><tr>\
                         <th>destination</th><th>next hop</th><th>type</th>\
                         <th>target VNI</th><th>NAT ports</th></tr>\n",
                        vni = v.vni
                    );
                    shown_vni = Some(v.vni);
                }
                let nat = match hop.kind {
                    NextHopKind::Nat { from, to } => format!("{from}-{to}"),
                    _ => String::new(),
                };
                let _ = writeln!(
                    body,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    escape(&prefix),
                    escape(&hop.target.to_string()),
                    kind_name(hop.kind),
                    hop.target_vni,
                    nat
                );
            }
        }
    }
    if shown_vni.is_some() {
        body.push_str("</table>\n");
    }

    let pages = matched.div_ceil(ROWS_PER_PAGE).max(1);
    let shown_from = if matched > first { first + 1 } else { 0 };
    let shown_to = matched.min(first + ROWS_PER_PAGE);
    let _ = write!(
        h,
        "<h2>Routes</h2>\n<p id=\"page-info\">{matched} matching routes; showing {shown_from}-{shown_to}, \
         page {page} of {pages}.",
        page = query.page
    );
    if query.page > 1 {
        let _ = write!(
            h,
            " <a id=\"prev\" href=\"/?{}\">previous</a>",
            escape(&query.with_page((query.page - 1).min(pages)))
        );
    }
    if query.page < pages {
        let _ = write!(
            h,
            " <a id=\"next\" href=\"/?{}\">next</a>",
            escape(&query.with_page(query.page + 1))
        );
    }
    h.push_str("</p>\n");
    h.push_str(&body);
}

/// HTML text and attribute escaping.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalbond_wire::types::NextHop;

    fn table(n: u32) -> RouteTableView {
        let hop = NextHop::standard("2001:db8::1".parse().unwrap());
        RouteTableView::from_routes((0..n).map(|i| {
            let vni = Vni::new(1 + i % 3).unwrap();
            let prefix = format!("10.{}.{}.0/24", (i >> 8) & 255, i & 255);
            (vni, prefix.parse().unwrap(), hop)
        }))
    }

    fn header() -> PageHeader<'static> {
        PageHeader {
            role: StatusRole::Server,
            version: "0.1.0",
            now: SystemTime::UNIX_EPOCH,
            peers: 0,
            policy: None,
        }
    }

    #[test]
    fn query_is_parsed_and_bad_values_reported() {
        let q = PageQuery::parse("vni=23&q=10.0%2F&page=3&x=1");
        assert_eq!(q.vni, Vni::new(23).ok());
        assert_eq!(q.filter.as_deref(), Some("10.0/"));
        assert_eq!(q.page, 3);
        assert!(q.problem.is_none());
        let q = PageQuery::parse("vni=99999999&page=0");
        assert!(q.problem.is_some());
        assert_eq!(q.page, 1);
    }

    #[test]
    fn reflected_filter_is_escaped() {
        let q = PageQuery::parse("q=%3Cscript%3Ealert(1)%3C%2Fscript%3E");
        let page = render(&table(3), &header(), &q);
        assert!(!page.contains("<script>"));
        assert!(page.contains("&lt;script&gt;"));
    }

    #[test]
    fn large_table_is_paged() {
        let t = table(100_000);
        let page = render(&t, &header(), &PageQuery::parse(""));
        assert_eq!(page.matches("<tr><td>10.").count(), ROWS_PER_PAGE);
        assert!(page.contains("100000 matching routes"));
        assert!(page.contains("page 1 of 200"));
        let last = render(&t, &header(), &PageQuery::parse("page=200"));
        assert_eq!(last.matches("<tr><td>10.").count(), ROWS_PER_PAGE);
        let only = render(&t, &header(), &PageQuery::parse("vni=2&q=10.0.1"));
        // vni 2 holds i % 3 == 1; prefixes 10.0.1.0/24 and 10.0.1x.0/24 etc. contain "10.0.1"
        assert!(only.contains("<h3 id=\"vni-2\">"));
        assert!(!only.contains("<h3 id=\"vni-1\">"));
    }
}
