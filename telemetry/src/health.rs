//! The health check a container runs (`gateway health`, `router health`,
//! `mock-destinations health`): the runtime image has no shell or curl, so
//! each binary can ask its own running server over plain HTTP.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("`{0}` is not a listen address (host:port)")]
    Address(String),
    #[error("cannot reach {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("{0} answered `{1}`")]
    Unhealthy(String, String),
}

/// GETs `path` from the server listening on `listen` (as configured, e.g.
/// `0.0.0.0:8080`, which is asked on loopback) within `timeout`; Ok on 2xx.
pub fn probe(listen: &str, path: &str, timeout: Duration) -> Result<(), ProbeError> {
    let mut address = listen
        .to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.next())
        .ok_or_else(|| ProbeError::Address(listen.to_owned()))?;
    if address.ip().is_unspecified() {
        address.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let connect_error = |error| ProbeError::Connect(address, error);
    let mut stream = TcpStream::connect_timeout(&address, timeout).map_err(connect_error)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(connect_error)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(connect_error)?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .map_err(connect_error)?;
    let mut head = [0u8; 64];
    let read = stream.read(&mut head).map_err(connect_error)?;
    let status_line = String::from_utf8_lossy(&head[..read])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let is_success = status_line
        .split_whitespace()
        .nth(1)
        .is_some_and(|code| code.starts_with('2'));
    if is_success {
        Ok(())
    } else {
        Err(ProbeError::Unhealthy(
            format!("http://{address}{path}"),
            status_line,
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// A one-request server answering `status_line`; returns its address.
    fn answer_once(status_line: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            // The whole request first: closing with some of it unread resets
            // the connection, and the probe would see a reset, not the answer.
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = write!(stream, "{status_line}\r\nContent-Length: 0\r\n\r\n");
        });
        format!("0.0.0.0:{}", address.port())
    }

    #[test]
    fn success_only_on_2xx() {
        let second = Duration::from_secs(2);
        assert!(probe(&answer_once("HTTP/1.1 200 OK"), "/healthz", second).is_ok());
        let unhealthy = probe(
            &answer_once("HTTP/1.1 503 Service Unavailable"),
            "/readyz",
            second,
        );
        assert!(matches!(unhealthy, Err(ProbeError::Unhealthy(_, line)) if line.contains("503")));
        let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("addr").port();
        drop(closed);
        let refused = probe(&format!("127.0.0.1:{port}"), "/healthz", second);
        assert!(matches!(refused, Err(ProbeError::Connect(..))));
        assert!(matches!(
            probe("nonsense", "/", second),
            Err(ProbeError::Address(_))
        ));
    }
}
