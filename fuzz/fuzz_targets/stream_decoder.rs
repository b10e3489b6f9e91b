//! Fuzz target: the streaming frame decoder fed arbitrary bytes in arbitrary
//! chunks. It must never panic, and every message it yields must re-encode
//! to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metalbond_wire::codec::{encode_frame, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    // First byte picks the chunk size, so splits vary with the input.
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split).max(1);
    let mut dec = FrameDecoder::new();
    for part in rest.chunks(chunk) {
        dec.extend(part);
        loop {
            match dec.next_message() {
                Ok(Some(msg)) => {
                    let mut buf = Vec::new();
                    encode_frame(&msg, &mut buf);
                    let mut again = FrameDecoder::new();
                    again.extend(&buf);
                    match again.next_message() {
                        Ok(Some(back)) => assert_eq!(back, msg),
                        other => panic!("re-encoded {msg:?} decoded as {other:?}"),
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
