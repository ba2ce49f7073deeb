// SPDX-License-Identifier: MIT
//! The allowlist (MSP §4): which local caller may send which request to which metadata
//! endpoint. Read `../shared/spec/msp-protocol.md` §4 and §11 first.
//!
//! How the files connect:
//!
//! ```text
//!  status poll ──> rules (serde schema, fixed capacities)
//!                    │
//!                    ├─> local_rules (descriptor id, WireServer_/IMDS_Rules.json, merge,
//!                    │                fail-closed item, change detection)
//!                    v
//!                  compile (CompiledRules: lower-cased privileges, assignment bitsets,
//!                           content digest)            ── setup path, may Box ──
//!  ────────────────────────────────────────────────────────────────────────────────────
//!  proxy request ─> decide (skip list → method/target/traversal guard → endpoint
//!                          authorizer → rules on the legacy form; shadow verdict on the
//!                          canonical form)             ── per request, no allocation ──
//!                    │
//!                  canonical (method allow-list, traversal guard, legacy decoding,
//!                             strict canonical form, fixed DecodeScratch)
//!
//!  explain: the same decision for one hypothetical request, printed for operators.
//!  snapshot: the AuthorizationRules_<time>.json files written when rules change (§4.12).
//! ```
//!
//! [`Policy`] ties it together: it holds the three endpoints' compiled items (HostGAPlugin's
//! is compiled from the WireServer item, without local files, MSP §1.4/§4.7), swaps them
//! when their effective *content* changes (§11 item 7), and answers [`Policy::decide`].

use std::path::Path;

use heapless::Vec;

use self::compile::{CompiledRules, compile, content_digest};
use self::decide::{CallerView, Decision};
use self::local_rules::{LocalRulesEvent, LocalRulesTracker, Refresh, rules_file_name};
use self::rules::{AuthorizationItem, AuthorizationRules};
use crate::redirect::Endpoint;

pub mod canonical;
pub mod compile;
pub mod decide;
pub mod explain;
pub mod local_rules;
pub mod rules;
pub mod snapshot;

/// Local-rules events kept from one [`Policy::update`]: at most a state change and a parse
/// result for each of the two endpoints that read files, plus room.
const MAX_UPDATE_EVENTS: usize = 8;

/// One endpoint's installed rules and its local-file tracker.
#[derive(Debug, Default)]
struct Slot {
    /// The effective item (after descriptor rewrite and local merge), kept for snapshots.
    effective: Option<Box<AuthorizationItem>>,
    compiled: Option<Box<CompiledRules>>,
    tracker: LocalRulesTracker,
}

/// The installed allowlist of all endpoints.
#[derive(Debug, Default)]
pub struct Policy {
    wireserver: Slot,
    imds: Slot,
    hostga: Slot,
    events: Vec<(Endpoint, LocalRulesEvent), MAX_UPDATE_EVENTS>,
}

impl Policy {
    /// No rules anywhere: the default policy of MSP §4.5.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies the latest `authorizationRules` (pass `AuthorizationRules::default()` when the
    /// status document has none); see [`Self::update_items`].
    pub fn update(&mut self, rules: &AuthorizationRules, local_dir: &Path) -> bool {
        self.update_items(rules.imds.as_ref(), rules.wireserver.as_ref(), local_dir)
    }

    /// Applies the latest rule items, one per endpoint as delivered (boxed items from
    /// `msp::status_doc::StatusRules` fit via `as_deref()`). `local_dir` holds the local rule
    /// files (normally [`local_rules::DEFAULT_RULES_DIR`]). Returns whether any endpoint's
    /// installed rules changed, i.e. whether a rules snapshot (§4.12) is due. There is no
    /// HostGAPlugin parameter: it mirrors WireServer and its own item is ignored (§1.4).
    pub fn update_items(
        &mut self,
        imds: Option<&AuthorizationItem>,
        wireserver: Option<&AuthorizationItem>,
        local_dir: &Path,
    ) -> bool {
        self.events.clear();
        let mut changed = false;
        for endpoint in Endpoint::ALL {
            let (slot, host, file) = match endpoint {
                Endpoint::Imds => (&mut self.imds, imds, rules_file_name(endpoint)),
                Endpoint::WireServer => (&mut self.wireserver, wireserver, rules_file_name(endpoint)),
                Endpoint::HostGaPlugin | Endpoint::Unknown(_) => (&mut self.hostga, wireserver, None),
            };
            let path = file.map(|name| local_dir.join(name));
            let events = &mut self.events;
            let mut record = |event| {
                // Full only if something emits more than designed; the rules still apply.
                let _dropped = events.push((endpoint, event));
            };
            let Refresh::Rebuilt(item) = slot.tracker.refresh(host, path.as_deref(), &mut record) else {
                continue;
            };
            let installed = slot.compiled.as_ref().map(|c| c.digest);
            if item.as_deref().map(content_digest) != installed {
                slot.compiled = item.as_deref().map(compile);
                slot.effective = item;
                changed = true;
            }
        }
        changed
    }

    fn slot(&self, endpoint: Endpoint) -> Option<&Slot> {
        match endpoint {
            Endpoint::Imds => Some(&self.imds),
            Endpoint::WireServer => Some(&self.wireserver),
            Endpoint::HostGaPlugin => Some(&self.hostga),
            Endpoint::Unknown(_) => None,
        }
    }

    /// The compiled rules in force for an endpoint.
    pub fn rules(&self, endpoint: Endpoint) -> Option<&CompiledRules> {
        self.slot(endpoint).and_then(|s| s.compiled.as_deref())
    }

    /// The effective item those rules were compiled from (after descriptor rewrite and local
    /// merge): the `inputRules` of a snapshot (§4.12).
    pub fn effective_item(&self, endpoint: Endpoint) -> Option<&AuthorizationItem> {
        self.slot(endpoint).and_then(|s| s.effective.as_deref())
    }

    /// Decides one request against the installed rules (see [`decide::decide`]).
    pub fn decide(&self, endpoint: Endpoint, caller: &CallerView<'_>, method: &[u8], target: &[u8]) -> Decision {
        decide::decide(self.rules(endpoint), endpoint, caller, method, target)
    }

    /// Local-rules events of the last [`Self::update`], for telemetry (MSP §4.7 names via
    /// [`LocalRulesEvent::name`]).
    pub fn local_events(&self) -> &[(Endpoint, LocalRulesEvent)] {
        &self.events
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Helpers shared by the policy tests.

    use super::compile::{CompiledRules, compile};
    use super::rules::AuthorizationItem;

    /// Runs `f` on a thread with a large stack. Debug builds copy a parsed rule item (about
    /// 160 KiB) several times while serde builds it, which overflows the 2 MiB default stack
    /// of test threads; the agent's main thread has 8 MiB and release builds copy far less.
    pub(crate) fn on_big_stack<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .stack_size(64 << 20)
                .spawn_scoped(scope, f)
                .expect("spawn test thread")
                .join()
                .expect("test thread panicked")
        })
    }

    /// Parses an item, panicking on invalid JSON (tests only).
    pub(crate) fn item(json: &str) -> Box<AuthorizationItem> {
        on_big_stack(|| {
            let mut scratch = [0u8; 512];
            let parsed = serde_json_core::from_slice_escaped::<AuthorizationItem>(json.as_bytes(), &mut scratch);
            Box::new(parsed.expect("valid item").0)
        })
    }

    /// Parses and compiles an item.
    pub(crate) fn rules(json: &str) -> Box<CompiledRules> {
        let item = item(json);
        on_big_stack(|| compile(&item))
    }
}

#[cfg(test)]
mod tests {
    use super::compile::Mode;
    use super::decide::{Outcome, Reason};
    use super::test_support::on_big_stack;
    use super::*;

    fn status_rules(json: &str) -> Box<AuthorizationRules> {
        on_big_stack(|| {
            let mut scratch = [0u8; 512];
            let parsed = serde_json_core::from_slice_escaped::<AuthorizationRules>(json.as_bytes(), &mut scratch);
            Box::new(parsed.expect("valid rules").0)
        })
    }

    fn update(policy: &mut Policy, rules: &AuthorizationRules) -> bool {
        on_big_stack(|| policy.update(rules, Path::new("/nonexistent/gpa-policy-rules")))
    }

    const USER: CallerView<'static> =
        CallerView { uid: 1000, user_name: Some("alice"), groups: &[], exe_path: None, process_name: None };
    const ROOT: CallerView<'static> = CallerView { uid: 0, user_name: Some("root"), ..USER };

    fn item(mode: &str, default: &str, id: &str) -> String {
        format!(r#"{{"defaultAccess":"{default}","mode":"{mode}","id":"{id}"}}"#)
    }

    #[test]
    fn hostgaplugin_mirrors_wireserver_and_ignores_hostga_item() {
        let mut policy = Policy::new();
        let rules = status_rules(&format!(
            r#"{{"imds":{},"wireserver":{},"hostga":{}}}"#,
            item("audit", "allow", "i"),
            item("enforce", "deny", "w"),
            item("disabled", "allow", "h")
        ));
        assert!(update(&mut policy, &rules));
        let hgap = policy.rules(Endpoint::HostGaPlugin).expect("hgap rules");
        assert_eq!((hgap.id.as_str(), hgap.mode), ("w", Mode::Enforce));
        assert_eq!(policy.decide(Endpoint::HostGaPlugin, &ROOT, b"GET", b"/x").outcome, Outcome::Forbidden);
        assert_eq!(policy.rules(Endpoint::Imds).map(|r| r.mode), Some(Mode::Audit));
        assert!(policy.rules(Endpoint::Unknown(7)).is_none());
    }

    #[test]
    fn content_change_without_id_change_is_applied() {
        let mut policy = Policy::new();
        let enforce = status_rules(&format!(r#"{{"imds":{}}}"#, item("enforce", "deny", "same")));
        assert!(update(&mut policy, &enforce));
        assert!(!update(&mut policy, &enforce), "unchanged");
        assert_eq!(policy.decide(Endpoint::Imds, &USER, b"GET", b"/x").outcome, Outcome::Forbidden);
        let audit = status_rules(&format!(r#"{{"imds":{}}}"#, item("audit", "deny", "same")));
        assert!(update(&mut policy, &audit));
        assert_eq!(policy.decide(Endpoint::Imds, &USER, b"GET", b"/x").outcome, Outcome::AllowWithAudit);
    }

    #[test]
    fn empty_id_item_is_applied_on_first_boot() {
        let mut policy = Policy::new();
        assert!(update(&mut policy, &status_rules(&format!(r#"{{"imds":{}}}"#, item("enforce", "deny", "")))));
        assert!(policy.rules(Endpoint::Imds).is_some());
    }

    #[test]
    fn removing_rules_returns_to_the_default_policy() {
        // Three empty items are still ~1 MiB on the stack: not on the test thread's 2 MiB.
        on_big_stack(|| {
            let mut policy = Policy::new();
            let none = Box::new(AuthorizationRules::default());
            assert!(!update(&mut policy, &none), "nothing installed yet");
            assert!(update(&mut policy, &status_rules(&format!(r#"{{"imds":{}}}"#, item("enforce", "deny", "x")))));
            assert!(update(&mut policy, &none));
            let d = policy.decide(Endpoint::Imds, &USER, b"GET", b"/x");
            assert_eq!((d.outcome, d.reason), (Outcome::Allow, Reason::NoRules));
            assert_eq!(policy.decide(Endpoint::WireServer, &USER, b"GET", b"/x").reason, Reason::RootOnly);
        });
    }

    #[test]
    fn local_file_events_are_reported_per_endpoint() {
        let dir = std::env::temp_dir().join(format!("gpa-policy-mod-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(local_rules::IMDS_RULES_FILE);
        std::fs::write(&path, br#"{"defaultAccess":"allow","id":"l"}"#).expect("write");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");
        // base64 of {"id":"h","useLocalFileRules":true}
        let rules = status_rules(&format!(
            r#"{{"imds":{}}}"#,
            item("enforce", "deny", "eyJpZCI6ImgiLCJ1c2VMb2NhbEZpbGVSdWxlcyI6dHJ1ZX0=")
        ));
        let mut policy = Policy::new();
        assert!(on_big_stack(|| policy.update(&rules, &dir)));
        let names: std::vec::Vec<_> = policy.local_events().iter().map(|(e, ev)| (*e, ev.name())).collect();
        assert_eq!(
            names,
            [(Endpoint::Imds, "LocalFileRulesStateChanged"), (Endpoint::Imds, "LocalRulesFileParseSuccess")]
        );
        assert_eq!(policy.rules(Endpoint::Imds).map(|r| r.id.as_str()), Some("h-useLocalFileRules-true_l"));
        assert_eq!(policy.decide(Endpoint::Imds, &USER, b"GET", b"/x").outcome, Outcome::Allow);
        drop(std::fs::remove_dir_all(&dir));
    }
}
