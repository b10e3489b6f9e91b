//! The `HOST:PORT` form of a server address, checked once when a server is
//! added (the host is resolved at each connect).

/// Checks the `HOST:PORT` form: HOST is an IPv6 address in brackets, an
/// IPv4 address or a DNS name (resolved at each connect, so it may not
/// resolve yet); PORT is 0-65535. `Err` says what is wrong.
pub fn check_address(address: &str) -> Result<(), String> {
    let no_port = || "no ':PORT'".to_string();
    let (host, port) = if address.starts_with('[') {
        let end = address
            .find(']')
            .ok_or_else(|| format!("'{address}' lacks the closing ']'"))?;
        let port = address[end + 1..].strip_prefix(':').ok_or_else(no_port)?;
        (&address[..=end], port)
    } else {
        address.rsplit_once(':').ok_or_else(no_port)?
    };
    port.parse::<u16>()
        .map_err(|_| format!("port '{port}' is not a number 0-65535"))?;
    check_host(host)
}

/// The HOST part of `HOST:PORT` (see `check_address`).
fn check_host(host: &str) -> Result<(), String> {
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| format!("'{host}' lacks the closing ']'"))?;
        // A zone is allowed after the address as the interface index
        // (fe80::1%2): names (%eth0) are not resolved on connect.
        let (addr, zone) = inner.split_once('%').unwrap_or((inner, "0"));
        let zone_ok = !zone.is_empty() && zone.chars().all(|c| c.is_ascii_digit());
        return match addr.parse::<std::net::Ipv6Addr>() {
            Ok(_) if zone_ok => Ok(()),
            _ => Err(format!("'{inner}' is not an IPv6 address")),
        };
    }
    if host.contains(':') {
        return Err("an IPv6 address needs brackets: [ADDR]:PORT".into());
    }
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return host
            .parse::<std::net::Ipv4Addr>()
            .map(|_| ())
            .map_err(|_| format!("'{host}' is not an IPv4 address"));
    }
    // A DNS name: labels of letters, digits, '-' and '_' (1-63 each, not
    // starting or ending with '-'), 253 characters at most, a final '.'
    // allowed.
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!("'{host}' is not a host name or IP address"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Client, ClientConfig, ClientError, LogSink};

    #[test]
    fn server_addresses_need_host_and_port() {
        for good in [
            "[::1]:4711",
            "[fe80::1%2]:4711",
            "127.0.0.1:4711",
            "reflector.example:4711",
            "reflector.example.:4711",
            "localhost:4711",
            "rr-1_a.dc2.example:1",
        ] {
            assert_eq!(check_address(good), Ok(()), "{good}");
        }
        for (bad, cause) in [
            ("::1:4711", "needs brackets"),
            ("[::1]", "no ':PORT'"),
            ("host", "no ':PORT'"),
            (":4711", "empty"),
            ("host:port", "not a number"),
            ("host:70000", "not a number"),
            ("[::1:4711", "closing"),
            ("[10.0.0.1]:4711", "not an IPv6 address"),
            ("[fe80::1%]:4711", "not an IPv6 address"),
            ("[fe80::1%eth0]:4711", "not an IPv6 address"),
            ("10.0.0.300:4711", "not an IPv4 address"),
            ("bad host:4711", "not a host name"),
            ("-host:4711", "not a host name"),
            ("a..b:4711", "not a host name"),
            ("x/y:4711", "not a host name"),
        ] {
            let err = check_address(bad).unwrap_err();
            assert!(err.contains(cause), "{bad}: {err}");
        }
        let c = Client::new(ClientConfig::default(), LogSink);
        assert_eq!(
            c.add_server("bad host:1"),
            Err(ClientError::InvalidServerAddress("bad host:1".into()))
        );
    }
}
