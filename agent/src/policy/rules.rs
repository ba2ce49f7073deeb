// SPDX-License-Identifier: MIT
//! The allowlist schema as delivered in `authorizationRules.<endpoint>` (MSP §4.1), parsed by
//! serde-json-core into fixed-capacity structures. Unknown fields are ignored (§4.1).
//!
//! Capacities are in [`limits`], each sized from the real schema it holds. An endpoint's item
//! over a limit fails to parse; the status document then keeps that endpoint's mode and id
//! and allows nothing there (`msp::status_doc`), while the other endpoints, the modes and the
//! key latch go on.
//!
//! Duplicate JSON keys: serde's derived struct visitors already refuse a repeated field, and
//! `queryParameters` (a map, where serde would let the last value win silently) goes through
//! `unique_query_map` so a repeated key is refused there too. A document that says two
//! different things is never half-believed (attack catalog S12).
//!
//! Sizes (64-bit): an `AuthorizationItem` is about 160 KiB and `AuthorizationRules` about
//! 470 KiB, so parsed items live in a `Box` and never on a per-request stack. serde builds a
//! value on the stack and moves it a few times (more in debug builds) before it reaches its
//! `Box`: fine on the agent's 8 MiB main thread, where the status poll parses; tests that
//! parse run on a large-stack thread (`policy::test_support::on_big_stack`).

#![expect(
    clippy::large_stack_frames,
    reason = "serde/Clone/Default derives of the fixed-capacity schema; parsed on the setup path on \
              the 8 MiB main thread (module docs)"
)]

use core::fmt;

use heapless::{LinearMap, String, Vec};
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};

/// Capacities of the rules model. An item over any of them is refused, and its endpoint
/// allows nothing (see the module docs).
pub mod limits {
    /// Privileges per rule item.
    pub const MAX_PRIVILEGES: usize = 32;
    /// Roles per rule item: as many as privileges (a generated document often makes one role
    /// per privilege, e.g. one per managed identity).
    pub const MAX_ROLES: usize = MAX_PRIVILEGES;
    /// Identities per rule item.
    pub const MAX_IDENTITIES: usize = 32;
    /// Role assignments per rule item.
    pub const MAX_ROLE_ASSIGNMENTS: usize = 32;
    /// Privilege names listed in one role, identity names in one assignment: a role may name
    /// every privilege of its item.
    pub const MAX_REFERENCES: usize = MAX_PRIVILEGES;
    /// Required query parameters per privilege.
    pub const MAX_QUERY_PARAMETERS: usize = 8;
    /// Names of privileges, roles, identities; user, group and process names. A local-file
    /// name must still fit after the 15-byte `LocalFileRules_` merge prefix (MSP §4.7), or the
    /// merge fails closed.
    pub const NAME_MAX_BYTES: usize = 64;
    /// Privilege paths and executable paths.
    pub const PATH_MAX_BYTES: usize = 256;
    /// Query parameter keys (`api-version`, `resource`, `client_id`, `mi_res_id`, …).
    pub const QUERY_KEY_MAX_BYTES: usize = 64;
    /// Query parameter values. The longest real one is a user-assigned identity's ARM
    /// resource id (`mi_res_id`, `msi_res_id`): `/subscriptions/` + a 36-byte GUID +
    /// `/resourceGroups/` + a resource group name (at most 90) + `/providers/` +
    /// `Microsoft.ManagedIdentity` + `/userAssignedIdentities/` + an identity name (at most
    /// 128) = 345 bytes, 361 with its eight `/` percent-encoded. A `resource` URI is shorter.
    pub const QUERY_VALUE_MAX_BYTES: usize = 400;
    /// Rule-set ids (may be a base64 descriptor, §4.7).
    pub const ID_MAX_BYTES: usize = 512;
    /// Short enumerations (`mode`, `defaultAccess`).
    pub const WORD_MAX_BYTES: usize = 16;
}
use self::limits::*;

/// A name (privilege, role, identity, user, group, process).
pub type Name = String<NAME_MAX_BYTES>;

/// Required query parameters of a privilege, in document order.
pub type QueryMap = LinearMap<String<QUERY_KEY_MAX_BYTES>, String<QUERY_VALUE_MAX_BYTES>, MAX_QUERY_PARAMETERS>;

/// `authorizationRules` of the status document.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct AuthorizationRules {
    /// Rules for IMDS.
    #[serde(default)]
    pub imds: Option<AuthorizationItem>,
    /// Rules for WireServer (and, per §1.4, HostGAPlugin).
    #[serde(default)]
    pub wireserver: Option<AuthorizationItem>,
    /// Parsed and ignored (§1.4: HostGAPlugin mirrors WireServer).
    #[serde(default)]
    pub hostga: Option<AuthorizationItem>,
}

/// One endpoint's rule item.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct AuthorizationItem {
    /// `allow` or `deny`; anything but `allow` (case-insensitive) is deny.
    #[serde(rename = "defaultAccess")]
    pub default_access: String<WORD_MAX_BYTES>,
    /// `disabled` / `audit` / `enforce`, case-insensitive.
    pub mode: String<WORD_MAX_BYTES>,
    /// Rule-set id.
    pub id: String<ID_MAX_BYTES>,
    /// The rules; absent or null means default access only.
    #[serde(default)]
    pub rules: Option<AccessControlRules>,
}

/// The four arrays; all four must be present for any privilege to count (§4.2).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct AccessControlRules {
    /// Privileges.
    #[serde(default)]
    pub privileges: Option<Vec<Privilege, MAX_PRIVILEGES>>,
    /// Roles.
    #[serde(default)]
    pub roles: Option<Vec<Role, MAX_ROLES>>,
    /// Identities.
    #[serde(default)]
    pub identities: Option<Vec<Identity, MAX_IDENTITIES>>,
    /// Role assignments.
    #[serde(default, rename = "roleAssignments")]
    pub role_assignments: Option<Vec<RoleAssignment, MAX_ROLE_ASSIGNMENTS>>,
}

/// A path prefix plus required query parameters.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Privilege {
    /// Privilege name.
    pub name: Name,
    /// Path prefix.
    pub path: String<PATH_MAX_BYTES>,
    /// Required query parameters.
    #[serde(default, rename = "queryParameters", deserialize_with = "unique_query_map")]
    pub query_parameters: Option<QueryMap>,
}

/// A named set of privileges.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Role {
    /// Role name.
    pub name: Name,
    /// Privilege names.
    pub privileges: Vec<Name, MAX_REFERENCES>,
}

/// Who a caller must be; absent selectors are wildcards.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Identity {
    /// Identity name.
    pub name: Name,
    /// User name.
    #[serde(default, rename = "userName")]
    pub user_name: Option<Name>,
    /// Group name (any of the user's groups).
    #[serde(default, rename = "groupName")]
    pub group_name: Option<Name>,
    /// Executable full path.
    #[serde(default, rename = "exePath")]
    pub exe_path: Option<String<PATH_MAX_BYTES>>,
    /// Executable file name.
    #[serde(default, rename = "processName")]
    pub process_name: Option<Name>,
}

/// Binds a role to identities.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RoleAssignment {
    /// Role name.
    pub role: Name,
    /// Identity names.
    pub identities: Vec<Name, MAX_REFERENCES>,
}

/// Deserialises an optional `queryParameters` object, refusing a repeated key.
///
/// heapless' own map impl would keep the last value of a repeated key without a word; for an
/// allowlist that is ambiguity an attacker could aim at a parser difference, so refuse it.
fn unique_query_map<'de, D>(deserializer: D) -> Result<Option<QueryMap>, D::Error>
where
    D: Deserializer<'de>,
{
    /// `Option<UniqueQueryMap>` lets serde handle `null` for us.
    struct UniqueQueryMap(QueryMap);

    impl<'de> Deserialize<'de> for UniqueQueryMap {
        fn deserialize<D2: Deserializer<'de>>(deserializer: D2) -> Result<Self, D2::Error> {
            deserializer.deserialize_map(UniqueVisitor)
        }
    }

    struct UniqueVisitor;

    impl<'de> Visitor<'de> for UniqueVisitor {
        type Value = UniqueQueryMap;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object of unique string keys and string values")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
            let mut map = QueryMap::new();
            while let Some((key, value)) =
                access.next_entry::<String<QUERY_KEY_MAX_BYTES>, String<QUERY_VALUE_MAX_BYTES>>()?
            {
                if map.contains_key(&key) {
                    return Err(serde::de::Error::custom("duplicate queryParameters key"));
                }
                if map.insert(key, value).is_err() {
                    return Err(serde::de::Error::invalid_length(MAX_QUERY_PARAMETERS + 1, &self));
                }
            }
            Ok(UniqueQueryMap(map))
        }
    }

    Ok(Option::<UniqueQueryMap>::deserialize(deserializer)?.map(|m| m.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Box<AuthorizationItem>, serde_json_core::de::Error> {
        crate::policy::test_support::on_big_stack(|| {
            let mut scratch = [0u8; 256];
            serde_json_core::from_slice_escaped::<AuthorizationItem>(json.as_bytes(), &mut scratch)
                .map(|(item, _)| Box::new(item))
        })
    }

    #[test]
    fn parses_full_item_and_ignores_unknown_fields() {
        let item = parse(
            r#"{"defaultAccess":"deny","mode":"enforce","id":"x","extra":[1,{"a":2}],
               "rules":{"privileges":[{"name":"p","path":"/a","queryParameters":{"k":"v"}}],
               "roles":[{"name":"r","privileges":["p"]}],
               "identities":[{"name":"i","userName":"root"}],
               "roleAssignments":[{"role":"r","identities":["i"]}]}}"#,
        )
        .expect("valid item");
        let rules = item.rules.as_ref().expect("rules present");
        let privileges = rules.privileges.as_ref().expect("privileges present");
        assert_eq!(privileges[0].query_parameters.as_ref().map(|m| m.len()), Some(1));
        assert_eq!(rules.identities.as_ref().expect("identities")[0].user_name.as_deref(), Some("root"));
    }

    #[test]
    fn null_query_parameters_are_absent() {
        let item = parse(
            r#"{"defaultAccess":"deny","mode":"enforce","id":"x",
               "rules":{"privileges":[{"name":"p","path":"/a","queryParameters":null}]}}"#,
        )
        .expect("valid item");
        let rules = item.rules.as_ref().expect("rules present");
        assert!(rules.privileges.as_ref().expect("privileges")[0].query_parameters.is_none());
    }

    #[test]
    fn rejects_duplicate_query_parameter_key() {
        let err = parse(
            r#"{"defaultAccess":"deny","mode":"enforce","id":"x",
               "rules":{"privileges":[{"name":"p","path":"/a","queryParameters":{"k":"1","k":"2"}}]}}"#,
        );
        assert!(err.is_err());
    }

    #[test]
    fn rejects_duplicate_struct_field() {
        assert!(parse(r#"{"defaultAccess":"allow","defaultAccess":"deny","mode":"enforce","id":"x"}"#).is_err());
    }

    #[test]
    fn rejects_too_many_query_parameters() {
        let err = parse(
            r#"{"defaultAccess":"deny","mode":"enforce","id":"x","rules":{"privileges":[{"name":"p","path":"/a",
               "queryParameters":{"a":"1","b":"1","c":"1","d":"1","e":"1","f":"1","g":"1","h":"1","i":"1"}}]}}"#,
        );
        assert!(err.is_err());
    }
}
