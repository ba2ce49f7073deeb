// SPDX-License-Identifier: MIT
//! The audit trail as the proxy writes it (issue 13): two hash-chained logs and a per-uid
//! rate limit in front of them, so that no unprivileged traffic can evict the evidence.
//!
//! - `<dir>/audit.ndjson…`: every record admitted (the full story, in order).
//! - `<dir>/security/audit.ndjson…`: a second chain with only the security-relevant records —
//!   denials, identity failures and every other decision but `allow`, every WireServer and
//!   HostGAPlugin request, `event`s (start, stop, key latched) and `suppressed` summaries.
//!   A flood of ordinary allowed requests never enters it, so it cannot rotate it away.
//! - Each non-root uid (identity-less callers all count as one) may write
//!   `limits.auditRecordsPerSecond` records, with a burst of `limits.auditBurst`; what is over
//!   is counted, and once a second a `suppressed` record says how many of that uid's records,
//!   and how many of them security-relevant, were not written. Root is never limited: its
//!   callers are the provisioning and guest agents, whose records must all be there.
//!
//! Both chains are verified by `guest-proxy-agent audit verify` like any audit file.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use super::{AuditError, AuditLog, AuditRecord};
use crate::config::Caps;
use crate::limits::{AUDIT_RATE_TABLE_UIDS, AUDIT_SUPPRESSED_INTERVAL_MS};

/// Sub-directory of the security trail inside the audit directory.
pub const SECURITY_DIR_NAME: &str = "security";
/// The uid the identity-less callers are counted under.
pub const NO_IDENTITY_UID: u32 = u32::MAX;
/// Where uids beyond [`AUDIT_RATE_TABLE_UIDS`] are counted together.
const OVERFLOW_UID: u32 = u32::MAX - 1;

/// Whether a record belongs in the security trail as well.
pub fn is_security_relevant(rec: &AuditRecord<'_>) -> bool {
    rec.decision != "allow" && rec.decision != "local" || rec.endpoint == "wireserver" || rec.endpoint == "hostgaplugin"
}

#[derive(Debug)]
struct Bucket {
    /// Thousandths of a record.
    tokens_milli: u64,
    refilled: Instant,
    suppressed: u64,
    suppressed_security: u64,
    reported: Instant,
}

impl Bucket {
    /// The tokens at `now`: refilled at `rate` thousandths per millisecond, at most `burst`.
    fn tokens_at(&self, now: Instant, rate: u64, burst: u64) -> u64 {
        let elapsed_ms = u64::try_from(now.saturating_duration_since(self.refilled).as_millis()).unwrap_or(u64::MAX);
        self.tokens_milli.saturating_add(elapsed_ms.saturating_mul(rate)).min(burst)
    }
}

/// The proxy's audit output: the full trail, the security trail, and the per-uid rate.
#[derive(Debug)]
pub struct AuditTrail {
    all: AuditLog,
    security: AuditLog,
    rate_milli_per_ms: u64,
    burst_milli: u64,
    buckets: HashMap<u32, Bucket>,
    /// Records not written because of the rate, in total.
    suppressed_total: u64,
}

impl AuditTrail {
    /// Opens both trails in `dir` (see [`AuditLog::open`]) with the sizes and rates of `caps`.
    pub fn open(dir: &Path, caps: &Caps) -> Result<Self, AuditError> {
        let all = AuditLog::open(dir, caps.audit_max_file_bytes, caps.audit_max_files)?;
        let security = AuditLog::open(&dir.join(SECURITY_DIR_NAME), caps.audit_max_file_bytes, caps.audit_max_files)?;
        Ok(Self {
            all,
            security,
            rate_milli_per_ms: u64::from(caps.audit_records_per_second),
            burst_milli: u64::from(caps.audit_burst.max(1)) * 1000,
            buckets: HashMap::with_capacity(64),
            suppressed_total: 0,
        })
    }

    /// Writes one request record (formatting only, see [`AuditLog::record`]) unless its uid is
    /// over its rate; the security-relevant ones go to both trails.
    pub fn record(&mut self, rec: &AuditRecord<'_>, now: Instant) {
        let security = is_security_relevant(rec);
        if rec.uid != 0 && !self.admit(rec.uid, security, now) {
            return;
        }
        self.all.record(rec);
        if security {
            self.security.record(rec);
        }
    }

    /// An `event` record in both trails (never rate-limited: only the agent makes them).
    pub fn event(&mut self, event: &str, detail: &str) {
        let unix_ms = wall_ms();
        self.all.event(unix_ms, event, detail);
        self.security.event(unix_ms, event, detail);
    }

    /// Writes the due `suppressed` summaries, then both buffers (see [`AuditLog::flush`]).
    pub fn flush(&mut self, now: Instant) -> Result<(), AuditError> {
        self.write_out(now, false)
    }

    /// Every pending summary now, due or not, and both buffers (at shutdown).
    pub fn flush_all(&mut self, now: Instant) -> Result<(), AuditError> {
        self.write_out(now, true)
    }

    fn write_out(&mut self, now: Instant, every_summary: bool) -> Result<(), AuditError> {
        self.summarise(now, every_summary);
        let all = self.all.flush();
        let security = self.security.flush();
        all.and(security)
    }

    /// Sets the checkpoint key of both chains (see [`AuditLog::set_checkpoint_key`]).
    pub fn set_checkpoint_key(&mut self, key: Option<[u8; 32]>) {
        self.all.set_checkpoint_key(key);
        self.security.set_checkpoint_key(key);
    }

    /// Request records written and dropped (buffer full) in the full trail, and records not
    /// written because of the per-uid rate.
    pub fn counts(&self) -> (u64, u64, u64) {
        let (written, dropped) = self.all.counts();
        (written, dropped, self.suppressed_total)
    }

    fn admit(&mut self, uid: u32, security: bool, now: Instant) -> bool {
        let key = if self.buckets.len() >= AUDIT_RATE_TABLE_UIDS && !self.buckets.contains_key(&uid) {
            self.prune(now);
            if self.buckets.len() >= AUDIT_RATE_TABLE_UIDS { OVERFLOW_UID } else { uid }
        } else {
            uid
        };
        let burst = self.burst_milli;
        let rate = self.rate_milli_per_ms;
        let b = self.buckets.entry(key).or_insert(Bucket {
            tokens_milli: burst,
            refilled: now,
            suppressed: 0,
            suppressed_security: 0,
            reported: now,
        });
        // Only whole milliseconds advance the refill point, so calls closer together than
        // that still add up.
        if now.saturating_duration_since(b.refilled).as_millis() > 0 {
            b.tokens_milli = b.tokens_at(now, rate, burst);
            b.refilled = now;
        }
        if b.tokens_milli >= 1000 {
            b.tokens_milli -= 1000;
            return true;
        }
        if b.suppressed == 0 {
            // The first suppressed record starts the summary interval.
            b.reported = now;
        }
        b.suppressed += 1;
        b.suppressed_security += u64::from(security);
        self.suppressed_total += 1;
        false
    }

    fn summarise(&mut self, now: Instant, all_due: bool) {
        let unix_ms = wall_ms();
        for (uid, b) in &mut self.buckets {
            let due = all_due
                || now.saturating_duration_since(b.reported).as_millis() >= u128::from(AUDIT_SUPPRESSED_INTERVAL_MS);
            if b.suppressed == 0 || !due {
                continue;
            }
            let written = self.all.suppressed(unix_ms, *uid, b.suppressed, b.suppressed_security)
                & self.security.suppressed(unix_ms, *uid, b.suppressed, b.suppressed_security);
            if written {
                b.suppressed = 0;
                b.suppressed_security = 0;
                b.reported = now;
            }
        }
    }

    /// Forgets buckets that are full again and owe no summary.
    fn prune(&mut self, now: Instant) {
        let (burst, rate) = (self.burst_milli, self.rate_milli_per_ms);
        self.buckets.retain(|_, b| b.suppressed > 0 || b.tokens_at(now, rate, burst) < burst);
    }
}

/// Wall-clock time, Unix milliseconds.
pub(crate) fn wall_ms() -> u64 {
    u64::try_from(crate::clock::wall_now().as_millis()).unwrap_or(0)
}
