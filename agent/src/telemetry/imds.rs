// SPDX-License-Identifier: MIT
//! The few `compute` values telemetry needs from the IMDS instance document (MSP §7.3), read by
//! a small iterative scanner.
//!
//! Why not serde-json-core: it does skip unknown fields, nested objects and arrays included,
//! but it does so by recursion without a depth bound, and the instance document is large and
//! mostly unknown fields (`network`, `storageProfile`, `publicKeys`, …). This scanner keeps an
//! explicit stack of at most [`MAX_DEPTH`] levels, decodes only the wanted strings into
//! fixed-capacity fields (with serde-json-core's string decoder, one string at a time), and
//! ignores everything else; it needs no allocation and no input can make it panic.

use heapless::{String, Vec};

use crate::limits::TELEMETRY_VALUE_MAX_BYTES;

/// Deepest nesting followed.
pub const MAX_DEPTH: usize = 32;

/// One value.
pub type Value = String<TELEMETRY_VALUE_MAX_BYTES>;

/// `compute.*` of the instance document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compute {
    /// `location`.
    pub location: Value,
    /// `name`.
    pub name: Value,
    /// `resourceGroupName`.
    pub resource_group_name: Value,
    /// `subscriptionId`.
    pub subscription_id: Value,
    /// `vmId`.
    pub vm_id: Value,
    /// `vmSize`.
    pub vm_size: Value,
    /// `offer` (optional; empty for custom images).
    pub offer: Value,
}

/// Why the document was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImdsError {
    /// Not well-formed enough to scan (truncated, unbalanced, bad string).
    Malformed,
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// A wanted value is longer than [`TELEMETRY_VALUE_MAX_BYTES`].
    TooLong,
    /// No `compute` object, or it lacks a required field (named).
    Missing(&'static str),
}

impl ImdsError {
    /// A short reason for logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "JSON malformed",
            Self::TooDeep => "JSON nested too deep",
            Self::TooLong => "JSON value too long",
            Self::Missing(_) => "JSON compute field missing",
        }
    }
}

/// The required fields (MSP §7.3) and where they go; `offer` is optional.
const FIELDS: [&str; 7] = ["location", "name", "resourceGroupName", "subscriptionId", "vmId", "vmSize", "offer"];

impl Compute {
    fn slot(&mut self, index: usize) -> Option<&mut Value> {
        Some(match index {
            0 => &mut self.location,
            1 => &mut self.name,
            2 => &mut self.resource_group_name,
            3 => &mut self.subscription_id,
            4 => &mut self.vm_id,
            5 => &mut self.vm_size,
            6 => &mut self.offer,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    /// An object; `want_key`: the next string is a key.
    Object {
        want_key: bool,
    },
    Array,
}

/// Reads `compute.{location,name,resourceGroupName,subscriptionId,vmId,vmSize,offer}`.
pub fn parse_compute(json: &[u8]) -> Result<Compute, ImdsError> {
    let mut compute = Compute::default();
    read_compute(json, &mut compute).map(|()| compute)
}

/// [`parse_compute`] into `compute` in place (no copy of the result); on an error the fields
/// read so far are kept and `offer` is cleared only when the document is complete.
pub fn read_compute(json: &[u8], compute: &mut Compute) -> Result<(), ImdsError> {
    let mut seen = [false; FIELDS.len()];
    let mut stack: Vec<Level, MAX_DEPTH> = Vec::new();
    // Depth of the `compute` object once entered; the last key read.
    let mut compute_depth = None;
    let mut compute_closed = false;
    let mut key: &[u8] = b"";
    let mut pos = 0;
    while let Some(&b) = json.get(pos) {
        match b {
            b' ' | b'\t' | b'\r' | b'\n' | b':' => pos += 1,
            b',' => {
                if let Some(Level::Object { want_key }) = stack.last_mut() {
                    *want_key = true;
                }
                pos += 1;
            }
            b'{' | b'[' => {
                let entering_compute = b == b'{' && stack.len() == 1 && key == b"compute" && compute_depth.is_none();
                let level = if b == b'{' { Level::Object { want_key: true } } else { Level::Array };
                stack.push(level).map_err(|_full| ImdsError::TooDeep)?;
                if entering_compute {
                    compute_depth = Some(stack.len());
                }
                pos += 1;
            }
            b'}' | b']' => {
                let closed = stack.pop().ok_or(ImdsError::Malformed)?;
                if matches!(closed, Level::Object { .. }) != (b == b'}') {
                    return Err(ImdsError::Malformed);
                }
                if compute_depth == Some(stack.len() + 1) {
                    compute_closed = true;
                    break; // everything needed has been read
                }
                if stack.is_empty() {
                    break;
                }
                pos += 1;
            }
            b'"' => {
                let next = string_end(json, pos)?;
                let quoted = &json[pos..next];
                let raw = &quoted[1..quoted.len() - 1];
                pos = next;
                let depth = stack.len();
                match stack.last_mut() {
                    Some(Level::Object { want_key }) if *want_key => {
                        *want_key = false;
                        key = raw;
                    }
                    _ if compute_depth == Some(depth) => {
                        if let Some(i) = FIELDS.iter().position(|f| f.as_bytes() == key) {
                            let slot = compute.slot(i).ok_or(ImdsError::Malformed)?;
                            decode_into(quoted, slot)?;
                            seen[i] = true;
                        }
                    }
                    _ => {}
                }
            }
            // Numbers, true, false, null: skipped to the next delimiter.
            _ => {
                let len =
                    json[pos..].iter().position(|c| matches!(c, b',' | b'}' | b']')).ok_or(ImdsError::Malformed)?;
                pos += len;
            }
        }
    }
    if compute_depth.is_none() {
        return Err(ImdsError::Missing("compute"));
    }
    if !compute_closed {
        return Err(ImdsError::Malformed);
    }
    for (i, field) in FIELDS.iter().enumerate().take(6) {
        if !seen[i] {
            return Err(ImdsError::Missing(field));
        }
    }
    if !seen[6] {
        compute.offer.clear();
    }
    Ok(())
}

/// The index after the closing quote of the string starting at `json[start] == '"'`.
fn string_end(json: &[u8], start: usize) -> Result<usize, ImdsError> {
    let mut i = start + 1;
    while let Some(&b) = json.get(i) {
        match b {
            b'\\' => i += 2,
            b'"' => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err(ImdsError::Malformed)
}

/// Decodes the JSON string `quoted` (quotes included) into `out`, with serde-json-core's
/// string decoder (already part of the agent for the config and status documents).
fn decode_into(quoted: &[u8], out: &mut Value) -> Result<(), ImdsError> {
    let mut unescaped = [0u8; TELEMETRY_VALUE_MAX_BYTES];
    match serde_json_core::from_slice_escaped::<Value>(quoted, &mut unescaped) {
        Ok((value, _)) => {
            *out = value;
            Ok(())
        }
        Err(_bad) if quoted.len() > TELEMETRY_VALUE_MAX_BYTES + 2 => Err(ImdsError::TooLong),
        Err(_bad) => Err(ImdsError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape IMDS serves (2018-02-01 and later): nested objects and arrays everywhere.
    const INSTANCE: &[u8] = br#"{
      "compute": {
        "azEnvironment": "AzurePublicCloud",
        "location": "eastus",
        "name": "vm\u00e9\/1",
        "offer": "0001-com-ubuntu-server-jammy",
        "osProfile": {"adminUsername": "azureuser", "disablePasswordAuthentication": "true"},
        "placementGroupId": "",
        "plan": {"name": "", "product": "", "publisher": ""},
        "platformFaultDomain": 0,
        "publicKeys": [{"keyData": "ssh-rsa AAAA", "path": "/home/x/.ssh/authorized_keys"}],
        "resourceGroupName": "rg \"quoted\"",
        "storageProfile": {"dataDisks": [], "imageReference": {"id": "", "offer": "not-this-one"}},
        "subscriptionId": "0e1f2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b",
        "tagsList": [[1, 2], {"name": "k", "value": "v"}],
        "vmId": "5c3e5d2a-8f7e-4b7a-9d61-0b6f7e9a1c42",
        "vmScaleSetName": null,
        "vmSize": "Standard_D2s_v3",
        "zone": true
      },
      "network": {"interface": [{"ipv4": {"ipAddress": [{"privateIpAddress": "10.0.0.4"}]}}]}
    }"#;

    #[test]
    fn reads_compute_and_skips_nested_unknown_fields() {
        let c = parse_compute(INSTANCE).unwrap();
        assert_eq!(c.location, "eastus");
        assert_eq!(c.name, "vmé/1");
        assert_eq!(c.offer, "0001-com-ubuntu-server-jammy", "the nested storageProfile offer is not compute.offer");
        assert_eq!(c.resource_group_name, "rg \"quoted\"");
        assert_eq!(c.subscription_id, "0e1f2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b");
        assert_eq!(c.vm_id, "5c3e5d2a-8f7e-4b7a-9d61-0b6f7e9a1c42");
        assert_eq!(c.vm_size, "Standard_D2s_v3");
        // Go's encoder (IMDS) writes <, > and & as \u escapes.
        let escaped = br#"{"compute":{"location":"\u003ca\u0026b\u003e","name":"","resourceGroupName":"","subscriptionId":"","vmId":"","vmSize":""}}"#;
        assert_eq!(parse_compute(escaped).unwrap().location, "<a&b>");
        // serde-json-core does not join surrogate pairs; Azure names and ids never need them.
        let emoji = br#"{"compute":{"location":"\ud83d\ude00","name":"","resourceGroupName":"","subscriptionId":"","vmId":"","vmSize":""}}"#;
        assert_eq!(parse_compute(emoji), Err(ImdsError::Malformed));
    }

    #[test]
    fn missing_fields_and_hostile_input_are_errors() {
        assert_eq!(parse_compute(br#"{"network":{}}"#), Err(ImdsError::Missing("compute")));
        assert_eq!(parse_compute(br#"{"compute":{"location":"x"}}"#), Err(ImdsError::Missing("name")));
        assert_eq!(parse_compute(br#"{"x":{"compute":{}}}"#), Err(ImdsError::Missing("compute")), "only top level");
        let deep = "[".repeat(MAX_DEPTH + 1);
        assert_eq!(parse_compute(deep.as_bytes()), Err(ImdsError::TooDeep));
        let long = format!(r#"{{"compute":{{"location":"{}"}}}}"#, "x".repeat(TELEMETRY_VALUE_MAX_BYTES + 1));
        assert_eq!(parse_compute(long.as_bytes()), Err(ImdsError::TooLong));
        assert_eq!(parse_compute(b"{]"), Err(ImdsError::Malformed));
        // Cut before the end of `compute`: refused. Cut after it: what is needed was read.
        let zone = INSTANCE.windows(6).position(|w| w == b"\"zone\"").unwrap();
        let compute_end = zone + INSTANCE[zone..].iter().position(|b| *b == b'}').unwrap() + 1;
        for cut in 0..INSTANCE.len() {
            let r = parse_compute(&INSTANCE[..cut]);
            assert_eq!(r.is_ok(), cut >= compute_end, "cut {cut}: {r:?}");
        }
        for garbage in [
            &b""[..],
            b"\"",
            b"\"\\",
            b"{\"compute\":{\"vmId\":\"\\u12\"}}",
            b"{\"compute\":{\"vmId\":\"\\ud800x\"}}",
            b"}}}}",
            b"\xff",
        ] {
            assert!(parse_compute(garbage).is_err(), "{garbage:?}");
        }
    }
}
