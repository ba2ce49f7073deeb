// SPDX-License-Identifier: MIT
//! A faithful fake MSP host: WireServer, HostGAPlugin and IMDS in one process, for the agent's
//! system tests and demo. Read `msp-protocol.md` §1–§3 and Appendix A first.
//!
//! It is an *independent oracle*: the signature check in [`signing`] is written from the spec,
//! not shared with the agent, so a signing bug in the agent cannot be mirrored here.
//!
//! Map of the module:
//! - `http`: reads requests exactly as they arrived (raw headers in order, de-chunked body) and
//!   writes responses (always with `Content-Length`).
//! - [`signing`]: string-to-sign, canonical query, HMAC verification (public, so tests can sign).
//! - `state`: live settings, issued keys, counters and the request log behind one mutex.
//! - `handlers`: secure-channel API, data answers with per-endpoint enforcement, control API.
//! - this file: CLI, listeners, one thread per connection, and [`FakeHost`] for in-process use.
//!
//! Threads rather than an event loop: this is test tooling that serves a handful of
//! connections, where plain blocking code is easiest to trust.

pub mod signing;

mod handlers;
mod http;
mod state;

use std::collections::HashMap;
use std::io::{self, BufReader, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;
use std::{fmt, fs};

use serde_json::{Value, json};

pub use state::{Endpoint, Mode, StatusVersion};

use http::{HttpError, Response};
use state::{Settings, State};

/// How long `shutdown` waits to wake an accept loop with a self-connection.
const WAKE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

const USAGE: &str = "usage: fake-host [--imds ADDR] [--wireserver ADDR] [--hostga ADDR] --control ADDR \
[--mode enforce|audit|disabled] [--version 1.0|2.0] [--rules FILE]
       fake-host ovf-env --provision-guest-proxy-agent true|false   (print the provisioning media's ovf-env.xml)";

/// What to listen on and how to start.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeHostConfig {
    /// IMDS listener, e.g. `169.254.169.254:80`; `None` = not served.
    pub imds: Option<SocketAddr>,
    /// WireServer listener (also serves the secure-channel API), e.g. `168.63.129.16:80`.
    pub wireserver: Option<SocketAddr>,
    /// HostGAPlugin listener, e.g. `168.63.129.16:32526`.
    pub hostga: Option<SocketAddr>,
    /// Control API listener (keep it on loopback).
    pub control: SocketAddr,
    /// Initial mode of all three endpoints.
    pub mode: Mode,
    /// Status document schema.
    pub version: StatusVersion,
    /// Custom `authorizationRules` object; `None` = default allow items.
    pub rules: Option<Value>,
}

impl FakeHostConfig {
    /// All four listeners on ephemeral loopback ports, enforce mode, schema 2.0.
    pub fn loopback() -> Self {
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        Self {
            imds: Some(any),
            wireserver: Some(any),
            hostga: Some(any),
            control: any,
            mode: Mode::Enforce,
            version: StatusVersion::V2,
            rules: None,
        }
    }
}

/// The addresses actually bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundAddrs {
    pub imds: Option<SocketAddr>,
    pub wireserver: Option<SocketAddr>,
    pub hostga: Option<SocketAddr>,
    pub control: SocketAddr,
}

impl BoundAddrs {
    /// The one-line readiness report the binary prints, keys in a fixed order so scripts can
    /// also match it textually.
    pub fn ready_line(&self) -> String {
        let addr = |a: Option<SocketAddr>| a.map_or_else(|| "null".to_owned(), |a| format!("\"{a}\""));
        format!(
            r#"{{"ready":true,"imds":{},"wireserver":{},"hostga":{},"control":"{}"}}"#,
            addr(self.imds),
            addr(self.wireserver),
            addr(self.hostga),
            self.control
        )
    }
}

/// Why the fake host could not start.
#[derive(Debug)]
pub enum FakeHostError {
    /// Bad command line; the text says what.
    Usage(String),
    /// `--rules FILE` could not be read.
    ReadRules(String, io::Error),
    /// `--rules FILE` is not a JSON object.
    ParseRules(String, String),
    /// A listener could not be bound (typically: the port is busy).
    BindListener(&'static str, SocketAddr, io::Error),
    /// An accept thread could not be started.
    SpawnThread(io::Error),
}

impl fmt::Display for FakeHostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Usage(why) => write!(f, "{why}\n{USAGE}"),
            Self::ReadRules(path, e) => write!(f, "cannot read rules file {path}: {e}"),
            Self::ParseRules(path, why) => {
                write!(f, "rules file {path} is not a JSON object: {why}")
            }
            Self::BindListener(name, addr, e) => {
                write!(f, "cannot bind {name} listener on {addr}: {e}")
            }
            Self::SpawnThread(e) => write!(f, "cannot start accept thread: {e}"),
        }
    }
}

impl std::error::Error for FakeHostError {}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Endpoint(Endpoint),
    Control,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Self::Endpoint(e) => e.as_str(),
            Self::Control => "control",
        }
    }
}

/// State shared by every thread.
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Live connections, so `down` and shutdown can close them at once.
    conns: Mutex<HashMap<u64, (Role, TcpStream)>>,
    next_conn: AtomicU64,
    stopping: AtomicBool,
    addrs: BoundAddrs,
}

impl Shared {
    /// Locks the state. A panicking handler cannot leave it half-updated in a way that matters
    /// to a test fake, so poisoning is ignored rather than cascading into every thread.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<u64, (Role, TcpStream)>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, role: Role, stream: &TcpStream) -> Option<u64> {
        let clone = stream.try_clone().ok()?;
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.conns().insert(id, (role, clone));
        Some(id)
    }

    fn unregister(&self, id: Option<u64>) {
        if let Some(id) = id {
            self.conns().remove(&id);
        }
    }

    /// Closes every WireServer/HostGAPlugin/IMDS connection (the `down` switch). The control
    /// API stays reachable so the test can bring the host back.
    pub(crate) fn drop_endpoint_connections(&self) {
        self.close_connections(|role| matches!(role, Role::Endpoint(_)));
    }

    fn close_connections(&self, select: impl Fn(Role) -> bool) {
        for (role, stream) in self.conns().values() {
            if select(*role) {
                // Wakes the connection's blocked read with EOF; its thread then exits. An error
                // means it is already closed.
                stream.shutdown(Shutdown::Both).ok();
            }
        }
    }
}

/// A running fake host. Dropping it (or [`FakeHost::shutdown`]) closes the listeners and all
/// connections, so a test can start another one on the same addresses.
#[derive(Debug)]
pub struct FakeHost {
    shared: Arc<Shared>,
    accept_threads: Vec<(SocketAddr, JoinHandle<()>)>,
}

impl FakeHost {
    /// Binds every listener (failing before serving anything if one is busy), then serves each
    /// on its own accept thread. Returns once all are accepting.
    pub fn start(config: FakeHostConfig) -> Result<Self, FakeHostError> {
        let bind = |name: &'static str, addr: SocketAddr| {
            TcpListener::bind(addr)
                .and_then(|l| Ok((l.local_addr()?, l)))
                .map_err(|e| FakeHostError::BindListener(name, addr, e))
        };
        let mut listeners = Vec::new();
        let mut bound = |role: Role, addr: Option<SocketAddr>| -> Result<Option<SocketAddr>, FakeHostError> {
            let Some(addr) = addr else { return Ok(None) };
            let (local, listener) = bind(role.name(), addr)?;
            listeners.push((role, local, listener));
            Ok(Some(local))
        };
        let imds = bound(Role::Endpoint(Endpoint::Imds), config.imds)?;
        let wireserver = bound(Role::Endpoint(Endpoint::WireServer), config.wireserver)?;
        let hostga = bound(Role::Endpoint(Endpoint::HostGa), config.hostga)?;
        let control = bound(Role::Control, Some(config.control))?.unwrap_or(config.control);
        let addrs = BoundAddrs { imds, wireserver, hostga, control };

        let settings = Settings::new(config.mode, config.version, config.rules);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(settings)),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            addrs,
        });
        let mut host = Self { shared, accept_threads: Vec::new() };
        for (role, local, listener) in listeners {
            let shared = Arc::clone(&host.shared);
            let handle = thread::Builder::new()
                .name(format!("fake-{}-accept", role.name()))
                .spawn(move || accept_loop(&listener, &shared, role))
                .map_err(FakeHostError::SpawnThread)?;
            host.accept_threads.push((local, handle));
        }
        Ok(host)
    }

    /// The bound addresses.
    pub fn addrs(&self) -> BoundAddrs {
        self.shared.addrs
    }

    /// Stops accepting, closes every connection and waits for the accept threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.close_connections(|_| true);
        for (addr, handle) in self.accept_threads.drain(..) {
            // A blocking accept only notices `stopping` when a connection arrives: make one.
            let target =
                if addr.ip().is_unspecified() { SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port())) } else { addr };
            if TcpStream::connect_timeout(&target, WAKE_CONNECT_TIMEOUT).is_ok() {
                handle.join().ok();
            }
        }
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, role: Role) {
    for incoming in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match incoming {
            Ok(stream) => stream,
            Err(e) => {
                eprintln!("fake-host: accept failed: listener={} error={e}", role.name());
                // Typically EMFILE; back off instead of spinning.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if role != Role::Control && shared.lock().settings.down {
            // Host down: the connection is accepted by the kernel already; close it unanswered.
            drop(stream);
            continue;
        }
        let conn_shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name(format!("fake-{}-conn", role.name()))
            .spawn(move || serve_connection(&conn_shared, role, stream));
        if let Err(e) = spawned {
            eprintln!("fake-host: cannot spawn connection thread: listener={} error={e}", role.name());
        }
    }
}

fn serve_connection(shared: &Shared, role: Role, stream: TcpStream) {
    let Ok(peer) = stream.peer_addr() else { return };
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let id = shared.register(role, &stream);
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    loop {
        let request = match http::read_request(&mut reader) {
            Ok(Some(request)) => request,
            Ok(None) | Err(HttpError::Io(_)) => break,
            Err(e @ HttpError::Malformed(_)) => {
                eprintln!("fake-host: bad request: listener={} peer={peer} {e}", role.name());
                let response = Response::json(400, &json!({"error": e.to_string()}));
                http::write_response(&mut writer, &response, false, true, false).ok();
                break;
            }
        };
        let response = match role {
            Role::Endpoint(endpoint) => match handlers::handle_endpoint(shared, endpoint, peer, &request) {
                Some(response) => response,
                None => break,
            },
            Role::Control => handlers::handle_control(shared, &request),
        };
        let keep_alive = request.keep_alive() && !shared.stopping.load(Ordering::SeqCst);
        let head_only = request.method == "HEAD";
        let http10_keep_alive = keep_alive && request.version == "HTTP/1.0";
        if http::write_response(&mut writer, &response, head_only, !keep_alive, http10_keep_alive).is_err()
            || !keep_alive
        {
            break;
        }
    }
    writer.shutdown(Shutdown::Both).ok();
    shared.unregister(id);
}

/// Parses the command line (without the program name). `Ok(None)` means `--help` was asked.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<FakeHostConfig>, FakeHostError> {
    let usage = |why: String| FakeHostError::Usage(why);
    let addr = |flag: &str, value: &str| {
        value.parse::<SocketAddr>().map_err(|e| usage(format!("{flag}: invalid address {value:?}: {e}")))
    };
    let mut config = FakeHostConfig {
        imds: None,
        wireserver: None,
        hostga: None,
        control: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        mode: Mode::Enforce,
        version: StatusVersion::V2,
        rules: None,
    };
    let mut control = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(None);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value.to_owned())),
            _ => (arg.clone(), None),
        };
        if !matches!(
            flag.as_str(),
            "--imds" | "--wireserver" | "--hostga" | "--control" | "--mode" | "--version" | "--rules"
        ) {
            return Err(usage(format!("unknown argument {arg:?}")));
        }
        let Some(value) = inline.or_else(|| args.next()) else {
            return Err(usage(format!("{flag} needs a value")));
        };
        match flag.as_str() {
            "--imds" => config.imds = Some(addr(&flag, &value)?),
            "--wireserver" => config.wireserver = Some(addr(&flag, &value)?),
            "--hostga" => config.hostga = Some(addr(&flag, &value)?),
            "--control" => control = Some(addr(&flag, &value)?),
            "--mode" => {
                config.mode = Mode::parse(&value)
                    .ok_or_else(|| usage(format!("--mode: expected enforce, audit or disabled, got {value:?}")))?;
            }
            "--version" => {
                config.version = StatusVersion::parse(&value)
                    .ok_or_else(|| usage(format!("--version: expected 1.0 or 2.0, got {value:?}")))?;
            }
            _ => config.rules = Some(read_rules(&value)?),
        }
    }
    config.control = control.ok_or_else(|| usage("--control is required".to_owned()))?;
    Ok(Some(config))
}

fn read_rules(path: &str) -> Result<Value, FakeHostError> {
    let text = fs::read(path).map_err(|e| FakeHostError::ReadRules(path.to_owned(), e))?;
    match serde_json::from_slice::<Value>(&text) {
        Ok(rules @ Value::Object(_)) => Ok(rules),
        Ok(_) => Err(FakeHostError::ParseRules(path.to_owned(), "not an object".to_owned())),
        Err(e) => Err(FakeHostError::ParseRules(path.to_owned(), e.to_string())),
    }
}

/// The `fake-host` binary: parse, bind everything, print the ready line, serve until killed.
/// Exit codes: 1 = cannot start (e.g. busy port), 2 = usage error.
pub fn run(args: impl IntoIterator<Item = String>) -> ExitCode {
    let args: Vec<String> = args.into_iter().collect();
    if args.first().map(String::as_str) == Some("ovf-env") {
        return print_ovf_environment(&args[1..]);
    }
    let config = match parse_args(args) {
        Ok(Some(config)) => config,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("fake-host: {e}");
            return ExitCode::from(2);
        }
    };
    let host = match FakeHost::start(config) {
        Ok(host) => host,
        Err(e) => {
            eprintln!("fake-host: {e}");
            return ExitCode::from(1);
        }
    };
    let mut stdout = io::stdout().lock();
    if writeln!(stdout, "{}", host.addrs().ready_line()).and_then(|()| stdout.flush()).is_err() {
        eprintln!("fake-host: cannot write the ready line to stdout");
        return ExitCode::from(1);
    }
    drop(stdout);
    // Serve until killed; the accept threads do the work.
    loop {
        thread::park();
    }
}

/// `fake-host ovf-env --provision-guest-proxy-agent true|false`: the OVF environment of the
/// VM this fake describes, for a boot test's provisioning media.
fn print_ovf_environment(args: &[String]) -> ExitCode {
    let flag = match args {
        [name, value] if name == "--provision-guest-proxy-agent" => match value.as_str() {
            "true" => true,
            "false" => false,
            _ => {
                eprintln!("fake-host: --provision-guest-proxy-agent: expected true or false, got {value:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("fake-host: ovf-env needs --provision-guest-proxy-agent true|false\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    print!("{}", handlers::ovf_environment(flag));
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// A parsed response.
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }

        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).expect("JSON body")
        }
    }

    /// Reads one response off `stream` (always framed by Content-Length here).
    fn read_reply(stream: &mut TcpStream) -> Reply {
        read_reply_to(stream, false)
    }

    /// As [`read_reply`]; after a HEAD request the body is absent despite Content-Length.
    fn read_reply_to(stream: &mut TcpStream, head_only: bool) -> Reply {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(stream.read(&mut byte).unwrap(), 1, "connection closed mid-head");
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(": ").unwrap();
                (n.to_owned(), v.to_owned())
            })
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "Content-Length")
            .map(|(_, v)| v.parse().unwrap())
            .expect("Content-Length on every response");
        let mut body = vec![0u8; if head_only { 0 } else { length }];
        stream.read_exact(&mut body).unwrap();
        Reply { status, headers, body }
    }

    fn connect(addr: SocketAddr) -> TcpStream {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream
    }

    /// Sends a request with `headers` (plus content-length), optionally signed with
    /// `(guid, key)` exactly as the agent signs, on a fresh connection.
    fn send(
        addr: SocketAddr,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        sign_with: Option<(&str, &[u8])>,
    ) -> Reply {
        let mut all: Vec<(String, String)> = headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
        all.push(("content-length".to_owned(), body.len().to_string()));
        if let Some((guid, key)) = sign_with {
            let sts = signing::string_to_sign(method, body, &all, target);
            all.push((signing::AUTHORIZATION_HEADER.to_owned(), signing::authorization_value(guid, key, &sts)));
        }
        let mut raw = format!("{method} {target} HTTP/1.1\r\n");
        for (n, v) in &all {
            raw.push_str(&format!("{n}: {v}\r\n"));
        }
        raw.push_str("\r\n");
        let mut bytes = raw.into_bytes();
        bytes.extend_from_slice(body);
        let mut stream = connect(addr);
        stream.write_all(&bytes).unwrap();
        read_reply(&mut stream)
    }

    fn control(host: &FakeHost, patch: &Value) -> Reply {
        send(host.addrs().control, "POST", "/control", &[], patch.to_string().as_bytes(), None)
    }

    fn get_json(host: &FakeHost, path: &str) -> Value {
        let reply = send(host.addrs().control, "GET", path, &[], b"", None);
        assert_eq!(reply.status, 200);
        reply.json()
    }

    const AGENT_HEADERS: &[(&str, &str)] = &[
        ("metadata", "True "),
        ("x-ms-azure-host-date", "Wed, 23 Apr 2025 12:00:00 GMT"),
        ("host", "168.63.129.16"),
        ("x-ms-azure-host-claims", "{ \"isRoot\": \"true\"}"),
    ];

    #[test]
    fn latch_attest_and_enforce_end_to_end() {
        let host = FakeHost::start(FakeHostConfig::loopback()).unwrap();
        let ws = host.addrs().wireserver.unwrap();
        let imds = host.addrs().imds.unwrap();

        let status = send(ws, "GET", "/secure-channel/status", AGENT_HEADERS, b"", None);
        assert_eq!(status.status, 200);
        assert_eq!(status.header("Content-Type"), Some("application/json; charset=utf-8"));
        assert!(status.header("x-ms-azure-host-date").unwrap().ends_with(" GMT"));
        let doc = status.json();
        assert_eq!(doc["keyGuid"], Value::Null);
        assert_eq!(doc["version"], "2.0");
        assert_eq!(doc["authorizationRules"]["imds"]["mode"], "enforce");

        let acquire_body = br#"{"authorizationScheme": "Azure-HMAC-SHA256"}"#;
        let key_doc = send(ws, "POST", "/secure-channel/key", AGENT_HEADERS, acquire_body, None).json();
        let guid = key_doc["guid"].as_str().unwrap().to_owned();
        let key = signing::decode_hex(key_doc["key"].as_str().unwrap().as_bytes()).unwrap();
        assert_eq!(key.len(), 32);
        assert_eq!(key_doc["issued"], "2021-05-05T 12:00:00Z");
        assert_eq!(get_json(&host, "/keys")[&guid], key_doc["key"]);

        let attest = format!("/secure-channel/key/{guid}/key-attestation");
        let wrong_key = [0x11u8; 32];
        let rejected = send(ws, "POST", &attest, AGENT_HEADERS, b"", Some((&guid, &wrong_key)));
        assert_eq!(rejected.status, 401);
        let accepted = send(ws, "POST", &attest, AGENT_HEADERS, b"", Some((&guid, &key)));
        assert_eq!(accepted.status, 200);

        let status = send(ws, "GET", "/secure-channel/status", AGENT_HEADERS, b"", None);
        assert_eq!(status.json()["keyGuid"], guid.as_str());

        let goal_headers = &[("x-ms-version", "2012-11-30"), ("host", "168.63.129.16")];
        let unsigned = send(ws, "GET", "/machine?comp=goalstate", goal_headers, b"", None);
        assert_eq!(unsigned.status, 401);
        assert_eq!(unsigned.json(), json!({"error": "unsigned or invalid signature"}));
        let signed = send(ws, "GET", "/machine?comp=goalstate", goal_headers, b"", Some((&guid, &key)));
        assert_eq!(signed.status, 200);
        assert_eq!(signed.header("Content-Type"), Some("text/xml; charset=utf-8"));
        let xml = String::from_utf8(signed.body).unwrap();
        assert!(xml.contains(&format!("<SharedConfig>http://{ws}/machine/")), "{xml}");

        assert_eq!(control(&host, &json!({"mode": "audit"})).json()["imdsMode"], "audit");
        let instance =
            send(imds, "GET", "/metadata/instance?api-version=2021-02-01", &[("metadata", "true")], b"", None);
        assert_eq!(instance.status, 200);
        assert_eq!(instance.json()["compute"]["location"], "eastus");

        let log = get_json(&host, "/requests");
        let log = log.as_array().unwrap();
        let summary: Vec<(&str, &str, &str, u64)> = log
            .iter()
            .map(|r| {
                (
                    r["endpoint"].as_str().unwrap(),
                    r["target"].as_str().unwrap(),
                    r["signature"].as_str().unwrap(),
                    r["status"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("wireserver", "/secure-channel/status", "missing", 200),
                ("wireserver", "/secure-channel/key", "missing", 200),
                ("wireserver", attest.as_str(), "invalid:signature-mismatch", 401),
                ("wireserver", attest.as_str(), "valid", 200),
                ("wireserver", "/secure-channel/status", "missing", 200),
                ("wireserver", "/machine?comp=goalstate", "missing", 401),
                ("wireserver", "/machine?comp=goalstate", "valid", 200),
                ("imds", "/metadata/instance?api-version=2021-02-01", "missing", 200),
            ]
        );
        let seqs: Vec<u64> = log.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
        assert_eq!(log[0]["headers"][0], json!(["metadata", "True "]));
        assert_eq!(log[0]["version"], "HTTP/1.1");
        assert_eq!(log[1]["bodyLength"], 44);
        assert_eq!(log[6]["keyGuid"], guid.as_str());

        let stats = get_json(&host, "/stats");
        assert_eq!(stats["statusCalls"], 2);
        assert_eq!(stats["acquireCalls"], 1);
        assert_eq!(stats["attestCalls"], 2);
        assert_eq!(stats["attestFailures"], 1);
        assert_eq!(stats["currentKeyGuid"], guid.as_str());
        assert_eq!(stats["issuedKeys"], json!([guid]));

        assert_eq!(send(host.addrs().control, "POST", "/reset-requests", &[], b"", None).status, 200);
        assert_eq!(get_json(&host, "/requests"), json!([]));
        host.shutdown();
    }

    #[test]
    fn keep_alive_chunked_and_head_on_one_connection() {
        let host = FakeHost::start(FakeHostConfig { mode: Mode::Disabled, ..FakeHostConfig::loopback() }).unwrap();
        let mut stream = connect(host.addrs().hostga.unwrap());
        stream
            .write_all(b"POST /echo HTTP/1.1\r\nHost: 168.63.129.16\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            .unwrap();
        let echo = read_reply(&mut stream).json();
        assert_eq!(echo["endpoint"], "hostga");
        assert_eq!(echo["body"], "abcde");
        stream.write_all(b"HEAD /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").unwrap();
        let head = read_reply_to(&mut stream, true);
        assert_eq!(head.status, 200);
        assert_ne!(head.header("Content-Length"), Some("0"), "states the GET body size");
        assert_eq!(head.header("Connection"), Some("close"));
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "no body after a HEAD response, then EOF");
        assert_eq!(get_json(&host, "/requests")[0]["bodyLength"], 5);
    }

    #[test]
    fn failure_injection_knobs() {
        let host =
            FakeHost::start(FakeHostConfig { version: StatusVersion::V1, ..FakeHostConfig::loopback() }).unwrap();
        let ws = host.addrs().wireserver.unwrap();
        let status =
            |host: &FakeHost| send(host.addrs().wireserver.unwrap(), "GET", "/secure-channel/status", &[], b"", None);

        assert_eq!(status(&host).json()["secureChannelState"], "WireserverAndImds");
        control(&host, &json!({"statusHttpStatus": 500}));
        assert_eq!(status(&host).status, 500);
        control(
            &host,
            &json!({"statusHttpStatus": 0, "malformedStatus": true, "statusContentType": "text/plain", "noHostDate": true}),
        );
        let malformed = status(&host);
        assert_eq!(malformed.body, br#"{"version": "2.0", "#);
        assert_eq!(malformed.header("Content-Type"), Some("text/plain"));
        assert_eq!(malformed.header("x-ms-azure-host-date"), None);
        control(
            &host,
            &json!({"malformedStatus": false, "statusContentType": null, "keyGuidOverride": "abc", "version": "2.0", "secureChannelEnabled": false}),
        );
        let doc = status(&host).json();
        assert_eq!(doc["keyGuid"], "abc");
        assert_eq!(doc["authorizationRules"], Value::Null);

        control(&host, &json!({"acquireHttpStatus": 403}));
        let acquire = send(ws, "POST", "/secure-channel/key", &[], b"{}", None);
        assert_eq!(acquire.status, 403);
        assert_eq!(get_json(&host, "/stats")["acquireBodyMismatches"], 1);

        let bad = control(&host, &json!({"mode": "strict"}));
        assert_eq!(bad.status, 400);

        // Down: an open keep-alive connection is closed without an answer; control still works.
        let mut idle = connect(ws);
        control(&host, &json!({"down": true}));
        idle.write_all(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n").ok();
        let mut buf = Vec::new();
        assert!(idle.read_to_end(&mut buf).map_or(true, |_| buf.is_empty()));
        control(&host, &json!({"down": false}));
        assert_eq!(status(&host).status, 200);
    }

    /// The goal state and health report as cloud-init's Azure datasource sends them
    /// (`/machine/?comp=goalstate`, `/machine?comp=health` with its report XML).
    #[test]
    fn provisioning_goal_state_and_health_reports_as_cloud_init_sends_them() {
        let host = FakeHost::start(FakeHostConfig { mode: Mode::Audit, ..FakeHostConfig::loopback() }).unwrap();
        let ws = host.addrs().wireserver.unwrap();
        let headers = &[("x-ms-agent-name", "WALinuxAgent"), ("x-ms-version", "2012-11-30")];
        let goal = send(ws, "GET", "/machine/?comp=goalstate", headers, b"", None);
        assert_eq!(goal.status, 200);
        let xml = String::from_utf8(goal.body).unwrap();
        assert!(xml.contains("<ContainerId>a8016240-7286-49ef-8981-63520cb8f6d0</ContainerId>"), "{xml}");
        let report = |state: &str, detail: &str, container: &str| {
            format!(
                "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Health><GoalStateIncarnation>1</GoalStateIncarnation>\
                 <Container><ContainerId>{container}</ContainerId><RoleInstanceList><Role>\
                 <InstanceId>fake-deployment.fake-vm_IN_0</InstanceId><Health><State>{state}</State>{detail}\
                 </Health></Role></RoleInstanceList></Container></Health>"
            )
        };
        let post = |body: String| {
            let headers = &[("x-ms-version", "2012-11-30"), ("content-type", "text/xml; charset=utf-8")];
            send(ws, "POST", "/machine?comp=health", headers, body.as_bytes(), None).status
        };
        let container = "a8016240-7286-49ef-8981-63520cb8f6d0";
        assert_eq!(post(report("Ready", "", container)), 200);
        let failed =
            "<Details><SubStatus>ProvisioningFailed</SubStatus><Description>proxy agent</Description></Details>";
        assert_eq!(post(report("NotReady", failed, container)), 200);
        assert_eq!(post(report("Ready", "", "00000000-0000-0000-0000-000000000000")), 400);
        let stats = get_json(&host, "/stats");
        assert_eq!((stats["readyReports"].as_u64(), stats["notReadyReports"].as_u64()), (Some(1), Some(1)));
        assert_eq!(stats["rejectedHealthReports"], 1);
        let records = get_json(&host, "/requests");
        let notes: Vec<&str> = records.as_array().unwrap().iter().filter_map(|r| r["note"].as_str()).collect();
        assert!(notes.contains(&"health NotReady ProvisioningFailed: proxy agent"), "{notes:?}");

        // Enforce: an unsigned report is refused like any other WireServer request.
        control(&host, &json!({"mode": "enforce"}));
        assert_eq!(post(report("Ready", "", container)), 401);
        assert_eq!(get_json(&host, "/stats")["readyReports"], 1);
    }

    #[test]
    fn the_ovf_environment_names_the_imds_documents_vm_and_carries_the_proxy_agent_flag() {
        for flag in [true, false] {
            let ovf = handlers::ovf_environment(flag);
            assert!(ovf.contains(&format!("<ns1:ProvisionGuestProxyAgent>{flag}</ns1:ProvisionGuestProxyAgent>")));
            assert!(ovf.contains("<ns1:HostName>fake-vm</ns1:HostName>") && ovf.contains("<ns1:UserName>azureuser<"));
        }
    }

    #[test]
    fn telemetry_upload_is_unsigned_answered_empty_and_recorded_with_failures_on_demand() {
        let host = FakeHost::start(FakeHostConfig::loopback()).unwrap();
        let body = br#"<?xml version="1.0"?><TelemetryData version="1.0"></TelemetryData>"#;
        let headers = &[("x-ms-version", "2012-11-30"), ("content-type", "text/xml; charset=utf-8")];
        let upload = |host: &FakeHost| {
            send(host.addrs().wireserver.unwrap(), "POST", "/machine/?comp=telemetrydata", headers, body, None)
        };
        // Enforce mode, unsigned: accepted (spec §3.7 skip list).
        let ok = upload(&host);
        assert_eq!((ok.status, ok.body.len()), (200, 0));
        control(&host, &json!({"telemetryFailures": 2}));
        assert_eq!(upload(&host).status, 500);
        assert_eq!(upload(&host).status, 500);
        assert_eq!(upload(&host).status, 200);
        let log = get_json(&host, "/requests");
        let uploads: Vec<&Value> =
            log.as_array().unwrap().iter().filter(|r| r["target"] == "/machine/?comp=telemetrydata").collect();
        assert_eq!(uploads.len(), 4);
        assert_eq!(uploads[0]["body"], String::from_utf8_lossy(body).as_ref());
        assert_eq!(uploads[0]["signature"], "missing");
        let statuses: Vec<u64> = uploads.iter().map(|r| r["status"].as_u64().unwrap()).collect();
        assert_eq!(statuses, [200, 500, 500, 200]);
        let stats = get_json(&host, "/stats");
        assert_eq!(
            (stats["telemetryUploads"].as_u64(), stats["telemetryFailuresInjected"].as_u64()),
            (Some(4), Some(2))
        );
        assert_eq!(get_json(&host, "/control")["telemetryFailures"], 0);
    }

    #[test]
    fn busy_port_is_a_bind_error() {
        let first = FakeHost::start(FakeHostConfig::loopback()).unwrap();
        let taken = first.addrs().wireserver;
        let err = FakeHost::start(FakeHostConfig { wireserver: taken, ..FakeHostConfig::loopback() }).unwrap_err();
        assert!(matches!(err, FakeHostError::BindListener("wireserver", _, _)), "{err}");
    }

    #[test]
    fn parses_command_line() {
        let args = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
        let config =
            parse_args(args("--imds 127.0.0.1:0 --control=127.0.0.1:9 --mode audit --version 1.0")).unwrap().unwrap();
        assert_eq!(config.imds, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(config.wireserver, None);
        assert_eq!(config.control, "127.0.0.1:9".parse().unwrap());
        assert_eq!((config.mode, config.version), (Mode::Audit, StatusVersion::V1));
        assert!(parse_args(args("--help")).unwrap().is_none());
        for bad in ["--imds 127.0.0.1:0", "--control nowhere", "--control 127.0.0.1:1 --mode x", "--bogus 1"] {
            assert!(matches!(parse_args(args(bad)), Err(FakeHostError::Usage(_))), "{bad}");
        }
    }

    #[test]
    fn ready_line_has_fixed_key_order() {
        let addrs = BoundAddrs {
            imds: Some("169.254.169.254:80".parse().unwrap()),
            wireserver: None,
            hostga: None,
            control: "127.0.0.1:5000".parse().unwrap(),
        };
        assert_eq!(
            addrs.ready_line(),
            r#"{"ready":true,"imds":"169.254.169.254:80","wireserver":null,"hostga":null,"control":"127.0.0.1:5000"}"#
        );
    }
}
