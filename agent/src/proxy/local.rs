// SPDX-License-Identifier: MIT
//! Endpoints the listener answers itself (MSP §1.7): `GET /provision`, which
//! `guest-proxy-agent --status` (and cloud-init, under the reference's name) polls, and
//! `GET /gpa-aggregated-status`. The target must match exactly (no query, origin form).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::gate::LocalResponse;
use super::services::Services;
use crate::clock;
use crate::http::RequestHead;
use crate::identity::Caller;

const JSON: &[u8] = b"content-type: application/json; charset=utf-8\r\n";

fn empty(status: u16) -> LocalResponse {
    LocalResponse { status, content_type: b"", body: String::new(), close: true }
}

impl Services {
    /// Answers `/provision` and `/gpa-aggregated-status`; `None` for every other target.
    pub(crate) fn answer_local(
        &mut self,
        head: &RequestHead,
        req: &[u8],
        caller: Option<&Caller>,
        now: Instant,
    ) -> Option<LocalResponse> {
        let target = head.target(req);
        if head.method(req) != b"GET" || !(target == b"/provision" || target == b"/gpa-aggregated-status") {
            return None;
        }
        if head.header(req, b"metadata").is_none() {
            return Some(empty(400));
        }
        if target == b"/provision" {
            return Some(self.provision_response(head, req, now));
        }
        // Full status only for root callers that came through the redirect (claims exist).
        if !caller.is_some_and(Caller::is_root) {
            return Some(empty(403));
        }
        // The response buffer bounds the answer; the renderer drops summaries to fit.
        let limit = crate::limits::RESPONSE_BUFFER_BYTES - 256;
        let body = self.render_status(limit).map(|json| String::from_utf8_lossy(json).into_owned());
        Some(match body {
            Some(body) => LocalResponse { status: 200, content_type: JSON, body, close: false },
            None => empty(500),
        })
    }

    fn provision_response(&mut self, head: &RequestHead, req: &[u8], now: Instant) -> LocalResponse {
        let tick: u64 = head
            .header(req, b"x-ms-azure-time-tick")
            .and_then(|v| core::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let keeper_ready = self.keeper.ready();
        if keeper_ready {
            self.provision.finished_unix_ns = self.provision.finished_unix_ns.max(self.keeper.ready_at_unix_ns());
        } else if self.provision.finished_unix_ns == 0
            && now.saturating_duration_since(self.provision.started)
                >= Duration::from_millis(crate::limits::PROVISION_TIMEOUT_MS)
        {
            // Finished with whatever is ready: the error message says what is missing.
            self.provision.finished_unix_ns = u64::try_from(clock::wall_now().as_nanos()).unwrap_or(u64::MAX);
        }
        let finished_ns = self.provision.finished_unix_ns;
        let latched = !matches!(self.keeper.state(), "Unknown" | "disabled");
        // A component that failed to start finishes provisioning at once, with its error:
        // waiting would only turn the cause into a timeout (issue 14). It is retried, and
        // the answer follows it.
        let finished = self.ebpf.failed || finished_ns != 0 && (finished_ns >= tick || latched);
        if !finished && head.header(req, b"x-ms-azure-notify").is_some() {
            if !latched {
                // §2.7: provisioning restarts; it finishes again when the keeper is ready.
                self.provision.finished_unix_ns = 0;
            }
            self.keeper.notify(now);
        }
        let mut error = String::new();
        if self.ebpf.failed {
            write!(error, "ebpfProgramStatus - {}\r\n", self.ebpf.message).ok();
        }
        if !keeper_ready {
            // §6.5: one line per readiness bit still missing.
            write!(error, "keyLatchStatus - {}\r\n", self.keeper.message()).ok();
        }
        let mut body = String::with_capacity(64 + error.len());
        write!(body, "{{\"finished\":{finished},\"errorMessage\":\"").ok();
        crate::text::json_escape_into(&mut body, &error);
        body.push_str("\"}");
        LocalResponse { status: 200, content_type: JSON, body, close: false }
    }
}
