//! A bystander that measures how promptly a server answers keepalives.
//!
//! Opens `PEERS` sessions (default 4, so that with round-robin hand-over
//! every shard of the server gets some), offers a keepalive of 1 s, then
//! sends a KEEPALIVE on every session every `EVERY_MS` (default 50) for
//! `SECONDS` (default 30) and records, per session, the longest time with no
//! KEEPALIVE from the server while one was outstanding. A session the server
//! closes is reported as lost. Used to look for shard stalls while a loadgen
//! run floods or withdraws a million routes (see BENCHMARKS.md):
//!
//! ```text
//! SECONDS=60 cargo run --release --example keepalive_probe -- 127.0.0.1:4871
//! ```
//!
//! Prints one line per second with the worst gap seen in that second, and a
//! summary at the end. Never sends routes or subscribes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use metalbond_wire::codec::{encode_frame, FrameDecoder, Message};

/// What one session saw.
#[derive(Default)]
struct Seen {
    /// Longest wait for a reply over the whole run.
    worst: Duration,
    /// Longest wait within the current report second.
    worst_now: Duration,
    /// When the worst wait ended (seconds since start).
    worst_at: f64,
    /// Replies received.
    replies: u64,
    /// The server closed the session (or it failed).
    lost: Option<String>,
}

/// The environment variable `name` parsed, or `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One encoded frame.
fn frame(msg: &Message) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_frame(msg, &mut b);
    b.to_vec()
}

/// Connects and completes the handshake with a keepalive of 1 s.
fn establish(addr: SocketAddr) -> Result<(TcpStream, FrameDecoder), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(&frame(&Message::Hello {
        keepalive_secs: 1,
        is_server: false,
        reads_stream: true,
    }))
    .map_err(|e| format!("send HELLO: {e}"))?;
    s.write_all(&frame(&Message::Keepalive))
        .map_err(|e| format!("send KEEPALIVE: {e}"))?;
    let mut dec = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    let mut got_keepalive = false;
    while !got_keepalive {
        let n = s.read(&mut buf).map_err(|e| format!("handshake: {e}"))?;
        if n == 0 {
            return Err("closed during handshake".into());
        }
        dec.extend(&buf[..n]);
        while let Some(m) = dec.next_message().map_err(|e| e.to_string())? {
            if m == Message::Keepalive {
                got_keepalive = true;
            }
        }
    }
    Ok((s, dec))
}

fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4711".into())
        .parse()
        .unwrap_or_else(|e| {
            eprintln!("bad address: {e}");
            std::process::exit(2)
        });
    let peers: usize = env_or("PEERS", 4);
    let every = Duration::from_millis(env_or("EVERY_MS", 50));
    let run_for = Duration::from_secs(env_or("SECONDS", 30));
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut seen = Vec::new();
    let mut threads = Vec::new();
    for _ in 0..peers {
        let (stream, mut dec) = match establish(addr) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("session not established: {e}");
                std::process::exit(1)
            }
        };
        let s = Arc::new(Mutex::new(Seen::default()));
        seen.push(s.clone());
        // Sender: a KEEPALIVE every `every`, stamped.
        let sent: Arc<Mutex<std::collections::VecDeque<Instant>>> = Arc::default();
        let mut w = match stream.try_clone() {
            Ok(w) => w,
            Err(e) => {
                eprintln!("clone: {e}");
                std::process::exit(1)
            }
        };
        let (stop_w, sent_w) = (stop.clone(), sent.clone());
        threads.push(std::thread::spawn(move || {
            let ka = frame(&Message::Keepalive);
            while !stop_w.load(Ordering::Relaxed) {
                sent_w.lock().unwrap().push_back(Instant::now());
                if w.write_all(&ka).is_err() {
                    return;
                }
                std::thread::sleep(every);
            }
        }));
        // Receiver: each KEEPALIVE answers the oldest outstanding one.
        let stop_r = stop.clone();
        let mut r = stream;
        let _ = r.set_read_timeout(Some(Duration::from_millis(200)));
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !stop_r.load(Ordering::Relaxed) {
                // The oldest unanswered keepalive is the current wait.
                if let Some(t0) = sent.lock().unwrap().front().copied() {
                    let waited = t0.elapsed();
                    let mut g = s.lock().unwrap();
                    g.worst_now = g.worst_now.max(waited);
                }
                match r.read(&mut buf) {
                    Ok(0) => {
                        s.lock().unwrap().lost = Some("closed by server".into());
                        return;
                    }
                    Ok(n) => {
                        dec.extend(&buf[..n]);
                        while let Ok(Some(m)) = dec.next_message() {
                            if m != Message::Keepalive {
                                continue;
                            }
                            let Some(t0) = sent.lock().unwrap().pop_front() else {
                                continue;
                            };
                            let waited = t0.elapsed();
                            let mut g = s.lock().unwrap();
                            g.replies += 1;
                            g.worst_now = g.worst_now.max(waited);
                            if waited > g.worst {
                                g.worst = waited;
                                g.worst_at = start.elapsed().as_secs_f64();
                            }
                        }
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(e) => {
                        s.lock().unwrap().lost = Some(e.to_string());
                        return;
                    }
                }
            }
        }));
    }
    while start.elapsed() < run_for {
        std::thread::sleep(Duration::from_secs(1));
        let worst: Vec<String> = seen
            .iter()
            .map(|s| {
                let mut g = s.lock().unwrap();
                let w = std::mem::take(&mut g.worst_now);
                match &g.lost {
                    Some(_) => "LOST".into(),
                    None => format!("{:.0}", w.as_secs_f64() * 1000.0),
                }
            })
            .collect();
        println!(
            "t={:5.1}s worst wait per session (ms): {}",
            start.elapsed().as_secs_f64(),
            worst.join(" ")
        );
    }
    stop.store(true, Ordering::Relaxed);
    let mut failed = false;
    for (i, s) in seen.iter().enumerate() {
        let g = s.lock().unwrap();
        println!(
            "session {i}: {} replies, longest wait {:.0} ms (ended at t={:.1}s){}",
            g.replies,
            g.worst.as_secs_f64() * 1000.0,
            g.worst_at,
            g.lost
                .as_ref()
                .map(|l| format!(", LOST: {l}"))
                .unwrap_or_default()
        );
        failed |= g.lost.is_some();
    }
    for t in threads {
        let _ = t.join();
    }
    std::process::exit(i32::from(failed));
}
