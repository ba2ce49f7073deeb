// SPDX-License-Identifier: MIT
//! The per-request audit trail: one NDJSON line per request, hash-chained, size-rotated.
//!
//! Read this first: `shared/spec/msp-protocol.md` §6.3 (what a request record holds), §7.4
//! (secret redaction), §11 item 6 (no key, signature or secret in audit output), and the
//! attack catalog's F1 (readable files hold no secrets), F2 (newlines in argv or
//! `PR_SET_NAME` cannot forge entries) and F3 (no symlink games around rotation).
//!
//! # Format
//!
//! One JSON object per line, keys in this fixed order, written by hand ([`line`]):
//!
//! ```text
//! {"seq":7,"ts":1767225600000,"prev":"<64 hex>","kind":"request","pid":4242,"uid":1000,
//!  "gid":1000,"user":"alice","exe":"/usr/bin/curl","cmdline":"curl -H [REDACTED] http://…",
//!  "endpoint":"imds","method":"GET","path":"/metadata/instance","decision":"allow",
//!  "mode":"enforce","status":200,"latency_us":1830}
//! {"seq":8,"ts":…,"prev":…,"kind":"checkpoint","mac":"<64 hex>"}
//! {"seq":9,"ts":…,"prev":…,"kind":"dropped","count":12}
//! {"seq":1,"ts":…,"prev":"000…0","kind":"chain-restart","reason":"torn last line"}
//! {"seq":10,"ts":…,"prev":…,"kind":"suppressed","uid":65534,"count":4810,"security":12}
//! {"seq":11,"ts":…,"prev":…,"kind":"event","event":"start","detail":"pid 812, version 0.1.0"}
//! ```
//!
//! (shown wrapped; each record is one line). `user` and `exe` may be `null`. Every string is
//! escaped so it cannot leave its line; the command line is redacted ([`redact`]) and the path
//! loses its query string, which can carry SAS signatures and tokens.
//!
//! # Chain
//!
//! `prev` is the hex SHA-256 of the previous line's bytes (without its newline), 64 zeros for
//! the first; `seq` counts up by one from 1. Both continue across rotation, so the first line
//! of a new file carries the hash of the last line of the one before. On open the chain resumes
//! from the last line on disk; if that line is torn or unparsable a new chain starts with a
//! `chain-restart` record (seq 1, zero `prev`) saying why — the break stays visible to
//! [`verify_files`].
//!
//! # Checkpoints
//!
//! The chain alone detects edits, deletions, insertions and reordering *inside* the file, but
//! whoever can write the file can also rewrite every line after an edit. Checkpoints close that
//! gap for a verifier holding the key: every [`CHECKPOINT_EVERY`] records, and at each flush
//! that wrote records, a `checkpoint` line carries `mac` = HMAC-SHA256(checkpoint key, the
//! 32-byte hash of the line before it, i.e. its own `prev`). The checkpoint key is derived from
//! the latched MSP key ([`derive_checkpoint_key`]) and never written anywhere. What the chain
//! cannot show: lines cut off the end of the newest file after its last checkpoint.
//!
//! # Files
//!
//! `<dir>/audit.ndjson` (0640, opened `O_APPEND|O_NOFOLLOW|O_CLOEXEC`, never through a
//! symlink, never hard-linked) in a 0700 directory that must not be group- or world-writable.
//! Rotation renames `audit.ndjson` → `.1` → `.2` …, keeping at most `max_files` files in all
//! (the active one included). `rename` and `unlink` never follow a planted symlink, and the new
//! active file is created with `O_EXCL`, so rotation can never write through one (F3).
//!
//! # Cost on the event loop
//!
//! [`AuditLog::record`] only formats into a fixed buffer allocated at open: no I/O, no
//! allocation. When the buffer is full, records are counted as dropped until the next flush,
//! which writes a `dropped` record with the count in their place. [`AuditLog::flush`] issues one `write`.

mod line;
mod redact;
pub mod trail;
mod verify;

use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use self::line::{Kind, LineWriter, parse_record};
pub use self::redact::{REDACTED, redact};
pub use self::trail::AuditTrail;
pub use self::verify::{VerifyReport, verify_files, why};

type HmacSha256 = Hmac<Sha256>;

/// Name of the active file inside the audit directory; rotated copies append `.1`, `.2`, ….
pub const ACTIVE_FILE_NAME: &str = "audit.ndjson";
/// Records between checkpoints (when a key is set).
pub const CHECKPOINT_EVERY: u32 = 64;
/// Smallest accepted `max_file_bytes`: a few records per file.
pub const MIN_FILE_BYTES: u64 = 1024;
/// The label the checkpoint key is derived with: HMAC-SHA256(MSP key, this).
pub const CHECKPOINT_KEY_LABEL: &[u8] = b"gpa audit checkpoint v1";

/// Field caps, in input bytes (longer input is cut). Each covers its producer's own limit.
const USER_MAX_BYTES: usize = 64;
const EXE_MAX_BYTES: usize = 512;
/// Command line before redaction, and after (redaction can lengthen very short secrets).
const CMDLINE_IN_MAX_BYTES: usize = 512;
const CMDLINE_OUT_MAX_BYTES: usize = 1024;
const PATH_MAX_BYTES: usize = 1024;
const METHOD_MAX_BYTES: usize = 32;
/// `endpoint`, `decision`, `mode`: short fixed words.
const LABEL_MAX_BYTES: usize = 32;
const _: () = assert!(USER_MAX_BYTES >= crate::limits::NAME_MAX_BYTES);
const _: () = assert!(EXE_MAX_BYTES >= crate::limits::EXE_PATH_MAX_BYTES);
const _: () = assert!(CMDLINE_IN_MAX_BYTES >= crate::limits::CMDLINE_MAX_BYTES);
const _: () = assert!(PATH_MAX_BYTES >= crate::limits::EXCHANGE_PATH_MAX_BYTES);
const _: () = assert!(METHOD_MAX_BYTES >= crate::limits::EXCHANGE_METHOD_MAX_BYTES);

/// Longest line ever written: every capped field escaped at the worst 6 output bytes per input
/// byte (`\u00XX`), plus keys, numbers and the hash (under 512 bytes).
const LINE_MAX_BYTES: usize = 16 * 1024;
const _: () = assert!(
    6 * (USER_MAX_BYTES + EXE_MAX_BYTES + PATH_MAX_BYTES + METHOD_MAX_BYTES + 3 * LABEL_MAX_BYTES)
        + CMDLINE_OUT_MAX_BYTES
        + 512
        <= LINE_MAX_BYTES
);
/// Longest `checkpoint`, `dropped` or `chain-restart` line, newline included.
const CONTROL_LINE_MAX_BYTES: usize = 256;
/// Room a request leaves free for the control lines that may follow it before a flush.
const REQUEST_RESERVE_BYTES: usize = 2 * CONTROL_LINE_MAX_BYTES;
/// The record buffer: ~200 typical records (~300 bytes each) between flushes, and always room
/// for one longest line.
const BUFFER_BYTES: usize = 64 * 1024;
const _: () = assert!(BUFFER_BYTES >= LINE_MAX_BYTES + 1 + REQUEST_RESERVE_BYTES);
/// Bytes read from the end of the file on open: one longest line and its newline.
const TAIL_WINDOW_BYTES: usize = LINE_MAX_BYTES + 1;

/// One handled request, as the event loop sees it.
#[derive(Clone, Copy, Debug)]
pub struct AuditRecord<'a> {
    /// Wall-clock time of the decision, Unix milliseconds.
    pub unix_ms: u64,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub user: Option<&'a str>,
    /// Executable path; may be non-UTF-8 (escaped per byte).
    pub exe: Option<&'a [u8]>,
    /// Command line, already truncated; redacted here before it is written.
    pub cmdline: &'a [u8],
    /// `imds` | `wireserver` | `hostgaplugin` | `local` | `unknown`.
    pub endpoint: &'a str,
    pub method: &'a [u8],
    /// Request path without query string (anything from `?` or `#` on is dropped here too).
    pub path: &'a [u8],
    /// `allow` | `audit-deny` | `deny` | `no-identity` | `error`.
    pub decision: &'a str,
    /// `enforce` | `audit` | `disabled` | `none`.
    pub mode: &'a str,
    pub status: u16,
    pub latency_us: u64,
}

/// Why the audit log could not be opened, written or rotated.
#[derive(Debug)]
pub enum AuditError {
    /// `max_file_bytes` below [`MIN_FILE_BYTES`] or `max_files` zero.
    Limits,
    /// Creating the audit directory failed.
    CreateDir(io::Error),
    /// The audit directory is a symlink, not a directory, or writable by group or others.
    UnsafeDir(&'static str),
    /// The active file is a symlink (refused, never followed).
    Symlink,
    /// The active file is not a regular file, or has other hard links.
    UnsafeFile(&'static str),
    /// Opening or re-permissioning the active file failed.
    OpenFile(io::Error),
    /// Reading the end of the existing file failed.
    ReadTail(io::Error),
    /// Writing records failed (they stay buffered for the next flush).
    Write(io::Error),
    /// Renaming or deleting files during rotation failed (writing went on in the old file).
    Rotate(io::Error),
}

impl fmt::Display for AuditError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Limits => write!(
                f,
                "audit limits invalid: max file bytes must be at least {MIN_FILE_BYTES} and max files at least 1"
            ),
            Self::CreateDir(e) => write!(f, "creating the audit directory failed: {e}"),
            Self::UnsafeDir(why) => write!(f, "audit directory refused: {why}"),
            Self::Symlink => f.write_str("audit file refused: it is a symlink"),
            Self::UnsafeFile(why) => write!(f, "audit file refused: {why}"),
            Self::OpenFile(e) => write!(f, "opening the audit file failed: {e}"),
            Self::ReadTail(e) => write!(f, "reading the end of the audit file failed: {e}"),
            Self::Write(e) => write!(f, "writing audit records failed: {e}"),
            Self::Rotate(e) => write!(f, "rotating audit files failed: {e}"),
        }
    }
}

impl std::error::Error for AuditError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::CreateDir(e) | Self::OpenFile(e) | Self::ReadTail(e) | Self::Write(e) | Self::Rotate(e) => Some(e),
            Self::Limits | Self::UnsafeDir(_) | Self::Symlink | Self::UnsafeFile(_) => None,
        }
    }
}

/// The open audit trail: active file, chain state and the record buffer.
pub struct AuditLog {
    dir: PathBuf,
    active: PathBuf,
    file: File,
    /// Size of the active file as far as our writes go.
    file_bytes: u64,
    max_file_bytes: u64,
    max_files: u32,
    /// Formatted lines waiting for [`Self::flush`]; `len` bytes used.
    buf: Box<[u8]>,
    len: usize,
    /// Request records in `buf` (counted as written once `buf` is out).
    buffered_requests: u64,
    next_seq: u64,
    /// SHA-256 of the last line formatted.
    prev: [u8; 32],
    /// Timestamp for control records: the last request's (or the resumed line's).
    last_ts: u64,
    /// Lines since the last checkpoint.
    since_checkpoint: u32,
    key: Option<[u8; 32]>,
    written: u64,
    dropped_total: u64,
    /// Drops not yet reported by a `dropped` record.
    dropped_pending: u64,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The checkpoint key is never printed.
        f.debug_struct("AuditLog")
            .field("active", &self.active)
            .field("file_bytes", &self.file_bytes)
            .field("buffered", &self.len)
            .field("next_seq", &self.next_seq)
            .field("key_set", &self.key.is_some())
            .field("written", &self.written)
            .field("dropped", &self.dropped_total)
            .finish_non_exhaustive()
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        if let Some(key) = &mut self.key {
            key.fill(0);
        }
    }
}

/// What the end of the existing trail says about where to continue.
enum Tail {
    Empty,
    Resume { seq: u64, hash: [u8; 32], ts: u64, need_newline: bool },
    Restart { reason: &'static str, need_newline: bool },
}

impl AuditLog {
    /// Opens (creating a 0700 `dir` if needed) `<dir>/audit.ndjson` for appending, 0640,
    /// refusing a symlink, and resumes the chain from the last line on disk (from
    /// `audit.ndjson.1` if the active file is empty). If that line is torn or unparsable, a
    /// new chain starts with a `chain-restart` record naming why.
    pub fn open(dir: &Path, max_file_bytes: u64, max_files: u32) -> Result<Self, AuditError> {
        if max_files == 0 || max_file_bytes < MIN_FILE_BYTES {
            return Err(AuditError::Limits);
        }
        DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(AuditError::CreateDir)?;
        check_dir(dir)?;
        let active = dir.join(ACTIVE_FILE_NAME);
        let mut file = open_active(&active, false)?;
        let size = file.metadata().map_err(AuditError::OpenFile)?.len();
        let mut buf = vec![0_u8; BUFFER_BYTES].into_boxed_slice();
        let window = &mut buf[..TAIL_WINDOW_BYTES];
        let tail = if size > 0 {
            read_tail(&mut file, size, window)
        } else {
            read_rotated_tail(&rotated_path(dir, 1), window)
        }
        .map_err(AuditError::ReadTail)?;
        let mut log = Self {
            dir: dir.to_path_buf(),
            active,
            file,
            file_bytes: size,
            max_file_bytes,
            max_files,
            buf,
            len: 0,
            buffered_requests: 0,
            next_seq: 1,
            prev: [0; 32],
            last_ts: 0,
            since_checkpoint: 0,
            key: None,
            written: 0,
            dropped_total: 0,
            dropped_pending: 0,
        };
        let need_newline = match tail {
            Tail::Empty => false,
            Tail::Resume { seq, hash, ts, need_newline } => {
                log.next_seq = seq.saturating_add(1);
                log.prev = hash;
                log.last_ts = ts;
                need_newline
            }
            Tail::Restart { reason, need_newline } => {
                log.last_ts = u64::try_from(crate::clock::wall_now().as_millis()).unwrap_or(0);
                log.append(0, log.last_ts, Kind::ChainRestart, |w| {
                    w.raw(b",\"reason\":");
                    w.string(reason.as_bytes());
                });
                need_newline
            }
        };
        if need_newline {
            // The last write was cut short: end that line so ours start on their own.
            log.file.write_all(b"\n").map_err(AuditError::Write)?;
            log.file_bytes += 1;
        }
        Ok(log)
    }

    /// Formats one record into the buffer (redacting the command line). No I/O: when the
    /// buffer is full the record is dropped and counted, as is every record until the next
    /// flush, which writes a `dropped` record with the count in their place.
    pub fn record(&mut self, rec: &AuditRecord<'_>) {
        self.last_ts = rec.unix_ms;
        if self.dropped_pending > 0 {
            // The buffer overflowed since the last flush: keep dropping until it is written, so
            // the `dropped` record sits exactly where the records are missing.
            self.drop_request();
            return;
        }
        let mut cmdline: heapless::Vec<u8, CMDLINE_OUT_MAX_BYTES> = heapless::Vec::new();
        redact(cap(rec.cmdline, CMDLINE_IN_MAX_BYTES), &mut cmdline);
        let path = rec.path.iter().position(|b| *b == b'?' || *b == b'#').map_or(rec.path, |query| &rec.path[..query]);
        let appended = self.append(REQUEST_RESERVE_BYTES, rec.unix_ms, Kind::Request, |w| {
            w.raw(b",\"pid\":");
            w.u64(rec.pid.into());
            w.raw(b",\"uid\":");
            w.u64(rec.uid.into());
            w.raw(b",\"gid\":");
            w.u64(rec.gid.into());
            w.raw(b",\"user\":");
            w.opt_string(rec.user.map(|user| cap(user.as_bytes(), USER_MAX_BYTES)));
            w.raw(b",\"exe\":");
            w.opt_string(rec.exe.map(|exe| cap(exe, EXE_MAX_BYTES)));
            w.raw(b",\"cmdline\":");
            w.string(&cmdline);
            w.raw(b",\"endpoint\":");
            w.string(cap(rec.endpoint.as_bytes(), LABEL_MAX_BYTES));
            w.raw(b",\"method\":");
            w.string(cap(rec.method, METHOD_MAX_BYTES));
            w.raw(b",\"path\":");
            w.string(cap(path, PATH_MAX_BYTES));
            w.raw(b",\"decision\":");
            w.string(cap(rec.decision.as_bytes(), LABEL_MAX_BYTES));
            w.raw(b",\"mode\":");
            w.string(cap(rec.mode.as_bytes(), LABEL_MAX_BYTES));
            w.raw(b",\"status\":");
            w.u64(rec.status.into());
            w.raw(b",\"latency_us\":");
            w.u64(rec.latency_us);
        });
        if !appended {
            self.drop_request();
            return;
        }
        self.buffered_requests += 1;
        if self.since_checkpoint >= CHECKPOINT_EVERY {
            self.append_checkpoint();
        }
    }

    /// Writes the buffer with one `write` (adding the pending `dropped` record and, with a
    /// key, a checkpoint), rotating first if the active file would grow past `max_file_bytes`.
    /// A short write keeps the rest for the next call; on error the records stay buffered.
    pub fn flush(&mut self) -> Result<(), AuditError> {
        if self.dropped_pending > 0 {
            self.append_dropped();
        }
        if self.since_checkpoint > 0 {
            self.append_checkpoint();
        }
        if self.len == 0 {
            return Ok(());
        }
        let pending = u64::try_from(self.len).unwrap_or(u64::MAX);
        let rotated = if self.file_bytes > 0 && self.file_bytes.saturating_add(pending) > self.max_file_bytes {
            self.rotate()
        } else {
            Ok(())
        };
        match self.file.write(&self.buf[..self.len]) {
            Ok(done) => {
                self.file_bytes += u64::try_from(done).unwrap_or(u64::MAX);
                if done >= self.len {
                    self.written += self.buffered_requests;
                    self.buffered_requests = 0;
                    self.len = 0;
                    if self.dropped_pending > 0 {
                        // No room for it before the write: it leads the next one.
                        self.append_dropped();
                    }
                } else {
                    self.buf.copy_within(done..self.len, 0);
                    self.len -= done;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(AuditError::Write(e)),
        }
        rotated
    }

    /// Sets the checkpoint key (see [`derive_checkpoint_key`]); `None` clears it. Records
    /// formatted under an outgoing key are sealed with a checkpoint under that key first.
    pub fn set_checkpoint_key(&mut self, key: Option<[u8; 32]>) {
        if self.key != key && self.since_checkpoint > 0 {
            self.append_checkpoint();
        }
        if let Some(old) = &mut self.key {
            old.fill(0);
        }
        self.key = key;
    }

    /// A `suppressed` record: `count` records of `uid` (`security` of them security-relevant)
    /// were not written because the uid was over its audit rate ([`trail`]). Like every
    /// control record it may use the reserve requests leave; false if even that is full.
    pub fn suppressed(&mut self, unix_ms: u64, uid: u32, count: u64, security: u64) -> bool {
        self.last_ts = self.last_ts.max(unix_ms);
        self.append(0, self.last_ts, Kind::Suppressed, |w| {
            w.raw(b",\"uid\":");
            w.u64(uid.into());
            w.raw(b",\"count\":");
            w.u64(count);
            w.raw(b",\"security\":");
            w.u64(security);
        })
    }

    /// An `event` record: the agent started or stopped, a key was latched or changed.
    pub fn event(&mut self, unix_ms: u64, event: &str, detail: &str) -> bool {
        self.last_ts = self.last_ts.max(unix_ms);
        self.append(REQUEST_RESERVE_BYTES, self.last_ts, Kind::Event, |w| {
            w.raw(b",\"event\":");
            w.string(cap(event.as_bytes(), LABEL_MAX_BYTES));
            w.raw(b",\"detail\":");
            w.string(cap(detail.as_bytes(), PATH_MAX_BYTES));
        })
    }

    /// Request records written to the file, and request records dropped (buffer full).
    pub fn counts(&self) -> (u64, u64) {
        (self.written, self.dropped_total)
    }

    fn drop_request(&mut self) {
        self.dropped_pending += 1;
        self.dropped_total += 1;
    }

    /// Appends the `dropped` record; it may use the reserve requests leave.
    fn append_dropped(&mut self) -> bool {
        let count = self.dropped_pending;
        let appended = self.append(0, self.last_ts, Kind::Dropped, |w| {
            w.raw(b",\"count\":");
            w.u64(count);
        });
        if appended {
            self.dropped_pending = 0;
        }
        appended
    }

    /// Appends a checkpoint if a key is set; it may use the reserve requests leave.
    fn append_checkpoint(&mut self) -> bool {
        let Some(key) = self.key else {
            return false;
        };
        let mac = checkpoint_mac(&key, &self.prev);
        self.append(0, self.last_ts, Kind::Checkpoint, |w| {
            w.raw(b",\"mac\":\"");
            w.hex(&mac);
            w.raw(b"\"");
        })
    }

    /// Formats one line (header, then `fields`, then `}` and newline) into the buffer, leaving
    /// `reserve` bytes free, and advances the chain; false (and nothing changed) if it does
    /// not fit.
    fn append(&mut self, reserve: usize, ts: u64, kind: Kind, fields: impl FnOnce(&mut LineWriter<'_>)) -> bool {
        let limit = self.buf.len().saturating_sub(reserve);
        let Some(space) = self.buf.get_mut(self.len..limit) else {
            return false;
        };
        let mut w = LineWriter::new(&mut *space);
        w.raw(b"{\"seq\":");
        w.u64(self.next_seq);
        w.raw(b",\"ts\":");
        w.u64(ts);
        w.raw(b",\"prev\":\"");
        w.hex(&self.prev);
        w.raw(b"\",\"kind\":\"");
        w.raw(kind.name());
        w.raw(b"\"");
        fields(&mut w);
        w.raw(b"}\n");
        let Some(written) = w.finish() else {
            return false;
        };
        self.prev = Sha256::digest(&space[..written - 1]).into();
        self.next_seq = self.next_seq.saturating_add(1);
        self.len += written;
        if kind == Kind::Checkpoint {
            self.since_checkpoint = 0;
        } else {
            self.since_checkpoint = self.since_checkpoint.saturating_add(1);
        }
        true
    }

    /// `audit.ndjson` → `.1` → … keeping `max_files` files in all, then a fresh active file
    /// created with `O_EXCL`. If that creation fails the old descriptor (now `.1`) stays in
    /// use, so no record is lost and the chain holds; the next flush tries again.
    fn rotate(&mut self) -> Result<(), AuditError> {
        remove_rotated_from(&self.dir, self.max_files.saturating_sub(1).max(1))?;
        for n in (1..self.max_files.saturating_sub(1)).rev() {
            match std::fs::rename(rotated_path(&self.dir, n), rotated_path(&self.dir, n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(AuditError::Rotate(e)),
                _ => {}
            }
        }
        let moved = if self.max_files > 1 {
            std::fs::rename(&self.active, rotated_path(&self.dir, 1))
        } else {
            std::fs::remove_file(&self.active)
        };
        match moved {
            // A retry after a failed creation: the active name is already free.
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(AuditError::Rotate(e)),
            _ => {}
        }
        self.file = open_active(&self.active, true)?;
        self.file_bytes = 0;
        Ok(())
    }
}

/// `<dir>/audit.ndjson.<n>`.
fn rotated_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("{ACTIVE_FILE_NAME}.{n}"))
}

/// The first `max` bytes of `bytes`.
fn cap(bytes: &[u8], max: usize) -> &[u8] {
    &bytes[..bytes.len().min(max)]
}

/// The directory itself must not be a symlink, and nobody but its owner may plant files in it.
fn check_dir(dir: &Path) -> Result<(), AuditError> {
    let meta = std::fs::symlink_metadata(dir).map_err(AuditError::CreateDir)?;
    if meta.file_type().is_symlink() {
        return Err(AuditError::UnsafeDir("it is a symlink"));
    }
    if !meta.is_dir() {
        return Err(AuditError::UnsafeDir("not a directory"));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(AuditError::UnsafeDir("writable by group or others"));
    }
    Ok(())
}

/// Opens the active file for reading and appending without following a symlink; `fresh`
/// insists on creating it. Sets mode 0640 through the descriptor (whatever the umask, and
/// failing on a file we do not own).
fn open_active(path: &Path, fresh: bool) -> Result<File, AuditError> {
    let mut options = OpenOptions::new();
    options.read(true).append(true).mode(0o640).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if fresh {
        options.create_new(true);
    } else {
        options.create(true);
    }
    let file = options.open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) { AuditError::Symlink } else { AuditError::OpenFile(e) }
    })?;
    let meta = file.metadata().map_err(AuditError::OpenFile)?;
    if !meta.is_file() {
        return Err(AuditError::UnsafeFile("not a regular file"));
    }
    if meta.nlink() > 1 {
        return Err(AuditError::UnsafeFile("it has other hard links"));
    }
    file.set_permissions(Permissions::from_mode(0o640)).map_err(AuditError::OpenFile)?;
    Ok(file)
}

/// Reads the last line of a non-empty file into `window`.
fn read_tail(file: &mut File, size: u64, window: &mut [u8]) -> io::Result<Tail> {
    let want = size.min(u64::try_from(window.len()).unwrap_or(u64::MAX));
    let data = &mut window[..usize::try_from(want).unwrap_or(0)];
    file.seek(SeekFrom::Start(size - want))?;
    file.read_exact(data)?;
    let (body, need_newline) = match data.strip_suffix(b"\n") {
        Some(body) => (body, false),
        None => (&*data, true),
    };
    let start = match body.iter().rposition(|b| *b == b'\n') {
        Some(newline) => newline + 1,
        None if want == size => 0,
        None => {
            return Ok(Tail::Restart { reason: "last line too long", need_newline });
        }
    };
    let line = &body[start..];
    Ok(match parse_record(line) {
        Some(head) => Tail::Resume { seq: head.seq, hash: Sha256::digest(line).into(), ts: head.ts, need_newline },
        None if need_newline => Tail::Restart { reason: "torn last line", need_newline },
        None => Tail::Restart { reason: "unparsable last line", need_newline },
    })
}

/// The active file is empty (rotation just happened, or first start): continue from `.1`.
fn read_rotated_tail(path: &Path, window: &mut [u8]) -> io::Result<Tail> {
    let opened = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path);
    let mut file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Tail::Empty),
        Err(_unusable) => {
            return Ok(Tail::Restart { reason: "previous file unreadable", need_newline: false });
        }
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(Tail::Restart { reason: "previous file not a regular file", need_newline: false });
    }
    if meta.len() == 0 {
        return Ok(Tail::Empty);
    }
    Ok(match read_tail(&mut file, meta.len(), window)? {
        // That file is closed for writing: its torn line stays as it is.
        Tail::Resume { seq, hash, ts, .. } => Tail::Resume { seq, hash, ts, need_newline: false },
        Tail::Restart { reason, .. } => Tail::Restart { reason, need_newline: false },
        Tail::Empty => Tail::Empty,
    })
}

/// Deletes `audit.ndjson.<n>` for every `n >= from` (also leftovers from a larger
/// `max_files`). `unlink` removes a planted symlink itself, never its target.
fn remove_rotated_from(dir: &Path, from: u32) -> Result<(), AuditError> {
    let prefix = format!("{ACTIVE_FILE_NAME}.");
    for entry in std::fs::read_dir(dir).map_err(AuditError::Rotate)? {
        let entry = entry.map_err(AuditError::Rotate)?;
        let name = entry.file_name();
        let number =
            name.to_str().and_then(|name| name.strip_prefix(prefix.as_str())).and_then(|n| n.parse::<u32>().ok());
        if number.is_some_and(|n| n >= from) {
            match std::fs::remove_file(entry.path()) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(AuditError::Rotate(e));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// HMAC-SHA256(`key`, `data`).
fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// A checkpoint's MAC: over the 32-byte hash of the line before it (its `prev`).
fn checkpoint_mac(key: &[u8; 32], prev: &[u8; 32]) -> [u8; 32] {
    hmac_sha256(key, prev)
}

/// Constant-time check of a checkpoint's MAC.
fn checkpoint_mac_matches(key: &[u8; 32], prev: &[u8; 32], mac: &[u8; 32]) -> bool {
    let mut state = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    state.update(prev);
    state.verify_slice(mac).is_ok()
}

/// The checkpoint key: HMAC-SHA256(MSP key, [`CHECKPOINT_KEY_LABEL`]).
///
/// The raw MSP key never has to reach this module: `keyed_hmac` returns HMAC-SHA256 under the
/// latched key of the bytes it is given (the signing key's keyed MAC state can provide it).
/// The result is the key for [`AuditLog::set_checkpoint_key`] and [`verify_files`]; it reveals
/// nothing about the MSP key and is never written anywhere.
pub fn derive_checkpoint_key(keyed_hmac: impl FnOnce(&[u8]) -> [u8; 32]) -> [u8; 32] {
    keyed_hmac(CHECKPOINT_KEY_LABEL)
}

/// [`derive_checkpoint_key`] from the raw key bytes (for the offline verifier, which reads the
/// key file itself).
pub fn derive_checkpoint_key_from_raw(msp_key: &[u8]) -> [u8; 32] {
    derive_checkpoint_key(|label| hmac_sha256(msp_key, label))
}

#[cfg(test)]
mod tests;
