// SPDX-License-Identifier: MIT
//! The connection state machine over real loopback sockets, without root: a real
//! [`Connection`] driven by a real `mio` poll, a real client socket on one side and a fake
//! upstream (a thread with a listener) on the other, and a fake [`Gate`] that decides, lends
//! body buffers and upstream shares, and keeps every record. Each test ends by checking that
//! every buffer and share the connection took came back.

#![expect(clippy::tests_outside_test_module, reason = "an integration test file is a test module")]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use gpa::http::RequestHead;
use gpa::identity::Caller;
use gpa::msp::signing::SigningKey;
use gpa::proxy::connection::{Buffers, CloseReason, Connection, Ctx, Next};
use gpa::proxy::gate::{Decision, Endorse, Exchange, Gate, LocalResponse, Route, Verdict};
use gpa::redirect::CallerRecord;
use mio::{Events, Poll, Token};

const CLIENT: Token = Token(0);
const UPSTREAM: Token = Token(1);
const KEY_GUID: &str = "8f4d2c1e-9b3a-4e6f-8a7d-2c1b0e9f8a7d";
const IMDS_GET: &[u8] =
    b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n";
const OK_JSON: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 13\r\n\r\n{\"vmId\":\"1\"}\n";

/// How the fake gate endorses.
#[derive(Clone, Copy, Debug)]
enum Keying {
    Signed,
    Unsigned,
    NotReady,
}

/// A gate with fixed answers that counts what is taken and given back.
#[derive(Debug)]
struct FakeGate {
    upstream: SocketAddrV4,
    verdict: Verdict,
    keying: Keying,
    key: SigningKey,
    draining: bool,
    /// Body buffers and upstream shares it may still lend.
    bodies_left: usize,
    upstreams_left: usize,
    bodies_out: usize,
    upstreams_out: usize,
    fail_connect: bool,
    /// Upstreams parked by ended connections, handed to the next connect.
    idle: Vec<TcpStream>,
    held: usize,
    requests: u64,
    signed: u64,
    records: Vec<Exchange>,
}

impl FakeGate {
    fn new(upstream: SocketAddrV4) -> Self {
        Self {
            upstream,
            verdict: Verdict::Allow,
            keying: Keying::Signed,
            key: SigningKey::from_hex(KEY_GUID, &"ab".repeat(32)).expect("key"),
            draining: false,
            bodies_left: 4,
            upstreams_left: 4,
            bodies_out: 0,
            upstreams_out: 0,
            fail_connect: false,
            idle: Vec::new(),
            held: 0,
            requests: 0,
            signed: 0,
            records: Vec::new(),
        }
    }

    fn decisions(&self) -> Vec<(u16, &'static str)> {
        self.records.iter().map(|e| (e.status, e.decision.as_str())).collect()
    }
}

impl Gate for FakeGate {
    fn upstream_timeout_ms(&self) -> u64 {
        2_000
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
            content_type: b"content-type: application/json\r\n",
            body: "{\"finished\":true}".to_owned(),
            close: false,
        })
    }

    fn authorize(&mut self, _: &Caller, _: &[u8], _: &[u8]) -> Verdict {
        self.verdict
    }

    fn endorsement(&self, route: &Route, method: &[u8], target: &[u8]) -> Endorse<'_> {
        if gpa::policy::decide::is_skip_listed(route.endpoint, method, target) {
            return Endorse::Unsigned;
        }
        match self.keying {
            Keying::Signed => Endorse::Sign(&self.key),
            Keying::Unsigned => Endorse::Unsigned,
            Keying::NotReady => Endorse::NotReady,
        }
    }

    fn host_date(&self) -> heapless::String<29> {
        heapless::String::try_from("Wed, 02 Dec 2026 06:00:00 GMT").expect("fits")
    }

    fn hold_for_key(&mut self, _: Instant) {
        self.held += 1;
    }

    fn count_signed(&mut self) {
        self.signed += 1;
    }

    fn take_body(&mut self, _: &Route) -> Option<Box<[u8]>> {
        if self.bodies_left == 0 {
            return None;
        }
        self.bodies_left -= 1;
        self.bodies_out += 1;
        Some(vec![0; gpa::limits::REQUEST_BODY_MAX_BYTES].into_boxed_slice())
    }

    fn give_back_body(&mut self, _: &Route, _: Box<[u8]>) {
        self.bodies_left += 1;
        self.bodies_out -= 1;
    }

    fn take_upstream(&mut self, _: &Route) -> bool {
        if self.upstreams_left == 0 {
            return false;
        }
        self.upstreams_left -= 1;
        self.upstreams_out += 1;
        true
    }

    fn give_back_upstream(&mut self, _: &Route) {
        self.upstreams_left += 1;
        self.upstreams_out -= 1;
    }

    fn connect(&mut self, _: &Route, fresh: bool, _: Instant) -> std::io::Result<(TcpStream, bool)> {
        if !fresh && let Some(idle) = self.idle.pop() {
            return Ok((idle, true));
        }
        if self.fail_connect {
            return Err(std::io::Error::from(ErrorKind::ConnectionRefused));
        }
        let s = TcpStream::connect(self.upstream)?;
        s.set_nonblocking(true)?;
        Ok((s, false))
    }

    fn park_upstream(&mut self, _: &Route, stream: TcpStream, _: Instant) {
        self.idle.push(stream);
    }

    fn record(&mut self, _: Option<&Caller>, _: SocketAddrV4, exchange: &Exchange, _: Instant) {
        self.records.push(exchange.clone());
    }
}

/// What the fake upstream does on each connection it accepts.
#[derive(Clone, Copy, Debug)]
enum Host {
    /// Answers every request with the response, keeping the connection.
    Answer(&'static [u8]),
    /// Answers the first request, then closes without saying so (a stale keep-alive).
    AnswerOnceThenClose(&'static [u8]),
    /// Answers the first request, then reads the next one and closes without an answer (the
    /// host closed an idle connection just as the request reached it).
    AnswerOnceThenDropNext(&'static [u8]),
    /// Reads and never answers.
    Silent,
}

/// Reads one request (head, then a `content-length` body or a chunked one to its end).
fn read_request(s: &mut TcpStream, pending: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut buf = [0u8; 65_536];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse::<usize>().expect("length"));
            let body_end = if head.contains("transfer-encoding: chunked") {
                pending[end + 4..].windows(5).position(|w| w == b"0\r\n\r\n").map(|p| end + 4 + p + 5)
            } else {
                Some(end + 4 + len).filter(|e| *e <= pending.len())
            };
            if let Some(body_end) = body_end {
                let request = pending[..body_end].to_vec();
                pending.drain(..body_end);
                return Some(request);
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

/// A fake upstream on a loopback port: every request it reads goes to the channel, with the
/// number of the connection it came on.
fn fake_host(host: Host) -> (SocketAddrV4, Receiver<(usize, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let std::net::SocketAddr::V4(addr) = listener.local_addr().expect("addr") else { unreachable!("v4") };
    let (tx, rx): (Sender<(usize, Vec<u8>)>, _) = channel();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut s) = stream else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut pending = Vec::new();
                let mut first = true;
                while let Some(request) = read_request(&mut s, &mut pending) {
                    if tx.send((n, request)).is_err() {
                        return;
                    }
                    match host {
                        Host::Answer(r) => drop(s.write_all(r)),
                        Host::AnswerOnceThenClose(r) => {
                            drop(s.write_all(r));
                            return;
                        }
                        Host::AnswerOnceThenDropNext(r) if first => {
                            drop(s.write_all(r));
                            first = false;
                        }
                        Host::AnswerOnceThenDropNext(_) => return,
                        Host::Silent => {}
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// A caller as the kernel would record it, headed for IMDS.
fn caller(uid: u32) -> Caller {
    let mut record = CallerRecord::zeroed();
    record.uid = uid;
    record.tgid = 4242;
    record.cgroup_id = 77;
    record.endpoint = 1;
    record.orig_ip = u32::from(std::net::Ipv4Addr::new(169, 254, 169, 254)).to_be();
    record.orig_port = 80u16.to_be();
    Caller { record, exe: None, cmdline: heapless::Vec::new(), user: None, groups: heapless::Vec::new() }
}

/// A caller headed for the HostGAPlugin, where the skip list streams `PUT /vmAgentLog`.
fn hostga_caller(uid: u32) -> Caller {
    let mut c = caller(uid);
    c.record.endpoint = 3;
    c.record.orig_ip = u32::from(std::net::Ipv4Addr::new(168, 63, 129, 16)).to_be();
    c.record.orig_port = 32526u16.to_be();
    c
}

/// One connection between a test client and the fake host, with the gate.
struct Rig {
    poll: Poll,
    events: Events,
    conn: Option<Connection>,
    gate: FakeGate,
    client: TcpStream,
    /// What the client has read so far.
    seen: Vec<u8>,
    host: Receiver<(usize, Vec<u8>)>,
    closed: Option<CloseReason>,
}

impl Rig {
    fn new(host: Host, caller: Option<Caller>) -> Self {
        Self::with_gate(host, caller, |_| {})
    }

    fn with_gate(host: Host, caller: Option<Caller>, set: impl FnOnce(&mut FakeGate)) -> Self {
        let (upstream, rx) = fake_host(host);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        client.set_nonblocking(true).expect("nonblocking");
        let (accepted, peer) = listener.accept().expect("accept");
        accepted.set_nonblocking(true).expect("nonblocking");
        let std::net::SocketAddr::V4(peer) = peer else { unreachable!("v4") };
        let poll = Poll::new().expect("poll");
        let mut stream = mio::net::TcpStream::from_std(accepted);
        poll.registry().register(&mut stream, CLIENT, mio::Interest::READABLE | mio::Interest::WRITABLE).expect("reg");
        let bufs = Buffers::arena(1).pop().expect("one slot");
        let mut gate = FakeGate::new(upstream);
        set(&mut gate);
        let conn = Connection::new(stream, peer, caller, bufs, gpa::clock::now());
        Self {
            poll,
            events: Events::with_capacity(16),
            conn: Some(conn),
            gate,
            client,
            seen: Vec::new(),
            host: rx,
            closed: None,
        }
    }

    /// Ends the client connection as the loop would (its parked upstream goes to the gate's
    /// pool) and opens a new one from the same caller, through the same gate.
    fn reconnect(&mut self, caller: Option<Caller>) {
        if let Some(conn) = self.conn.take() {
            let bufs = conn.close(&mut self.gate, self.poll.registry(), gpa::clock::now());
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            self.client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
            self.client.set_nonblocking(true).expect("nonblocking");
            let (accepted, peer) = listener.accept().expect("accept");
            accepted.set_nonblocking(true).expect("nonblocking");
            let std::net::SocketAddr::V4(peer) = peer else { unreachable!("v4") };
            let mut stream = mio::net::TcpStream::from_std(accepted);
            let interest = mio::Interest::READABLE | mio::Interest::WRITABLE;
            self.poll.registry().register(&mut stream, CLIENT, interest).expect("reg");
            self.conn = Some(Connection::new(stream, peer, caller, bufs, gpa::clock::now()));
            self.seen.clear();
            self.closed = None;
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.client.write_all(bytes).expect("client write");
    }

    fn drive(&mut self, timed_out: bool, now: Instant) {
        let Some(conn) = self.conn.as_mut() else { return };
        let mut ctx = Ctx { gate: &mut self.gate, registry: self.poll.registry(), upstream_token: UPSTREAM, now };
        let next = if timed_out { conn.on_timeout(&mut ctx) } else { conn.drive(&mut ctx) };
        if let Next::Close(reason) = next {
            let conn = self.conn.take().expect("open");
            let _slot_buffers = conn.close(&mut self.gate, self.poll.registry(), gpa::clock::now());
            self.closed = Some(reason);
            // The client sees the end of the connection.
        }
    }

    /// Polls and drives until `done` holds for what the client has read (or the connection
    /// ends), for at most five seconds of real time.
    fn run_until(&mut self, done: impl Fn(&[u8]) -> bool) {
        let end = gpa::clock::now() + Duration::from_secs(5);
        self.drive(false, gpa::clock::now());
        while gpa::clock::now() < end {
            self.read_client();
            if done(&self.seen) || self.closed.is_some() {
                self.read_client();
                return;
            }
            drop(self.poll.poll(&mut self.events, Some(Duration::from_millis(5))));
            self.drive(false, gpa::clock::now());
        }
        panic!("no progress: client saw {:?}", String::from_utf8_lossy(&self.seen));
    }

    /// Runs until the client has `n` complete responses (by `content-length`).
    fn responses(&mut self, n: usize) -> Vec<Response> {
        self.run_until(|seen| parse_responses(seen).len() >= n);
        parse_responses(&self.seen)
    }

    /// Lets the current deadline pass: the connection is woken as the loop would at it.
    fn expire(&mut self) {
        let Some(deadline) = self.conn.as_ref().map(Connection::deadline) else { return };
        self.drive(true, deadline + Duration::from_millis(1));
        self.run_until(|seen| !seen.is_empty());
    }

    fn read_client(&mut self) {
        let mut buf = [0u8; 65_536];
        loop {
            match self.client.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => self.seen.extend_from_slice(&buf[..n]),
                Err(_) => return,
            }
        }
    }

    /// The next request the fake host read, with the number of its connection.
    fn upstream_request(&self) -> (usize, String) {
        let (n, r) = self.host.recv_timeout(Duration::from_secs(5)).expect("the host got a request");
        (n, String::from_utf8_lossy(&r).into_owned())
    }

    /// Ends the connection (as the loop would) and checks every loan came back.
    fn finish(mut self) -> FakeGate {
        if let Some(conn) = self.conn.take() {
            let _slot_buffers = conn.close(&mut self.gate, self.poll.registry(), gpa::clock::now());
        }
        assert_eq!((self.gate.bodies_out, self.gate.upstreams_out), (0, 0), "body buffers and upstreams given back");
        self.gate
    }
}

/// A response as the client read it.
#[derive(Debug)]
struct Response {
    status: u16,
    head: String,
    body: Vec<u8>,
}

fn parse_responses(mut bytes: &[u8]) -> Vec<Response> {
    let mut out = Vec::new();
    while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let len = head
            .to_ascii_lowercase()
            .lines()
            .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
            .unwrap_or(0);
        if status == 100 {
            bytes = &bytes[end + 4..];
            continue;
        }
        if bytes.len() < end + 4 + len {
            break;
        }
        out.push(Response { status, head, body: bytes[end + 4..end + 4 + len].to_vec() });
        bytes = &bytes[end + 4 + len..];
    }
    out
}

#[test]
fn a_request_goes_up_signed_once_and_comes_back_with_the_marker() {
    let mut rig = Rig::new(Host::Answer(OK_JSON), Some(caller(0)));
    rig.send(IMDS_GET);
    let r = rig.responses(1);
    assert_eq!(r[0].status, 200, "{r:?}");
    assert!(r[0].head.contains("x-ms-azure-host-authorization: value"), "marker: {}", r[0].head);
    assert_eq!(r[0].body, b"{\"vmId\":\"1\"}\n");
    let (_, up) = rig.upstream_request();
    assert_eq!(up.matches("x-ms-azure-host-authorization:").count(), 1, "{up}");
    assert!(up.contains("x-ms-azure-host-claims: { \"isRoot\": \"true\"}\r\n"), "{up}");
    assert!(up.contains("x-ms-azure-host-date: Wed, 02 Dec 2026 06:00:00 GMT\r\n"), "{up}");
    let gate = rig.finish();
    assert_eq!((gate.requests, gate.signed), (1, 1));
    assert_eq!(gate.decisions(), [(200, "allow")]);
}

#[test]
fn without_a_required_signature_the_request_goes_up_unsigned() {
    let mut rig = Rig::with_gate(Host::Answer(OK_JSON), Some(caller(0)), |g| g.keying = Keying::Unsigned);
    rig.send(IMDS_GET);
    assert_eq!(rig.responses(1)[0].status, 200);
    let (_, up) = rig.upstream_request();
    assert!(!up.contains("x-ms-azure-host-authorization") && up.contains("x-ms-azure-host-claims"), "{up}");
    assert_eq!(rig.finish().signed, 0);
}

#[test]
fn pipelined_requests_are_answered_in_order_on_one_upstream() {
    let mut rig = Rig::new(Host::Answer(OK_JSON), Some(caller(1000)));
    let mut two = IMDS_GET.to_vec();
    two.extend_from_slice(b"GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/ HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n");
    rig.send(&two);
    let r = rig.responses(2);
    assert_eq!(r.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 200]);
    let (first, a) = rig.upstream_request();
    let (second, b) = rig.upstream_request();
    assert!(a.starts_with("GET /metadata/instance") && b.starts_with("GET /metadata/identity"), "order: {a} {b}");
    assert_eq!(first, second, "the kept-alive upstream is reused");
    assert!(b.contains("x-ms-azure-host-claims: { \"isRoot\": \"false\"}"), "{b}");
    let gate = rig.finish();
    assert_eq!(gate.decisions(), [(200, "allow"), (200, "allow")]);
}

#[test]
fn a_body_after_100_continue_goes_up_whole_with_its_length_and_without_expect() {
    let mut rig = Rig::new(Host::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"), Some(caller(0)));
    let body = "<Health><GoalStateIncarnation>1</GoalStateIncarnation></Health>";
    rig.send(
        format!(
            "POST /machine?comp=health HTTP/1.1\r\nHost: 168.63.129.16\r\nContent-Type: text/xml; charset=utf-8\r\nx-ms-version: 2012-11-30\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    rig.run_until(|seen| seen.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"));
    rig.send(body.as_bytes());
    let r = rig.responses(1);
    assert_eq!(r[0].status, 200);
    let (_, up) = rig.upstream_request();
    assert!(up.ends_with(body) && !up.to_ascii_lowercase().contains("expect:"), "{up}");
    assert!(up.contains(&format!("Content-Length: {}", body.len())), "{up}");
    let gate = rig.finish();
    assert_eq!(gate.decisions(), [(200, "allow")]);
}

#[test]
fn a_chunked_body_is_dechunked_and_sent_with_a_length() {
    let mut rig = Rig::new(Host::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"), Some(caller(0)));
    rig.send(b"POST /machine?comp=health HTTP/1.1\r\nHost: 168.63.129.16\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
    let r = rig.responses(1);
    assert_eq!(r[0].status, 200);
    let (_, up) = rig.upstream_request();
    assert!(up.contains("content-length: 11\r\n") && !up.contains("Transfer-Encoding"), "{up}");
    assert!(up.ends_with("\r\n\r\nhello world"), "{up}");
    rig.finish();
}

#[test]
fn a_stale_kept_alive_upstream_is_retried_once_on_a_fresh_connection() {
    let mut rig = Rig::new(Host::AnswerOnceThenClose(OK_JSON), Some(caller(0)));
    rig.send(IMDS_GET);
    assert_eq!(rig.responses(1)[0].status, 200);
    let (first, _) = rig.upstream_request();
    // Let the host's close arrive, so the parked upstream is stale when it is used.
    std::thread::sleep(Duration::from_millis(50));
    rig.send(IMDS_GET);
    let r = rig.responses(2);
    assert_eq!(r[1].status, 200, "{r:?}");
    let (second, _) = rig.upstream_request();
    assert_ne!(first, second, "sent again on a new connection");
    rig.finish();
}

#[test]
fn an_upstream_the_host_closed_meanwhile_is_not_used() {
    // The host's close is seen before the request is sent (a peek): a fresh connection.
    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let mut rig = Rig::new(Host::AnswerOnceThenClose(ok), Some(caller(0)));
    rig.send(IMDS_GET);
    assert_eq!(rig.responses(1)[0].status, 200);
    let (first, _) = rig.upstream_request();
    std::thread::sleep(Duration::from_millis(50));
    let body = "<Health><State>Ready</State></Health>";
    rig.send(
        format!(
            "POST /machine?comp=health HTTP/1.1\r\nHost: 168.63.129.16\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let r = rig.responses(2);
    assert_eq!(r[1].status, 200, "{r:?}");
    let (second, up) = rig.upstream_request();
    assert!(up.ends_with(body) && first != second, "{up}");
    rig.finish();
}

#[test]
fn a_request_the_host_dropped_is_sent_again_only_if_idempotent() {
    // The host takes the request on its idle connection and closes without answering. A GET
    // or a PUT (with its body) is sent again once, on a fresh connection; a POST is not (the
    // host may have acted on it): 502, as nginx does.
    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let body = "log line";
    let put = format!("PUT /vmAgentLog?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let post = format!("POST /machine?comp=health HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    for (request, status, resent) in
        [(IMDS_GET.to_vec(), 200, true), (put.into_bytes(), 200, true), (post.into_bytes(), 502, false)]
    {
        let mut rig = Rig::new(Host::AnswerOnceThenDropNext(ok), Some(caller(0)));
        rig.send(IMDS_GET);
        assert_eq!(rig.responses(1)[0].status, 200);
        let (first, _) = rig.upstream_request();
        rig.send(&request);
        let r = rig.responses(2);
        let what = String::from_utf8_lossy(&request).into_owned();
        assert_eq!(r[1].status, status, "{what}");
        let (dropped, _) = rig.upstream_request();
        assert_eq!(dropped, first, "the request reached the idle connection first");
        if resent {
            let (again, up) = rig.upstream_request();
            assert_ne!(again, first, "{what}");
            let method = &what[..what.find(' ').expect("method")];
            assert!(up.starts_with(method) && (what.ends_with("\r\n\r\n") || up.ends_with(body)), "whole again: {up}");
        } else {
            assert!(rig.host.recv_timeout(Duration::from_millis(200)).is_err(), "{what} was sent again");
        }
        rig.finish();
    }
}

#[test]
fn a_streamed_body_cannot_smuggle_a_request_and_imds_streams_nothing() {
    // A bare LF ends the trailer line for many servers, not for the agent: refused (400)
    // before the bytes after it go up.
    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let mut rig = Rig::new(Host::Answer(ok), Some(hostga_caller(0)));
    rig.send(b"PUT /vmAgentLog HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\nX: a\n\nPOST /machine?comp=health HTTP/1.1\nHost: 168.63.129.16\nContent-Length: 2\n\r\n\r\n");
    assert_eq!(rig.responses(1)[0].status, 400);
    // The host got the head and never the end of the body: no request, let alone a second.
    assert!(rig.host.recv_timeout(Duration::from_millis(200)).is_err(), "the host read a request");
    rig.finish();
    // To IMDS the same target is an ordinary request: buffered, de-chunked, signed.
    let mut rig = Rig::new(Host::Answer(ok), Some(caller(1000)));
    rig.send(b"PUT /vmAgentLog HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nlog\r\n0\r\n\r\n");
    assert_eq!(rig.responses(1)[0].status, 200);
    let (_, up) = rig.upstream_request();
    assert!(up.contains("x-ms-azure-host-authorization:") && up.contains("content-length: 3"), "{up}");
    rig.finish();
}

#[test]
fn an_interim_response_is_not_taken_for_the_answer() {
    // `103 Early Hints` before the answer: the client gets the answer, and the next request
    // its own (not the first one's answer left on the upstream).
    // A `100 Continue` that arrives in the same read as the answer is dropped the same way.
    let answers: [&'static [u8]; 2] = [
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ];
    for answer in answers {
        let mut rig = Rig::new(Host::Answer(answer), Some(caller(0)));
        rig.send(IMDS_GET);
        rig.send(IMDS_GET);
        let r = rig.responses(2);
        let got: Vec<(u16, &[u8])> = r.iter().map(|r| (r.status, r.body.as_slice())).collect();
        assert_eq!(got, [(200, &b"ok"[..]), (200, &b"ok"[..])]);
        rig.finish();
    }
}

#[test]
fn an_upstream_that_carried_a_client_framed_body_is_not_kept() {
    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let mut rig = Rig::new(Host::Answer(ok), Some(hostga_caller(0)));
    rig.send(b"PUT /vmAgentLog HTTP/1.1\r\nHost: 168.63.129.16:32526\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nlog\r\n0\r\n\r\n");
    assert_eq!(rig.responses(1)[0].status, 200);
    rig.send(IMDS_GET);
    assert_eq!(rig.responses(2)[1].status, 200);
    let (first, _) = rig.upstream_request();
    let (second, _) = rig.upstream_request();
    assert_ne!(first, second, "not reused by the same client either");
    let gate = rig.finish();
    assert_eq!(gate.idle.len(), 1, "only the second upstream is kept");
}

#[test]
fn a_client_that_asks_to_close_is_told_so_while_the_upstream_is_kept() {
    // The client's `Connection: close` is its own hop's: the host answers keep-alive, the
    // client's answer says close, the connection ends, the upstream goes to the pool.
    let ok = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\ncontent-length: 2\r\n\r\nok";
    let mut rig = Rig::new(Host::Answer(ok), Some(caller(0)));
    rig.send(b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nConnection: close\r\n\r\n");
    let r = rig.responses(1);
    assert!(r[0].head.contains("x-ms-azure-host-authorization: value\r\nconnection: close\r\n"), "{}", r[0].head);
    let (_, up) = rig.upstream_request();
    assert!(!up.to_ascii_lowercase().contains("connection:"), "hop-by-hop went up: {up}");
    rig.run_until(|_| false);
    assert_eq!(rig.closed, Some(CloseReason::Done));
    assert_eq!(rig.finish().idle.len(), 1, "the upstream is kept");
}

#[test]
fn a_pipelined_post_is_judged_by_its_own_method_not_the_next_requests() {
    // A POST with a HEAD pipelined behind it: the host takes the POST and drops it. Whether it
    // may be sent again is the POST's to say (no), not the HEAD's that follows it in the buffer
    // (same length: read at the POST's offsets, the next request's bytes spell `HEAD`).
    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let mut rig = Rig::new(Host::AnswerOnceThenDropNext(ok), Some(caller(0)));
    rig.send(IMDS_GET);
    assert_eq!(rig.responses(1)[0].status, 200);
    drop(rig.upstream_request());
    let mut both = b"POST /machine?comp=health HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nonce".to_vec();
    both.extend_from_slice(
        b"HEAD /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\n\r\n",
    );
    rig.send(&both);
    let r = rig.responses(2);
    assert_eq!(r[1].status, 502, "{r:?}");
    let (_, dropped) = rig.upstream_request();
    assert!(dropped.starts_with("POST") && dropped.ends_with("once"), "{dropped}");
    assert!(rig.host.recv_timeout(Duration::from_millis(200)).is_err(), "the POST was sent again");
    rig.finish();
}

#[test]
fn a_new_connection_reuses_the_upstream_the_last_one_left() {
    let mut rig = Rig::new(Host::Answer(OK_JSON), Some(caller(1000)));
    rig.send(IMDS_GET);
    assert_eq!(rig.responses(1)[0].status, 200);
    let (first, _) = rig.upstream_request();
    // Another caller's connection: the idle upstream serves it (each request is endorsed on
    // its own), with its own claims.
    rig.reconnect(Some(caller(0)));
    rig.send(IMDS_GET);
    assert_eq!(rig.responses(1)[0].status, 200);
    let (second, up) = rig.upstream_request();
    assert_eq!(first, second, "the pooled upstream");
    assert!(up.contains("x-ms-azure-host-claims: { \"isRoot\": \"true\"}"), "{up}");
    let gate = rig.finish();
    assert_eq!(gate.idle.len(), 1, "parked again at the end");
    assert_eq!(gate.decisions(), [(200, "allow"), (200, "allow")]);
}

#[test]
fn every_state_answers_its_deadline() {
    // Idle before any byte: closed without an answer.
    let mut rig = Rig::new(Host::Answer(OK_JSON), Some(caller(0)));
    rig.drive(false, gpa::clock::now());
    let deadline = rig.conn.as_ref().map(Connection::deadline).expect("open");
    rig.drive(true, deadline);
    assert_eq!(rig.closed, Some(CloseReason::Idle));
    assert!(rig.finish().records.is_empty());

    // A partial head: 408.
    let mut rig = Rig::new(Host::Answer(OK_JSON), Some(caller(0)));
    rig.send(b"GET /metadata/instance HTTP/1.1\r\nHost: x\r\n");
    rig.run_until(|_| false_after_one_turn());
    rig.expire();
    assert_eq!(parse_responses(&rig.seen)[0].status, 408);
    rig.finish();

    // Mid-body: 408, the body buffer back.
    let mut rig = Rig::new(Host::Answer(OK_JSON), Some(caller(0)));
    rig.send(b"POST /machine?comp=health HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc");
    rig.run_until(|_| false_after_one_turn());
    assert_eq!(rig.gate.bodies_out, 1, "the body holds a buffer");
    rig.expire();
    assert_eq!(parse_responses(&rig.seen)[0].status, 408);
    assert_eq!(rig.finish().decisions(), [(408, "allow")]);

    // Held for the key: 429 with when to retry.
    let mut rig = Rig::with_gate(Host::Answer(OK_JSON), Some(caller(0)), |g| g.keying = Keying::NotReady);
    rig.send(IMDS_GET);
    rig.run_until(|_| false_after_one_turn());
    assert!(rig.conn.as_ref().is_some_and(Connection::is_held_for_key));
    rig.expire();
    let r = parse_responses(&rig.seen);
    assert_eq!(r[0].status, 429);
    assert!(r[0].head.contains("retry-after: 1"), "{}", r[0].head);
    let gate = rig.finish();
    assert!(gate.held >= 1);

    // The host silent: 504, its upstream share back.
    let mut rig = Rig::new(Host::Silent, Some(caller(0)));
    rig.send(IMDS_GET);
    rig.run_until(|_| false_after_one_turn());
    drop(rig.upstream_request());
    assert_eq!(rig.gate.upstreams_out, 1);
    rig.expire();
    assert_eq!(parse_responses(&rig.seen)[0].status, 504);
    assert_eq!(rig.finish().decisions(), [(504, "error")]);

    // A streamed (skip-listed) body that stops: 408, the upstream share back.
    let mut rig = Rig::new(Host::Silent, Some(hostga_caller(0)));
    rig.send(
        b"PUT /vmAgentLog HTTP/1.1\r\nHost: 168.63.129.16:32526\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nlog!\r\n",
    );
    rig.run_until(|_| false_after_one_turn());
    rig.expire();
    assert_eq!(parse_responses(&rig.seen)[0].status, 408);
    rig.finish();

    // A response that stops mid-body: the connection ends (the client sees it truncated).
    let mut rig = Rig::new(Host::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten.."), Some(caller(0)));
    rig.send(IMDS_GET);
    rig.run_until(|seen| seen.ends_with(b"only ten.."));
    let deadline = rig.conn.as_ref().map(Connection::deadline).expect("open");
    rig.drive(true, deadline);
    assert_eq!(rig.closed, Some(CloseReason::Timeout));
    // Cut by its deadline, the request still leaves its record.
    assert_eq!(rig.finish().decisions(), [(0, "abandoned")]);
}

/// A `run_until` condition that lets one turn of driving happen and then stops (the state
/// machine blocks on its own).
fn false_after_one_turn() -> bool {
    std::thread::sleep(Duration::from_millis(20));
    true
}

#[test]
fn every_refusal_has_its_status_and_gives_everything_back() {
    type Setup = fn(&mut FakeGate);
    /// The request, the caller's uid (none: no identity), the gate, the status, the audit word.
    type Case = (&'static [u8], Option<u32>, Setup, u16, &'static str);
    let none: Setup = |_| {};
    let cases: &[Case] = &[
        (b"GET / HTTP/1.1\r\nHost x\r\n\r\n", Some(0), none, 400, ""),
        (b"CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: x\r\n\r\n", Some(0), none, 405, ""),
        (b"GET /metadata/instance#x HTTP/1.1\r\nHost: x\r\n\r\n", Some(0), none, 400, "target-fragment"),
        (b"GET /metadata/instance/%2e%2e/x HTTP/1.1\r\nHost: x\r\n\r\n", Some(0), none, 400, "target-dot-segment"),
        (IMDS_GET, None, none, 421, "no-identity"),
        (
            b"POST /machine?comp=health HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n",
            Some(0),
            none,
            413,
            "refused",
        ),
        (IMDS_GET, Some(1000), |g| g.verdict = Verdict::Forbidden, 403, "deny"),
        (
            b"POST /machine?comp=health HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            Some(1000),
            |g| g.bodies_left = 0,
            503,
            "error",
        ),
        (IMDS_GET, Some(1000), |g| g.upstreams_left = 0, 503, "error"),
        (IMDS_GET, Some(0), |g| g.fail_connect = true, 502, "error"),
    ];
    for &(request, uid, setup, status, decision) in cases {
        let mut rig = Rig::with_gate(Host::Answer(OK_JSON), uid.map(caller), setup);
        rig.send(request);
        let r = rig.responses(1);
        let what = String::from_utf8_lossy(request);
        assert_eq!(r[0].status, status, "{what}");
        assert!(r[0].head.contains("connection: close"), "{what}: {}", r[0].head);
        if status == 405 {
            assert!(r[0].head.contains("allow: GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"), "{}", r[0].head);
        }
        let gate = rig.finish();
        let recorded: Vec<&str> = gate.records.iter().map(|e| e.decision.as_str()).collect();
        if decision.is_empty() {
            assert!(recorded.is_empty() || recorded == ["refused"], "{what}: {recorded:?}");
        } else {
            assert_eq!(recorded, [decision], "{what}");
        }
    }
    // A head that fills the request buffer: 431.
    let mut rig = Rig::new(Host::Answer(OK_JSON), Some(caller(0)));
    let mut big = b"GET /metadata/instance HTTP/1.1\r\nX-Pad: ".to_vec();
    big.resize(gpa::limits::REQUEST_HEAD_MAX_BYTES + 10, b'a');
    rig.send(&big);
    assert_eq!(rig.responses(1)[0].status, 431);
    rig.finish();
    // An upstream that answers garbage: 502.
    let mut rig = Rig::new(Host::Answer(b"SMTP ready\r\n\r\n"), Some(caller(0)));
    rig.send(IMDS_GET);
    assert_eq!(rig.responses(1)[0].status, 502);
    assert_eq!(rig.finish().decisions(), [(502, "error")]);
}

#[test]
fn a_local_endpoint_is_answered_without_identity_and_keeps_the_connection() {
    let mut rig = Rig::new(Host::Answer(OK_JSON), None);
    rig.send(b"GET /provision HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\n\r\nGET /provision HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\n\r\n");
    let r = rig.responses(2);
    assert_eq!(r.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 200]);
    assert_eq!(r[0].body, b"{\"finished\":true}");
    assert!(!r[0].head.contains("connection: close"), "{}", r[0].head);
    assert_eq!(rig.finish().decisions(), [(200, "local"), (200, "local")]);
}

#[test]
fn a_draining_agent_answers_and_closes() {
    let mut rig = Rig::with_gate(Host::Answer(OK_JSON), Some(caller(0)), |g| g.draining = true);
    rig.send(IMDS_GET);
    let r = rig.responses(1);
    assert!(r[0].head.contains("x-ms-azure-host-authorization: value\r\nconnection: close"), "{}", r[0].head);
    rig.run_until(|_| false);
    assert_eq!(rig.closed, Some(CloseReason::Done));
    rig.finish();
}

#[test]
fn a_client_that_leaves_mid_request_is_audited_as_abandoned() {
    let mut rig = Rig::new(Host::Answer(OK_JSON), Some(caller(0)));
    rig.send(b"POST /machine?comp=health HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc");
    rig.run_until(|_| false_after_one_turn());
    rig.client.shutdown(std::net::Shutdown::Both).expect("shutdown");
    rig.run_until(|_| false);
    assert_eq!(rig.closed, Some(CloseReason::ClientClosed));
    let gate = rig.finish();
    assert_eq!(gate.records.iter().map(|e| e.decision).collect::<Vec<_>>(), [Decision::Abandoned]);
}
