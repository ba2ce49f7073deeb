// SPDX-License-Identifier: MIT
//! The `TelemetryData` body of `POST /machine/?comp=telemetrydata` (MSP §7.3), built in
//! batches of at most a given size (§7.2: 64 KiB).
//!
//! Heads up! Read `../shared/spec/msp-protocol.md` §7.3 first: the provider id, the event id,
//! the parameter names, their order and their `T` types are the wire contract. Every value is
//! XML-escaped (so `]]>` can never close the CDATA section early) and characters XML 1.0 does
//! not allow are replaced by `?`.

use super::event::Event;
use super::metadata::VmMetadata;
use crate::calendar::format_timestamp_millis;

/// Provider of generic log events (Event id 7).
pub const GENERIC_PROVIDER: &str = "FFF0196F-EE4C-4EAF-9AA5-776F622DEB4F";
const HEAD: &str =
    "<?xml version=\"1.0\"?><TelemetryData version=\"1.0\"><Provider id=\"FFF0196F-EE4C-4EAF-9AA5-776F622DEB4F\">";
const TAIL: &str = "</Provider></TelemetryData>";
/// `ExecutionMode` and `EventName` of every event.
const EXECUTION_MODE: &str = "ProxyAgent";
const EVENT_NAME: &str = "MicrosoftAzureGuestProxyAgent";

/// One body being filled.
#[derive(Debug)]
pub struct Batch {
    body: Vec<u8>,
    scratch: Vec<u8>,
    limit: usize,
    events: usize,
    /// Events whose message was cut so that they fit alone.
    pub truncated: u64,
    /// Events that could not fit even with an empty message (consumed, not sent).
    pub dropped: u64,
}

impl Batch {
    /// An empty batch whose finished body is at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        let mut body = Vec::with_capacity(limit.min(16 * 1024));
        body.extend_from_slice(HEAD.as_bytes());
        Self { body, scratch: Vec::new(), limit, events: 0, truncated: 0, dropped: 0 }
    }

    /// Adds `event` when it fits. `false`: the batch is full and the event was not taken (it
    /// starts the next batch). An event too big for an empty batch has its message cut to
    /// fit; if even the rest does not fit it is dropped and counted. Either way it is taken,
    /// so a caller that loops until `false` always ends.
    pub fn try_add(&mut self, event: &Event, meta: &VmMetadata) -> bool {
        let room = self.limit.saturating_sub(self.body.len() + TAIL.len());
        self.scratch.clear();
        render_event(&mut self.scratch, event, meta, usize::MAX);
        if self.scratch.len() > room {
            if self.events > 0 {
                return false;
            }
            self.scratch.clear();
            render_event(&mut self.scratch, event, meta, 0);
            let overhead = self.scratch.len();
            if overhead > room {
                self.dropped += 1;
                return true;
            }
            self.scratch.clear();
            render_event(&mut self.scratch, event, meta, room - overhead);
            self.truncated += 1;
        }
        self.body.extend_from_slice(&self.scratch);
        self.events += 1;
        true
    }

    /// Events in the batch.
    pub fn events(&self) -> usize {
        self.events
    }

    /// The finished body.
    pub fn finish(mut self) -> Vec<u8> {
        self.body.extend_from_slice(TAIL.as_bytes());
        self.body
    }
}

/// Appends one `<Event id="7">`; the message (`Context1`) takes at most `message_budget`
/// bytes once escaped.
fn render_event(out: &mut Vec<u8>, e: &Event, m: &VmMetadata, message_budget: usize) {
    let time = format_timestamp_millis(e.unix_ms);
    out.extend_from_slice(
        b"<Event id=\"7\"><![CDATA[<Param Name=\"KeywordName\" Value=\"{&quot;CpuArchitecture&quot;:&quot;",
    );
    escape_into(out, m.os.arch, usize::MAX);
    out.extend_from_slice(b"&quot;}\" T=\"mt:wstr\" />");
    let wstr = [
        ("TenantName", &*m.shared_config.deployment_name),
        ("RoleName", &m.shared_config.role_name),
        ("RoleInstanceName", m.role_instance_name()),
        ("ContainerId", &m.goal_state.container_id),
        ("ResourceGroupName", &m.compute.resource_group_name),
        ("SubscriptionId", &m.compute.subscription_id),
        ("VMId", &m.compute.vm_id),
    ];
    for (name, value) in wstr {
        param(out, name, value);
    }
    param_u64(out, "ImageOrigin", u64::from(!m.compute.offer.is_empty()));
    param(out, "OSVersion", &m.os.os_version);
    param_u64(out, "RAM", m.os.ram_mb);
    param_u64(out, "Processors", m.os.processors);
    param_u64(out, "EventPid", u64::from(e.pid));
    param_u64(out, "EventTid", u64::from(e.tid));
    let wstr = [
        ("GAVersion", crate::VERSION),
        ("ExecutionMode", EXECUTION_MODE),
        ("TaskName", &e.task),
        ("OpcodeName", &time),
        ("EventName", EVENT_NAME),
        ("CapabilityUsed", e.level.as_str()),
    ];
    for (name, value) in wstr {
        param(out, name, value);
    }
    param_with(out, "Context1", &e.message, "mt:wstr", message_budget);
    param(out, "Context2", &time);
    param(out, "Context3", &e.operation);
    out.extend_from_slice(b"]]></Event>");
}

/// A `mt:wstr` parameter (out of line: it is called two dozen times per event).
#[inline(never)]
fn param(out: &mut Vec<u8>, name: &str, value: &str) {
    param_with(out, name, value, "mt:wstr", usize::MAX);
}

fn param_with(out: &mut Vec<u8>, name: &str, value: &str, kind: &str, budget: usize) {
    out.extend_from_slice(b"<Param Name=\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\" Value=\"");
    escape_into(out, value, budget);
    out.extend_from_slice(b"\" T=\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\" />");
}

fn param_u64(out: &mut Vec<u8>, name: &str, value: u64) {
    let text = crate::http::decimal(value);
    param_with(out, name, core::str::from_utf8(&text).unwrap_or_default(), "mt:uint64", usize::MAX);
}

/// Appends `text` XML-escaped for an attribute value, at most `budget` bytes (whole escapes
/// and characters only).
pub fn escape_into(out: &mut Vec<u8>, text: &str, budget: usize) {
    let mut used = 0;
    for (at, c) in text.char_indices() {
        let piece: &[u8] = match c {
            '&' => b"&amp;",
            '<' => b"&lt;",
            '>' => b"&gt;",
            '"' => b"&quot;",
            '\'' => b"&apos;",
            // Escaped so attribute-value normalisation keeps them.
            '\t' => b"&#9;",
            '\n' => b"&#10;",
            '\r' => b"&#13;",
            // Not allowed anywhere in an XML 1.0 document, not even as a reference.
            '\u{0}'..='\u{1f}' | '\u{fffe}' | '\u{ffff}' => b"?",
            c => text.as_bytes().get(at..at + c.len_utf8()).unwrap_or_default(),
        };
        if used + piece.len() > budget {
            return;
        }
        used += piece.len();
        out.extend_from_slice(piece);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::event::EventTime;
    use crate::telemetry::imds::Compute;
    use crate::telemetry::metadata::{GoalState, OsInfo, SharedConfig};

    fn meta() -> VmMetadata {
        let v = |s: &str| heapless::String::try_from(s).unwrap();
        VmMetadata {
            goal_state: GoalState {
                container_id: v("a8016240-7286-49ef-8981-63520cb8f6d0"),
                instance_id: v("d.vm_IN_0"),
                shared_config_url: heapless::String::new(),
            },
            shared_config: SharedConfig {
                deployment_name: v("dep<&>"),
                role_name: v("vm"),
                instance_id: heapless::String::new(),
            },
            compute: Compute {
                resource_group_name: v("rg"),
                subscription_id: v("sub"),
                vm_id: v("vmid"),
                offer: v("ubuntu"),
                ..Compute::default()
            },
            os: OsInfo { os_version: v("Linux:Debian-12"), ram_mb: 2048, processors: 2, arch: "x86_64" },
        }
    }

    fn event(message: &str) -> Event {
        Event::new(
            log::Level::Warn,
            "KeyKeeper",
            "set_module_status_message",
            format_args!("{message}"),
            EventTime { pid: 42, tid: 43, unix_ms: 1_745_409_600_123 },
        )
    }

    #[test]
    fn golden_event_with_escaping_and_param_order() {
        let mut batch = Batch::new(64 * 1024);
        assert!(batch.try_add(&event("a \"b\" <c> ]]> d's pwd=secret;\n"), &meta()));
        let body = String::from_utf8(batch.finish()).unwrap();
        let expected = format!(
            "<?xml version=\"1.0\"?><TelemetryData version=\"1.0\"><Provider id=\"FFF0196F-EE4C-4EAF-9AA5-776F622DEB4F\">\
             <Event id=\"7\"><![CDATA[\
             <Param Name=\"KeywordName\" Value=\"{{&quot;CpuArchitecture&quot;:&quot;x86_64&quot;}}\" T=\"mt:wstr\" />\
             <Param Name=\"TenantName\" Value=\"dep&lt;&amp;&gt;\" T=\"mt:wstr\" />\
             <Param Name=\"RoleName\" Value=\"vm\" T=\"mt:wstr\" />\
             <Param Name=\"RoleInstanceName\" Value=\"d.vm_IN_0\" T=\"mt:wstr\" />\
             <Param Name=\"ContainerId\" Value=\"a8016240-7286-49ef-8981-63520cb8f6d0\" T=\"mt:wstr\" />\
             <Param Name=\"ResourceGroupName\" Value=\"rg\" T=\"mt:wstr\" />\
             <Param Name=\"SubscriptionId\" Value=\"sub\" T=\"mt:wstr\" />\
             <Param Name=\"VMId\" Value=\"vmid\" T=\"mt:wstr\" />\
             <Param Name=\"ImageOrigin\" Value=\"1\" T=\"mt:uint64\" />\
             <Param Name=\"OSVersion\" Value=\"Linux:Debian-12\" T=\"mt:wstr\" />\
             <Param Name=\"RAM\" Value=\"2048\" T=\"mt:uint64\" />\
             <Param Name=\"Processors\" Value=\"2\" T=\"mt:uint64\" />\
             <Param Name=\"EventPid\" Value=\"42\" T=\"mt:uint64\" />\
             <Param Name=\"EventTid\" Value=\"43\" T=\"mt:uint64\" />\
             <Param Name=\"GAVersion\" Value=\"{}\" T=\"mt:wstr\" />\
             <Param Name=\"ExecutionMode\" Value=\"ProxyAgent\" T=\"mt:wstr\" />\
             <Param Name=\"TaskName\" Value=\"set_module_status_message\" T=\"mt:wstr\" />\
             <Param Name=\"OpcodeName\" Value=\"2025-04-23T12:00:00.123\" T=\"mt:wstr\" />\
             <Param Name=\"EventName\" Value=\"MicrosoftAzureGuestProxyAgent\" T=\"mt:wstr\" />\
             <Param Name=\"CapabilityUsed\" Value=\"WARN\" T=\"mt:wstr\" />\
             <Param Name=\"Context1\" Value=\"a &quot;b&quot; &lt;c&gt; ]]&gt; d&apos;s [REDACTED];&#10;\" T=\"mt:wstr\" />\
             <Param Name=\"Context2\" Value=\"2025-04-23T12:00:00.123\" T=\"mt:wstr\" />\
             <Param Name=\"Context3\" Value=\"KeyKeeper\" T=\"mt:wstr\" />\
             ]]></Event></Provider></TelemetryData>",
            crate::VERSION
        );
        assert_eq!(body, expected);
        assert_eq!(body.matches("]]>").count(), 1, "only the CDATA end");
    }

    #[test]
    fn control_characters_and_nonchars_are_replaced() {
        let mut out = Vec::new();
        escape_into(&mut out, "a\u{0}b\u{1b}c\u{fffe}\té", usize::MAX);
        assert_eq!(String::from_utf8(out).unwrap(), "a?b?c?&#9;é");
        let mut out = Vec::new();
        escape_into(&mut out, "&&&", 9);
        assert_eq!(out, b"&amp;", "whole escapes only");
    }

    #[test]
    fn batches_stay_under_the_limit() {
        let limit = 8 * 1024;
        let meta = meta();
        let events: Vec<Event> = (0..50).map(|i| event(&format!("event {i} {}", "x".repeat(300)))).collect();
        let mut rest = events.as_slice();
        let mut batches = 0;
        while !rest.is_empty() {
            let mut batch = Batch::new(limit);
            let taken = rest.iter().take_while(|e| batch.try_add(e, &meta)).count();
            assert!(taken > 0);
            let body = batch.finish();
            assert!(body.len() <= limit, "{} > {limit}", body.len());
            if taken < rest.len() {
                assert!(body.len() > limit - 2000, "a full batch is nearly full: {}", body.len());
            }
            assert_eq!(String::from_utf8(body).unwrap().matches("<Event id=\"7\">").count(), taken);
            rest = &rest[taken..];
            batches += 1;
        }
        assert!(batches > 2);
    }

    #[test]
    fn an_event_too_big_alone_is_cut_and_one_that_cannot_fit_is_dropped() {
        let meta = meta();
        let big = event(&"<".repeat(4000)); // escapes to 16 000 bytes
        let mut batch = Batch::new(6 * 1024);
        assert!(batch.try_add(&big, &meta));
        assert_eq!((batch.events(), batch.truncated), (1, 1));
        assert!(!batch.try_add(&event("next"), &meta), "full: the next event waits");
        let body = batch.finish();
        assert!(body.len() <= 6 * 1024 && body.len() > 6 * 1024 - 8, "{}", body.len());
        assert!(String::from_utf8(body).unwrap().ends_with("\" T=\"mt:wstr\" /><Param Name=\"Context2\" Value=\"2025-04-23T12:00:00.123\" T=\"mt:wstr\" /><Param Name=\"Context3\" Value=\"KeyKeeper\" T=\"mt:wstr\" />]]></Event></Provider></TelemetryData>"));

        let mut tiny = Batch::new(500);
        assert!(tiny.try_add(&big, &meta), "taken, so the caller moves on");
        assert_eq!((tiny.events(), tiny.dropped), (0, 1));
    }
}
