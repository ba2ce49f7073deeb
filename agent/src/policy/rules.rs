// SPDX-License-Identifier: MIT
//! The allowlist schema as delivered in `authorizationRules.<endpoint>` (MSP §4.1), parsed by
//! serde-json-core into fixed-capacity structures. Unknown fields are ignored (§4.1).
//!
//! Capacities are in [`limits`]; a document over a limit fails to parse, and the caller
//! then fails closed for that endpoint.

use heapless::{LinearMap, String, Vec};
use serde::Deserialize;

/// Capacities of the rules model. A document over any of them is refused as a whole.
pub mod limits {
    /// Privileges per rule item.
    pub const MAX_PRIVILEGES: usize = 32;
    /// Roles per rule item.
    pub const MAX_ROLES: usize = 16;
    /// Identities per rule item.
    pub const MAX_IDENTITIES: usize = 32;
    /// Role assignments per rule item.
    pub const MAX_ROLE_ASSIGNMENTS: usize = 32;
    /// Privilege names listed in one role, identity names in one assignment.
    pub const MAX_REFERENCES: usize = 16;
    /// Required query parameters per privilege.
    pub const MAX_QUERY_PARAMETERS: usize = 8;
    /// Names of privileges, roles, identities; user, group and process names.
    pub const NAME_MAX_BYTES: usize = 64;
    /// Privilege paths and executable paths.
    pub const PATH_MAX_BYTES: usize = 256;
    /// Query parameter keys and values.
    pub const QUERY_MAX_BYTES: usize = 128;
    /// Rule-set ids (may be a base64 descriptor, §4.7).
    pub const ID_MAX_BYTES: usize = 512;
    /// Short enumerations (`mode`, `defaultAccess`).
    pub const WORD_MAX_BYTES: usize = 16;
}
use self::limits::*;

/// A name (privilege, role, identity, user, group, process).
pub type Name = String<NAME_MAX_BYTES>;

/// `authorizationRules` of the status document.
#[derive(Debug, Default, Deserialize)]
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
#[derive(Debug, Default, Deserialize)]
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
#[derive(Debug, Default, Deserialize)]
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
#[derive(Debug, Default, Deserialize)]
pub struct Privilege {
    /// Privilege name.
    pub name: Name,
    /// Path prefix.
    pub path: String<PATH_MAX_BYTES>,
    /// Required query parameters.
    #[serde(default, rename = "queryParameters")]
    pub query_parameters: Option<LinearMap<String<QUERY_MAX_BYTES>, String<QUERY_MAX_BYTES>, MAX_QUERY_PARAMETERS>>,
}

/// A named set of privileges.
#[derive(Debug, Default, Deserialize)]
pub struct Role {
    /// Role name.
    pub name: Name,
    /// Privilege names.
    pub privileges: Vec<Name, MAX_REFERENCES>,
}

/// Who a caller must be; absent selectors are wildcards.
#[derive(Debug, Default, Deserialize)]
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
#[derive(Debug, Default, Deserialize)]
pub struct RoleAssignment {
    /// Role name.
    pub role: Name,
    /// Identity names.
    pub identities: Vec<Name, MAX_REFERENCES>,
}
