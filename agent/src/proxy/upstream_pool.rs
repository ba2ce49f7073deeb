// SPDX-License-Identifier: MIT
//! Idle upstream connections kept between client connections (issue 17): a caller that opens
//! a connection per request (curl, most scripts) would otherwise cost a new TCP connection to
//! the host every time.
//!
//! Only a connection whose last response was complete and framed (its connection parked it)
//! comes here; it serves any caller next, since every request is endorsed on its own. An idle
//! connection is given out newest first, checked first (the host's close or stray bytes
//! show on a `peek`), never older than [`UPSTREAM_POOL_IDLE_MS`], and the pool holds at most
//! [`UPSTREAM_POOL_MAX`]; a connection that went stale anyway is retried once on a fresh one,
//! for idempotent requests only.

use std::io::ErrorKind;
use std::net::{SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use crate::limits::{UPSTREAM_POOL_IDLE_MS, UPSTREAM_POOL_MAX};

#[derive(Debug)]
struct Idle {
    destination: SocketAddrV4,
    stream: TcpStream,
    since: Instant,
}

/// The idle connections, oldest first.
#[derive(Debug, Default)]
pub(crate) struct UpstreamPool {
    idle: Vec<Idle>,
}

impl UpstreamPool {
    /// The newest live idle connection to `destination`, if any.
    pub(crate) fn take(&mut self, destination: SocketAddrV4, now: Instant) -> Option<TcpStream> {
        self.expire(now);
        while let Some(i) = self.idle.iter().rposition(|e| e.destination == destination) {
            let idle = self.idle.remove(i);
            if is_clean(idle.stream.peek(&mut [0u8; 1])) {
                return Some(idle.stream);
            }
        }
        None
    }

    /// Keeps `stream` for the next request to `destination` (the oldest goes when full).
    pub(crate) fn put(&mut self, destination: SocketAddrV4, stream: TcpStream, now: Instant) {
        self.expire(now);
        if self.idle.len() >= UPSTREAM_POOL_MAX {
            self.idle.remove(0);
        }
        self.idle.push(Idle { destination, stream, since: now });
    }

    /// Closes the connections idle for too long (the host may close them any moment after).
    pub(crate) fn expire(&mut self, now: Instant) {
        let max = Duration::from_millis(UPSTREAM_POOL_IDLE_MS);
        self.idle.retain(|e| now.saturating_duration_since(e.since) < max);
    }

    /// Idle connections held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.idle.len()
    }
}

/// An idle connection is clean when nothing is waiting on it: its non-blocking `peek` would
/// block (a read of 0 is the host's close, bytes are stray, an error is an error).
pub(crate) fn is_clean(peeked: std::io::Result<usize>) -> bool {
    matches!(peeked, Err(e) if e.kind() == ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        client.set_nonblocking(true).expect("nonblocking");
        let (server, _) = listener.accept().expect("accept");
        (client, server)
    }

    #[test]
    fn only_clean_fresh_connections_to_the_destination_come_back() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let std::net::SocketAddr::V4(dest) = listener.local_addr().expect("addr") else { unreachable!("v4") };
        let other = SocketAddrV4::new(*dest.ip(), dest.port().wrapping_add(1));
        let now = crate::clock::now();
        let mut pool = UpstreamPool::default();

        let (closed, server) = pair(&listener);
        drop(server);
        let (stray, mut server_stray) = pair(&listener);
        server_stray.write_all(b"HTTP/1.1 200 OK\r\n").expect("stray bytes");
        let (clean, _server_clean) = pair(&listener);
        let clean_port = clean.local_addr().expect("addr").port();
        pool.put(dest, clean, now);
        pool.put(dest, stray, now);
        pool.put(dest, closed, now);
        std::thread::sleep(Duration::from_millis(20));
        assert!(pool.take(other, now).is_none(), "another destination's");
        let got = pool.take(dest, now).expect("the clean one, past the closed and the stray");
        assert_eq!(got.local_addr().expect("addr").port(), clean_port);
        assert_eq!(pool.len(), 0, "the dirty ones are gone");

        let (idle, _server_idle) = pair(&listener);
        pool.put(dest, idle, now);
        let later = now + Duration::from_millis(UPSTREAM_POOL_IDLE_MS);
        assert!(pool.take(dest, later).is_none(), "too old");
        assert_eq!(pool.len(), 0);

        let mut servers = Vec::new();
        for _ in 0..UPSTREAM_POOL_MAX + 2 {
            let (c, s) = pair(&listener);
            servers.push(s);
            pool.put(dest, c, now);
        }
        assert_eq!(pool.len(), UPSTREAM_POOL_MAX, "bounded");
    }
}
