// SPDX-License-Identifier: MIT
//! Rules snapshot files (MSP §4.12): whenever the installed rules change, the effective input
//! items and their compiled form are written to
//! `AuthorizationRules_<YYYY-MM-DDTHH.MM.SS.fff>-<unix-ns>.json` in the log directory, and only
//! the newest [`SNAPSHOTS_KEPT`] are kept.
//!
//! Setup path only (allocates). Time is passed in (only `clock.rs` reads clocks). Files are
//! created with `O_CREAT|O_EXCL` under a temporary name and renamed into place, so a planted
//! symlink is never followed and a reader never sees half a snapshot. Rules hold no secrets,
//! so the files are 0644 like the rest of the status output.

use core::fmt::{self, Write};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use super::Policy;
use super::compile::CompiledRules;
use super::rules::{AuthorizationItem, Identity};
use crate::calendar::format_timestamp_millis;
use crate::redirect::Endpoint;
use crate::text::{json_opt, json_str};

/// File name prefix of a snapshot.
pub const SNAPSHOT_PREFIX: &str = "AuthorizationRules_";
/// Snapshots kept; the oldest by name are removed first.
pub const SNAPSHOTS_KEPT: usize = 5;

/// `AuthorizationRules_<YYYY-MM-DDTHH.MM.SS.fff>-<unix-ns>.json` (colons replaced by dots so
/// the name is valid everywhere).
pub fn snapshot_file_name(unix_ns: u128) -> String {
    let unix_ms = u64::try_from(unix_ns / 1_000_000).unwrap_or(u64::MAX);
    let stamp = format_timestamp_millis(unix_ms).replace(':', ".");
    format!("{SNAPSHOT_PREFIX}{stamp}-{unix_ns}.json")
}

/// `[…]` of JSON strings, or `null`.
fn json_array<T>(
    out: &mut impl Write,
    items: Option<&[T]>,
    mut each: impl FnMut(&mut dyn Write, &T) -> fmt::Result,
) -> fmt::Result {
    let Some(items) = items else {
        return out.write_str("null");
    };
    out.write_char('[')?;
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.write_char(',')?;
        }
        each(out, item)?;
    }
    out.write_char(']')
}

fn json_str_dyn(out: &mut dyn Write, text: &str) -> fmt::Result {
    let mut adapter = DynWrite(out);
    json_str(&mut adapter, text)
}

/// Lets the `impl Write` helpers run on a `dyn Write`.
struct DynWrite<'a>(&'a mut dyn Write);

impl Write for DynWrite<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.write_str(s)
    }
}

fn identity_json(out: &mut dyn Write, identity: &Identity) -> fmt::Result {
    let mut out = DynWrite(out);
    out.write_str("{\"name\":")?;
    json_str(&mut out, &identity.name)?;
    out.write_str(",\"userName\":")?;
    json_opt(&mut out, identity.user_name.as_deref())?;
    out.write_str(",\"groupName\":")?;
    json_opt(&mut out, identity.group_name.as_deref())?;
    out.write_str(",\"exePath\":")?;
    json_opt(&mut out, identity.exe_path.as_deref())?;
    out.write_str(",\"processName\":")?;
    json_opt(&mut out, identity.process_name.as_deref())?;
    out.write_char('}')
}

/// Writes an item in the wire schema of MSP §4.1 (parses back to the same content).
pub fn write_item_json(out: &mut impl Write, item: &AuthorizationItem) -> fmt::Result {
    out.write_str("{\"defaultAccess\":")?;
    json_str(out, &item.default_access)?;
    out.write_str(",\"mode\":")?;
    json_str(out, &item.mode)?;
    out.write_str(",\"id\":")?;
    json_str(out, &item.id)?;
    out.write_str(",\"rules\":")?;
    let Some(rules) = &item.rules else {
        return out.write_str("null}");
    };
    out.write_str("{\"privileges\":")?;
    json_array(out, rules.privileges.as_deref(), |out, p| {
        out.write_str("{\"name\":")?;
        json_str_dyn(out, &p.name)?;
        out.write_str(",\"path\":")?;
        json_str_dyn(out, &p.path)?;
        out.write_str(",\"queryParameters\":")?;
        let Some(query) = &p.query_parameters else {
            return out.write_str("null}");
        };
        out.write_char('{')?;
        for (i, (k, v)) in query.iter().enumerate() {
            out.write_str(if i == 0 { "" } else { "," })?;
            json_str_dyn(out, k)?;
            out.write_char(':')?;
            json_str_dyn(out, v)?;
        }
        out.write_str("}}")
    })?;
    out.write_str(",\"roles\":")?;
    json_array(out, rules.roles.as_deref(), |out, r| {
        out.write_str("{\"name\":")?;
        json_str_dyn(out, &r.name)?;
        out.write_str(",\"privileges\":")?;
        json_array(&mut DynWrite(out), Some(&r.privileges[..]), |out, n| json_str_dyn(out, n))?;
        out.write_char('}')
    })?;
    out.write_str(",\"identities\":")?;
    json_array(out, rules.identities.as_deref(), identity_json)?;
    out.write_str(",\"roleAssignments\":")?;
    json_array(out, rules.role_assignments.as_deref(), |out, a| {
        out.write_str("{\"role\":")?;
        json_str_dyn(out, &a.role)?;
        out.write_str(",\"identities\":")?;
        json_array(&mut DynWrite(out), Some(&a.identities[..]), |out, n| json_str_dyn(out, n))?;
        out.write_char('}')
    })?;
    out.write_str("}}")
}

/// Writes compiled rules as the `computedRules` entry of MSP §4.12.
pub fn write_compiled_json(out: &mut impl Write, rules: &CompiledRules) -> fmt::Result {
    out.write_str("{\"id\":")?;
    json_str(out, &rules.id)?;
    write!(
        out,
        ",\"defaultAllowed\":{},\"mode\":\"{}\",\"privileges\":{{",
        rules.default_allowed,
        rules.mode.as_str()
    )?;
    for (i, p) in rules.privileges.iter().enumerate() {
        out.write_str(if i == 0 { "" } else { "," })?;
        json_str(out, &p.name)?;
        out.write_str(":{\"name\":")?;
        json_str(out, &p.name)?;
        out.write_str(",\"path\":")?;
        json_str(out, &p.path)?;
        out.write_str(",\"queryParameters\":")?;
        if p.query.is_empty() {
            out.write_str("null}")?;
            continue;
        }
        out.write_char('{')?;
        for (j, (k, v)) in p.query.iter().enumerate() {
            out.write_str(if j == 0 { "" } else { "," })?;
            json_str(out, k)?;
            out.write_char(':')?;
            json_str(out, v)?;
        }
        out.write_str("}}")?;
    }
    out.write_str("},\"privilegeAssignments\":{")?;
    let assigned = rules.privileges.iter().filter(|p| p.assigned().next().is_some());
    for (i, p) in assigned.enumerate() {
        out.write_str(if i == 0 { "" } else { "," })?;
        json_str(out, &p.name)?;
        out.write_str(":[")?;
        for (j, identity) in p.assigned().filter_map(|index| rules.identity(index)).enumerate() {
            out.write_str(if j == 0 { "" } else { "," })?;
            json_str(out, &identity.name)?;
        }
        out.write_char(']')?;
    }
    out.write_str("},\"identities\":{")?;
    for (i, identity) in rules.identities.iter().enumerate() {
        out.write_str(if i == 0 { "" } else { "," })?;
        json_str(out, &identity.name)?;
        out.write_char(':')?;
        identity_json(out, identity)?;
    }
    out.write_str("}}")
}

/// Writes a whole snapshot document for the policy's current state.
pub fn write_snapshot_json(out: &mut impl Write, policy: &Policy) -> fmt::Result {
    const ENDPOINTS: [(&str, Endpoint); 3] =
        [("imds", Endpoint::Imds), ("wireserver", Endpoint::WireServer), ("hostga", Endpoint::HostGaPlugin)];
    out.write_str("{\"inputRules\":{")?;
    for (i, (key, endpoint)) in ENDPOINTS.iter().enumerate() {
        write!(out, "{}\"{key}\":", if i == 0 { "" } else { "," })?;
        match policy.effective_item(*endpoint) {
            Some(item) => write_item_json(out, item)?,
            None => out.write_str("null")?,
        }
    }
    out.write_str("},\"computedRules\":{")?;
    for (i, (key, endpoint)) in ENDPOINTS.iter().enumerate() {
        write!(out, "{}\"{key}\":", if i == 0 { "" } else { "," })?;
        match policy.rules(*endpoint) {
            Some(rules) => write_compiled_json(out, rules)?,
            None => out.write_str("null")?,
        }
    }
    out.write_str("}}")
}

/// Writes a snapshot into `dir` and prunes old ones. Returns the new file's path.
pub fn write_snapshot(dir: &Path, unix_ns: u128, policy: &Policy) -> io::Result<PathBuf> {
    let mut json = String::new();
    write_snapshot_json(&mut json, policy).map_err(io::Error::other)?;
    let name = snapshot_file_name(unix_ns);
    let temporary = dir.join(format!(".{name}.tmp"));
    let path = dir.join(&name);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&temporary)
        .and_then(|mut file| file.write_all(json.as_bytes()))
        .and_then(|()| std::fs::rename(&temporary, &path));
    if let Err(e) = written {
        // Best effort: a leftover temporary file is harmless and never matches the prefix.
        drop(std::fs::remove_file(&temporary));
        return Err(e);
    }
    prune_snapshots(dir, SNAPSHOTS_KEPT)?;
    Ok(path)
}

/// Removes the oldest snapshots (by name, which sorts by time) beyond `keep`. Returns how many
/// were removed.
pub fn prune_snapshots(dir: &Path, keep: usize) -> io::Result<usize> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(SNAPSHOT_PREFIX) && name.ends_with(".json"))
        .collect();
    names.sort_unstable();
    let excess = names.len().saturating_sub(keep);
    for name in &names[..excess] {
        match std::fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(excess)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile::content_digest;
    use crate::policy::rules::AuthorizationRules;
    use crate::policy::test_support::{item, on_big_stack};

    const FULL: &str = r#"{"defaultAccess":"deny","mode":"Enforce","id":"id \"quoted\"","rules":{
        "privileges":[{"name":"p","path":"/Metadata","queryParameters":{"API":"V1"}},{"name":"q","path":"/x"}],
        "roles":[{"name":"r","privileges":["p","q"]}],
        "identities":[{"name":"i","userName":"root","exePath":"/usr/bin/curl"}],
        "roleAssignments":[{"role":"r","identities":["i"]}]}}"#;

    #[test]
    fn file_name_uses_dotted_utc_time_and_nanoseconds() {
        assert_eq!(
            snapshot_file_name(1_784_715_072_345_678_901),
            "AuthorizationRules_2026-07-22T10.11.12.345-1784715072345678901.json"
        );
    }

    #[test]
    fn item_json_round_trips() {
        for json in [FULL, r#"{"defaultAccess":"allow","mode":"audit","id":"","rules":{"privileges":[]}}"#] {
            let original = item(json);
            let mut written = String::new();
            write_item_json(&mut written, &original).expect("string write");
            assert_eq!(content_digest(&item(&written)), content_digest(&original), "{written}");
        }
    }

    #[test]
    fn snapshot_holds_inputs_and_computed_rules() {
        let mut policy = Policy::new();
        let rules = on_big_stack(|| {
            let wire = format!(r#"{{"wireserver":{FULL}}}"#);
            let mut scratch = [0u8; 512];
            let parsed = serde_json_core::from_slice_escaped::<AuthorizationRules>(wire.as_bytes(), &mut scratch);
            Box::new(parsed.expect("valid").0)
        });
        assert!(on_big_stack(|| policy.update(&rules, Path::new("/nonexistent"))));
        let mut json = String::new();
        write_snapshot_json(&mut json, &policy).expect("string write");
        assert!(json.starts_with(r#"{"inputRules":{"imds":null,"wireserver":{"defaultAccess":"deny""#), "{json}");
        assert!(json.contains(r#""computedRules":{"imds":null,"wireserver":{"id":"id \"quoted\"","defaultAllowed":false,"mode":"Enforce","privileges":{"p":{"name":"p","path":"/metadata","queryParameters":{"api":"v1"}},"q":{"name":"q","path":"/x","queryParameters":null}},"privilegeAssignments":{"p":["i"],"q":["i"]},"identities":{"i":{"name":"i","userName":"root","groupName":null,"exePath":"/usr/bin/curl","processName":null}}}"#), "{json}");
        assert!(json.contains(r#""hostga":{"id":"id \"quoted\"""#), "HostGAPlugin mirrors WireServer: {json}");
    }

    #[test]
    fn keeps_only_the_newest_five_after_ten_writes() {
        let dir = std::env::temp_dir().join(format!("gpa-policy-snapshots-{}", std::process::id()));
        drop(std::fs::remove_dir_all(&dir));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("unrelated.json"), b"{}").expect("write");
        let policy = Policy::new();
        let base: u128 = 1_784_715_072_000_000_000;
        let mut written = Vec::new();
        for i in 0..10u128 {
            written.push(write_snapshot(&dir, base + i * 1_500_000_000, &policy).expect("snapshot written"));
        }
        let mut left: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(SNAPSHOT_PREFIX)))
            .collect();
        left.sort();
        assert_eq!(left, written[5..]);
        assert!(dir.join("unrelated.json").exists());
        let body = std::fs::read_to_string(&written[9]).expect("read");
        assert_eq!(
            body,
            r#"{"inputRules":{"imds":null,"wireserver":null,"hostga":null},"computedRules":{"imds":null,"wireserver":null,"hostga":null}}"#
        );
        drop(std::fs::remove_dir_all(&dir));
    }
}

/// The `inputRules` object of the newest snapshot in `dir` (for `policy explain --live`):
/// the effective items the running agent applied, in the schema `explain` reads.
pub fn latest_input_rules(dir: &Path) -> io::Result<Vec<u8>> {
    let newest = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(SNAPSHOT_PREFIX) && name.ends_with(".json"))
        .max()
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no {SNAPSHOT_PREFIX}*.json in {}", dir.display()))
        })?;
    let doc = std::fs::read(dir.join(&newest))?;
    member_value(&doc, b"\"inputRules\"")
        .map(<[u8]>::to_vec)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{newest} has no inputRules")))
}

/// The raw JSON value of the first member named `key` (quoted) in `doc`: the object or array
/// after the colon, matched bracket for bracket outside strings.
fn member_value<'d>(doc: &'d [u8], key: &[u8]) -> Option<&'d [u8]> {
    let at = doc.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &doc[at..];
    let start = at + rest.iter().position(|b| *b == b'{' || *b == b'[')?;
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, b) in doc[start..].iter().enumerate() {
        match (in_string, escaped, *b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (true, false, _) => {}
            (false, _, b'"') => in_string = true,
            (false, _, b'{' | b'[') => depth += 1,
            (false, _, b'}' | b']') => {
                depth -= 1;
                if depth == 0 {
                    return Some(&doc[start..=start + i]);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod member_tests {
    use super::member_value;

    #[test]
    fn finds_the_input_rules_object_even_with_braces_in_strings() {
        let doc = br#"{"inputRules":{"imds":{"id":"a}{","rules":null}},"computedRules":{}}"#;
        assert_eq!(member_value(doc, b"\"inputRules\""), Some(&br#"{"imds":{"id":"a}{","rules":null}}"#[..]));
        assert_eq!(member_value(doc, b"\"missing\""), None);
    }
}
