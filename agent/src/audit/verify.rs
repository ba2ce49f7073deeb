// SPDX-License-Identifier: MIT
//! Offline verification of audit files (the `--verify-audit` side; nothing here runs in the
//! event loop).
//!
//! Each line's SHA-256 must equal the next line's `prev`, `seq` must count up by one across
//! all given files (oldest rotated file first), and with a key every checkpoint's MAC must
//! verify. The report names the FIRST broken line, attributing it where the neighbours allow:
//! an edited line is named itself (the line after it still links past it), a deleted line is
//! named by the line that follows the gap, an inserted line is named itself when the genuine
//! line it duplicates is the one the chain continues from.

use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::line::{Header, Kind, parse_record};

/// The reasons [`VerifyReport::first_break`] can give.
pub mod why {
    /// The named line changed after it was written (its successor no longer matches it).
    pub const EDITED: &str = "edited";
    /// The line's `prev` matches nothing expected; the neighbours do not tell which changed.
    pub const HASH_MISMATCH: &str = "hash mismatch";
    /// `seq` jumps forward: lines before this one were deleted (or lines were swapped).
    pub const SEQUENCE_GAP: &str = "sequence gap";
    /// `seq` goes backwards or repeats: a line was inserted, replayed or moved.
    pub const SEQUENCE_OUT_OF_ORDER: &str = "sequence out of order";
    /// Not a well-formed audit record.
    pub const BAD_JSON: &str = "bad json";
    /// A checkpoint whose MAC does not verify with the given key.
    pub const BAD_CHECKPOINT_MAC: &str = "bad checkpoint mac";
    /// The file could not be read (line 0).
    pub const UNREADABLE: &str = "unreadable";
}

/// What [`verify_files`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Non-checkpoint lines checked before the first break (or in total).
    pub records: u64,
    /// Checkpoint lines checked (MAC-verified when `macs_checked`).
    pub checkpoints: u64,
    /// Whether a key was given, so checkpoint MACs were verified.
    pub macs_checked: bool,
    /// The first broken line: file, 1-based line number, and one of the [`why`] reasons.
    pub first_break: Option<(PathBuf, u64, &'static str)>,
}

impl VerifyReport {
    /// True when no break was found.
    pub fn is_ok(&self) -> bool {
        self.first_break.is_none()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some((path, line, reason)) = &self.first_break else {
            write!(f, "ok: {} records, {} checkpoints", self.records, self.checkpoints)?;
            if !self.macs_checked && self.checkpoints > 0 {
                f.write_str(" (checkpoint macs not checked: no key)")?;
            }
            return Ok(());
        };
        let explanation = match *reason {
            why::EDITED => "this record was changed after it was written",
            why::SEQUENCE_GAP => "records missing before this line (deleted, or lines swapped)",
            why::SEQUENCE_OUT_OF_ORDER => "record inserted, replayed or moved here",
            why::BAD_JSON => "not a well-formed audit record",
            why::BAD_CHECKPOINT_MAC => {
                "checkpoint does not verify with this key: chain rewritten, or made under another key"
            }
            why::UNREADABLE => "file cannot be read",
            _ => "record edited, deleted or inserted before this line",
        };
        write!(f, "{}:{line}: chain broken ({reason}): {explanation}", path.display())
    }
}

/// Verifies `paths` as one chain, oldest first (e.g. `audit.ndjson.2`, `audit.ndjson.1`,
/// `audit.ndjson`). The oldest file may start mid-chain (older files rotated away); a chain
/// starting at `seq` 1 must start from 64 zeros. With `key` (see
/// [`derive_checkpoint_key`](super::derive_checkpoint_key)) every checkpoint must verify.
pub fn verify_files(paths: &[PathBuf], key: Option<&[u8; 32]>) -> VerifyReport {
    let mut contents = Vec::with_capacity(paths.len());
    for path in paths {
        match std::fs::read(path) {
            Ok(bytes) => contents.push(bytes),
            Err(_unreadable) => {
                return VerifyReport {
                    records: 0,
                    checkpoints: 0,
                    macs_checked: key.is_some(),
                    first_break: Some((path.clone(), 0, why::UNREADABLE)),
                };
            }
        }
    }
    let files: Vec<(&Path, &[u8])> =
        paths.iter().map(PathBuf::as_path).zip(contents.iter().map(Vec::as_slice)).collect();
    verify_contents(&files, key)
}

/// One line of one file.
struct Line<'a> {
    file: usize,
    number: u64,
    bytes: &'a [u8],
}

/// [`verify_files`] over contents already in memory.
pub(super) fn verify_contents(files: &[(&Path, &[u8])], key: Option<&[u8; 32]>) -> VerifyReport {
    let mut lines = Vec::new();
    for (file, (_, content)) in files.iter().enumerate() {
        if content.is_empty() {
            continue;
        }
        let body = content.strip_suffix(b"\n").unwrap_or(content);
        for (number, bytes) in (1..).zip(body.split(|b| *b == b'\n')) {
            lines.push(Line { file, number, bytes });
        }
    }
    let mut report = VerifyReport { records: 0, checkpoints: 0, macs_checked: key.is_some(), first_break: None };
    if let Some((index, reason)) = first_break(&lines, key, &mut report) {
        let line = &lines[index];
        report.first_break = Some((files[line.file].0.to_path_buf(), line.number, reason));
    }
    report
}

fn hash(line: &Line<'_>) -> [u8; 32] {
    Sha256::digest(line.bytes).into()
}

fn header(lines: &[Line<'_>], index: usize) -> Option<Header> {
    lines.get(index).and_then(|line| parse_record(line.bytes))
}

/// Walks the chain; returns the index of the first broken line and why.
fn first_break(lines: &[Line<'_>], key: Option<&[u8; 32]>, report: &mut VerifyReport) -> Option<(usize, &'static str)> {
    // (seq, prev) the next line must carry; None before the first line.
    let mut expected: Option<(u64, [u8; 32])> = None;
    for (index, line) in lines.iter().enumerate() {
        let Some(head) = parse_record(line.bytes) else {
            return Some((index, why::BAD_JSON));
        };
        match expected {
            None if head.seq == 1 && head.prev != [0; 32] => {
                return Some((index, why::HASH_MISMATCH));
            }
            None => {}
            Some((seq, _)) if head.seq > seq => return Some((index, why::SEQUENCE_GAP)),
            Some((seq, _)) if head.seq < seq => {
                return Some((intruder(lines, index, &head), why::SEQUENCE_OUT_OF_ORDER));
            }
            Some((_, prev)) if head.prev != prev => return Some(link_break(lines, index)),
            Some(_) => {}
        }
        if head.kind == Kind::Checkpoint {
            report.checkpoints += 1;
            if let (Some(key), Some(mac)) = (key, head.mac)
                && !super::checkpoint_mac_matches(key, &head.prev, &mac)
            {
                return Some((index, why::BAD_CHECKPOINT_MAC));
            }
        } else {
            report.records += 1;
        }
        expected = Some((head.seq.saturating_add(1), hash(line)));
    }
    None
}

/// `seq` went backwards at `index`. If the line before claims the very same place (same
/// `seq`, same `prev`) and the chain continues from this line, the one before is the intruder.
fn intruder(lines: &[Line<'_>], index: usize, head: &Header) -> usize {
    let Some(before) = index.checked_sub(1).and_then(|i| header(lines, i)) else {
        return index;
    };
    let twin = before.seq == head.seq && before.prev == head.prev;
    let continues_from_this = header(lines, index + 1).is_none_or(|next| next.prev == hash(&lines[index]));
    if twin && continues_from_this { index - 1 } else { index }
}

/// `seq` is right at `index` but `prev` does not match the line before: decide from the line
/// after which of the two changed.
fn link_break(lines: &[Line<'_>], index: usize) -> (usize, &'static str) {
    let Some(next) = header(lines, index + 1) else {
        return (index, why::HASH_MISMATCH);
    };
    if next.prev == hash(&lines[index]) {
        // This line is intact and followed by its genuine successor: the one before changed.
        (index - 1, why::EDITED)
    } else if next.prev == hash(&lines[index - 1]) {
        // The chain skips this line: it was put here afterwards.
        (index, why::SEQUENCE_OUT_OF_ORDER)
    } else {
        // Neither neighbour links to this line as written: its own `prev` was changed.
        (index, why::EDITED)
    }
}
