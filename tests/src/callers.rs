// SPDX-License-Identifier: MIT
//! The timed caller loop: a python `http.client` caller that sends IMDS requests for a few
//! seconds while a test disturbs the agent (kills it, hands its listener over, rotates its
//! key), and counts what it got. One program with parameters, so every test that asks "did a
//! caller ever meet a gap?" counts gaps the same way.
//!
//! Each answer is classified as `ok` (200, and when [`CallerLoop::marker`] is set, the fake
//! host's proof that the request came through the agent), `refused` (no connection, a reset, a
//! timeout, or a status listed in [`CallerLoop::refused`]), or `other` (any other status or
//! exception: an answer that must not happen). Every answer is also kept in order, as its status
//! or `err:<exception>`, for tests that check the sequence.

use std::fmt;

use serde_json::{Value, json};

use crate::harness::{As, Netns, client};

/// The python side. argv[1] is the JSON of [`CallerLoop`]; prints one JSON object
/// `{ok, refused, other, closes, answers}`.
const PROGRAM: &str = r#"
import http.client, json, sys, time
p = json.loads(sys.argv[1])
ok = refused = other = closes = 0
answers = []
c = None
end = time.time() + p["secs"]
while time.time() < end:
    try:
        if c is None:
            c = http.client.HTTPConnection("169.254.169.254", 80, timeout=p["timeout"])
            if p["connect_pause"] > 0:
                # Connected (and so redirected) now, the request sent a moment later.
                c.connect(); time.sleep(p["connect_pause"])
        c.request("GET", p["path"], headers=p["headers"])
        r = c.getresponse(); r.read()
        answers.append(str(r.status))
        marked = p["marker"] is None or r.getheader("x-ms-azure-host-authorization") == p["marker"]
        if r.status == 200 and marked: ok += 1
        elif r.status in p["refused"]: refused += 1
        else: other += 1
        if not p["keep_alive"]:
            c.close(); c = None
        elif r.will_close:
            # The agent asked to end this connection (a hand-over): move to a fresh one.
            closes += 1; c.close(); c = None
    except OSError as e:
        refused += 1; answers.append("err:" + type(e).__name__); c = None
        time.sleep(p["error_gap"])
    except Exception as e:
        other += 1; answers.append("err:" + type(e).__name__); c = None
        time.sleep(p["error_gap"])
    time.sleep(p["gap"])
print(json.dumps({"ok": ok, "refused": refused, "other": other, "closes": closes, "answers": answers}))
"#;

/// A timed IMDS caller loop; build with [`CallerLoop::imds`], then [`CallerLoop::run`].
#[derive(Debug, Clone)]
pub struct CallerLoop {
    secs: f64,
    path: String,
    headers: Vec<(String, String)>,
    timeout: f64,
    gap: f64,
    error_gap: f64,
    connect_pause: f64,
    keep_alive: bool,
    refused: Vec<u16>,
    marker: Option<String>,
}

impl CallerLoop {
    /// `GET /metadata/instance` with `Metadata: true` on a fresh connection each time, for
    /// `secs` seconds, back to back, 5 s client timeout, no marker required.
    pub fn imds(secs: f64) -> Self {
        Self {
            secs,
            path: "/metadata/instance".into(),
            headers: vec![("Metadata".into(), "true".into())],
            timeout: 5.0,
            gap: 0.0,
            error_gap: 0.0,
            connect_pause: 0.0,
            keep_alive: false,
            refused: Vec::new(),
            marker: None,
        }
    }

    /// The request target.
    pub fn path(mut self, path: &str) -> Self {
        self.path = path.into();
        self
    }

    /// One more request header (a tag the test finds the requests by on the host).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The client's socket timeout in seconds.
    pub fn timeout(mut self, secs: f64) -> Self {
        self.timeout = secs;
        self
    }

    /// Pause after every request, in seconds.
    pub fn gap(mut self, secs: f64) -> Self {
        self.gap = secs;
        self
    }

    /// Further pause after an exception, so a loop meeting a dead listener does not spin.
    pub fn error_gap(mut self, secs: f64) -> Self {
        self.error_gap = secs;
        self
    }

    /// Connect first, send the request `secs` later (the connect lands before a hand-over,
    /// the request after it).
    pub fn connect_pause(mut self, secs: f64) -> Self {
        self.connect_pause = secs;
        self
    }

    /// Reuse one connection until the agent answers `Connection: close`.
    pub fn keep_alive(mut self) -> Self {
        self.keep_alive = true;
        self
    }

    /// Statuses that count as `refused` (the agent's own "not now": e.g. 429, 502, 503 while it
    /// restarts) instead of `other`.
    pub fn refused(mut self, statuses: &[u16]) -> Self {
        self.refused = statuses.to_vec();
        self
    }

    /// A 200 counts as `ok` only with the fake host's `x-ms-azure-host-authorization: value`
    /// header, which only a request signed by the agent gets.
    pub fn marker(mut self) -> Self {
        self.marker = Some("value".into());
        self
    }

    /// Runs the loop in `ns` as `who` and returns its counts (panics if python fails).
    pub fn run(&self, ns: &Netns, who: As<'_>) -> LoopCounts {
        let headers: serde_json::Map<String, Value> =
            self.headers.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect();
        let params = json!({
            "secs": self.secs, "path": self.path, "headers": headers, "timeout": self.timeout,
            "gap": self.gap, "error_gap": self.error_gap, "connect_pause": self.connect_pause,
            "keep_alive": self.keep_alive, "refused": self.refused, "marker": self.marker,
        })
        .to_string();
        let out = client(ns, who, &["python3", "-c", PROGRAM, &params]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "caller loop failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        let v: Value =
            serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("caller loop output {stdout:?}: {e}"));
        let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("caller loop output has no {k}: {v}"));
        LoopCounts {
            ok: n("ok"),
            refused: n("refused"),
            other: n("other"),
            closes: n("closes"),
            answers: v["answers"]
                .as_array()
                .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
                .unwrap_or_default(),
        }
    }
}

/// What a [`CallerLoop`] got.
#[derive(Debug, Clone, Default)]
pub struct LoopCounts {
    pub ok: u64,
    pub refused: u64,
    pub other: u64,
    /// Kept-alive connections the agent closed (`Connection: close`), with `keep_alive`.
    pub closes: u64,
    /// Every answer in order: the status, or `err:<exception>`.
    pub answers: Vec<String>,
}

impl LoopCounts {
    /// Answers other than 200, in order (for a failure message).
    pub fn unexpected(&self) -> Vec<&str> {
        self.answers.iter().map(String::as_str).filter(|a| *a != "200").collect()
    }
}

impl fmt::Display for LoopCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ok {} refused {} other {} closes {}", self.ok, self.refused, self.other, self.closes)?;
        let unexpected = self.unexpected();
        if !unexpected.is_empty() {
            write!(f, " (not 200: {})", unexpected.join(" "))?;
        }
        Ok(())
    }
}
