// SPDX-License-Identifier: MIT
//! Connection summaries (MSP §6.3): every handled request is counted under the key
//! `userName clientIp ip port processFullPath processCmdLine responseStatus` in 15-minute
//! buckets; buckets older than 4 hours age out and `count` is the sum of the retained ones.
//!
//! Two bounded tables, one per report list (`proxyConnectionSummary`,
//! `failedAuthenticateSummary`), each of [`SUMMARY_KEYS`] keys × [`SUMMARY_BUCKETS`] buckets. A key
//! whose buckets have all aged out is dropped; when a table is full of live keys, the key seen
//! least recently is evicted (and counted) to make room. Time is passed in (Unix seconds), so
//! tests choose any instant and nothing here reads a clock.

use core::cmp::Reverse;
use core::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};

use heapless::{String, Vec};

use crate::identity::{Caller, Name};
use crate::limits::{
    EXE_PATH_MAX_BYTES, GROUPS_PER_USER, NAME_MAX_BYTES, SUMMARY_BUCKET_SECS, SUMMARY_BUCKETS, SUMMARY_KEYS,
};

/// How long a request is counted: [`SUMMARY_BUCKETS`] × [`SUMMARY_BUCKET_SECS`] = 4 h.
pub const RETENTION_SECS: u64 = SUMMARY_BUCKET_SECS * SUMMARY_BUCKETS as u64;
/// Command line kept per key, after secret redaction (MSP §7.4): the identity layer keeps
/// 256 bytes, and a redacted line can grow a little (`a=b` becomes `[REDACTED]`).
pub const CMDLINE_SUMMARY_MAX_BYTES: usize = 384;
/// What MSP §6.3 puts in the text fields of a request without caller identity.
pub const NO_IDENTITY: &str = "empty";

// Indices into a table are kept as `u8` when ranking.
const _: () = assert!(SUMMARY_KEYS <= u8::MAX as usize);

/// Which report list a request goes to (MSP §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SummaryKind {
    /// `proxyConnectionSummary`: every outcome except a redirected connection without claims;
    /// enforce-mode denials go here (as `403`) *and* to [`Self::FailedAuthenticate`].
    ProxyConnection,
    /// `failedAuthenticateSummary`: allowlist denials (enforce or audit, as `403`) and
    /// redirected connections without claims (`421`).
    FailedAuthenticate,
}

/// One handled request, as the summaries see it. Borrowed: recording copies what it keeps.
#[derive(Clone, Copy, Debug)]
pub struct SummaryRecord<'a> {
    /// User name of the caller; [`NO_IDENTITY`] without identity.
    pub user_name: &'a str,
    /// Group names of the caller (`None`: unknown, reported as `null`).
    pub user_groups: Option<&'a [Name]>,
    /// The client socket address (the caller's side of the connection to the listener).
    pub client_ip: Ipv4Addr,
    /// Upstream destination (`None` when unknown, reported as `"None"`).
    pub ip: Option<Ipv4Addr>,
    /// Upstream port (0 when unknown).
    pub port: u16,
    /// Executable path (`None`: could not be bound to the caller, reported as `null`).
    pub process_full_path: Option<&'a [u8]>,
    /// Command line as captured (not yet redacted; recording redacts it).
    pub process_cmd_line: &'a [u8],
    /// HTTP status of the answer the caller got.
    pub response_status: u16,
}

impl<'a> SummaryRecord<'a> {
    /// The record of a request from `caller` (`None`: no kernel record, e.g. a direct connect
    /// to the listener), which came from `client`, went (or would have gone) to `upstream`,
    /// and was answered with `status`. The user name of a uid without a passwd entry is the
    /// uid in decimal (written into `uid_text`, which the record borrows).
    pub fn from_caller(
        caller: Option<&'a Caller>,
        client: SocketAddrV4,
        upstream: Option<SocketAddrV4>,
        status: u16,
        uid_text: &'a mut String<10>,
    ) -> Self {
        let (user_name, user_groups, process_full_path, process_cmd_line) = match caller {
            None => (NO_IDENTITY, None, Some(NO_IDENTITY.as_bytes()), NO_IDENTITY.as_bytes()),
            Some(c) => {
                let user = match &c.user {
                    Some(u) => u.as_str(),
                    None => {
                        uid_text.clear();
                        // Ten digits hold any u32.
                        write!(uid_text, "{}", c.uid()).ok();
                        uid_text.as_str()
                    }
                };
                (user, Some(&c.groups[..]), c.exe.as_deref(), &c.cmdline[..])
            }
        };
        Self {
            user_name,
            user_groups,
            client_ip: *client.ip(),
            ip: upstream.map(|u| *u.ip()),
            port: upstream.map_or(0, |u| u.port()),
            process_full_path,
            process_cmd_line,
            response_status: status,
        }
    }
}

/// What recording did, for the caller's logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// This was the first request of its key in the current bucket (MSP §6.3 logs such
    /// records as an Info event).
    pub first_in_bucket: bool,
    /// A live key was evicted to make room.
    pub evicted: bool,
}

/// The aggregation key (MSP §6.3), stored in fixed-size fields.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    user_name: String<NAME_MAX_BYTES>,
    client_ip: Ipv4Addr,
    ip: Option<Ipv4Addr>,
    port: u16,
    process_full_path: Option<String<EXE_PATH_MAX_BYTES>>,
    process_cmd_line: String<CMDLINE_SUMMARY_MAX_BYTES>,
    response_status: u16,
}

impl Key {
    fn of(rec: &SummaryRecord<'_>) -> Self {
        let mut redacted: Vec<u8, CMDLINE_SUMMARY_MAX_BYTES> = Vec::new();
        crate::audit::redact(rec.process_cmd_line, &mut redacted);
        Self {
            user_name: lossy(rec.user_name.as_bytes()),
            client_ip: rec.client_ip,
            ip: rec.ip,
            port: rec.port,
            process_full_path: rec.process_full_path.map(lossy),
            process_cmd_line: lossy(&redacted),
            response_status: rec.response_status,
        }
    }
}

/// Copies `bytes` as UTF-8 (invalid sequences become U+FFFD), cut on a character boundary
/// at the capacity.
fn lossy<const N: usize>(bytes: &[u8]) -> String<N> {
    let mut out = String::new();
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if out.push(c).is_err() {
                return out;
            }
        }
        if !chunk.invalid().is_empty() && out.push(char::REPLACEMENT_CHARACTER).is_err() {
            return out;
        }
    }
    out
}

/// Requests of one key in one 15-minute bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Bucket {
    /// `unix_s / SUMMARY_BUCKET_SECS`.
    number: u64,
    requests: u32,
}

/// One key with its buckets (a ring indexed by bucket number modulo [`SUMMARY_BUCKETS`]).
#[derive(Clone, Debug)]
struct Entry {
    key: Key,
    /// Groups of the latest request (not part of the key: MSP §6.3).
    user_groups: Option<Vec<Name, GROUPS_PER_USER>>,
    buckets: [Bucket; SUMMARY_BUCKETS],
    last_seen_s: u64,
}

fn bucket_number(unix_s: u64) -> u64 {
    unix_s / SUMMARY_BUCKET_SECS
}

/// A bucket is retained while it is one of the [`SUMMARY_BUCKETS`] newest ones (the current bucket
/// and the 15 before it). A bucket from the future (the wall clock stepped back) is kept.
fn retained(bucket: Bucket, current: u64) -> bool {
    bucket.requests > 0 && bucket.number.saturating_add(SUMMARY_BUCKETS as u64) > current
}

impl Entry {
    fn count(&self, current: u64) -> u64 {
        self.buckets.iter().filter(|b| retained(**b, current)).map(|b| u64::from(b.requests)).sum()
    }

    fn bump(&mut self, current: u64) -> bool {
        let slot = &mut self.buckets[usize::try_from(current % SUMMARY_BUCKETS as u64).unwrap_or(0)];
        let fresh = slot.number != current || slot.requests == 0;
        if fresh {
            *slot = Bucket { number: current, requests: 0 };
        }
        slot.requests = slot.requests.saturating_add(1);
        fresh
    }
}

fn groups_of(groups: Option<&[Name]>) -> Option<Vec<Name, GROUPS_PER_USER>> {
    groups.map(|g| g.iter().take(GROUPS_PER_USER).cloned().collect())
}

/// One table of [`SUMMARY_KEYS`] keys.
#[derive(Debug)]
pub struct SummaryTable {
    /// Insertion order is first-seen order; never grows past [`SUMMARY_KEYS`].
    entries: std::vec::Vec<Entry>,
    evictions: u64,
}

impl SummaryTable {
    fn new() -> Self {
        Self { entries: std::vec::Vec::with_capacity(SUMMARY_KEYS), evictions: 0 }
    }

    fn record(&mut self, rec: &SummaryRecord<'_>, now_unix_s: u64) -> Recorded {
        let current = bucket_number(now_unix_s);
        let key = Key::of(rec);
        if let Some(e) = self.entries.iter_mut().find(|e| e.key == key) {
            e.user_groups = groups_of(rec.user_groups);
            e.last_seen_s = now_unix_s;
            return Recorded { first_in_bucket: e.bump(current), evicted: false };
        }
        let mut evicted = false;
        if self.entries.len() == SUMMARY_KEYS {
            self.age(now_unix_s);
        }
        if self.entries.len() == SUMMARY_KEYS {
            // Full of live keys: the one seen least recently makes room.
            let oldest = self.entries.iter().enumerate().min_by_key(|(i, e)| (e.last_seen_s, *i)).map(|(i, _)| i);
            if let Some(i) = oldest {
                self.entries.remove(i);
                self.evictions += 1;
                evicted = true;
            }
        }
        let mut entry = Entry {
            key,
            user_groups: groups_of(rec.user_groups),
            buckets: [Bucket::default(); SUMMARY_BUCKETS],
            last_seen_s: now_unix_s,
        };
        entry.bump(current);
        self.entries.push(entry);
        Recorded { first_in_bucket: true, evicted }
    }

    fn age(&mut self, now_unix_s: u64) {
        let current = bucket_number(now_unix_s);
        self.entries.retain(|e| e.count(current) > 0);
    }

    /// Live keys (including ones whose buckets have aged out but that [`Summaries::age`] has
    /// not dropped yet).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No keys at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Live keys evicted because the table was full.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// The summaries with a non-zero count at `now_unix_s`, highest count first (ties in
    /// first-seen order), so a report that has to leave some out drops the smallest.
    pub fn ranked(&self, now_unix_s: u64) -> Ranked<'_> {
        let current = bucket_number(now_unix_s);
        let mut order: Vec<(u8, u64), SUMMARY_KEYS> = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            let count = e.count(current);
            if count > 0 {
                // Both bounded by SUMMARY_KEYS (asserted to fit a u8 and the Vec).
                let i = u8::try_from(i).unwrap_or(u8::MAX);
                order.push((i, count)).ok();
            }
        }
        order.sort_unstable_by_key(|(i, count)| (Reverse(*count), *i));
        Ranked { table: self, order, next: 0 }
    }
}

/// Iterator over a table's summaries, highest count first.
#[derive(Debug)]
pub struct Ranked<'a> {
    table: &'a SummaryTable,
    order: Vec<(u8, u64), SUMMARY_KEYS>,
    next: usize,
}

impl<'a> Iterator for Ranked<'a> {
    type Item = SummaryView<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        let (i, count) = *self.order.get(self.next)?;
        self.next += 1;
        let e = self.table.entries.get(usize::from(i))?;
        Some(SummaryView {
            user_name: &e.key.user_name,
            client_ip: e.key.client_ip,
            ip: e.key.ip,
            port: e.key.port,
            process_cmd_line: &e.key.process_cmd_line,
            response_status: e.key.response_status,
            count,
            user_groups: e.user_groups.as_deref(),
            process_full_path: e.key.process_full_path.as_deref(),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining(), Some(self.remaining()))
    }
}

impl ExactSizeIterator for Ranked<'_> {}

impl Ranked<'_> {
    /// Summaries not yet yielded.
    pub fn remaining(&self) -> usize {
        self.order.len() - self.next
    }
}

/// One summary as reported (MSP §6.2 `Summary`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SummaryView<'a> {
    /// `userName`.
    pub user_name: &'a str,
    /// Part of the key, not reported.
    pub client_ip: Ipv4Addr,
    /// `ip` (`"None"` when unknown).
    pub ip: Option<Ipv4Addr>,
    /// `port`.
    pub port: u16,
    /// `processCmdLine` (redacted).
    pub process_cmd_line: &'a str,
    /// `responseStatus` as a code; see [`status_text`].
    pub response_status: u16,
    /// `count`: requests in the retained buckets.
    pub count: u64,
    /// `userGroups` (`null` when unknown).
    pub user_groups: Option<&'a [Name]>,
    /// `processFullPath` (`null` when unknown).
    pub process_full_path: Option<&'a str>,
}

/// Both tables.
#[derive(Debug)]
pub struct Summaries {
    proxy_connection: SummaryTable,
    failed_authenticate: SummaryTable,
}

impl Default for Summaries {
    fn default() -> Self {
        Self::new()
    }
}

impl Summaries {
    /// Empty tables (their storage is reserved once, here).
    pub fn new() -> Self {
        Self { proxy_connection: SummaryTable::new(), failed_authenticate: SummaryTable::new() }
    }

    /// Counts one request in `kind`'s table at `now_unix_s`.
    pub fn record(&mut self, kind: SummaryKind, rec: &SummaryRecord<'_>, now_unix_s: u64) -> Recorded {
        self.table_mut(kind).record(rec, now_unix_s)
    }

    /// Drops every key whose buckets have all aged out at `now_unix_s`.
    pub fn age(&mut self, now_unix_s: u64) {
        self.proxy_connection.age(now_unix_s);
        self.failed_authenticate.age(now_unix_s);
    }

    /// One table.
    pub fn table(&self, kind: SummaryKind) -> &SummaryTable {
        match kind {
            SummaryKind::ProxyConnection => &self.proxy_connection,
            SummaryKind::FailedAuthenticate => &self.failed_authenticate,
        }
    }

    fn table_mut(&mut self, kind: SummaryKind) -> &mut SummaryTable {
        match kind {
            SummaryKind::ProxyConnection => &mut self.proxy_connection,
            SummaryKind::FailedAuthenticate => &mut self.failed_authenticate,
        }
    }
}

/// `responseStatus` text: the code and its RFC 9110 reason phrase (e.g. `403 Forbidden`);
/// a code without a registered phrase is reported as the bare number.
pub fn status_text(code: u16) -> StatusText {
    StatusText(code)
}

/// See [`status_text`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusText(pub u16);

impl core::fmt::Display for StatusText {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match crate::http::reason_phrase(self.0) {
            Some(r) => write!(f, "{} {r}", self.0),
            None => write!(f, "{}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_784_000_000 / SUMMARY_BUCKET_SECS * SUMMARY_BUCKET_SECS; // a bucket boundary

    fn rec(user: &str, status: u16) -> SummaryRecord<'_> {
        SummaryRecord {
            user_name: user,
            user_groups: None,
            client_ip: Ipv4Addr::LOCALHOST,
            ip: Some(Ipv4Addr::new(169, 254, 169, 254)),
            port: 80,
            process_full_path: Some(b"/usr/bin/curl"),
            process_cmd_line: b"curl -s http://169.254.169.254/metadata/instance",
            response_status: status,
        }
    }

    fn counts(s: &Summaries, kind: SummaryKind, now: u64) -> std::vec::Vec<(std::string::String, u64)> {
        s.table(kind).ranked(now).map(|v| (v.user_name.to_owned(), v.count)).collect()
    }

    #[test]
    fn aggregates_under_the_full_key() {
        let mut s = Summaries::new();
        let k = SummaryKind::ProxyConnection;
        assert!(s.record(k, &rec("alice", 200), T0).first_in_bucket);
        assert!(!s.record(k, &rec("alice", 200), T0 + 10).first_in_bucket);
        // Every key field separates keys.
        s.record(k, &rec("alice", 404), T0);
        s.record(k, &rec("bob", 200), T0);
        s.record(k, &SummaryRecord { port: 8080, ..rec("alice", 200) }, T0);
        s.record(k, &SummaryRecord { client_ip: Ipv4Addr::new(127, 0, 0, 2), ..rec("alice", 200) }, T0);
        s.record(k, &SummaryRecord { ip: None, ..rec("alice", 200) }, T0);
        s.record(k, &SummaryRecord { process_full_path: None, ..rec("alice", 200) }, T0);
        s.record(k, &SummaryRecord { process_cmd_line: b"wget", ..rec("alice", 200) }, T0);
        assert_eq!(s.table(k).len(), 8);
        // Groups are not part of the key.
        let groups = [Name::try_from("adm").unwrap()];
        s.record(k, &SummaryRecord { user_groups: Some(&groups), ..rec("alice", 200) }, T0);
        assert_eq!(s.table(k).len(), 8);
        let top = s.table(k).ranked(T0).next().unwrap();
        assert_eq!((top.user_name, top.count, top.response_status), ("alice", 3, 200));
        assert_eq!(top.user_groups.map(<[Name]>::len), Some(1));
        // The other table is separate.
        assert!(s.table(SummaryKind::FailedAuthenticate).is_empty());
    }

    #[test]
    fn ranks_by_count_then_first_seen() {
        let mut s = Summaries::new();
        let k = SummaryKind::FailedAuthenticate;
        s.record(k, &rec("a", 403), T0);
        s.record(k, &rec("b", 403), T0);
        s.record(k, &rec("c", 403), T0);
        s.record(k, &rec("c", 403), T0);
        let got = counts(&s, k, T0);
        assert_eq!(got, [("c".into(), 2), ("a".into(), 1), ("b".into(), 1)]);
    }

    #[test]
    fn buckets_roll_over_every_15_minutes_and_count_sums_them() {
        let mut s = Summaries::new();
        let k = SummaryKind::ProxyConnection;
        assert!(s.record(k, &rec("a", 200), T0).first_in_bucket);
        assert!(!s.record(k, &rec("a", 200), T0 + SUMMARY_BUCKET_SECS - 1).first_in_bucket);
        // The next bucket starts: first record again.
        assert!(s.record(k, &rec("a", 200), T0 + SUMMARY_BUCKET_SECS).first_in_bucket);
        assert_eq!(counts(&s, k, T0 + SUMMARY_BUCKET_SECS), [("a".into(), 3)]);
        // The ring slot of T0 is reused 4 h later: the old count is replaced, not added.
        s.record(k, &rec("a", 200), T0 + RETENTION_SECS);
        assert_eq!(counts(&s, k, T0 + RETENTION_SECS), [("a".into(), 2)]);
    }

    #[test]
    fn entries_age_out_after_4_hours() {
        let mut s = Summaries::new();
        let k = SummaryKind::ProxyConnection;
        s.record(k, &rec("old", 200), T0);
        s.record(k, &rec("new", 200), T0 + RETENTION_SECS - 1);
        // The last second of the 16th bucket still counts T0's bucket.
        assert_eq!(counts(&s, k, T0 + RETENTION_SECS - 1), [("old".into(), 1), ("new".into(), 1)]);
        // From the next bucket on, T0's bucket is out of the report...
        assert_eq!(counts(&s, k, T0 + RETENTION_SECS), [("new".into(), 1)]);
        assert_eq!(s.table(k).len(), 2);
        // ...and aging drops the key.
        s.age(T0 + RETENTION_SECS);
        assert_eq!(s.table(k).len(), 1);
        s.age(T0 + 2 * RETENTION_SECS);
        assert!(s.table(k).is_empty());
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_seen_key() {
        let mut s = Summaries::new();
        let k = SummaryKind::ProxyConnection;
        let users: std::vec::Vec<std::string::String> = (0..=SUMMARY_KEYS).map(|i| format!("u{i}")).collect();
        for (i, u) in users.iter().take(SUMMARY_KEYS).enumerate() {
            s.record(k, &rec(u, 200), T0 + u64::try_from(i).unwrap());
        }
        // u0 is seen again: u1 becomes the least recent.
        s.record(k, &rec(&users[0], 200), T0 + 1000);
        let r = s.record(k, &rec(&users[SUMMARY_KEYS], 200), T0 + 1001);
        assert!(r.evicted && r.first_in_bucket);
        assert_eq!(s.table(k).len(), SUMMARY_KEYS);
        assert_eq!(s.table(k).evictions(), 1);
        let names: std::vec::Vec<_> = counts(&s, k, T0 + 1001).into_iter().map(|(n, _)| n).collect();
        assert!(
            !names.contains(&"u1".to_owned())
                && names.contains(&"u0".to_owned())
                && names.contains(&format!("u{SUMMARY_KEYS}"))
        );
    }

    #[test]
    fn a_full_table_of_expired_keys_ages_instead_of_evicting() {
        let mut s = Summaries::new();
        let k = SummaryKind::ProxyConnection;
        let users: std::vec::Vec<std::string::String> = (0..SUMMARY_KEYS).map(|i| format!("u{i}")).collect();
        for u in &users {
            s.record(k, &rec(u, 200), T0);
        }
        let r = s.record(k, &rec("late", 200), T0 + RETENTION_SECS);
        assert!(!r.evicted);
        assert_eq!(s.table(k).evictions(), 0);
        assert_eq!(counts(&s, k, T0 + RETENTION_SECS), [("late".into(), 1)]);
    }

    #[test]
    fn command_lines_are_redacted_and_text_is_made_valid_utf8() {
        let mut s = Summaries::new();
        let k = SummaryKind::ProxyConnection;
        let r = SummaryRecord {
            process_cmd_line: b"sqlcmd -S db pwd=secret123; x",
            process_full_path: Some(b"/opt/\xffbin"),
            ..rec("alice", 200)
        };
        s.record(k, &r, T0);
        let v = s.table(k).ranked(T0).next().unwrap();
        assert_eq!(v.process_cmd_line, "sqlcmd -S db [REDACTED]; x");
        assert_eq!(v.process_full_path, Some("/opt/\u{fffd}bin"));
    }

    #[test]
    fn records_without_identity_use_empty_and_the_socket_peer() {
        let mut uid = String::new();
        let client = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 40000);
        let r = SummaryRecord::from_caller(None, client, None, 421, &mut uid);
        assert_eq!(r.user_name, "empty");
        assert_eq!(r.process_full_path, Some(&b"empty"[..]));
        assert_eq!(r.process_cmd_line, b"empty");
        assert_eq!((r.client_ip, r.ip, r.port), (Ipv4Addr::LOCALHOST, None, 0));
        assert!(r.user_groups.is_none());
    }

    #[test]
    fn status_text_has_reason_phrases() {
        assert_eq!(status_text(200).to_string(), "200 OK");
        assert_eq!(status_text(403).to_string(), "403 Forbidden");
        assert_eq!(status_text(421).to_string(), "421 Misdirected Request");
        assert_eq!(status_text(299).to_string(), "299");
    }
}
