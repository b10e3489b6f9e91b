//! Man pages and shell completions, generated from the command's own clap
//! definition (`metalbond generate-docs DIR`, run by the packaging step and
//! kept out of that definition), so no second description of the command
//! line exists to drift from the real one.
//!
//! Owns: which pages and completions are written, their file names and man
//! section (8: `metalbond` lives in /usr/sbin).
//!
//! Must never: be reached by `server` or `client`, or write outside the
//! directory it is given.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap::Command;
use clap_complete::Shell;

/// Man section of every page: system administration commands.
pub const MAN_SECTION: &str = "8";

/// The shells completions are written for (those Debian has vendor
/// completion directories for).
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Writes `DIR/man/metalbond.8` plus one page per visible subcommand
/// (`metalbond-server.8`, `metalbond-client.8`) and `DIR/completions/`
/// (`metalbond.bash`, `_metalbond`, `metalbond.fish`). Returns every file
/// written. Hidden subcommands get no page.
pub fn generate(mut cmd: Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    // Propagate global flags (--log-format) and versions to subcommands.
    cmd.build();
    let name = cmd.get_name().to_string();
    let man_dir = dir.join("man");
    let completion_dir = dir.join("completions");
    fs::create_dir_all(&man_dir)?;
    fs::create_dir_all(&completion_dir)?;
    let mut written = Vec::new();

    written.push(write_page(&cmd, &name, &man_dir)?);
    // `help` is clap's own subcommand: `metalbond.8` covers it.
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        // After `build`, a subcommand's display name is `metalbond-server`
        // (the page title) and its bin name `metalbond server` (synopsis).
        let page_name = format!("{name}-{}", sub.get_name());
        written.push(write_page(sub, &page_name, &man_dir)?);
    }

    for shell in SHELLS {
        written.push(clap_complete::generate_to(
            shell,
            &mut cmd,
            &name,
            &completion_dir,
        )?);
    }
    Ok(written)
}

/// Renders one man page `NAME.8` into `dir`.
fn write_page(cmd: &Command, name: &str, dir: &Path) -> io::Result<PathBuf> {
    let mut text = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section(MAN_SECTION)
        .render(&mut text)?;
    let path = dir.join(format!("{name}.{MAN_SECTION}"));
    fs::write(&path, text)?;
    Ok(path)
}
