// SPDX-License-Identifier: MIT
//! Compiles one endpoint's [`AuthorizationItem`] into the lookup-ready [`CompiledRules`] a
//! decision runs against (MSP §4.2), and fingerprints an item's content so rules are
//! re-applied when their *content* changes, not only their id (MSP §11 item 7).
//!
//! Compiling runs on the setup path (once per rule change) and returns a `Box`; nothing here
//! runs per request.

use heapless::{String, Vec};
use sha2::{Digest as _, Sha256};

use super::canonical::{canonical_rule_path, lower};
use super::rules::limits::{
    ID_MAX_BYTES, MAX_IDENTITIES, MAX_PRIVILEGES, MAX_QUERY_PARAMETERS, PATH_MAX_BYTES, QUERY_KEY_MAX_BYTES,
    QUERY_VALUE_MAX_BYTES,
};
use super::rules::{AccessControlRules, AuthorizationItem, Identity, Name};

/// Lower-casing grows text by at most half (`İ` → `i̇`, 2 → 3 bytes), so compiled paths and
/// query text get 1.5× the schema's room and lower-casing a valid item can never overflow.
pub const COMPILED_PATH_MAX_BYTES: usize = PATH_MAX_BYTES * 3 / 2;
/// See [`COMPILED_PATH_MAX_BYTES`].
pub const COMPILED_QUERY_KEY_MAX_BYTES: usize = QUERY_KEY_MAX_BYTES * 3 / 2;
/// See [`COMPILED_PATH_MAX_BYTES`].
pub const COMPILED_QUERY_VALUE_MAX_BYTES: usize = QUERY_VALUE_MAX_BYTES * 3 / 2;

/// Assigned identities per privilege, one bit per entry of [`CompiledRules::identities`].
type IdentitySet = u64;
const _: () = assert!(MAX_IDENTITIES <= IdentitySet::BITS as usize);

/// SHA-256 of an item's canonical content (see [`content_digest`]).
pub type ContentDigest = [u8; 32];

/// Enforcement mode of one endpoint's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Rules are not evaluated; everything the endpoint authorizer lets through is allowed.
    Disabled,
    /// Denials are recorded and the request is still forwarded.
    Audit,
    /// Denials are answered with `403`.
    Enforce,
}

impl Mode {
    /// Case-insensitive parse of the wire value; `None` for anything unknown.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Disabled, Self::Audit, Self::Enforce].into_iter().find(|m| text.eq_ignore_ascii_case(m.wire()))
    }

    /// The wire spelling (`disabled`, `audit`, `enforce`).
    pub fn wire(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::Audit => "audit",
            Self::Enforce => "enforce",
        }
    }

    /// The snapshot spelling of MSP §4.12 (`Disabled`, `Audit`, `Enforce`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "Disabled",
            Self::Audit => "Audit",
            Self::Enforce => "Enforce",
        }
    }
}

/// A privilege ready for matching.
#[derive(Clone, Debug)]
pub struct CompiledPrivilege {
    /// Privilege name, as delivered.
    pub name: Name,
    /// Lower-cased path prefix (legacy, plain string prefix).
    pub path: String<COMPILED_PATH_MAX_BYTES>,
    /// Canonical path for the shadow evaluator; `None` if it can never match canonically.
    pub canon_path: Option<String<PATH_MAX_BYTES>>,
    /// Lower-cased required query parameters, in document order.
    pub query:
        Vec<(String<COMPILED_QUERY_KEY_MAX_BYTES>, String<COMPILED_QUERY_VALUE_MAX_BYTES>), MAX_QUERY_PARAMETERS>,
    assigned: IdentitySet,
}

impl CompiledPrivilege {
    /// Indices into [`CompiledRules::identities`] of the identities assigned to this privilege.
    pub fn assigned(&self) -> impl Iterator<Item = usize> + '_ {
        (0..MAX_IDENTITIES).filter(|i| self.assigned & (1 << i) != 0)
    }
}

/// One endpoint's rules, compiled (MSP §4.2).
#[derive(Clone, Debug)]
pub struct CompiledRules {
    /// Rule-set id (after any descriptor rewrite and local merge).
    pub id: String<ID_MAX_BYTES>,
    /// Mode; an unknown wire value compiles to `Disabled` (MSP §4.2) with `mode_recognised`
    /// false, so the caller can log it.
    pub mode: Mode,
    /// Whether the wire `mode` was one of the three known values.
    pub mode_recognised: bool,
    /// `defaultAccess` lower-cased equals `allow`.
    pub default_allowed: bool,
    /// Privileges, unique by name (a later duplicate replaced the earlier one in place).
    pub privileges: Vec<CompiledPrivilege, MAX_PRIVILEGES>,
    /// Identities, unique by name, selectors kept as delivered.
    pub identities: Vec<Identity, MAX_IDENTITIES>,
    /// Fingerprint of the item this was compiled from.
    pub digest: ContentDigest,
}

impl CompiledRules {
    /// The identity at `index` of [`Self::identities`].
    pub fn identity(&self, index: usize) -> Option<&Identity> {
        self.identities.get(index)
    }
}

/// Compiles an item. Infallible: every capacity of the compiled form is at least the schema's,
/// so a parsed item always fits.
pub fn compile(item: &AuthorizationItem) -> Box<CompiledRules> {
    let parsed_mode = Mode::parse(&item.mode);
    let mut compiled = Box::new(CompiledRules {
        id: item.id.clone(),
        mode: parsed_mode.unwrap_or(Mode::Disabled),
        mode_recognised: parsed_mode.is_some(),
        default_allowed: item.default_access.eq_ignore_ascii_case("allow"),
        privileges: Vec::new(),
        identities: Vec::new(),
        digest: content_digest(item),
    });
    if let Some(rules) = &item.rules {
        compile_rules(rules, &mut compiled);
    }
    compiled
}

fn compile_rules(rules: &AccessControlRules, compiled: &mut CompiledRules) {
    // §4.2: only when all four arrays are present does any privilege count.
    let (Some(privileges), Some(roles), Some(identities), Some(assignments)) =
        (&rules.privileges, &rules.roles, &rules.identities, &rules.role_assignments)
    else {
        return;
    };
    for privilege in privileges {
        let Some(entry) = compile_privilege(privilege) else {
            // Unreachable by the capacity argument on `compile`. Were it reached, silently
            // dropping a privilege could turn a restricted path into default access; deny
            // everything instead.
            compiled.privileges.clear();
            compiled.default_allowed = false;
            return;
        };
        match compiled.privileges.iter_mut().find(|p| p.name == entry.name) {
            Some(existing) => *existing = entry,
            None => {
                // Fits: both vectors have MAX_PRIVILEGES capacity.
                let _ignored = compiled.privileges.push(entry);
            }
        }
    }
    for identity in identities {
        match compiled.identities.iter_mut().find(|i| i.name == identity.name) {
            Some(existing) => *existing = identity.clone(),
            None => {
                // Fits: both vectors have MAX_IDENTITIES capacity.
                let _ignored = compiled.identities.push(identity.clone());
            }
        }
    }
    for assignment in assignments {
        // Roles, like the other arrays, are keyed by name with the later entry winning.
        let Some(role) = roles.iter().rev().find(|r| r.name == assignment.role) else {
            continue;
        };
        let mut members: IdentitySet = 0;
        for name in &assignment.identities {
            if let Some(index) = compiled.identities.iter().position(|i| i.name == *name) {
                members |= 1 << index;
            }
        }
        for name in &role.privileges {
            if let Some(privilege) = compiled.privileges.iter_mut().find(|p| p.name == *name) {
                privilege.assigned |= members;
            }
        }
    }
}

fn compile_privilege(privilege: &super::rules::Privilege) -> Option<CompiledPrivilege> {
    let mut query = Vec::new();
    for (key, value) in privilege.query_parameters.iter().flatten() {
        query.push((lower(key)?, lower(value)?)).ok()?;
    }
    Some(CompiledPrivilege {
        name: privilege.name.clone(),
        path: lower(&privilege.path)?,
        canon_path: canonical_rule_path(&privilege.path),
        query,
        assigned: 0,
    })
}

/// SHA-256 over an item's content in a fixed, length-prefixed encoding: every field with a
/// tag, `null` distinct from empty, arrays and maps in document order. Independent of JSON
/// spelling (whitespace, escapes, key order of objects), dependent on everything a decision
/// could depend on.
pub fn content_digest(item: &AuthorizationItem) -> ContentDigest {
    let mut h = Hasher(Sha256::new());
    h.text(b'd', &item.default_access);
    h.text(b'm', &item.mode);
    h.text(b'i', &item.id);
    match &item.rules {
        None => h.tag(b'0'),
        Some(rules) => {
            h.tag(b'R');
            h.array(b'P', rules.privileges.as_deref(), |h, p| {
                h.text(b'n', &p.name);
                h.text(b'p', &p.path);
                match &p.query_parameters {
                    None => h.tag(b'0'),
                    Some(map) => {
                        h.count(b'q', map.len());
                        for (k, v) in map {
                            h.text(b'k', k);
                            h.text(b'v', v);
                        }
                    }
                }
            });
            h.array(b'O', rules.roles.as_deref(), |h, r| {
                h.text(b'n', &r.name);
                h.count(b'l', r.privileges.len());
                r.privileges.iter().for_each(|p| h.text(b'r', p));
            });
            h.array(b'I', rules.identities.as_deref(), |h, i| {
                h.text(b'n', &i.name);
                h.option(b'u', i.user_name.as_deref());
                h.option(b'g', i.group_name.as_deref());
                h.option(b'e', i.exe_path.as_deref());
                h.option(b'p', i.process_name.as_deref());
            });
            h.array(b'A', rules.role_assignments.as_deref(), |h, a| {
                h.text(b'r', &a.role);
                h.count(b'l', a.identities.len());
                a.identities.iter().for_each(|i| h.text(b'i', i));
            });
        }
    }
    h.0.finalize().into()
}

/// Tag-length-value feeding, so no two different items can produce the same byte stream.
struct Hasher(Sha256);

impl Hasher {
    fn tag(&mut self, tag: u8) {
        self.0.update([tag]);
    }

    fn count(&mut self, tag: u8, n: usize) {
        self.tag(tag);
        self.0.update((n as u64).to_le_bytes());
    }

    fn text(&mut self, tag: u8, text: &str) {
        self.count(tag, text.len());
        self.0.update(text.as_bytes());
    }

    fn option(&mut self, tag: u8, text: Option<&str>) {
        match text {
            None => self.tag(b'0'),
            Some(text) => self.text(tag, text),
        }
    }

    fn array<T>(&mut self, tag: u8, items: Option<&[T]>, mut each: impl FnMut(&mut Self, &T)) {
        match items {
            None => self.tag(b'0'),
            Some(items) => {
                self.count(tag, items.len());
                for item in items {
                    each(self, item);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_support::item;

    const FULL: &str = r#"{"defaultAccess":"Allow","mode":"ENFORCE","id":"r1","rules":{
        "privileges":[{"name":"p","path":"/Metadata/Identity","queryParameters":{"API-Version":"2018-02-01"}},
                      {"name":"q","path":"/x"}],
        "roles":[{"name":"r","privileges":["p","q","missing"]}],
        "identities":[{"name":"i","userName":"Root"},{"name":"j","exePath":"/usr/bin/curl"}],
        "roleAssignments":[{"role":"r","identities":["i","ghost"]},{"role":"nobody","identities":["j"]}]}}"#;

    #[test]
    fn mode_parse_is_case_insensitive_and_unknown_is_disabled() {
        assert_eq!(Mode::parse("AuDiT"), Some(Mode::Audit));
        assert_eq!(Mode::parse("enforce "), None);
        let c = compile(&item(r#"{"defaultAccess":"deny","mode":"strict","id":""}"#));
        assert_eq!((c.mode, c.mode_recognised), (Mode::Disabled, false));
    }

    #[test]
    fn default_access_allow_only_for_allow() {
        assert!(compile(&item(r#"{"defaultAccess":"ALLOW","mode":"enforce","id":""}"#)).default_allowed);
        for access in ["deny", "allowed", " allow", ""] {
            let json = format!(r#"{{"defaultAccess":"{access}","mode":"enforce","id":""}}"#);
            assert!(!compile(&item(&json)).default_allowed, "{access}");
        }
    }

    #[test]
    fn compiles_lower_cased_paths_and_query_and_assignment_table() {
        let c = compile(&item(FULL));
        assert_eq!((c.mode, c.default_allowed, c.id.as_str()), (Mode::Enforce, true, "r1"));
        let p = &c.privileges[0];
        assert_eq!(p.path, "/metadata/identity");
        assert_eq!(p.canon_path.as_deref(), Some("/metadata/identity"));
        assert_eq!((p.query[0].0.as_str(), p.query[0].1.as_str()), ("api-version", "2018-02-01"));
        // Identity selectors keep their case; unknown role/privilege/identity names are skipped.
        assert_eq!(c.identities[0].user_name.as_deref(), Some("Root"));
        assert_eq!(p.assigned().collect::<std::vec::Vec<_>>(), [0]);
        assert_eq!(c.privileges[1].assigned().collect::<std::vec::Vec<_>>(), [0]);
    }

    #[test]
    fn later_duplicate_names_overwrite() {
        let c = compile(&item(
            r#"{"defaultAccess":"deny","mode":"enforce","id":"","rules":{
            "privileges":[{"name":"p","path":"/old"},{"name":"p","path":"/new"}],
            "roles":[{"name":"r","privileges":[]},{"name":"r","privileges":["p"]}],
            "identities":[{"name":"i","userName":"a"},{"name":"i","userName":"b"}],
            "roleAssignments":[{"role":"r","identities":["i"]}]}}"#,
        ));
        assert_eq!(c.privileges.len(), 1);
        assert_eq!(c.privileges[0].path, "/new");
        assert_eq!(c.identities.len(), 1);
        assert_eq!(c.identities[0].user_name.as_deref(), Some("b"));
        assert_eq!(c.privileges[0].assigned().count(), 1);
    }

    #[test]
    fn missing_any_of_the_four_arrays_means_no_privileges() {
        let arrays = [
            ("privileges", r#"[{"name":"p","path":"/"}]"#),
            ("roles", r#"[{"name":"r","privileges":["p"]}]"#),
            ("identities", r#"[{"name":"i"}]"#),
            ("roleAssignments", r#"[{"role":"r","identities":["i"]}]"#),
        ];
        let build = |skip: Option<&str>, null: bool| {
            let fields: std::vec::Vec<_> = arrays
                .iter()
                .filter_map(|(k, v)| match (Some(*k) == skip, null) {
                    (true, false) => None,
                    (true, true) => Some(format!(r#""{k}":null"#)),
                    (false, _) => Some(format!(r#""{k}":{v}"#)),
                })
                .collect();
            format!(r#"{{"defaultAccess":"deny","mode":"enforce","id":"","rules":{{{}}}}}"#, fields.join(","))
        };
        assert_eq!(compile(&item(&build(None, false))).privileges.len(), 1);
        for (missing, _) in arrays {
            assert!(compile(&item(&build(Some(missing), false))).privileges.is_empty(), "{missing} absent");
            assert!(compile(&item(&build(Some(missing), true))).privileges.is_empty(), "{missing} null");
        }
    }

    #[test]
    fn digest_tracks_content_not_spelling() {
        let a = content_digest(&item(FULL));
        let spaced = FULL.replace(':', " : ");
        assert_eq!(a, content_digest(&item(&spaced)));
        let escaped = FULL.replace("\"Root\"", "\"R\\u006fot\"");
        assert_eq!(a, content_digest(&item(&escaped)));
        assert_ne!(a, content_digest(&item(&FULL.replace("Root", "root"))));
        assert_ne!(a, content_digest(&item(&FULL.replace("ENFORCE", "audit"))));
        // Same id, different rules: still a change (MSP §11 item 7).
        assert_ne!(a, content_digest(&item(&FULL.replace("/x", "/y"))));
        assert_eq!(compile(&item(FULL)).digest, a);
    }

    #[test]
    fn digest_distinguishes_null_from_empty() {
        let empty = item(r#"{"defaultAccess":"deny","mode":"enforce","id":"","rules":{"privileges":[]}}"#);
        let null = item(r#"{"defaultAccess":"deny","mode":"enforce","id":"","rules":{"privileges":null}}"#);
        let none = item(r#"{"defaultAccess":"deny","mode":"enforce","id":""}"#);
        assert_ne!(content_digest(&empty), content_digest(&null));
        assert_ne!(content_digest(&null), content_digest(&none));
    }
}
