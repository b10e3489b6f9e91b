//! The wire format: frames and messages, bytes in and bytes out.
//!
//! Owns: the 4-byte frame header, the 1188-byte payload limit, the streaming
//! decoder and the appending encoder (`frame`), the five messages and their
//! validation (`message`), and the typed errors (`error`).
//!
//! Must never: touch a socket, a timer or the route table. Callers feed it
//! bytes and take messages, or hand it messages and take bytes.

mod error;
mod frame;
mod message;

pub use error::DecodeError;
pub use frame::{
    encode_frame, first_frame_len, whole_frames_prefix, FrameBuffer, FrameDecoder, FrameSpan,
    HEADER_LEN, MAX_FRAME, MAX_PAYLOAD, VERSION,
};
pub use message::{Message, MessageType};
