// SPDX-License-Identifier: MIT
//! A connection driven by a script of bytes, for the fuzzer (`fuzz/fuzz_targets/connection.rs`)
//! and for the unit tests that replay its seeds.
//!
//! Everything is real but the decisions: a [`Connection`] on a loopback socket, a client
//! socket, an upstream listener the connection connects to, all in one thread; a gate with
//! fixed answers that counts what it lends. The script says, step by step, what the client
//! and the host send, who closes, and when a deadline passes, so every state, every timeout
//! and every error path can be reached. After the script the connection is ended as the loop
//! would end it, and every body buffer and upstream share must have come back: a leak is a
//! panic the fuzzer reports.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};

use super::connection::{Buffers, Connection, Ctx, Next};
use super::gate::{Endorse, Exchange, Gate, LocalResponse, Route, Verdict};
use crate::http::RequestHead;
use crate::identity::Caller;
use crate::msp::signing::SigningKey;
use crate::policy::decide::is_skip_listed;
use crate::redirect::CallerRecord;

std::thread_local! {
    /// The slot buffers of the last run, for the next.
    static SLOT: std::cell::RefCell<Option<Buffers>> = const { std::cell::RefCell::new(None) };
}

/// A gate whose answers come from the script's first byte.
#[derive(Debug)]
struct ScriptedGate {
    upstream: SocketAddrV4,
    verdict: Verdict,
    keying: u8,
    key: SigningKey,
    draining: bool,
    bodies_left: usize,
    upstreams_left: usize,
    lent_bodies: usize,
    lent_upstreams: usize,
    fail_connect: bool,
    /// Upstreams parked between connections (reused by a later run's connect: none here).
    idle: Vec<TcpStream>,
    requests: u64,
    recorded: u64,
}

impl Gate for ScriptedGate {
    fn upstream_timeout_ms(&self) -> u64 {
        1_000
    }

    fn draining(&self) -> bool {
        self.draining
    }

    fn count_request(&mut self) {
        self.requests += 1;
    }

    fn local_endpoint(
        &mut self,
        head: &RequestHead,
        req: &[u8],
        _: Option<&Caller>,
        _: Instant,
    ) -> Option<LocalResponse> {
        (head.target(req) == b"/provision").then(|| LocalResponse {
            status: 200,
            content_type: b"",
            body: String::from("{}"),
            close: false,
        })
    }

    fn authorize(&mut self, _: &Caller, _: &[u8], _: &[u8]) -> Verdict {
        self.verdict
    }

    fn endorsement(&self, route: &Route, method: &[u8], target: &[u8]) -> Endorse<'_> {
        match self.keying {
            _ if is_skip_listed(route.endpoint, method, target) => Endorse::Unsigned,
            0 => Endorse::Sign(&self.key),
            1 => Endorse::Unsigned,
            _ => Endorse::NotReady,
        }
    }

    fn host_date(&self) -> heapless::String<29> {
        let mut date = heapless::String::new();
        // 29 bytes into 29: cannot fail.
        date.push_str("Wed, 02 Dec 2026 06:00:00 GMT").ok();
        date
    }

    fn hold_for_key(&mut self, _: Instant) {}

    fn count_signed(&mut self) {}

    fn take_body(&mut self, _: &Route) -> Option<Box<[u8]>> {
        self.bodies_left = self.bodies_left.checked_sub(1)?;
        self.lent_bodies += 1;
        Some(vec![0; crate::limits::REQUEST_BODY_MAX_BYTES].into_boxed_slice())
    }

    fn give_back_body(&mut self, _: &Route, _: Box<[u8]>) {
        self.bodies_left += 1;
        self.lent_bodies -= 1;
    }

    fn take_upstream(&mut self, _: &Route) -> bool {
        let Some(left) = self.upstreams_left.checked_sub(1) else { return false };
        self.upstreams_left = left;
        self.lent_upstreams += 1;
        true
    }

    fn give_back_upstream(&mut self, _: &Route) {
        self.upstreams_left += 1;
        self.lent_upstreams -= 1;
    }

    fn connect(&mut self, _: &Route, fresh: bool, _: Instant) -> io::Result<(TcpStream, bool)> {
        if !fresh && let Some(idle) = self.idle.pop() {
            return Ok((idle, true));
        }
        if self.fail_connect {
            return Err(io::Error::from(ErrorKind::ConnectionRefused));
        }
        let stream = TcpStream::connect(self.upstream)?;
        stream.set_nonblocking(true)?;
        Ok((stream, false))
    }

    fn park_upstream(&mut self, _: &Route, stream: TcpStream, _: Instant) {
        self.idle.push(stream);
    }

    fn record(&mut self, _: Option<&Caller>, _: SocketAddrV4, _: &Exchange, _: Instant) {
        self.recorded += 1;
    }
}

/// Runs `script` against a fresh connection. Byte 0 chooses the gate (verdict, keying,
/// draining, budgets, identity); then each step is an opcode, and for the two that send, a
/// length byte and that many bytes:
///
/// | op % 8 | step |
/// |---|---|
/// | 0 | the client sends |
/// | 1 | the host sends on its newest connection |
/// | 2 | the host closes its newest connection |
/// | 3 | the client stops sending (shutdown write) |
/// | 4 | the connection's deadline passes |
/// | 5 | the client closes |
/// | 6, 7 | the loop drives the connection again (a redrive) |
///
/// Returns the requests read and the records written. Panics if the connection leaks a loan,
/// or if sockets cannot be made (not a finding).
pub fn run(script: &[u8]) -> (u64, u64) {
    let Some((&setup, mut steps)) = script.split_first() else { return (0, 0) };
    let host = TcpListener::bind("127.0.0.1:0").expect("upstream listener");
    host.set_nonblocking(true).expect("nonblocking");
    let std::net::SocketAddr::V4(upstream) = host.local_addr().expect("address") else { return (0, 0) };
    let front = TcpListener::bind("127.0.0.1:0").expect("client listener");
    let mut client = TcpStream::connect(front.local_addr().expect("address")).expect("connect");
    client.set_nonblocking(true).expect("nonblocking");
    let (accepted, peer) = front.accept().expect("accept");
    accepted.set_nonblocking(true).expect("nonblocking");
    let std::net::SocketAddr::V4(peer) = peer else { return (0, 0) };
    let mut poll = Poll::new().expect("poll");
    let mut stream = mio::net::TcpStream::from_std(accepted);
    poll.registry().register(&mut stream, Token(0), Interest::READABLE | Interest::WRITABLE).expect("register");

    let mut gate = ScriptedGate {
        upstream,
        verdict: [Verdict::Allow, Verdict::AllowWithAudit, Verdict::Forbidden, Verdict::Allow][usize::from(setup & 3)],
        keying: (setup >> 2) % 3,
        key: SigningKey::from_hex("8f4d2c1e-9b3a-4e6f-8a7d-2c1b0e9f8a7d", &"ab".repeat(32)).expect("key"),
        draining: setup & 0x10 != 0,
        bodies_left: usize::from(setup & 0x20 == 0),
        upstreams_left: usize::from(setup & 0x40 == 0) * 2,
        fail_connect: setup == 0xff,
        idle: Vec::new(),
        lent_bodies: 0,
        lent_upstreams: 0,
        requests: 0,
        recorded: 0,
    };
    let caller = (setup & 0x80 == 0).then(|| {
        let mut record = CallerRecord::zeroed();
        record.uid = u32::from(setup & 1) * 1000;
        // IMDS, or the HostGAPlugin (where the skip list streams a body).
        record.endpoint = if setup & 2 == 0 { 1 } else { 3 };
        record.orig_ip = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        record.orig_port = upstream.port().to_be();
        Caller { record, exe: None, cmdline: heapless::Vec::new(), user: None, groups: heapless::Vec::new() }
    });
    // One slot's buffers, reused from run to run (the arena is never freed, by design).
    let bufs = SLOT.with(|slot| slot.borrow_mut().take()).unwrap_or_else(|| Buffers::arena(1).pop().expect("one slot"));
    let mut now = crate::clock::now();
    let mut conn = Some(Connection::new(stream, peer, caller, bufs, now));
    let mut hosts: Vec<TcpStream> = Vec::new();
    let mut events = Events::with_capacity(8);
    let mut sink = [0u8; 16 * 1024];
    let mut slot_buffers = None;

    while let Some((&op, rest)) = steps.split_first() {
        steps = rest;
        let mut timed_out = false;
        match op % 8 {
            0 | 1 => {
                let Some((&len, rest)) = steps.split_first() else { break };
                let take = usize::from(len).min(rest.len());
                let (chunk, rest) = rest.split_at(take);
                steps = rest;
                let to = if op % 8 == 0 { Some(&mut client) } else { hosts.last_mut() };
                if let Some(to) = to {
                    drop(to.write(chunk));
                }
            }
            2 => drop(hosts.pop()),
            3 => drop(client.shutdown(Shutdown::Write)),
            4 => {
                if let Some(c) = conn.as_ref() {
                    now = now.max(c.deadline()) + Duration::from_millis(1);
                }
                timed_out = true;
            }
            5 => drop(client.shutdown(Shutdown::Both)),
            _ => {}
        }
        drop(poll.poll(&mut events, Some(Duration::ZERO)));
        if let Some(c) = conn.as_mut() {
            let mut ctx = Ctx { gate: &mut gate, registry: poll.registry(), upstream_token: Token(1), now };
            let next = if timed_out { c.on_timeout(&mut ctx) } else { c.drive(&mut ctx) };
            if let Next::Close(_) = next
                && let Some(ended) = conn.take()
            {
                slot_buffers = Some(ended.close(&mut gate, poll.registry(), now));
            }
        }
        // What the connection sent goes nowhere; new upstream connections are the host's.
        while let Ok(n) = client.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
        while let Ok((s, _)) = host.accept() {
            drop(s.set_nonblocking(true));
            hosts.push(s);
        }
        for h in &mut hosts {
            while let Ok(n) = h.read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
        }
    }
    if let Some(ended) = conn.take() {
        slot_buffers = Some(ended.close(&mut gate, poll.registry(), now));
    }
    SLOT.with(|slot| *slot.borrow_mut() = slot_buffers);
    assert_eq!((gate.lent_bodies, gate.lent_upstreams), (0, 0), "every loan comes back");
    assert!(gate.recorded <= gate.requests, "at most one record per request");
    (gate.requests, gate.recorded)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `op` 0 with its length byte: the client sends `bytes`.
    fn client(bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![0, u8::try_from(bytes.len()).expect("short")];
        v.extend_from_slice(bytes);
        v
    }

    fn host(bytes: &[u8]) -> Vec<u8> {
        let mut v = client(bytes);
        v[0] = 1;
        v
    }

    #[test]
    fn the_seed_scripts_run_and_give_every_loan_back() {
        let get: &[u8] = b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\n\r\n";
        let post: &[u8] = b"POST /machine?comp=health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab";
        let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let seeds: Vec<Vec<u8>> = vec![
            [&[0u8][..], &client(get), &host(ok), &client(get), &[2], &host(ok), &[4]].concat(),
            [&[0u8][..], &client(post), &[4]].concat(),
            [&[0u8][..], &client(post), &client(b"cde"), &host(b"HTTP/1.1 100 Continue\r\n\r\n"), &host(ok)].concat(),
            [&[0x08u8][..], &client(get), &[4, 4]].concat(),
            [&[0x20u8][..], &client(post), &client(b"cde")].concat(),
            [&[0x40u8][..], &client(get)].concat(),
            [&[0xffu8][..], &client(get)].concat(),
            [&[0x80u8][..], &client(b"GET /provision HTTP/1.1\r\nMetadata: true\r\n\r\n"), &[5]].concat(),
            [&[0x10u8][..], &client(get), &host(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\npart"), &[2, 4]].concat(),
            [
                &[0u8][..],
                &client(b"PUT /vmAgentLog HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"),
                &[4, 3, 4],
            ]
            .concat(),
        ];
        let outcomes: Vec<(u64, u64)> = seeds.iter().map(|seed| run(seed)).collect();
        // Each seed reaches what it is for: two exchanges on a reused then a fresh upstream;
        // a body cut by the deadline (408); a 100-continue body answered; a request held for
        // the key and answered 429; no body buffer (503); no upstream share (503); a failed
        // connect (502); a local endpoint without identity; a truncated response while
        // draining; a streamed body cut by the deadline.
        assert_eq!(outcomes, [(2, 2), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1)]);
    }
}
