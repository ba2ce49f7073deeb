// SPDX-License-Identifier: MIT
//! `guest-proxy-agent policy explain`: runs one hypothetical request through exactly the
//! decision code the proxy uses and reports every step — the front-door checks, the legacy
//! and canonical forms of the target, and which privilege, identity or default decided.
//!
//! This is an operator tool (setup path), so it allocates freely; what it calls to decide is
//! the same allocation-free [`decide`].
//!
//! Accepted rule input: one `AuthorizationItem`, or an `authorizationRules` object (the item
//! for the endpoint is taken; HostGAPlugin uses `wireserver`, MSP §1.4), or empty / `null`
//! for "no rules" (the default policy of §4.5). Local rule files are not read: pass the
//! effective item.

use core::fmt::{self, Write};
use std::string::String;
use std::vec::Vec;

use super::canonical::{
    CanonError, DecodeScratch, GuardError, TargetError, canonicalize, legacy_decode, split_target, traversal_guard,
};
use super::compile::{CompiledRules, compile};
use super::decide::{CallerView, Decision, decide};
use super::local_rules::parse_boxed;
use super::rules::AuthorizationItem;
use crate::http::method_allowed;
use crate::redirect::Endpoint;
use crate::text::{json_opt, json_str, write_escaped};

/// The rules the explanation ran against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RulesSummary {
    /// No item: the endpoint's default policy.
    None,
    /// A compiled item.
    Loaded {
        /// Rule-set id.
        id: String,
        /// Snapshot spelling of the mode.
        mode: &'static str,
        /// Whether the wire mode was known.
        mode_recognised: bool,
        /// `defaultAccess` is allow.
        default_allowed: bool,
        /// Compiled privileges.
        privileges: usize,
        /// Compiled identities.
        identities: usize,
    },
    /// The rules did not parse; the agent would refuse them and fail closed.
    Invalid(String),
}

/// A decoded request form (legacy or canonical).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestForm {
    /// The path as matched.
    pub path: String,
    /// Query pairs in matching order.
    pub query: Vec<(String, String)>,
}

/// The caller, as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerSummary {
    /// uid.
    pub uid: u32,
    /// User name.
    pub user_name: Option<String>,
    /// Group names.
    pub groups: Vec<String>,
    /// Executable path (lossy UTF-8).
    pub exe_path: Option<String>,
}

/// Everything `policy explain` prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExplainReport {
    /// Endpoint the request was addressed to.
    pub endpoint: Endpoint,
    /// Caller.
    pub caller: CallerSummary,
    /// Method (lossy UTF-8).
    pub method: String,
    /// Request target (lossy UTF-8).
    pub url: String,
    /// Rules used.
    pub rules: RulesSummary,
    /// Method allow-list result.
    pub method_allowed: bool,
    /// Target form problem, if any.
    pub target_error: Option<TargetError>,
    /// Traversal guard result (`None` when the target could not be split).
    pub guard: Option<Result<(), GuardError>>,
    /// The legacy form that decides.
    pub legacy: Option<RequestForm>,
    /// The strict canonical form.
    pub canonical: Result<RequestForm, CanonError>,
    /// The decision; `None` when the rules did not parse.
    pub decision: Option<Decision>,
}

use self::wrappers::{ImdsOnly, ItemShape, WireServerOnly};

/// `{"imds": item}` / `{"wireserver": item}`: only the wanted endpoint is materialised.
mod wrappers {
    #![expect(
        clippy::large_stack_frames,
        reason = "serde derives holding one ~160 KiB item; operator CLI on the main thread"
    )]

    use serde::Deserialize;

    use super::AuthorizationItem;

    #[derive(Deserialize)]
    pub(super) struct ImdsOnly {
        #[serde(default)]
        pub(super) imds: Option<AuthorizationItem>,
    }

    /// Which shape the input has: an item carries at least one of these keys, an
    /// `authorizationRules` object none.
    #[derive(Deserialize)]
    pub(super) struct ItemShape {
        #[serde(default, rename = "defaultAccess")]
        pub(super) default_access: Option<serde::de::IgnoredAny>,
        #[serde(default)]
        pub(super) mode: Option<serde::de::IgnoredAny>,
        #[serde(default)]
        pub(super) rules: Option<serde::de::IgnoredAny>,
    }

    #[derive(Deserialize)]
    pub(super) struct WireServerOnly {
        #[serde(default)]
        pub(super) wireserver: Option<AuthorizationItem>,
    }
}

/// Parses the rule input (see the module docs).
fn load_rules(json: &[u8], endpoint: Endpoint) -> Result<Option<Box<AuthorizationItem>>, String> {
    let trimmed = json.trim_ascii();
    if trimmed.is_empty() || trimmed == b"null" {
        return Ok(None);
    }
    let item_error = match parse_boxed::<AuthorizationItem>(trimmed) {
        Ok(item) => return Ok(Some(item)),
        Err(e) => e,
    };
    // An item the agent cannot take (over a capacity, 33 privileges, a value too long) is
    // refused there and its endpoint allows nothing: never read it as "no rules".
    let is_item = parse_boxed::<ItemShape>(trimmed)
        .is_ok_and(|shape| shape.default_access.is_some() || shape.mode.is_some() || shape.rules.is_some());
    if is_item {
        return Err(format!("the agent refuses this rule set and allows nothing on the endpoint: {item_error}"));
    }
    let from_rules = match endpoint {
        Endpoint::Imds => parse_boxed::<ImdsOnly>(trimmed).map(|r| r.imds.map(Box::new)),
        Endpoint::WireServer | Endpoint::HostGaPlugin => {
            parse_boxed::<WireServerOnly>(trimmed).map(|r| r.wireserver.map(Box::new))
        }
        Endpoint::Unknown(_) => Ok(None),
    };
    // A `{"imds":…}` object that is not an item parses here; report the item error otherwise,
    // since an item is the common input.
    from_rules.map_err(|_rules_error| format!("invalid rules JSON: {item_error}"))
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn owned_pairs<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<(String, String)> {
    pairs.map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

/// Explains one request against `rules_json` (see the module docs for accepted input).
pub fn explain(
    rules_json: &[u8],
    endpoint: Endpoint,
    caller: &CallerView<'_>,
    method: &[u8],
    url: &[u8],
) -> ExplainReport {
    let loaded = load_rules(rules_json, endpoint);
    let compiled: Result<Option<Box<CompiledRules>>, String> = loaded.map(|item| item.as_deref().map(compile));
    let rules = match &compiled {
        Ok(None) => RulesSummary::None,
        Ok(Some(c)) => RulesSummary::Loaded {
            id: c.id.as_str().to_owned(),
            mode: c.mode.as_str(),
            mode_recognised: c.mode_recognised,
            default_allowed: c.default_allowed,
            privileges: c.privileges.len(),
            identities: c.identities.len(),
        },
        Err(e) => RulesSummary::Invalid(e.clone()),
    };
    let mut scratch = Box::new(DecodeScratch::new());
    let split = split_target(url);
    let legacy = legacy_decode(url, &mut scratch)
        .ok()
        .map(|r| RequestForm { path: r.path.to_owned(), query: owned_pairs(r.pairs()) });
    let canonical = canonicalize(method, url, &mut scratch)
        .map(|r| RequestForm { path: r.path().to_owned(), query: owned_pairs(r.pairs()) });
    ExplainReport {
        endpoint,
        caller: CallerSummary {
            uid: caller.uid,
            user_name: caller.user_name.map(str::to_owned),
            groups: caller.groups.iter().map(|g| (*g).to_owned()).collect(),
            exe_path: caller.exe_path.map(lossy),
        },
        method: lossy(method),
        url: lossy(url),
        rules,
        method_allowed: method_allowed(method),
        target_error: split.err(),
        guard: split.ok().map(|parts| traversal_guard(parts.path)),
        legacy,
        canonical,
        decision: compiled.ok().map(|c| decide(c.as_deref(), endpoint, caller, method, url)),
    }
}

fn json_form(out: &mut impl Write, form: &RequestForm) -> fmt::Result {
    out.write_str("{\"path\":")?;
    json_str(out, &form.path)?;
    out.write_str(",\"query\":[")?;
    for (i, (k, v)) in form.query.iter().enumerate() {
        out.write_str(if i == 0 { "[" } else { ",[" })?;
        json_str(out, k)?;
        out.write_char(',')?;
        json_str(out, v)?;
        out.write_char(']')?;
    }
    out.write_str("]}")
}

/// One line of text for humans: caller-controlled text escaped.
fn human_form(out: &mut impl Write, label: &str, form: &RequestForm) -> fmt::Result {
    write!(out, "{label} path=\"")?;
    write_escaped(out, form.path.as_bytes())?;
    out.write_str("\" query=[")?;
    for (i, (k, v)) in form.query.iter().enumerate() {
        out.write_str(if i == 0 { "" } else { ", " })?;
        write_escaped(out, k.as_bytes())?;
        out.write_str("=\"")?;
        write_escaped(out, v.as_bytes())?;
        out.write_char('"')?;
    }
    out.write_str("]\n")
}

fn guard_text(guard: Option<Result<(), GuardError>>) -> &'static str {
    match guard {
        Some(Ok(())) => "ok",
        Some(Err(e)) => e.as_str(),
        None => "not-run",
    }
}

impl ExplainReport {
    /// Writes the report for a terminal.
    pub fn write_human(&self, out: &mut impl Write) -> fmt::Result {
        write!(out, "endpoint:  {}\nrequest:   ", self.endpoint.name())?;
        write_escaped(out, self.method.as_bytes())?;
        out.write_char(' ')?;
        write_escaped(out, self.url.as_bytes())?;
        write!(out, "\ncaller:    uid={} user=", self.caller.uid)?;
        write_escaped(out, self.caller.user_name.as_deref().unwrap_or("(unknown)").as_bytes())?;
        out.write_str(" exe=")?;
        write_escaped(out, self.caller.exe_path.as_deref().unwrap_or("(unknown)").as_bytes())?;
        out.write_str(" groups=")?;
        write_escaped(out, self.caller.groups.join(",").as_bytes())?;
        out.write_str("\nrules:     ")?;
        match &self.rules {
            RulesSummary::None => out.write_str("none (default policy)")?,
            RulesSummary::Loaded { id, mode, mode_recognised, default_allowed, privileges, identities } => {
                out.write_str("id=")?;
                write_escaped(out, id.as_bytes())?;
                let unknown = if *mode_recognised { "" } else { " (unknown wire mode)" };
                let default = if *default_allowed { "allow" } else { "deny" };
                write!(out, " mode={mode}{unknown} default={default} privileges={privileges} identities={identities}")?;
            }
            RulesSummary::Invalid(e) => write!(out, "INVALID: {e}")?,
        }
        let method = if self.method_allowed { "allowed" } else { "not-allowed" };
        write!(out, "\nchecks:    method={method} guard={}", guard_text(self.guard))?;
        if let Some(e) = self.target_error {
            write!(out, " target={e:?}")?;
        }
        out.write_char('\n')?;
        match &self.legacy {
            Some(form) => human_form(out, "legacy:   ", form)?,
            None => out.write_str("legacy:    (no form)\n")?,
        }
        match &self.canonical {
            Ok(form) => human_form(out, "canonical:", form)?,
            Err(e) => writeln!(out, "canonical: error {}", e.code())?,
        }
        let Some(d) = &self.decision else {
            return out.write_str("decision:  none (the agent would refuse these rules)\n");
        };
        write!(out, "decision:  {} ({})", d.outcome.as_str(), d.reason.as_str())?;
        if let Some(p) = &d.privilege {
            out.write_str(" privilege=")?;
            write_escaped(out, p.as_bytes())?;
        }
        if let Some(i) = &d.identity {
            out.write_str(" identity=")?;
            write_escaped(out, i.as_bytes())?;
        }
        out.write_char('\n')?;
        if let Some(div) = &d.divergence {
            let legacy = if div.legacy_allowed { "allow" } else { "deny" };
            writeln!(out, "shadow:    legacy={legacy} canon={} (diverges; the legacy verdict decides)", div.canon)?;
        }
        Ok(())
    }

    /// Writes the report as one JSON object.
    pub fn write_json(&self, out: &mut impl Write) -> fmt::Result {
        out.write_str("{\"endpoint\":")?;
        json_str(out, self.endpoint.name())?;
        write!(out, ",\"caller\":{{\"uid\":{},\"userName\":", self.caller.uid)?;
        json_opt(out, self.caller.user_name.as_deref())?;
        out.write_str(",\"groups\":[")?;
        for (i, g) in self.caller.groups.iter().enumerate() {
            if i > 0 {
                out.write_char(',')?;
            }
            json_str(out, g)?;
        }
        out.write_str("],\"exePath\":")?;
        json_opt(out, self.caller.exe_path.as_deref())?;
        out.write_str("},\"method\":")?;
        json_str(out, &self.method)?;
        out.write_str(",\"url\":")?;
        json_str(out, &self.url)?;
        out.write_str(",\"rules\":")?;
        match &self.rules {
            RulesSummary::None => out.write_str("null")?,
            RulesSummary::Loaded { id, mode, mode_recognised, default_allowed, privileges, identities } => {
                out.write_str("{\"id\":")?;
                json_str(out, id)?;
                write!(
                    out,
                    ",\"mode\":\"{mode}\",\"modeRecognised\":{mode_recognised},\"defaultAllowed\":{default_allowed},\
                     \"privileges\":{privileges},\"identities\":{identities}}}"
                )?;
            }
            RulesSummary::Invalid(e) => {
                out.write_str("{\"error\":")?;
                json_str(out, e)?;
                out.write_char('}')?;
            }
        }
        write!(out, ",\"methodAllowed\":{},\"guard\":\"{}\",\"legacy\":", self.method_allowed, guard_text(self.guard))?;
        match &self.legacy {
            Some(form) => json_form(out, form)?,
            None => out.write_str("null")?,
        }
        out.write_str(",\"canonical\":")?;
        match &self.canonical {
            Ok(form) => json_form(out, form)?,
            Err(e) => write!(out, "{{\"error\":\"{}\"}}", e.code())?,
        }
        out.write_str(",\"decision\":")?;
        let Some(d) = &self.decision else {
            return out.write_str("null}");
        };
        write!(out, "{{\"outcome\":\"{}\",\"reason\":\"{}\",\"privilege\":", d.outcome.as_str(), d.reason.as_str())?;
        json_opt(out, d.privilege.as_deref())?;
        out.write_str(",\"identity\":")?;
        json_opt(out, d.identity.as_deref())?;
        out.write_str(",\"divergence\":")?;
        match &d.divergence {
            Some(div) => write!(out, "{{\"legacyAllowed\":{},\"canon\":\"{}\"}}", div.legacy_allowed, div.canon)?,
            None => out.write_str("null")?,
        }
        out.write_str("}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::decide::{Outcome, Reason};
    use crate::policy::test_support::on_big_stack;

    const ITEM: &str = r#"{"defaultAccess":"allow","mode":"enforce","id":"rs-1","rules":{
        "privileges":[{"name":"token","path":"/metadata/identity/oauth2/token"}],
        "roles":[{"name":"r","privileges":["token"]}],
        "identities":[{"name":"curl","exePath":"/usr/bin/curl"}],
        "roleAssignments":[{"role":"r","identities":["curl"]}]}}"#;

    const USER: CallerView<'static> = CallerView {
        uid: 1000,
        user_name: Some("alice"),
        groups: &["alice"],
        exe_path: Some(b"/usr/bin/python3"),
        process_name: None,
    };

    fn run(rules: &str, endpoint: Endpoint, url: &str) -> ExplainReport {
        on_big_stack(|| explain(rules.as_bytes(), endpoint, &USER, b"GET", url.as_bytes()))
    }

    fn human(report: &ExplainReport) -> String {
        let mut out = String::new();
        report.write_human(&mut out).expect("string write");
        out
    }

    fn json(report: &ExplainReport) -> String {
        let mut out = String::new();
        report.write_json(&mut out).expect("string write");
        out
    }

    #[test]
    fn explains_identity_mismatch_with_forms() {
        let report = run(ITEM, Endpoint::Imds, "/metadata/identity/oauth2%2Ftoken?Resource=X");
        let decision = report.decision.as_ref().expect("decided");
        assert_eq!((decision.outcome, decision.reason), (Outcome::Forbidden, Reason::IdentityMismatch));
        let legacy = report.legacy.as_ref().expect("legacy form");
        assert_eq!(legacy.path, "/metadata/identity/oauth2/token");
        assert_eq!(legacy.query, [("resource".to_owned(), "x".to_owned())]);
        let text = human(&report);
        assert!(text.contains("decision:  forbidden (privilege-without-identity) privilege=token"), "{text}");
        assert!(text.contains("rules:     id=rs-1 mode=Enforce default=allow privileges=1 identities=1"), "{text}");
        assert!(text.contains("canonical: path=\"/metadata/identity/oauth2/token\""), "{text}");
    }

    #[test]
    fn explains_default_and_divergence() {
        let report = run(ITEM, Endpoint::Imds, "/metadata/\u{131}dentity/oauth2/token");
        assert_eq!(report.canonical, Err(CanonError::NonAscii));
        let text = human(&report);
        assert!(text.contains("decision:  allow (default-access)"), "{text}");
        assert!(text.contains("shadow:    legacy=allow canon=error:CANON_NON_ASCII"), "{text}");
        assert!(text.contains("\\xc4\\xb1"), "non-ASCII escaped in human output: {text}");
    }

    #[test]
    fn accepts_authorization_rules_objects_per_endpoint() {
        let rules = format!(r#"{{"imds":{ITEM},"wireserver":null}}"#);
        assert!(matches!(run(&rules, Endpoint::Imds, "/x").rules, RulesSummary::Loaded { .. }));
        assert_eq!(run(&rules, Endpoint::WireServer, "/x").rules, RulesSummary::None);
        let ws = format!(r#"{{"wireserver":{ITEM}}}"#);
        assert!(matches!(run(&ws, Endpoint::HostGaPlugin, "/x").rules, RulesSummary::Loaded { .. }));
        let report = run("", Endpoint::WireServer, "/x");
        assert_eq!(report.decision.expect("decided").reason, Reason::RootOnly);
    }

    #[test]
    fn rules_the_agent_refuses_are_invalid_never_no_rules() {
        // 33 privileges (one over the capacity), and a query value longer than any ARM id.
        let privileges: Vec<String> =
            (0..33).map(|i| format!(r#"{{"name":"p{i}","path":"/metadata/p{i}"}}"#)).collect();
        let too_many = format!(
            r#"{{"defaultAccess":"allow","mode":"enforce","id":"x","rules":{{"privileges":[{}],"roles":[],"identities":[],"roleAssignments":[]}}}}"#,
            privileges.join(",")
        );
        let long_value = format!(
            r#"{{"defaultAccess":"allow","mode":"enforce","id":"x","rules":{{"privileges":[{{"name":"t","path":"/metadata/identity","queryParameters":{{"mi_res_id":"{}"}}}}],"roles":[],"identities":[],"roleAssignments":[]}}}}"#,
            "a".repeat(500)
        );
        for rules in [too_many, long_value] {
            let report = run(&rules, Endpoint::Imds, "/metadata/p1");
            assert!(matches!(report.rules, RulesSummary::Invalid(_)), "{:?}", report.rules);
            assert!(report.decision.is_none());
            assert!(human(&report).contains("INVALID: the agent refuses this rule set"), "{}", human(&report));
        }
    }

    #[test]
    fn invalid_rules_give_no_decision() {
        let report = run("{\"defaultAccess\":", Endpoint::Imds, "/x");
        assert!(matches!(report.rules, RulesSummary::Invalid(_)));
        assert!(report.decision.is_none());
        assert!(human(&report).contains("decision:  none"));
        assert!(json(&report).ends_with("\"decision\":null}"));
    }

    #[test]
    fn front_door_failures_are_reported() {
        let report = run(ITEM, Endpoint::Imds, "/a/%2e%2e/b");
        assert_eq!(report.guard, Some(Err(GuardError::DotDot)));
        assert_eq!(report.decision.as_ref().map(|d| d.reason), Some(Reason::Traversal(GuardError::DotDot)));
        let report = run(ITEM, Endpoint::Imds, "*");
        assert_eq!((report.target_error, report.guard), (Some(TargetError::Form), None));
    }

    #[test]
    fn json_output_is_escaped_and_complete() {
        let report = run(ITEM, Endpoint::Imds, "/metadata/identity/oauth2/token?q=%22%0A");
        let out = json(&report);
        assert!(out.starts_with(r#"{"endpoint":"imds","caller":{"uid":1000,"userName":"alice","groups":["alice"],"exePath":"/usr/bin/python3"}"#), "{out}");
        assert!(
            out.contains(r#""legacy":{"path":"/metadata/identity/oauth2/token","query":[["q","\"\u000a"]]}"#),
            "{out}"
        );
        assert!(out.contains(r#""canonical":{"error":"CANON_CTRL"}"#), "{out}");
        assert!(out.contains(r#""decision":{"outcome":"forbidden","reason":"privilege-without-identity","privilege":"token","identity":null,"divergence":{"legacyAllowed":false,"canon":"error:CANON_CTRL"}}"#), "{out}");
        assert_eq!(out.matches('{').count(), out.matches('}').count());
    }
}
