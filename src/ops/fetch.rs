//! One HTTP/1.1 GET to a daemon's status port, for the operator commands.
//!
//! Owns: connecting (with a timeout), the request, reading the answer
//! (bounded in time and size), `Content-Length` and chunked bodies, and an
//! error that names the address and the cause. Plain HTTP on a status port
//! the operator names: no TLS, no redirects, no keep-alive.
//!
//! Must never: retry, or read without a bound (a status port that trickles
//! or never ends is cut off at `MAX_BODY` or the timeout).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Largest answer read (a 1,000,000-route `/routes.json` is about 200 MB).
pub const MAX_BODY: usize = 1 << 30;

/// Why a GET failed: what `metalbond diff` prints (exit status 3).
#[derive(Debug, thiserror::Error)]
#[error("{addr}: {cause}")]
pub struct FetchError {
    /// The status port as given.
    pub addr: String,
    /// What went wrong.
    pub cause: String,
}

/// An answer: status code and body.
#[derive(Debug)]
pub struct Fetched {
    /// HTTP status code.
    pub status: u16,
    /// The body (decoded from chunks if it came chunked).
    pub body: Vec<u8>,
}

/// `GET path` from the status port at `addr` (`HOST:PORT`, IPv6 in
/// brackets), within `timeout` in all.
pub fn get(addr: &str, path: &str, timeout: Duration) -> Result<Fetched, FetchError> {
    let fail = |cause: String| FetchError {
        addr: addr.to_string(),
        cause,
    };
    let deadline = Instant::now() + timeout;
    let targets: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| fail(format!("cannot resolve: {e}")))?
        .collect();
    let mut last = String::from("no address to connect to");
    let mut stream = None;
    for t in targets {
        match TcpStream::connect_timeout(&t, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("cannot connect: {e}"),
        }
    }
    let mut stream = stream.ok_or_else(|| fail(last))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream
        .set_write_timeout(Some(timeout))
        .and_then(|()| stream.write_all(request.as_bytes()))
        .map_err(|e| fail(format!("cannot send the request: {e}")))?;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail(format!("no complete answer within {timeout:?}")));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| fail(e.to_string()))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if raw.len() > MAX_BODY {
                    return Err(fail(format!("answer larger than {MAX_BODY} bytes")));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(format!("reading the answer: {e}"))),
        }
    }
    parse(&raw).map_err(fail)
}

/// Splits a whole HTTP/1.1 answer into status and body.
fn parse(raw: &[u8]) -> Result<Fetched, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("not an HTTP answer (no end of headers)")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP status line: {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else {
        match length {
            Some(n) if n > rest.len() => {
                return Err(format!("answer cut short: {} of {n} bytes", rest.len()))
            }
            Some(n) => rest[..n].to_vec(),
            None => rest.to_vec(),
        }
    };
    Ok(Fetched { status, body })
}

/// Decodes a chunked body.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunked body cut short")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            return Err("chunked body cut short".into());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_with_length_chunks_or_neither_parse() {
        let a = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi").unwrap();
        assert_eq!((a.status, a.body.as_slice()), (200, &b"hi"[..]));
        let c = parse(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((c.status, c.body.as_slice()), (404, &b"abcde"[..]));
        let n = parse(b"HTTP/1.0 200 OK\r\n\r\nall of it").unwrap();
        assert_eq!(n.body, b"all of it");
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhi").is_err());
        assert!(parse(b"garbage").is_err());
    }
}
