//! Running the real `loadgen` binary from tests (`loadgen/tests/`): a
//! second time bound, and the text of a run.
//!
//! Owns: the second time guard (loadgen stops itself at `--time-limit`; if it
//! ever does not, it is killed after 60 s so a test cannot hang) and the text
//! dump of a run for assertion messages.

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Runs `cmd` with captured output, killed if it is still running after 60 s.
pub fn run_bounded(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let guard = thread::spawn(move || {
        let t0 = Instant::now();
        while !done2.load(Ordering::Relaxed) {
            if t0.elapsed() > Duration::from_secs(60) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
    });
    let out = child.wait_with_output().unwrap();
    done.store(true, Ordering::Relaxed);
    let _ = guard.join();
    out
}

/// Exit status and both output streams, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
