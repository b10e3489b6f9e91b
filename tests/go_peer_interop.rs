//! Interop with the Go MetalBond peers deployed in the field (issue #30):
//! they read into one 65,535-byte buffer, reset the session when a read
//! fills it, cannot reassemble a frame split across two reads, and process
//! about 6,700 routes a second. A sender that writes a sync faster than
//! that, or lets 64 KiB pile up unread, makes them crash-loop.
//!
//! Each Go peer is played by the model in `metalbond_test_support::go_peer` (see its module
//! doc for what it reproduces of `peer.go`); the other side is the real
//! thing: the in-process server on loopback, and our client as a library
//! and as the `metalbond client` process. Every interop test requires
//! exact convergence with no reset and no split frame, within a generous
//! bound (100,000 routes at 0.15 ms each is 15 s of the Go peer's
//! processing). The `model_*` tests at the end check that the model sees
//! what it claims to see: a full read, a split frame, a clean paced stream,
//! the Go server's handshake.

use metalbond_test_support::go_peer as go_peer_support;
use metalbond_test_support::server as server_support;
use metalbond_utils::pacing::PACED_UNREAD;

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use go_peer_support::{
    GoClientModel, GoPeerConfig, GoServerModel, GoState, Reset, Summary, GO_KEEPALIVE_SECS,
    GO_READ_BUFFER,
};
use metalbond_client::{Client, ClientConfig, LogSink};
use metalbond_wire::codec::{FrameDecoder, Message};
use metalbond_wire::Route;
use server_support::process::ChildGuard;
use server_support::{add, apply, frame, route, vni, TestPeer, TestServer, WAIT};

/// Bound of every wait for a Go peer: generous for 15 s of processing on a
/// busy two-core machine, finite.
const LIMIT: Duration = Duration::from_secs(90);
/// The VNI every test uses.
const VNI: u32 = 23;
/// Routes per write of the fast test announcer.
const CHUNK: usize = 10_000;

/// `n` distinct IPv4 /32 routes in `VNI` over 16 next hops.
fn numbered(n: u32) -> Vec<Route> {
    (0..n).map(|i| route(VNI, i, (i % 16) as u16 + 1)).collect()
}

/// A server whose VNI holds `n` routes, announced beforehand by a fast test
/// peer; the peer is returned too because its routes leave with it.
fn server_holding(n: u32) -> (TestServer, TestPeer, HashSet<Route>) {
    let srv = TestServer::start(2);
    let (announcer, _) = TestPeer::established(srv.addr, 60);
    announcer.keep_alive(Duration::from_secs(1));
    let want = numbered(n);
    for chunk in want.chunks(CHUNK) {
        announcer.send_all(&chunk.iter().map(|r| add(*r)).collect::<Vec<_>>());
    }
    srv.wait_stats("the announcer's routes in the table", |s| {
        s.sum(|s| s.routes) == u64::from(n)
    });
    (srv, announcer, want.into_iter().collect())
}

/// Asserts that a Go peer's session took exactly `want`, cleanly.
fn assert_took_exactly(who: &str, seen: &Summary, routes: &HashSet<Route>, want: &HashSet<Route>) {
    eprintln!("{who}: {seen}");
    assert_eq!(seen.reset, None, "{who} was reset: {seen}");
    assert_eq!(
        (seen.duplicate_adds, seen.unknown_removes),
        (0, 0),
        "{who} got inconsistent updates: {seen}"
    );
    assert_eq!(
        routes.len(),
        want.len(),
        "{who} did not converge within {LIMIT:?}: {seen}"
    );
    assert!(routes == want, "{who} holds other routes than announced");
}

/// A Go client subscribes to a VNI of `n` routes and must take the whole
/// sync.
/// The tests where our server paces a Go client model take turns: the
/// model's reader thread must get the CPU as a real client's does, and
/// twelve tests at once on two cores once starved it long enough for 64 KiB
/// to pile up unread (seen once in a full suite run; never alone).
static PACED_GO_CLIENT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_paced_go_client() -> std::sync::MutexGuard<'static, ()> {
    PACED_GO_CLIENT.lock().unwrap_or_else(|e| e.into_inner())
}

fn sync_to_go_client(n: u32) {
    let _one = one_paced_go_client();
    let (srv, _announcer, want) = server_holding(n);
    let go = GoClientModel::connect(srv.addr, &[vni(VNI)], GoPeerConfig::default());
    go.wait_until(LIMIT, |s| s.routes >= want.len());
    let routes = go.routes();
    assert_took_exactly("the Go client", &go.summary(), &routes, &want);
}

#[test]
fn go_client_takes_a_sync_of_3_000_routes() {
    sync_to_go_client(3_000);
}

#[test]
fn go_client_takes_a_sync_of_30_000_routes() {
    sync_to_go_client(30_000);
}

#[test]
fn go_client_takes_a_sync_of_100_000_routes() {
    sync_to_go_client(100_000);
}

/// Reads `peer`'s updates until it holds as many routes as `want`, within
/// `LIMIT`, then compares.
fn converge_fast(peer: &mut TestPeer, want: &HashSet<Route>) {
    let deadline = Instant::now() + LIMIT;
    let mut state = BTreeSet::new();
    while state.len() < want.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match peer.recv_update(left) {
            Some((a, r)) => apply(&mut state, a, r),
            None => panic!(
                "the fast subscriber stopped at {} of {} routes (eof={})",
                state.len(),
                want.len(),
                peer.eof
            ),
        }
    }
    assert!(
        state.iter().all(|r| want.contains(r)),
        "the fast subscriber holds other routes than announced"
    );
}

/// Bytes waiting unread in `s`'s receive queue.
fn unread(s: &TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer; `s` is open.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    usize::try_from(n).unwrap_or(0)
}

/// A subscriber of a 30,000-route VNI (about 1.2 MB of UPDATEs) with the
/// kernel's default socket buffers (as a Go client has) which reads
/// nothing: how much the server left unread at it after 1.5 s, with its
/// HELLO saying `reads_stream` or not.
fn unread_at_a_subscriber_that_waits(reads_stream: bool) -> usize {
    let (srv, _announcer, _) = server_holding(30_000);
    let mut peer = TestPeer::connect(srv.addr);
    peer.handshake_declaring(60, reads_stream);
    peer.send(&Message::Subscribe(vni(VNI)));
    std::thread::sleep(Duration::from_millis(1500));
    unread(&peer.stream)
}

/// Our own peers say in their HELLO that they read as a stream (field 100,
/// which a Go peer neither sends nor minds): the server writes to them as
/// fast as the socket takes, from the first byte. A peer that does not say
/// so (every Go peer) is paced: far less than the Go reader's 64 KiB waits
/// unread at it. (Measured: 126,976 bytes declared, 14,004 Go-like, once
/// 37,260 with the machine busy; before the declaration existed both were
/// paced, before pacing both unpaced.) The Go-like bound is the pacer's
/// own: `PACED_UNREAD` plus the 24 KiB it leaves for the growth of the
/// peer's window early on (`metalbond_utils::pacing`), under the 64 KiB a
/// Go reader takes in one read.
#[test]
fn only_a_peer_that_declares_it_reads_as_a_stream_is_written_to_unpaced() {
    let declared = unread_at_a_subscriber_that_waits(true);
    let go_like = unread_at_a_subscriber_that_waits(false);
    eprintln!("unread after 1.5 s: {declared} bytes (declared), {go_like} (Go-like HELLO)");
    assert!(
        declared > GO_READ_BUFFER,
        "a declared stream reader was paced: {declared} bytes unread"
    );
    let paced_bound = PACED_UNREAD as usize + 24 * 1024;
    assert!(
        go_like < paced_bound && paced_bound < GO_READ_BUFFER,
        "a Go-like peer was not paced: {go_like} bytes unread (bound {paced_bound})"
    );
}

/// A server with an announcer and a fast subscriber of `VNI` (both on
/// 1 s keepalives), before anything is announced. The subscriber's HELLO
/// says it reads as a stream, as our client's does.
fn announcer_and_fast_subscriber() -> (TestServer, TestPeer, TestPeer) {
    let srv = TestServer::start(2);
    let (announcer, _) = TestPeer::established(srv.addr, 60);
    announcer.keep_alive(Duration::from_secs(1));
    let mut fast = TestPeer::connect(srv.addr);
    fast.handshake_declaring(60, true);
    fast.keep_alive(Duration::from_secs(1));
    fast.send(&Message::Subscribe(vni(VNI)));
    assert!(fast.sync_point().is_empty(), "nothing announced yet");
    (srv, announcer, fast)
}

#[test]
fn go_client_subscribing_during_a_burst_converges_beside_a_fast_subscriber() {
    let _one = one_paced_go_client();
    const N: u32 = 100_000;
    let (srv, announcer, mut fast) = announcer_and_fast_subscriber();

    let want = numbered(N);
    let burst: Vec<Message> = want.iter().map(|r| add(*r)).collect();
    let (before, after) = burst.split_at(burst.len() / 2);
    for chunk in before.chunks(CHUNK) {
        announcer.send_all(chunk);
    }
    // Half the burst is out: the Go client's subscription lands among the
    // rest, so it gets a sync of what is there and the rest as it comes.
    let go = GoClientModel::connect(srv.addr, &[vni(VNI)], GoPeerConfig::default());
    for chunk in after.chunks(CHUNK) {
        announcer.send_all(chunk);
    }
    let want: HashSet<Route> = want.into_iter().collect();

    converge_fast(&mut fast, &want);
    go.wait_until(LIMIT, |s| s.routes >= want.len());
    let routes = go.routes();
    assert_took_exactly("the Go client", &go.summary(), &routes, &want);
}

/// One 100,000-route burst to a fast subscriber, with a Go client
/// subscribed to the same VNI beforehand when `beside_go`: the time from
/// the burst's first write to the fast subscriber's convergence.
fn fast_subscriber_burst_time(beside_go: bool) -> Duration {
    const N: u32 = 100_000;
    let (srv, announcer, mut fast) = announcer_and_fast_subscriber();
    let go =
        beside_go.then(|| GoClientModel::connect(srv.addr, &[vni(VNI)], GoPeerConfig::default()));
    if let Some(go) = &go {
        go.wait_until(LIMIT, |s| s.state == GoState::Established);
    }
    let want = numbered(N);
    let burst: Vec<Message> = want.iter().map(|r| add(*r)).collect();
    let started = Instant::now();
    for chunk in burst.chunks(CHUNK) {
        announcer.send_all(chunk);
    }
    let want: HashSet<Route> = want.into_iter().collect();
    converge_fast(&mut fast, &want);
    let took = started.elapsed();
    if let Some(go) = go {
        go.wait_until(LIMIT, |s| s.routes >= want.len());
        let routes = go.routes();
        assert_took_exactly("the Go client", &go.summary(), &routes, &want);
    }
    took
}

/// Issue #30 point 3: does a Go client subscribed beside our fast
/// subscriber slow it (the aim: by 10 % at most)? Alternates the two
/// set-ups and prints the medians (each run still asserts that both
/// converge, the Go client with no reset); figures in BENCHMARKS.md ("Go
/// peers and pacing").
#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn fast_subscriber_beside_a_go_client_keeps_its_speed() {
    let runs: usize = std::env::var("MB_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let (mut alone, mut beside) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        alone.push(fast_subscriber_burst_time(false));
        beside.push(fast_subscriber_burst_time(true));
    }
    alone.sort();
    beside.sort();
    let (a, b) = (alone[runs / 2], beside[runs / 2]);
    eprintln!("fast subscriber alone: {alone:?}");
    eprintln!("beside a Go client:    {beside:?}");
    eprintln!(
        "medians {a:?} alone, {b:?} beside a Go client: ratio {:.2}",
        b.as_secs_f64() / a.as_secs_f64()
    );
}

/// Waits until one of `go`'s sessions holds `want.len()` routes (or one was
/// reset) and asserts that exactly one session took them all cleanly.
fn assert_go_server_took(go: &GoServerModel, want: &HashSet<Route>) {
    let sessions = go.wait_until(LIMIT, |all| all.iter().any(|s| s.routes >= want.len()));
    for s in &sessions {
        eprintln!("the Go server's session: {s}");
    }
    let resets: Vec<_> = sessions.iter().filter_map(|s| s.reset.as_ref()).collect();
    assert!(
        resets.is_empty(),
        "the Go server reset sessions: {resets:?}"
    );
    let Some(session) = sessions.iter().find(|s| s.routes >= want.len()) else {
        panic!("the Go server did not get all routes within {LIMIT:?}: {sessions:?}");
    };
    let routes = go.routes();
    assert_took_exactly("the Go server", session, &routes, want);
}

#[test]
fn our_client_library_announces_100_000_routes_to_a_go_server() {
    let go = GoServerModel::start(GoPeerConfig::default());
    let want = numbered(100_000);
    let client = Client::new(ClientConfig::default(), LogSink);
    for r in &want {
        client.announce(*r).expect("announce");
    }
    client
        .add_server(&go.addr().to_string())
        .expect("add the Go server");
    assert_go_server_took(&go, &want.into_iter().collect());
}

/// Our client library announcing 30,000 routes (about 1.2 MB) to a
/// scripted server that completes the handshake, its HELLO saying
/// `reads_stream` or not, and then reads nothing: how much the client left
/// unread at it after 1.5 s.
fn unread_at_a_server_that_waits(reads_stream: bool) -> usize {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let client = Client::new(ClientConfig::default(), LogSink);
    for r in numbered(30_000) {
        client.announce(r).expect("announce");
    }
    client
        .add_server(&listener.local_addr().unwrap().to_string())
        .expect("add the scripted server");
    let (mut s, _) = listener.accept().expect("our client connects");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut decoder = FrameDecoder::new();
    let hello = next_message(&mut s, &mut decoder);
    assert!(
        matches!(
            hello,
            Message::Hello {
                is_server: false,
                reads_stream: true,
                ..
            }
        ),
        "our client's HELLO says it reads as a stream: {hello:?}"
    );
    s.write_all(&frame(&Message::Hello {
        keepalive_secs: 60,
        is_server: true,
        reads_stream,
    }))
    .unwrap();
    assert_eq!(next_message(&mut s, &mut decoder), Message::Keepalive);
    s.write_all(&frame(&Message::Keepalive)).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let left = unread(&s) + decoder.buffered();
    drop(client);
    left
}

/// The client side of `only_a_peer_that_declares_…`: our client writes its
/// announcements unpaced to a server that declares it reads as a stream
/// (ours), paced to one that does not (the Go server).
#[test]
fn our_client_paces_its_announcements_only_to_a_server_that_does_not_declare_a_stream() {
    let declared = unread_at_a_server_that_waits(true);
    let go_like = unread_at_a_server_that_waits(false);
    eprintln!("unread after 1.5 s: {declared} bytes (declared), {go_like} (Go-like HELLO)");
    assert!(
        declared > GO_READ_BUFFER,
        "our client paced a server that reads as a stream: {declared} bytes unread"
    );
    // Paced: at most PACED_UNREAD (20 KiB) unread, plus what the early
    // growth of the receiver's window hides from the estimate (pacing.rs
    // leaves 24 KiB for it): 44 KiB, well below the 64 KiB read that resets
    // a Go peer. Typically 14 KiB here; 36 KiB seen once on a machine
    // loaded by two parallel builds.
    assert!(
        go_like < (PACED_UNREAD + 24 * 1024) as usize,
        "our client did not pace a Go-like server: {go_like} bytes unread"
    );
}

/// `VNI#PREFIX#NEXTHOP` as `--announce` takes it.
fn announce_arg(r: &Route) -> String {
    format!("{}#{}#{}", r.vni, r.destination, r.next_hop.target)
}

#[test]
fn metalbond_client_process_announces_3_000_routes_to_a_go_server() {
    let go = GoServerModel::start(GoPeerConfig::default());
    let want = numbered(3_000);
    let log_path =
        std::env::temp_dir().join(format!("go-interop-client-{}.log", std::process::id()));
    let log = File::create(&log_path).expect("client log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_metalbond"));
    cmd.arg("client").arg("--server").arg(go.addr().to_string());
    // Comma-separated lists, 500 routes an argument (an argument is
    // limited to 128 KiB).
    for chunk in want.chunks(500) {
        let list: Vec<String> = chunk.iter().map(announce_arg).collect();
        cmd.arg("--announce").arg(list.join(","));
    }
    cmd.env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let client = ChildGuard(cmd.spawn().expect("spawn metalbond client"));

    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_go_server_took(&go, &want.iter().copied().collect())
    }));
    drop(client);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    if let Err(panic) = outcome {
        eprintln!("metalbond client's log:\n{log}");
        std::panic::resume_unwind(panic);
    }
}

// The model itself: it must see what it claims to see, or the tests above
// would pass for the wrong reason. A scripted server on a raw socket does
// the passive handshake and then writes exactly the bytes each test wants.

/// Reads from `s` until the next whole message.
fn next_message(s: &mut TcpStream, decoder: &mut FrameDecoder) -> Message {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(m) = decoder.next_message().expect("a valid frame") {
            return m;
        }
        let n = s.read(&mut buf).expect("the model's next frame in time");
        assert!(n > 0, "the model closed the connection");
        decoder.extend(&buf[..n]);
    }
}

/// A Go client model connected to a raw socket that has done the passive
/// handshake with it and seen its SUBSCRIBE.
fn scripted_go_client(config: GoPeerConfig) -> (GoClientModel, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let go = GoClientModel::connect(listener.local_addr().unwrap(), &[vni(VNI)], config);
    let (mut s, _) = listener.accept().expect("the model connects");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut decoder = FrameDecoder::new();
    let hello = next_message(&mut s, &mut decoder);
    assert_eq!(
        hello,
        Message::Hello {
            keepalive_secs: GO_KEEPALIVE_SECS,
            is_server: false,
            reads_stream: false,
        },
        "the model's HELLO is a Go client's: no readsStream"
    );
    s.write_all(&frame(&Message::Hello {
        keepalive_secs: GO_KEEPALIVE_SECS,
        is_server: true,
        reads_stream: false,
    }))
    .unwrap();
    assert_eq!(next_message(&mut s, &mut decoder), Message::Keepalive);
    s.write_all(&frame(&Message::Keepalive)).unwrap();
    assert_eq!(
        next_message(&mut s, &mut decoder),
        Message::Subscribe(vni(VNI))
    );
    (go, s)
}

/// Frames of ADDs for `routes`, back to back.
fn adds(routes: &[Route]) -> Vec<u8> {
    routes.iter().flat_map(|r| frame(&add(*r))).collect()
}

#[test]
fn model_takes_whole_frames_written_no_faster_than_it_processes() {
    let (go, mut s) = scripted_go_client(GoPeerConfig::default());
    let want = numbered(3_000);
    // Closed loop: the next write only after the model applied the last.
    for (i, chunk) in want.chunks(100).enumerate() {
        s.write_all(&adds(chunk)).unwrap();
        let applied = (i + 1) * 100;
        go.wait_until(WAIT, |seen| seen.routes >= applied);
    }
    let seen = go.summary();
    assert_took_exactly(
        "the model",
        &seen,
        &go.routes(),
        &want.iter().copied().collect(),
    );
    assert!(seen.max_read <= adds(&want[..100]).len(), "{seen}");
}

#[test]
fn model_resets_when_one_read_fills_its_buffer() {
    // 5 ms per route: the first 200 routes keep the reader blocked on the
    // full channel for about half a second, while 80 KB more arrive.
    let config = GoPeerConfig {
        per_route: Duration::from_millis(5),
        ..GoPeerConfig::default()
    };
    let (go, mut s) = scripted_go_client(config);
    let want = numbered(2_200);
    s.write_all(&adds(&want[..200])).unwrap();
    go.wait_until(WAIT, |seen| seen.routes > 0);
    s.write_all(&adds(&want[200..])).unwrap();
    let seen = go.wait_until(WAIT, |_| false);
    eprintln!("the model: {seen}");
    assert_eq!(
        seen.reset,
        Some(Reset::FullRead {
            bytes: GO_READ_BUFFER
        })
    );
    assert_eq!(seen.max_read, GO_READ_BUFFER);
    assert!(
        seen.routes <= 200,
        "nothing of the full read is applied: {seen}"
    );
}

#[test]
fn model_resets_on_a_frame_split_across_two_reads() {
    let (go, mut s) = scripted_go_client(GoPeerConfig::default());
    let bytes = adds(&numbered(2));
    let first = frame(&add(numbered(1)[0])).len();
    // One whole frame and 10 bytes of the next, then (later) the rest. The
    // whole frame is parsed (`at` is past it); whether it is also applied
    // before the reset is a race, in Go as in the model.
    s.write_all(&bytes[..first + 10]).unwrap();
    let seen = go.wait_until(WAIT, |_| false);
    let _ = s.write_all(&bytes[first + 10..]);
    eprintln!("the model: {seen}");
    assert_eq!(
        seen.reset,
        Some(Reset::SplitFrame {
            read: first + 10,
            at: first,
            frame: Some(bytes.len() - first),
        })
    );
}

#[test]
fn model_server_handshakes_answers_keepalives_and_records_routes() {
    let go = GoServerModel::start(GoPeerConfig::default());
    // TestPeer checks the server's HELLO (isServer) and its KEEPALIVE reply.
    let (mut peer, interval) = TestPeer::established(go.addr(), 60);
    assert_eq!(interval, GO_KEEPALIVE_SECS, "the smaller interval");
    let want = numbered(500);
    peer.send(&Message::Subscribe(vni(VNI)));
    peer.send_all(&want.iter().map(|r| add(*r)).collect::<Vec<_>>());
    assert!(
        peer.sync_point().is_empty(),
        "every KEEPALIVE is answered, nothing else is sent"
    );
    let sessions = go.wait_until(WAIT, |all| all.iter().any(|s| s.routes >= want.len()));
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].subscriptions, vec![vni(VNI)]);
    assert_took_exactly(
        "the model",
        &sessions[0],
        &go.routes(),
        &want.iter().copied().collect(),
    );

    // A KEEPALIVE before HELLO is a protocol error to the Go server.
    let early = TestPeer::connect(go.addr());
    early.send(&Message::Keepalive);
    let sessions = go.wait_until(WAIT, |all| all.len() == 2 && all[1].reset.is_some());
    assert_eq!(
        sessions[1].reset,
        Some(Reset::KeepaliveInWrongState {
            state: GoState::Connecting
        })
    );
    assert_eq!(sessions[0].reset, None, "the first session carries on");
}
