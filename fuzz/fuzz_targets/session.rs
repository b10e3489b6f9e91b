//! Fuzz target: a whole passive session fed arbitrary bytes, as a server's
//! read loop would run it: stream decoder → session state machine, with a
//! clock that the input advances. It must never panic, and once the session
//! says "close" nothing more is processed (as the server does).
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use metalbond_wire::codec::FrameDecoder;
use metalbond_wire::session::{PeerSession, Reaction, Role, SessionState};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split % 64).max(1);
    let t0 = Instant::now();
    let mut now = t0;
    let mut session = PeerSession::new(Role::Passive, Duration::from_secs(5), now);
    let mut dec = FrameDecoder::new();
    let mut established = false;
    for part in rest.chunks(chunk) {
        // Each chunk also moves the clock by up to 2.55 s.
        now += Duration::from_millis(u64::from(part[0]) * 10);
        if session.on_tick(now).is_err() {
            return;
        }
        dec.extend(part);
        loop {
            let msg = match dec.next_message() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(_) => return,
            };
            match session.on_message(msg, now) {
                Ok(Reaction::Established { .. }) => {
                    assert!(!established, "established twice");
                    established = true;
                }
                Ok(Reaction::Deliver(_)) => assert_eq!(session.state(), SessionState::Established),
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }
});
