// SPDX-License-Identifier: MIT
//! Customer-managed local rule files (MSP §4.7): the base64 id descriptor that switches them
//! on, reading and validating `WireServer_Rules.json` / `IMDS_Rules.json`, merging them into
//! the host's item, failing closed when they are bad, and deciding when to read them again.
//!
//! Read MSP §4.7 first. All of this runs on the setup path (the status poll), never per
//! request, so it may allocate (`Box`, the file buffer).
//!
//! Safety properties and where they come from:
//! * **A local file can never lower the mode**: its `mode` is not even parsed; the mode is
//!   always the host's (attack catalog S3).
//! * **Fail closed**: unreadable metadata, a read error, malformed JSON, a duplicate key, a
//!   validation error or a merge that does not fit produce the host item with
//!   `defaultAccess: deny` and no rules (mode kept) (S10, S12, S18).
//! * **Duplicate JSON keys** are refused, not resolved: serde's derived visitors reject a
//!   repeated struct field and `rules::unique_query_map` a repeated query key; so "last wins"
//!   never even gets a chance to pick "allow" (S12).
//! * **A group- or world-writable file is refused** (fail closed): anyone who can write it
//!   could grant themselves access. This project's addition.
//!
//! Deliberate differences from the reference: no in-place retry (3 attempts 50 ms apart
//! would block the single-threaded loop); a failed read is simply retried on the next poll,
//! because "the previous read failed" is one of the re-read triggers. File state includes
//! size and inode besides mtime, so an atomic replace within one mtime tick is still seen.

use core::fmt::{self, Write as _};
use std::io::{self, Read as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use heapless::{String, Vec};
use serde::Deserialize;

use super::compile::{ContentDigest, content_digest};
use super::rules::limits::ID_MAX_BYTES;
use super::rules::{AccessControlRules, AuthorizationItem, Name};
use crate::redirect::Endpoint;

/// Directory of the local rule files (MSP §11 item 11: this project's state directory).
pub const DEFAULT_RULES_DIR: &str = "/var/lib/guest-proxy-agent/rules/";
/// The WireServer file name.
pub const WIRESERVER_RULES_FILE: &str = "WireServer_Rules.json";
/// The IMDS file name.
pub const IMDS_RULES_FILE: &str = "IMDS_Rules.json";
/// Prefix given to local names when both sides carry rules.
pub const LOCAL_PREFIX: &str = "LocalFileRules_";
/// Largest local file read. A full rule set at schema capacity is about 40 KiB of JSON;
/// anything bigger cannot parse into the fixed model anyway, so stop reading early.
pub const LOCAL_FILE_MAX_BYTES: usize = 64 * 1024;
/// Room to unescape one JSON string: the longest string field is an id.
const UNESCAPE_BYTES: usize = ID_MAX_BYTES;
/// Suffix room of a rewritten id: `-useLocalFileRules-false`.
const DESCRIPTOR_SUFFIX_BYTES: usize = 24;
// A decoded descriptor id (at most 3/4 of a raw id) plus the suffix always fits an id.
const _: () = assert!(ID_MAX_BYTES / 4 * 3 + DESCRIPTOR_SUFFIX_BYTES <= ID_MAX_BYTES);

/// The local file of an endpoint; HostGAPlugin never uses one (MSP §4.7).
pub fn rules_file_name(endpoint: Endpoint) -> Option<&'static str> {
    match endpoint {
        Endpoint::WireServer => Some(WIRESERVER_RULES_FILE),
        Endpoint::Imds => Some(IMDS_RULES_FILE),
        Endpoint::HostGaPlugin | Endpoint::Unknown(_) => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Descriptor ids

/// Decodes standard base64 (RFC 4648 §4) strictly: length a multiple of 4, padding only at the
/// end, unused trailing bits zero, no whitespace. Returns the decoded prefix of `out`.
pub fn base64_decode<'o>(input: &[u8], out: &'o mut [u8]) -> Option<&'o [u8]> {
    fn value(byte: u8) -> Option<u32> {
        let v = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        Some(u32::from(v))
    }
    if !input.len().is_multiple_of(4) {
        return None;
    }
    let quads = input.len() / 4;
    let mut n = 0;
    for (index, quad) in input.chunks_exact(4).enumerate() {
        let padding = match quad {
            [.., b'=', b'='] => 2,
            [.., b'='] => 1,
            _ => 0,
        };
        if padding > 0 && index + 1 != quads {
            return None;
        }
        let mut bits = 0u32;
        for &byte in &quad[..4 - padding] {
            bits = bits << 6 | value(byte)?;
        }
        bits <<= 6 * padding;
        let bytes = bits.to_be_bytes();
        let produced = &bytes[1..4 - padding];
        if bytes[4 - padding..].iter().any(|b| *b != 0) {
            // Non-canonical: the unused bits of the last character are set.
            return None;
        }
        out.get_mut(n..n + produced.len())?.copy_from_slice(produced);
        n += produced.len();
    }
    Some(&out[..n])
}

/// The JSON a descriptor id decodes to (MSP §4.7). Both fields optional; unknown ones ignored.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Descriptor {
    /// The logical rule-set id.
    #[serde(default)]
    pub id: Option<String<ID_MAX_BYTES>>,
    /// Whether the local file applies.
    #[serde(default, rename = "useLocalFileRules")]
    pub use_local_file_rules: Option<bool>,
}

/// Parses a raw rule id as a descriptor; `None` means "a plain id, local files off".
pub fn parse_descriptor(raw_id: &str) -> Option<Descriptor> {
    let mut decoded = [0u8; ID_MAX_BYTES];
    let json = base64_decode(raw_id.as_bytes(), &mut decoded)?;
    let mut unescape = [0u8; UNESCAPE_BYTES];
    serde_json_core::from_slice_escaped::<Descriptor>(json, &mut unescape).ok().map(|(d, _)| d)
}

/// A host item's id after descriptor handling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostId {
    /// `<logical id>-useLocalFileRules-<flag>` for a descriptor, else the raw id.
    pub id: String<ID_MAX_BYTES>,
    /// Whether the local file applies.
    pub use_local_file_rules: bool,
}

/// Resolves a raw id: descriptor → rewritten id and flag; anything else → itself, flag off.
pub fn resolve_id(raw_id: &str) -> HostId {
    let plain = || HostId { id: String::try_from(raw_id).unwrap_or_default(), use_local_file_rules: false };
    let Some(descriptor) = parse_descriptor(raw_id) else {
        return plain();
    };
    let flag = descriptor.use_local_file_rules.unwrap_or(false);
    let logical = descriptor.id.as_deref().filter(|id| !id.is_empty()).unwrap_or("unknown");
    let mut id = String::new();
    // Cannot fail (see the size assertion above); if it did, local files stay off.
    match write!(id, "{logical}-useLocalFileRules-{flag}") {
        Ok(()) => HostId { id, use_local_file_rules: flag },
        Err(fmt::Error) => plain(),
    }
}

// ---------------------------------------------------------------------------------------------
// The file

pub use self::file_schema::LocalRulesFile;

/// The file schema in its own module so the lint exception covers only its derives.
mod file_schema {
    #![expect(
        clippy::large_stack_frames,
        reason = "serde derive of a ~160 KiB fixed-capacity value, parsed on the setup path (see rules.rs)"
    )]

    use heapless::String;
    use serde::Deserialize;

    use super::super::rules::AccessControlRules;
    use super::super::rules::limits::{ID_MAX_BYTES, WORD_MAX_BYTES};

    /// A local rule file (MSP §4.7). `mode` is deliberately absent: it is ignored.
    #[derive(Clone, Debug, Default, Deserialize)]
    pub struct LocalRulesFile {
        /// `allow` / `deny`, trimmed, case-insensitive; overrides the host's.
        #[serde(default, rename = "defaultAccess")]
        pub default_access: Option<String<WORD_MAX_BYTES>>,
        /// Appended to the host id as `<host id>_<id>`.
        #[serde(default)]
        pub id: Option<String<ID_MAX_BYTES>>,
        /// Local rules.
        #[serde(default)]
        pub rules: Option<AccessControlRules>,
    }
}

/// What is wrong with a local file's content (MSP §4.7 validation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValidationError {
    /// `defaultAccess` is neither allow nor deny.
    DefaultAccess,
    /// `id` is blank.
    BlankId,
    /// A privilege, role or identity has a blank name.
    BlankName,
    /// Two privileges share a name.
    DuplicatePrivilege,
    /// A privilege has a blank path.
    BlankPath,
    /// A query parameter key or value is blank.
    BlankQueryParameter,
    /// Two roles share a name.
    DuplicateRole,
    /// A role lists no privilege.
    RoleWithoutPrivileges,
    /// A reference (privilege in a role, identity in an assignment) is blank.
    BlankReference,
    /// A role lists the same privilege twice, or an assignment the same identity.
    DuplicateReference,
    /// A role names a privilege that does not exist.
    UnknownPrivilege,
    /// Two identities share a name.
    DuplicateIdentity,
    /// An identity has no non-blank selector (it would match everyone).
    IdentityWithoutSelector,
    /// An assignment names a role that does not exist.
    UnknownRole,
    /// An assignment lists no identity.
    AssignmentWithoutIdentities,
    /// An assignment names an identity that does not exist.
    UnknownIdentity,
}

/// Why a local file could not be used; every variant means "fail closed".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalRulesError {
    /// `stat` failed for a reason other than "not found".
    Metadata(io::ErrorKind),
    /// Not a regular file.
    NotAFile,
    /// Group- or world-writable.
    InsecurePermissions,
    /// Over [`LOCAL_FILE_MAX_BYTES`].
    TooLarge,
    /// Reading failed.
    Read(io::ErrorKind),
    /// Malformed JSON, a duplicate key, a wrong type or a value over a capacity.
    Json(serde_json_core::de::Error),
    /// Parsed but invalid.
    Invalid(ValidationError),
    /// The merged item would exceed a capacity (too many entries, or a name too long for the
    /// `LocalFileRules_` prefix, or an id too long).
    MergeCapacity,
}

impl fmt::Display for LocalRulesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Metadata(kind) => write!(f, "reading file metadata failed: {kind}"),
            Self::NotAFile => f.write_str("not a regular file"),
            Self::InsecurePermissions => f.write_str("file is group- or world-writable"),
            Self::TooLarge => write!(f, "file larger than {LOCAL_FILE_MAX_BYTES} bytes"),
            Self::Read(kind) => write!(f, "reading file failed: {kind}"),
            Self::Json(e) => write!(f, "invalid JSON: {e}"),
            Self::Invalid(e) => write!(f, "invalid rules: {e:?}"),
            Self::MergeCapacity => f.write_str("merged rules exceed a capacity"),
        }
    }
}

/// Parses and validates a file's bytes (a UTF-8 BOM is tolerated).
pub fn parse_local_file(bytes: &[u8]) -> Result<Box<LocalRulesFile>, LocalRulesError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let file = parse_boxed::<LocalRulesFile>(bytes).map_err(LocalRulesError::Json)?;
    validate(&file).map_err(LocalRulesError::Invalid)?;
    Ok(file)
}

/// Parses JSON into a `Box`, in a frame of its own so the value's stack copies stay here.
#[inline(never)]
pub(crate) fn parse_boxed<'de, T: Deserialize<'de>>(json: &'de [u8]) -> Result<Box<T>, serde_json_core::de::Error> {
    let mut unescape = [0u8; UNESCAPE_BYTES];
    serde_json_core::from_slice_escaped::<T>(json, &mut unescape).map(|(value, _)| Box::new(value))
}

/// Clones a large item into a `Box`, in a frame of its own.
#[inline(never)]
fn clone_boxed(item: &AuthorizationItem) -> Box<AuthorizationItem> {
    Box::new(item.clone())
}

fn blank(text: &str) -> bool {
    text.trim().is_empty()
}

/// Checks a list of references: non-blank, unique, each naming something that exists.
fn check_references(
    references: &[Name],
    exists: impl Fn(&str) -> bool,
    unknown: ValidationError,
) -> Result<(), ValidationError> {
    for (i, reference) in references.iter().enumerate() {
        if blank(reference) {
            return Err(ValidationError::BlankReference);
        }
        if references[..i].contains(reference) {
            return Err(ValidationError::DuplicateReference);
        }
        if !exists(reference) {
            return Err(unknown);
        }
    }
    Ok(())
}

/// The validation rules of MSP §4.7.
pub fn validate(file: &LocalRulesFile) -> Result<(), ValidationError> {
    use ValidationError as E;
    if let Some(access) = &file.default_access {
        let access = access.trim();
        if !access.eq_ignore_ascii_case("allow") && !access.eq_ignore_ascii_case("deny") {
            return Err(E::DefaultAccess);
        }
    }
    if file.id.as_deref().is_some_and(blank) {
        return Err(E::BlankId);
    }
    let Some(rules) = &file.rules else {
        return Ok(());
    };
    let privileges = rules.privileges.as_deref().unwrap_or_default();
    let roles = rules.roles.as_deref().unwrap_or_default();
    let identities = rules.identities.as_deref().unwrap_or_default();
    for (i, p) in privileges.iter().enumerate() {
        if blank(&p.name) {
            return Err(E::BlankName);
        }
        if privileges[..i].iter().any(|q| q.name == p.name) {
            return Err(E::DuplicatePrivilege);
        }
        if blank(&p.path) {
            return Err(E::BlankPath);
        }
        if p.query_parameters.iter().flatten().any(|(k, v)| blank(k) || blank(v)) {
            return Err(E::BlankQueryParameter);
        }
    }
    for (i, r) in roles.iter().enumerate() {
        if blank(&r.name) {
            return Err(E::BlankName);
        }
        if roles[..i].iter().any(|q| q.name == r.name) {
            return Err(E::DuplicateRole);
        }
        if r.privileges.is_empty() {
            return Err(E::RoleWithoutPrivileges);
        }
        check_references(&r.privileges, |n| privileges.iter().any(|p| p.name == n), E::UnknownPrivilege)?;
    }
    for (i, identity) in identities.iter().enumerate() {
        if blank(&identity.name) {
            return Err(E::BlankName);
        }
        if identities[..i].iter().any(|q| q.name == identity.name) {
            return Err(E::DuplicateIdentity);
        }
        let selectors = [
            identity.user_name.as_deref(),
            identity.group_name.as_deref(),
            identity.exe_path.as_deref(),
            identity.process_name.as_deref(),
        ];
        if !selectors.into_iter().flatten().any(|s| !blank(s)) {
            return Err(E::IdentityWithoutSelector);
        }
    }
    for assignment in rules.role_assignments.as_deref().unwrap_or_default() {
        if !roles.iter().any(|r| r.name == assignment.role) {
            return Err(E::UnknownRole);
        }
        if assignment.identities.is_empty() {
            return Err(E::AssignmentWithoutIdentities);
        }
        check_references(&assignment.identities, |n| identities.iter().any(|i| i.name == n), E::UnknownIdentity)?;
    }
    Ok(())
}

/// State of a rule file, for change detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileState {
    /// No such file.
    Missing,
    /// Present, with what identifies this version of it.
    Present {
        /// Modification time, nanoseconds since the epoch.
        modified_ns: i128,
        /// Size in bytes.
        len: u64,
        /// Inode (changes on an atomic replace).
        inode: u64,
    },
    /// `stat` failed.
    Error(io::ErrorKind),
}

/// `stat`s a rule file.
pub fn file_state(path: &Path) -> FileState {
    match std::fs::metadata(path) {
        Ok(m) => FileState::Present {
            modified_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            len: m.len(),
            inode: m.ino(),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => FileState::Missing,
        Err(e) => FileState::Error(e.kind()),
    }
}

/// Checks what `stat`/`fstat` says about a rule file before trusting its content.
fn check_metadata(metadata: &std::fs::Metadata) -> Result<(), LocalRulesError> {
    if !metadata.is_file() {
        return Err(LocalRulesError::NotAFile);
    }
    // Only a file the agent's own user owns, writable by nobody else, may change the rules:
    // otherwise a local user could grant itself access.
    if metadata.mode() & 0o022 != 0 || metadata.uid() != crate::sys::geteuid() {
        return Err(LocalRulesError::InsecurePermissions);
    }
    if metadata.len() > u64::try_from(LOCAL_FILE_MAX_BYTES).unwrap_or(u64::MAX) {
        return Err(LocalRulesError::TooLarge);
    }
    Ok(())
}

/// Reads, parses and validates a rule file. `Ok(None)`: the file does not exist.
///
/// The path is checked with `stat` before opening (so a FIFO or device is never opened, which
/// could block the loop) and the opened file again with `fstat` (so what is read is what was
/// checked).
pub fn read_local_file(path: &Path) -> Result<Option<Box<LocalRulesFile>>, LocalRulesError> {
    // The folder must be ours and closed to others too (a writable folder lets anyone swap
    // the file between checks).
    if let Some(dir) = path.parent() {
        match std::fs::symlink_metadata(dir) {
            Ok(m) if !m.is_dir() || m.uid() != crate::sys::geteuid() || m.mode() & 0o022 != 0 => {
                return Err(LocalRulesError::InsecurePermissions);
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LocalRulesError::Metadata(e.kind())),
        }
    }
    match std::fs::metadata(path) {
        Ok(m) => check_metadata(&m)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LocalRulesError::Metadata(e.kind())),
    }
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LocalRulesError::Read(e.kind())),
    };
    match file.metadata() {
        Ok(m) => check_metadata(&m)?,
        Err(e) => return Err(LocalRulesError::Metadata(e.kind())),
    }
    let mut bytes = std::vec::Vec::new();
    // `take(LIMIT + 1)` bounds the read even if the file grows after the check.
    let limit = u64::try_from(LOCAL_FILE_MAX_BYTES).unwrap_or(u64::MAX).saturating_add(1);
    if let Err(e) = file.by_ref().take(limit).read_to_end(&mut bytes) {
        return Err(LocalRulesError::Read(e.kind()));
    }
    if bytes.len() > LOCAL_FILE_MAX_BYTES {
        return Err(LocalRulesError::TooLarge);
    }
    parse_local_file(&bytes).map(Some)
}

// ---------------------------------------------------------------------------------------------
// Merge and fail-closed

fn synthetic(mode: &str, id: &str) -> Box<AuthorizationItem> {
    // Built in its box: an item is ~300 KiB even without rules.
    let mut item = Box::<AuthorizationItem>::default();
    item.default_access = String::try_from("deny").unwrap_or_default();
    item.mode = String::try_from(mode).unwrap_or_default();
    item.id = String::try_from(id).unwrap_or_default();
    item
}

/// `name` with the local prefix, unless it already has it (idempotent, catalog S17).
pub fn prefixed(name: &str) -> Result<Name, LocalRulesError> {
    let mut out = Name::new();
    if !name.starts_with(LOCAL_PREFIX) {
        out.push_str(LOCAL_PREFIX).map_err(|()| LocalRulesError::MergeCapacity)?;
    }
    out.push_str(name).map_err(|()| LocalRulesError::MergeCapacity)?;
    Ok(out)
}

/// Appends `local`'s entries to `host`'s array (creating it when absent), each transformed.
fn append<T: Clone, const N: usize>(
    host: &mut Option<Vec<T, N>>,
    local: &Option<Vec<T, N>>,
    transform: impl Fn(&mut T) -> Result<(), LocalRulesError>,
) -> Result<(), LocalRulesError> {
    let Some(local) = local else { return Ok(()) };
    let target = host.get_or_insert_with(Vec::new);
    for entry in local {
        let mut entry = entry.clone();
        transform(&mut entry)?;
        if target.push(entry).is_err() {
            return Err(LocalRulesError::MergeCapacity);
        }
    }
    Ok(())
}

fn prefix_all(names: &mut Vec<Name, { super::rules::limits::MAX_REFERENCES }>) -> Result<(), LocalRulesError> {
    for name in names.iter_mut() {
        *name = prefixed(name)?;
    }
    Ok(())
}

/// Both sides carry rules: local names and cross-references prefixed, local arrays appended.
fn merge_rules(host: &mut AccessControlRules, local: &AccessControlRules) -> Result<(), LocalRulesError> {
    append(&mut host.privileges, &local.privileges, |p| {
        p.name = prefixed(&p.name)?;
        Ok(())
    })?;
    append(&mut host.roles, &local.roles, |r| {
        r.name = prefixed(&r.name)?;
        prefix_all(&mut r.privileges)
    })?;
    append(&mut host.identities, &local.identities, |i| {
        i.name = prefixed(&i.name)?;
        Ok(())
    })?;
    append(&mut host.role_assignments, &local.role_assignments, |a| {
        a.role = prefixed(&a.role)?;
        prefix_all(&mut a.identities)
    })
}

/// Merges a valid local file into the host item (MSP §4.7 "Merge"). `host_id` is the host's
/// id after descriptor rewriting. The mode is always the host's (or `disabled` for the
/// synthetic item when the host sent none).
#[expect(
    clippy::large_stack_frames,
    reason = "clones of the ~300 KiB fixed-capacity item on the setup path, on the 32 MiB worker stack"
)]
pub fn merge(
    host: Option<&AuthorizationItem>,
    host_id: &str,
    local: &LocalRulesFile,
) -> Result<Box<AuthorizationItem>, LocalRulesError> {
    let mut merged = match host {
        Some(host) => clone_boxed(host),
        None => synthetic("disabled", host_id),
    };
    merged.id = String::try_from(host_id).map_err(|()| LocalRulesError::MergeCapacity)?;
    if let Some(local_id) = &local.id {
        merged.id.push('_').map_err(|()| LocalRulesError::MergeCapacity)?;
        merged.id.push_str(local_id).map_err(|()| LocalRulesError::MergeCapacity)?;
    }
    if let Some(access) = &local.default_access {
        let access = if access.trim().eq_ignore_ascii_case("allow") { "allow" } else { "deny" };
        merged.default_access = String::try_from(access).unwrap_or_default();
    }
    // In place: an `AccessControlRules` is too big to move around casually.
    match (&mut merged.rules, &local.rules) {
        (Some(host_rules), Some(local_rules)) => merge_rules(host_rules, local_rules)?,
        (host_rules @ None, Some(local_rules)) => *host_rules = Some(local_rules.clone()),
        (_, None) => {}
    }
    Ok(merged)
}

/// The fail-closed item: the host item (or a synthetic `enforce` one) with `defaultAccess`
/// `deny` and no rules; mode unchanged; id = `host_id`.
pub fn fail_closed(host: Option<&AuthorizationItem>, host_id: &str) -> Box<AuthorizationItem> {
    let Some(host) = host else {
        return synthetic("enforce", host_id);
    };
    let mut item = synthetic("", host_id);
    item.mode = host.mode.clone();
    item
}

/// The host item with its id rewritten (no local file involved).
fn with_id(host: &AuthorizationItem, id: &str) -> Box<AuthorizationItem> {
    let mut item = clone_boxed(host);
    item.id = String::try_from(id).unwrap_or_else(|()| host.id.clone());
    item
}

// ---------------------------------------------------------------------------------------------
// Change detection

/// Something worth a telemetry event (MSP §4.7 method names in [`LocalRulesEvent::name`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalRulesEvent {
    /// The file appeared, changed, disappeared or became unreadable.
    StateChanged {
        /// Previous state (`None`: not watched before).
        from: Option<FileState>,
        /// New state.
        to: FileState,
    },
    /// The file was read and merged.
    ParseSuccess,
    /// The file could not be used; the endpoint fails closed.
    ParseFailed(LocalRulesError),
    /// `stat` failed; the endpoint fails closed.
    MetadataReadFailed(io::ErrorKind),
}

impl LocalRulesEvent {
    /// The telemetry method name of MSP §4.7.
    pub fn name(&self) -> &'static str {
        match self {
            Self::StateChanged { .. } => "LocalFileRulesStateChanged",
            Self::ParseSuccess => "LocalRulesFileParseSuccess",
            Self::ParseFailed(_) => "LocalRulesFileParseFailed",
            Self::MetadataReadFailed(_) => "LocalRulesFileMetadataReadFailed",
        }
    }
}

/// What the last refresh looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    host: Option<ContentDigest>,
    use_local: bool,
    file: Option<FileState>,
    failed: bool,
}

/// Result of [`LocalRulesTracker::refresh`].
#[derive(Debug)]
pub enum Refresh {
    /// Nothing that feeds the effective item changed.
    Unchanged,
    /// The effective item was rebuilt (`None`: the host sent no item). It may still equal
    /// the installed one; compare digests before recompiling.
    Rebuilt(Option<Box<AuthorizationItem>>),
}

/// Decides, per poll, whether an endpoint's effective item must be rebuilt, and builds it.
#[derive(Debug, Default)]
pub struct LocalRulesTracker {
    seen: Option<Seen>,
}

impl LocalRulesTracker {
    /// A tracker that has seen nothing (the first refresh always rebuilds).
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the effective item when the host item's content, the `useLocalFileRules`
    /// flag or the file's state changed, or the previous read failed (MSP §4.7, with content
    /// instead of id per §11 item 7). `rules_file` is `None` for HostGAPlugin.
    pub fn refresh(
        &mut self,
        host: Option<&AuthorizationItem>,
        rules_file: Option<&Path>,
        events: &mut dyn FnMut(LocalRulesEvent),
    ) -> Refresh {
        let host_id = host.map(|h| resolve_id(&h.id));
        let watched = rules_file.filter(|_| host_id.as_ref().is_some_and(|i| i.use_local_file_rules));
        let file = watched.map(file_state);
        let mut seen = Seen { host: host.map(content_digest), use_local: watched.is_some(), file, failed: false };
        let previous = self.seen;
        if previous.is_some_and(|p| !p.failed && p == seen) {
            return Refresh::Unchanged;
        }
        let previous_file = previous.and_then(|p| p.file);
        if let Some(file) = file.filter(|f| Some(*f) != previous_file) {
            events(LocalRulesEvent::StateChanged { from: previous_file, to: file });
        }
        let item = match (host, host_id, watched, file) {
            (None, _, _, _) => None,
            (Some(host), Some(id), Some(path), Some(state)) => {
                let (item, failed) = Self::with_local(host, &id.id, path, state, events);
                seen.failed = failed;
                Some(item)
            }
            (Some(host), id, _, _) => Some(with_id(host, id.as_ref().map_or(host.id.as_str(), |i| i.id.as_str()))),
        };
        self.seen = Some(seen);
        Refresh::Rebuilt(item)
    }

    /// Reads and merges the local file; returns the effective item and whether it failed.
    fn with_local(
        host: &AuthorizationItem,
        host_id: &str,
        path: &Path,
        state: FileState,
        events: &mut dyn FnMut(LocalRulesEvent),
    ) -> (Box<AuthorizationItem>, bool) {
        if let FileState::Error(kind) = state {
            events(LocalRulesEvent::MetadataReadFailed(kind));
            return (fail_closed(Some(host), host_id), true);
        }
        let merged = read_local_file(path).and_then(|file| match file {
            // Documented intent: no file means the host's rules (root-only WS, open IMDS).
            None => Ok(with_id(host, host_id)),
            Some(file) => merge(Some(host), host_id, &file),
        });
        match merged {
            Ok(item) => {
                if state != FileState::Missing {
                    events(LocalRulesEvent::ParseSuccess);
                }
                (item, false)
            }
            Err(LocalRulesError::Metadata(kind)) => {
                events(LocalRulesEvent::MetadataReadFailed(kind));
                (fail_closed(Some(host), host_id), true)
            }
            Err(e) => {
                events(LocalRulesEvent::ParseFailed(e));
                (fail_closed(Some(host), host_id), true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::PathBuf;

    use super::*;
    use crate::policy::compile::{CompiledRules, Mode, compile};
    use crate::policy::decide::{CallerView, Outcome, Reason, decide};
    use crate::policy::test_support::{item, on_big_stack};

    /// Standard base64 (test-side encoder, to build descriptor ids).
    fn b64(data: &[u8]) -> std::string::String {
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = std::string::String::new();
        for chunk in data.chunks(3) {
            let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
            let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn descriptor(json: &str) -> std::string::String {
        b64(json.as_bytes())
    }

    fn host(mode: &str, default: &str, id: &str, rules: &str) -> Box<AuthorizationItem> {
        let rules = if rules.is_empty() { std::string::String::new() } else { format!(r#","rules":{rules}"#) };
        item(&format!(r#"{{"defaultAccess":"{default}","mode":"{mode}","id":"{id}"{rules}}}"#))
    }

    fn parse(bytes: &[u8]) -> Result<Box<LocalRulesFile>, LocalRulesError> {
        on_big_stack(|| parse_local_file(bytes))
    }

    /// Host item + local file bytes → compiled effective rules, as the tracker builds them.
    fn effective(host: &AuthorizationItem, file: &[u8]) -> Box<CompiledRules> {
        on_big_stack(|| {
            let id = resolve_id(&host.id);
            let item = match parse_local_file(file).and_then(|f| merge(Some(host), &id.id, &f)) {
                Ok(item) => item,
                Err(_) => fail_closed(Some(host), &id.id),
            };
            compile(&item)
        })
    }

    fn enforce_deny_host() -> Box<AuthorizationItem> {
        let id = descriptor(r#"{"id":"host","useLocalFileRules":true}"#);
        host("enforce", "deny", &id, "")
    }

    const ROOT: CallerView<'static> = CallerView {
        uid: 0,
        user_name: Some("root"),
        groups: &["root"],
        exe_path: Some(b"/usr/bin/curl"),
        process_name: None,
    };
    const ALICE: CallerView<'static> = CallerView {
        uid: 1000,
        user_name: Some("alice"),
        groups: &["alice", "metadata-readers"],
        exe_path: Some(b"/usr/bin/python3"),
        process_name: None,
    };
    const ALICE_CURL: CallerView<'static> = CallerView { exe_path: Some(b"/usr/bin/curl"), ..ALICE };

    fn outcome(rules: &CompiledRules, endpoint: Endpoint, caller: &CallerView<'_>, target: &str) -> Outcome {
        decide(Some(rules), endpoint, caller, b"GET", target.as_bytes()).outcome
    }

    /// A local file granting one path (with optional query) to one identity.
    fn one_path_file(path: &str, query: &str, identity: &str) -> std::string::String {
        let query =
            if query.is_empty() { std::string::String::new() } else { format!(r#","queryParameters":{query}"#) };
        format!(
            r#"{{"defaultAccess":"deny","id":"local","rules":{{
            "privileges":[{{"name":"p","path":"{path}"{query}}}],
            "roles":[{{"name":"r","privileges":["p"]}}],
            "identities":[{{"name":"who"{identity}}}],
            "roleAssignments":[{{"role":"r","identities":["who"]}}]}}}}"#
        )
    }

    #[test]
    fn base64_rfc4648_vectors() {
        let mut out = [0u8; 16];
        for (encoded, decoded) in [
            ("", ""),
            ("Zg==", "f"),
            ("Zm8=", "fo"),
            ("Zm9v", "foo"),
            ("Zm9vYg==", "foob"),
            ("Zm9vYmE=", "fooba"),
            ("Zm9vYmFy", "foobar"),
        ] {
            assert_eq!(base64_decode(encoded.as_bytes(), &mut out), Some(decoded.as_bytes()), "{encoded}");
        }
        for bad in ["Zg=", "Zh==", "Zm9=", "Z===", "Zg==Zg==", "Zm9v\n", "Zm-v", "=Zg="] {
            assert_eq!(base64_decode(bad.as_bytes(), &mut out), None, "{bad}");
        }
        assert_eq!(base64_decode(b"Zm9vYmFy", &mut [0u8; 5]), None, "output too small");
    }

    #[test]
    fn plain_ids_are_not_descriptors() {
        for raw in ["", "abcd", "rules-v1", "/subscriptions/x/galleries/g", "bnVsbA==" /* null */] {
            let id = resolve_id(raw);
            assert_eq!((id.id.as_str(), id.use_local_file_rules), (raw, false), "{raw}");
        }
    }

    #[test]
    fn descriptor_ids_are_rewritten() {
        let id = resolve_id(&descriptor(r#"{"id":"decoded-id","useLocalFileRules":true}"#));
        assert_eq!((id.id.as_str(), id.use_local_file_rules), ("decoded-id-useLocalFileRules-true", true));
        let id = resolve_id(&descriptor(r#"{"useLocalFileRules":false,"other":1}"#));
        assert_eq!((id.id.as_str(), id.use_local_file_rules), ("unknown-useLocalFileRules-false", false));
        assert_eq!(resolve_id(&descriptor("{}")).id, "unknown-useLocalFileRules-false");
        assert_eq!(resolve_id(&descriptor(r#"{"id":""}"#)).id, "unknown-useLocalFileRules-false");
        assert!(!resolve_id(&descriptor(r#"{"id":"a","id":"b"}"#)).use_local_file_rules, "duplicate key: plain id");
    }

    #[test]
    fn merge_id_defaults_and_prefixing() {
        let h = host(
            "enforce",
            "allow",
            &descriptor(r#"{"id":"decoded-id","useLocalFileRules":true}"#),
            r#"{"privileges":[{"name":"hp","path":"/h"}],"roles":[{"name":"hr","privileges":["hp"]}],
                "identities":[{"name":"hi","userName":"root"}],"roleAssignments":[{"role":"hr","identities":["hi"]}]}"#,
        );
        let file = br#"{"defaultAccess":" DENY ","id":"local-id","rules":{
            "privileges":[{"name":"p","path":"/Local/Path"}],"roles":[{"name":"r","privileges":["p"]}],
            "identities":[{"name":"i","userName":"alice"}],"roleAssignments":[{"role":"r","identities":["i"]}]}}"#;
        let merged = on_big_stack(|| {
            let id = resolve_id(&h.id);
            merge(Some(&h), &id.id, &parse_local_file(file).expect("valid file")).expect("fits")
        });
        assert_eq!(merged.id, "decoded-id-useLocalFileRules-true_local-id");
        assert_eq!(merged.default_access, "deny");
        assert_eq!(merged.mode, "enforce");
        let rules = merged.rules.as_ref().expect("rules");
        let privileges = rules.privileges.as_ref().expect("privileges");
        assert_eq!((privileges[0].name.as_str(), privileges[1].name.as_str()), ("hp", "LocalFileRules_p"));
        assert_eq!(privileges[1].path, "/Local/Path", "paths untouched");
        let roles = rules.roles.as_ref().expect("roles");
        assert_eq!((roles[1].name.as_str(), roles[1].privileges[0].as_str()), ("LocalFileRules_r", "LocalFileRules_p"));
        let identities = rules.identities.as_ref().expect("identities");
        assert_eq!(
            (identities[1].name.as_str(), identities[1].user_name.as_deref()),
            ("LocalFileRules_i", Some("alice"))
        );
        let assignments = rules.role_assignments.as_ref().expect("assignments");
        assert_eq!(assignments[1].role, "LocalFileRules_r");
        assert_eq!(assignments[1].identities[0], "LocalFileRules_i");
    }

    #[test]
    fn only_one_side_with_rules_is_used_as_is() {
        let file = one_path_file("/metadata/instance", "", r#","userName":"alice""#);
        let merged =
            on_big_stack(|| merge(Some(&enforce_deny_host()), "x", &parse_local_file(file.as_bytes()).expect("valid")));
        let merged = merged.expect("fits");
        assert_eq!(merged.rules.as_ref().and_then(|r| r.privileges.as_ref()).expect("privileges")[0].name, "p");
        let h = host("enforce", "deny", "x", r#"{"privileges":[{"name":"p","path":"/"}]}"#);
        let merged =
            on_big_stack(|| merge(Some(&h), "x", &parse_local_file(br#"{"id":"l"}"#).expect("valid"))).expect("fits");
        assert_eq!(merged.rules.as_ref().and_then(|r| r.privileges.as_ref()).expect("privileges")[0].name, "p");
        assert_eq!(merged.id, "x_l");
    }

    #[test]
    fn missing_host_arrays_are_taken_from_the_local_side_prefixed() {
        let h = host("enforce", "deny", "x", r#"{"privileges":[{"name":"hp","path":"/h"}]}"#);
        let file = one_path_file("/l", "", r#","userName":"alice""#);
        let merged =
            on_big_stack(|| merge(Some(&h), "x", &parse_local_file(file.as_bytes()).expect("valid"))).expect("fits");
        let roles = merged.rules.as_ref().and_then(|r| r.roles.as_ref()).expect("roles from the local side");
        assert_eq!(roles[0].name, "LocalFileRules_r");
    }

    #[test]
    fn merge_without_host_item_starts_from_synthetic_deny_disabled() {
        let merged = on_big_stack(|| merge(None, "x", &parse_local_file(b"{}").expect("valid"))).expect("fits");
        assert_eq!((merged.default_access.as_str(), merged.mode.as_str()), ("deny", "disabled"));
        let closed = fail_closed(None, "x");
        assert_eq!(
            (closed.default_access.as_str(), closed.mode.as_str(), closed.id.as_str()),
            ("deny", "enforce", "x")
        );
    }

    #[test]
    fn merge_over_capacity_fails() {
        let long = "n".repeat(60);
        assert_eq!(prefixed(&long), Err(LocalRulesError::MergeCapacity));
        assert_eq!(prefixed("LocalFileRules_x").as_deref(), Ok("LocalFileRules_x"));
    }

    #[test]
    fn invalid_json_fails_closed_keeping_id_and_mode() {
        let h = host("audit", "allow", &descriptor(r#"{"id":"d","useLocalFileRules":true}"#), r#"{"privileges":[]}"#);
        let c = effective(&h, b"{not json");
        assert_eq!((c.default_allowed, c.mode, c.id.as_str()), (false, Mode::Audit, "d-useLocalFileRules-true"));
        assert!(c.privileges.is_empty());
    }

    #[test]
    fn validation_errors() {
        use ValidationError as E;
        let rules = |body: &str| format!(r#"{{"rules":{body}}}"#);
        let cases: [(std::string::String, E); 16] = [
            (r#"{"defaultAccess":"maybe"}"#.into(), E::DefaultAccess),
            (r#"{"id":"  "}"#.into(), E::BlankId),
            (rules(r#"{"privileges":[{"name":" ","path":"/"}]}"#), E::BlankName),
            (rules(r#"{"privileges":[{"name":"p","path":"/"},{"name":"p","path":"/x"}]}"#), E::DuplicatePrivilege),
            (rules(r#"{"privileges":[{"name":"p","path":""}]}"#), E::BlankPath),
            (rules(r#"{"privileges":[{"name":"p","path":"/","queryParameters":{"k":" "}}]}"#), E::BlankQueryParameter),
            (
                rules(
                    r#"{"privileges":[{"name":"p","path":"/"}],"roles":[{"name":"r","privileges":["p"]},{"name":"r","privileges":["p"]}]}"#,
                ),
                E::DuplicateRole,
            ),
            (rules(r#"{"roles":[{"name":"r","privileges":[]}]}"#), E::RoleWithoutPrivileges),
            (
                rules(r#"{"privileges":[{"name":"p","path":"/"}],"roles":[{"name":"r","privileges":["p","p"]}]}"#),
                E::DuplicateReference,
            ),
            (
                rules(r#"{"privileges":[{"name":"p","path":"/"}],"roles":[{"name":"r","privileges":[""]}]}"#),
                E::BlankReference,
            ),
            (
                rules(r#"{"privileges":[{"name":"p","path":"/"}],"roles":[{"name":"r","privileges":["ghost"]}]}"#),
                E::UnknownPrivilege,
            ),
            (
                rules(r#"{"identities":[{"name":"i","userName":"a"},{"name":"i","userName":"b"}]}"#),
                E::DuplicateIdentity,
            ),
            (rules(r#"{"identities":[{"name":"i","userName":" "}]}"#), E::IdentityWithoutSelector),
            (rules(r#"{"roleAssignments":[{"role":"ghost","identities":["i"]}]}"#), E::UnknownRole),
            (
                rules(
                    r#"{"privileges":[{"name":"p","path":"/"}],"roles":[{"name":"r","privileges":["p"]}],"roleAssignments":[{"role":"r","identities":[]}]}"#,
                ),
                E::AssignmentWithoutIdentities,
            ),
            (
                rules(
                    r#"{"privileges":[{"name":"p","path":"/"}],"roles":[{"name":"r","privileges":["p"]}],"identities":[],"roleAssignments":[{"role":"r","identities":["ghost"]}]}"#,
                ),
                E::UnknownIdentity,
            ),
        ];
        for (json, expected) in cases {
            assert_eq!(parse(json.as_bytes()).map(|_| ()), Err(LocalRulesError::Invalid(expected)), "{json}");
        }
        assert!(parse(br#"{"defaultAccess":" Allow "}"#).is_ok());
    }

    #[test]
    fn s3_local_mode_is_ignored() {
        let file = br#"{"mode":"audit","defaultAccess":"deny"}"#;
        let c = effective(&enforce_deny_host(), file);
        assert_eq!(c.mode, Mode::Enforce);
        assert_eq!(outcome(&c, Endpoint::Imds, &ROOT, "/metadata/instance"), Outcome::Forbidden);
        let disabled = effective(&enforce_deny_host(), br#"{"mode":"disabled"}"#);
        assert_eq!(disabled.mode, Mode::Enforce);
    }

    #[test]
    fn s4_one_path_allowed_token_path_still_denied() {
        let c = effective(
            &enforce_deny_host(),
            one_path_file("/metadata/instance", "", r#","userName":"alice""#).as_bytes(),
        );
        assert_eq!(outcome(&c, Endpoint::Imds, &ALICE, "/metadata/instance?api-version=2021-02-01"), Outcome::Allow);
        assert_eq!(outcome(&c, Endpoint::Imds, &ALICE, "/metadata/identity/oauth2/token"), Outcome::Forbidden);
    }

    #[test]
    fn s5_wrong_identity_denied_on_allowed_path() {
        let c = effective(
            &enforce_deny_host(),
            one_path_file("/metadata/instance", "", r#","userName":"no-such-user""#).as_bytes(),
        );
        let d = decide(Some(&c), Endpoint::Imds, &ALICE, b"GET", b"/metadata/instance");
        assert_eq!((d.outcome, d.reason), (Outcome::Forbidden, Reason::IdentityMismatch));
    }

    #[test]
    fn s6_s7_wireserver_goalstate_only_against_encodings() {
        let file = one_path_file("/machine", r#"{"comp":"goalstate"}"#, r#","userName":"root""#);
        let c = effective(&enforce_deny_host(), file.as_bytes());
        let ws = |target: &str| outcome(&c, Endpoint::WireServer, &ROOT, target);
        assert_eq!(ws("/machine?comp=goalstate"), Outcome::Allow);
        assert_eq!(ws("/machine?comp=GOALSTATE"), Outcome::Allow, "value case is folded");
        assert_eq!(ws("/machine?comp=goalstate&incarnation=1"), Outcome::Allow, "extra parameter");
        for denied in [
            "/machine?comp=certificates",
            "/machine?comp=Certificates",
            "/machine",
            "/machine?comp=goalstatex",
            "/machine/%2F?comp=certificates",
            "/machine%2f?comp=sharedConfig",
            "/machine%252F?comp=extensionsConfig",
            "/machine%3Fcomp=goalstate?comp=certificates",
            "/machine/./../machine?comp=certificates",
            "//machine///?comp=goalstate",
        ] {
            assert_eq!(ws(denied), Outcome::Forbidden, "{denied}");
        }
        assert_eq!(
            outcome(&c, Endpoint::WireServer, &ALICE, "/machine?comp=goalstate"),
            Outcome::Forbidden,
            "root-only"
        );
    }

    #[test]
    fn s8_group_name_only_identity_matches() {
        let c = effective(
            &enforce_deny_host(),
            one_path_file("/metadata/instance", "", r#","groupName":"metadata-readers""#).as_bytes(),
        );
        assert_eq!(outcome(&c, Endpoint::Imds, &ALICE, "/metadata/instance"), Outcome::Allow);
        assert_eq!(outcome(&c, Endpoint::Imds, &ROOT, "/metadata/instance"), Outcome::Forbidden);
    }

    #[test]
    fn s9_exe_path_identity() {
        let c = effective(
            &enforce_deny_host(),
            one_path_file("/metadata/instance", "", r#","exePath":"/usr/bin/curl""#).as_bytes(),
        );
        assert_eq!(outcome(&c, Endpoint::Imds, &ALICE, "/metadata/instance"), Outcome::Forbidden, "python");
        assert_eq!(outcome(&c, Endpoint::Imds, &ALICE_CURL, "/metadata/instance"), Outcome::Allow, "curl");
    }

    #[test]
    fn s10_malformed_json_fails_closed() {
        let open_host = host("enforce", "allow", &descriptor(r#"{"id":"h","useLocalFileRules":true}"#), "");
        for bad in [&b"{"[..], b"", b"[]", br#"{"rules":{"privileges":[{"name":1}]}}"#, br#"{"id":"x"} trailing"#] {
            let c = effective(&open_host, bad);
            assert_eq!(outcome(&c, Endpoint::Imds, &ROOT, "/metadata/instance"), Outcome::Forbidden, "{bad:?}");
        }
    }

    #[test]
    fn s11_bom_is_tolerated_and_rules_enforced() {
        let mut file = b"\xEF\xBB\xBF".to_vec();
        file.extend_from_slice(one_path_file("/metadata/instance", "", r#","userName":"alice""#).as_bytes());
        let c = effective(&enforce_deny_host(), &file);
        assert_eq!(outcome(&c, Endpoint::Imds, &ALICE, "/metadata/instance"), Outcome::Allow);
        assert_eq!(outcome(&c, Endpoint::Imds, &ALICE, "/metadata/identity/oauth2/token"), Outcome::Forbidden);
    }

    #[test]
    fn s12_duplicate_keys_never_pick_the_first_value() {
        let open_host = host("enforce", "allow", &descriptor(r#"{"id":"h","useLocalFileRules":true}"#), "");
        let cases: [&[u8]; 3] = [
            br#"{"defaultAccess":"allow","defaultAccess":"deny"}"#,
            br#"{"defaultAccess":"deny","defaultAccess":"allow"}"#,
            br#"{"rules":{"privileges":[{"name":"p","path":"/a","path":"/b"}]}}"#,
        ];
        for file in cases {
            assert!(matches!(parse(file), Err(LocalRulesError::Json(_))), "{file:?}");
            let c = effective(&open_host, file);
            assert_eq!(outcome(&c, Endpoint::Imds, &ROOT, "/metadata/instance"), Outcome::Forbidden, "{file:?}");
        }
    }

    #[test]
    fn s17_prefixer_is_idempotent_and_references_still_bind() {
        let h = host(
            "enforce",
            "deny",
            &descriptor(r#"{"id":"h","useLocalFileRules":true}"#),
            r#"{"privileges":[{"name":"hp","path":"/never"}],"roles":[],"identities":[],"roleAssignments":[]}"#,
        );
        let file = br#"{"rules":{
            "privileges":[{"name":"LocalFileRules_p","path":"/metadata/instance"}],
            "roles":[{"name":"LocalFileRules_r","privileges":["LocalFileRules_p"]}],
            "identities":[{"name":"LocalFileRules_i","userName":"alice"}],
            "roleAssignments":[{"role":"LocalFileRules_r","identities":["LocalFileRules_i"]}]}}"#;
        let c = effective(&h, file);
        assert_eq!(c.privileges[1].name, "LocalFileRules_p");
        assert_eq!(c.identities[0].name, "LocalFileRules_i");
        assert_eq!(outcome(&c, Endpoint::Imds, &ALICE, "/metadata/instance"), Outcome::Allow);
    }

    #[test]
    fn s18_dangling_reference_fails_closed() {
        let file = br#"{"defaultAccess":"allow","rules":{"privileges":[{"name":"p","path":"/"}],
            "roles":[{"name":"r","privileges":["missing"]}],"identities":[],"roleAssignments":[]}}"#;
        assert_eq!(parse(file).map(|_| ()), Err(LocalRulesError::Invalid(ValidationError::UnknownPrivilege)));
        let c = effective(&enforce_deny_host(), file);
        assert!(!c.default_allowed);
        assert_eq!(outcome(&c, Endpoint::Imds, &ROOT, "/metadata/instance"), Outcome::Forbidden);
    }

    #[test]
    fn s19_cyrillic_homoglyph_user_name_does_not_match() {
        // "rооt" with two CYRILLIC SMALL LETTER O (U+043E).
        let file = one_path_file("/metadata/instance", "", ",\"userName\":\"r\u{43e}\u{43e}t\"");
        let c = effective(&enforce_deny_host(), file.as_bytes());
        assert_eq!(outcome(&c, Endpoint::Imds, &ROOT, "/metadata/instance"), Outcome::Forbidden);
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let path = std::env::temp_dir().join(format!("gpa-policy-{tag}-{}", std::process::id()));
            drop(std::fs::remove_dir_all(&path));
            std::fs::create_dir_all(&path).expect("create temp dir");
            Self(path)
        }

        fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, bytes).expect("write rules file");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            drop(std::fs::remove_dir_all(&self.0));
        }
    }

    fn refresh(
        tracker: &mut LocalRulesTracker,
        host: Option<&AuthorizationItem>,
        path: Option<&Path>,
    ) -> (Option<Option<Box<AuthorizationItem>>>, std::vec::Vec<&'static str>) {
        on_big_stack(|| {
            let mut events = std::vec::Vec::new();
            let result = tracker.refresh(host, path, &mut |e| events.push(e.name()));
            let item = match result {
                Refresh::Unchanged => None,
                Refresh::Rebuilt(item) => Some(item),
            };
            (item, events)
        })
    }

    #[test]
    fn tracker_rereads_on_file_change_and_after_failure() {
        let dir = TempDir::new("tracker");
        let path = dir.0.join(IMDS_RULES_FILE);
        let h = enforce_deny_host();
        let mut tracker = LocalRulesTracker::new();

        // Missing file: host rules unchanged (with the rewritten id).
        let (item, events) = refresh(&mut tracker, Some(&h), Some(&path));
        let item = item.expect("first refresh rebuilds").expect("host item");
        assert_eq!((item.id.as_str(), item.default_access.as_str()), ("host-useLocalFileRules-true", "deny"));
        assert_eq!(events, ["LocalFileRulesStateChanged"]);
        assert!(refresh(&mut tracker, Some(&h), Some(&path)).0.is_none(), "nothing changed");

        // File appears.
        dir.write(IMDS_RULES_FILE, br#"{"defaultAccess":"allow","id":"l1"}"#);
        let (item, events) = refresh(&mut tracker, Some(&h), Some(&path));
        let item = item.expect("state changed").expect("item");
        assert_eq!((item.id.as_str(), item.default_access.as_str()), ("host-useLocalFileRules-true_l1", "allow"));
        assert_eq!(events, ["LocalFileRulesStateChanged", "LocalRulesFileParseSuccess"]);
        assert!(refresh(&mut tracker, Some(&h), Some(&path)).0.is_none());

        // Broken file: fail closed, and re-read on every poll until fixed.
        dir.write(IMDS_RULES_FILE, b"{broken");
        let (item, events) = refresh(&mut tracker, Some(&h), Some(&path));
        let item = item.expect("changed").expect("item");
        assert_eq!(item.default_access, "deny");
        assert!(item.rules.is_none());
        assert_eq!(events, ["LocalFileRulesStateChanged", "LocalRulesFileParseFailed"]);
        let (again, events) = refresh(&mut tracker, Some(&h), Some(&path));
        assert!(again.is_some(), "previous read failed: read again");
        assert_eq!(events, ["LocalRulesFileParseFailed"]);

        // Insecure permissions fail closed.
        let file = dir.write(IMDS_RULES_FILE, br#"{"defaultAccess":"allow"}"#);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let (item, _) = refresh(&mut tracker, Some(&h), Some(&path));
        assert_eq!(item.expect("changed").expect("item").default_access, "deny");

        // Host content change without an id change is picked up (MSP §11 item 7).
        std::fs::remove_file(&file).expect("remove");
        assert!(refresh(&mut tracker, Some(&h), Some(&path)).0.is_some());
        assert!(refresh(&mut tracker, Some(&h), Some(&path)).0.is_none());
        let audit = host("audit", "deny", &h.id, "");
        let (item, _) = refresh(&mut tracker, Some(&audit), Some(&path));
        assert_eq!(item.expect("content changed").expect("item").mode, "audit");

        // Host item gone.
        let (item, _) = refresh(&mut tracker, None, Some(&path));
        assert!(item.expect("changed").is_none());
    }

    #[test]
    fn tracker_ignores_the_file_without_the_flag_or_for_hostgaplugin() {
        let dir = TempDir::new("flag");
        let path = dir.write(WIRESERVER_RULES_FILE, br#"{"defaultAccess":"allow"}"#);
        let plain = host("enforce", "deny", "plain-id", "");
        let mut tracker = LocalRulesTracker::new();
        let (item, events) = refresh(&mut tracker, Some(&plain), Some(&path));
        assert_eq!(item.expect("first").expect("item").default_access, "deny");
        assert!(events.is_empty());
        let h = enforce_deny_host();
        let mut hgap = LocalRulesTracker::new();
        let (item, _) = refresh(&mut hgap, Some(&h), None);
        assert_eq!(item.expect("first").expect("item").id, "host-useLocalFileRules-true");
        assert_eq!(rules_file_name(Endpoint::HostGaPlugin), None);
        assert_eq!(rules_file_name(Endpoint::Imds), Some("IMDS_Rules.json"));
    }

    #[test]
    fn read_local_file_reports_missing_and_non_files() {
        let dir = TempDir::new("read");
        assert!(matches!(on_big_stack(|| read_local_file(&dir.0.join("absent.json"))), Ok(None)));
        // A directory where the file should be (its parent is a private folder; /tmp itself
        // would be refused as world-writable first).
        let sub = dir.0.join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert_eq!(on_big_stack(|| read_local_file(&sub)).map(|_| ()), Err(LocalRulesError::NotAFile));
        let big = dir.write("big.json", &vec![b' '; LOCAL_FILE_MAX_BYTES + 1]);
        assert_eq!(on_big_stack(|| read_local_file(&big)).map(|_| ()), Err(LocalRulesError::TooLarge));
        assert_eq!(file_state(&dir.0.join("absent.json")), FileState::Missing);
    }
}
