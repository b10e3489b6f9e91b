//! The README's generated parts match the code they describe: the metric
//! table (`metalbond_telemetry::families::readme_table`). Regenerate with
//! `METALBOND_BLESS_README=1 cargo test --test readme_tables`.

use metalbond_telemetry::families::{readme_table, ALL};

/// The README lists every family exactly as the table says.
#[test]
fn readme_lists_every_family() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let readme = std::fs::read_to_string(path).expect("README.md is readable");
    let begin = "<!-- metrics-table:begin (generated from crates/telemetry/src/families.rs) -->\n";
    let end = "<!-- metrics-table:end -->";
    let (Some(b), Some(e)) = (readme.find(begin), readme.find(end)) else {
        panic!("README.md lacks the metrics-table markers");
    };
    let current = &readme[b + begin.len()..e];
    let wanted = readme_table();
    if current != wanted && std::env::var_os("METALBOND_BLESS_README").is_some() {
        let updated = format!("{}{wanted}{}", &readme[..b + begin.len()], &readme[e..]);
        std::fs::write(path, updated).expect("README.md is writable");
        return;
    }
    assert_eq!(current, wanted, "README metric table is out of date");
    for f in ALL {
        assert!(
            readme.contains(&format!("`{}`", f.name)),
            "{} missing",
            f.name
        );
    }
}
