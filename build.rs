//! Records the git commit the `metalbond` binary is built from (the schema
//! is compiled by `crates/wire/build.rs`; no library crate reads git).
//!
//! The commit (`METALBOND_GIT_COMMIT`, shown by `--version` and the start
//! log line) comes from `git rev-parse --short HEAD`; a build outside a git
//! checkout (a source package) may set `METALBOND_GIT_COMMIT` itself, and
//! otherwise gets `unknown`.

use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=METALBOND_GIT_COMMIT");
    let commit = std::env::var("METALBOND_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=METALBOND_GIT_COMMIT={commit}");
    // A new commit or checkout moves HEAD's log; rebuild then (only where
    // .git is a directory: a worktree's .git is a file).
    if std::path::Path::new(".git/logs/HEAD").exists() {
        println!("cargo:rerun-if-changed=.git/logs/HEAD");
    }
    Ok(())
}

/// `git rev-parse --short HEAD`, if git and a checkout are there.
fn git_commit() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()?;
    let commit = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !commit.is_empty()).then_some(commit)
}
