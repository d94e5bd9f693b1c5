//! The `ScimDirectory` API (`scim.tokenops.dev/v1alpha1`).
//!
//! Admission-time validation lives in the schema (patterns, bounds, CEL rules) so that a bad manifest
//! is rejected by `kubectl apply` with a message naming the field, before the operator sees it. The
//! few checks CEL cannot express (duration bounds with day units, `renewBefore < tokenExpiresIn`) are
//! made by the operator and reported as `Ready=False, reason=InvalidSpec`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::DURATION_PATTERN;

/// API group of every resource and the prefix of every annotation the operator owns.
pub const GROUP: &str = "scim.tokenops.dev";

/// Annotation on a `ScimDirectory` that requests one imperative rotation. Any new value rotates once;
/// the handled value is recorded in `status.lastRotationRequest`, so re-applying a manifest (with or
/// without the annotation) neither repeats nor undoes the rotation.
pub const ROTATE_ANNOTATION: &str = "scim.tokenops.dev/rotate";

/// Annotation on a `ScimDirectory` that ends the current overlap window at once: any new value ends
/// it once (the previous token is refused from then on), like the rotate annotation.
pub const END_OVERLAP_ANNOTATION: &str = "scim.tokenops.dev/end-overlap";

/// `tokenExpiresIn - renewBefore >= max(1h, tokenExpiresIn / 10)`, where CEL can read both durations.
const RENEWAL_WINDOW_RULE: &str = "!has(self.renewBefore) || !has(self.tokenExpiresIn) \
    || self.tokenExpiresIn.contains('d') || self.renewBefore.contains('d') \
    || (duration(self.tokenExpiresIn) - duration(self.renewBefore) >= duration('1h') \
        && (duration(self.tokenExpiresIn) - duration(self.renewBefore)).getSeconds() * 10 \
           >= duration(self.tokenExpiresIn).getSeconds())";

/// A label value as the API server accepts it: at most 63 characters, alphanumeric at both ends.
const LABEL_VALUE_PATTERN: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";

/// Label and annotation keys as the API server accepts them: an optional DNS-subdomain prefix and `/`,
/// then a name of at most 63 characters, alphanumeric at both ends.
const QUALIFIED_KEYS_RULE: &str = r"self.all(k, size(k) <= 317 && (!k.contains('/') || k.indexOf('/') <= 253) && k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$'))";
const QUALIFIED_KEYS_MESSAGE: &str = "keys must be qualified names: an optional DNS subdomain prefix and '/', then at most 63 characters of [-A-Za-z0-9_.], alphanumeric at both ends";

/// Desired state of a SCIM directory's bearer token.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "scim.tokenops.dev",
    version = "v1alpha1",
    kind = "ScimDirectory",
    plural = "scimdirectories",
    shortname = "scimdir",
    namespaced,
    status = "ScimDirectoryStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Secret","type":"string","jsonPath":".status.secretName"}"#,
    printcolumn = r#"{"name":"Expires","type":"date","jsonPath":".status.tokenExpiresAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    // The default Secret name is `<name>-scim-token`, and a Secret name has at most 253 characters.
    validation = Rule::new("has(self.spec.secretName) || size(self.metadata.name) <= 242").message(
        "metadata.name may have at most 242 characters when spec.secretName is not set (the Secret is named <name>-scim-token, at most 253 characters)"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.secretName) == has(oldSelf.secretName) && (!has(self.secretName) || self.secretName == oldSelf.secretName)",
        "message": "secretName is immutable: create a new ScimDirectory to move the token to another Secret",
    },
    {
        "rule": "!has(self.renewBefore) || has(self.tokenExpiresIn)",
        "message": "renewBefore requires tokenExpiresIn: a token that never expires is never renewed",
    },
    {
        // CEL's duration() reads Go's units (h, m, s), not days: values with days are checked by the
        // operator instead (Ready=False, InvalidSpec), with the same rule (policy::min_renewal_window).
        "rule": RENEWAL_WINDOW_RULE,
        "message": "tokenExpiresIn minus renewBefore must be at least 1h and at least 10% of tokenExpiresIn, so that renewals cannot come in a storm",
    },
]))]
pub struct ScimDirectorySpec {
    /// Increase to rotate the token. The token is issued when the directory is created; every increase
    /// issues a new one and invalidates the previous one at once. Decreases are rejected.
    #[serde(default)]
    #[schemars(range(min = 0), extend("x-kubernetes-validations" = [{
        "rule": "self >= oldSelf",
        // A static message: string(int) in a messageExpression exceeds the CRD's CEL cost budget.
        "message": "rotationGeneration may only increase",
    }]))]
    pub rotation_generation: i64,

    /// How long an issued token is valid, e.g. "15552000s", "4320h", "1h30m" or "180d" (between 1h and
    /// 3650d). Absent means the token never expires. Adding, removing or changing it rotates the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(min = 2, max = 32))]
    pub token_expires_in: Option<String>,

    /// Rotate automatically this long before the token expires (same format as tokenExpiresIn; must be
    /// shorter than it). Off by default, because the identity provider must then be updated by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(min = 2, max = 32))]
    pub renew_before: Option<String>,

    /// Keep accepting the previous token this long after a rotation (same format as tokenExpiresIn; at
    /// most 24h), so the identity provider can be switched to the new token without failed requests.
    /// Absent: the previous token is invalid at once (1h with spec.identityProvider). Repairs (a deleted or tampered Secret) never open
    /// an overlap. The Secret holds only the new token; the verifier accepts the previous one by hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = DURATION_PATTERN),
        length(min = 2, max = 32),
        extend("x-kubernetes-validations" = [{
            // Values with days are checked by the operator (CEL's duration() has no day unit).
            "rule": "self.contains('d') || (duration(self) > duration('0s') && duration(self) <= duration('24h'))",
            "message": "rotationOverlap must be between 1s and 24h",
        }])
    )]
    pub rotation_overlap: Option<String>,

    /// Name of the Secret that receives the token (key `token`). Defaults to `<metadata.name>-scim-token`.
    /// Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"),
        length(min = 1, max = 253)
    )]
    pub secret_name: Option<String>,

    /// Labels and annotations to put on the Secret. They cannot override the operator's own keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_template: Option<SecretTemplate>,

    /// The identity provider the operator pushes every new token to, so that nobody has to paste it
    /// (see docs/entra.md). A planned rotation then always keeps the previous token valid for an
    /// overlap (spec.rotationOverlap, or 1h when unset), which ends early once the identity provider
    /// has synchronised with the new token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_provider: Option<IdentityProvider>,
}

/// A GUID as Microsoft Entra ID writes tenant, object and client ids.
const GUID_PATTERN: &str = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

/// Where new tokens are pushed. Exactly one provider.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.entra)",
    "message": "identityProvider needs exactly one provider: entra",
}]))]
pub struct IdentityProvider {
    /// Microsoft Entra ID: the SCIM credentials of an enterprise application's provisioning job,
    /// set through Microsoft Graph (`PUT /servicePrincipals/{id}/synchronization/secrets`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entra: Option<EntraProvisioning>,
}

/// The provisioning job of a (non-gallery) enterprise application in Microsoft Entra ID.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntraProvisioning {
    /// The directory (tenant) id.
    #[schemars(regex(pattern = GUID_PATTERN), length(max = 36))]
    pub tenant_id: String,
    /// Object id of the provisioning application's service principal (Enterprise applications →
    /// the app → Object ID), not its application (client) id.
    #[schemars(regex(pattern = GUID_PATTERN), length(max = 36))]
    pub service_principal_id: String,
    /// The synchronization job, e.g. `scim.0123456789abcdef0123456789abcdef.<guid>`. When absent
    /// the service principal must have exactly one job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"), length(min = 1, max = 256))]
    pub job_id: Option<String>,
    /// The Tenant URL Entra calls: the SCIM base address behind the verifier. https only.
    #[schemars(
        regex(pattern = r"^https://[^\s]+$"),
        length(max = 2048),
        extend("x-kubernetes-validations" = [{
            "rule": "isURL(self) && url(self).getScheme() == 'https' && url(self).getHostname() != ''",
            "message": "baseAddress must be an https:// URL with a host",
        }])
    )]
    pub base_address: String,
    /// How the operator authenticates to Microsoft Graph.
    pub auth: EntraAuth,
}

/// Exactly one way to get an access token for Microsoft Graph.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.workloadIdentity) != has(self.clientSecret)",
    "message": "auth needs exactly one of workloadIdentity and clientSecret",
}]))]
pub struct EntraAuth {
    /// Workload identity federation: the operator's projected ServiceAccount token
    /// (AZURE_FEDERATED_TOKEN_FILE) is the client assertion of this app registration. No secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity: Option<WorkloadIdentityAuth>,
    /// A client secret of this app registration, in a Secret of the directory's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<ClientSecretAuth>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentityAuth {
    /// The application (client) id whose federated credential trusts the operator's ServiceAccount.
    #[schemars(regex(pattern = GUID_PATTERN), length(max = 36))]
    pub client_id: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientSecretAuth {
    /// The application (client) id.
    #[schemars(regex(pattern = GUID_PATTERN), length(max = 36))]
    pub client_id: String,
    /// The Secret holding the client secret. Always the directory's own namespace: there is no
    /// namespace field.
    pub secret_ref: SecretKeyRef,
}

/// A key of a Secret in the directory's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"),
        length(min = 1, max = 253)
    )]
    pub name: String,
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"), length(min = 1, max = 253))]
    pub key: String,
}

/// Extra metadata for the managed Secret.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct SecretTemplate {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = { "type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN },
        "x-kubernetes-validations" = [
            {
                "rule": "self.all(k, !k.startsWith('scim.tokenops.dev/') && k != 'app.kubernetes.io/managed-by')",
                "message": "labels may not use the operator's keys (scim.tokenops.dev/*, app.kubernetes.io/managed-by)",
            },
            { "rule": QUALIFIED_KEYS_RULE, "message": QUALIFIED_KEYS_MESSAGE },
        ]
    ))]
    pub labels: BTreeMap<String, String>,

    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 64,
        "x-kubernetes-validations" = [
            {
                "rule": "self.all(k, !k.startsWith('scim.tokenops.dev/'))",
                "message": "annotations may not use the operator's keys (scim.tokenops.dev/*)",
            },
            { "rule": QUALIFIED_KEYS_RULE, "message": QUALIFIED_KEYS_MESSAGE },
        ]
    ))]
    pub annotations: BTreeMap<String, String>,
}

/// Observed state. Everything here is derived from the managed Secret, never the other way round,
/// so a crash between the Secret write and the status write is repaired by adopting the Secret.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScimDirectoryStatus {
    /// "sha256:" + lowercase hex SHA-256 of the current token (`printf %s "$TOKEN" | sha256sum`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_issued_at: Option<Time>,
    /// Absent when the token never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_at: Option<Time>,
    /// Why the current token was issued (`Initial`, `RotationRequested`, `RenewalDue`, ...: the
    /// Secret's `scim.tokenops.dev/issue-reason`), so that a record restored from the status keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_issue_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_rotation_generation: Option<i64>,
    /// The last value of the `scim.tokenops.dev/rotate` annotation that was acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation_request: Option<String>,
    /// Hash of the previous token while a rotation overlap (spec.rotationOverlap) keeps it valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_token_hash: Option<String>,
    /// Until when the previous token stays valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_token_valid_until: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// The reasons of the `Ready` condition. A public contract: Argo CD's health check
/// (`argocd/`), `kubectl scim`, the README and users' alerts read these strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReadyReason {
    /// True: the directory's first token was issued.
    TokenIssued,
    /// True: the token replaced another (the condition's message names the `IssueReason`).
    TokenRotated,
    /// False: the token's expiry has passed.
    TokenExpired,
    /// False: the Secret exists and is not this directory's; the directory has no token.
    SecretConflict,
    /// False: the spec cannot be acted on.
    InvalidSpec,
    /// False: an automatic re-issue waits for the minimum interval between issues.
    IssueDeferred,
    /// False: the API server refused the Secret write.
    SecretWriteFailed,
}

impl ReadyReason {
    pub const ALL: [ReadyReason; 7] = [
        ReadyReason::TokenIssued,
        ReadyReason::TokenRotated,
        ReadyReason::TokenExpired,
        ReadyReason::SecretConflict,
        ReadyReason::InvalidSpec,
        ReadyReason::IssueDeferred,
        ReadyReason::SecretWriteFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReadyReason::TokenIssued => "TokenIssued",
            ReadyReason::TokenRotated => "TokenRotated",
            ReadyReason::TokenExpired => "TokenExpired",
            ReadyReason::SecretConflict => "SecretConflict",
            ReadyReason::InvalidSpec => "InvalidSpec",
            ReadyReason::IssueDeferred => "IssueDeferred",
            ReadyReason::SecretWriteFailed => "SecretWriteFailed",
        }
    }

    pub fn parse(s: &str) -> Option<ReadyReason> {
        ReadyReason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether the condition is `True` with this reason: the directory has a working token.
    pub fn is_ready(self) -> bool {
        matches!(self, ReadyReason::TokenIssued | ReadyReason::TokenRotated)
    }
}

impl std::fmt::Display for ReadyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ScimDirectory {
    /// The Secret this directory writes its token to.
    pub fn secret_name(&self) -> String {
        match &self.spec.secret_name {
            Some(name) => name.clone(),
            None => format!("{}-scim-token", self.metadata.name.as_deref().unwrap_or_default()),
        }
    }

    /// The Entra provisioning job new tokens are pushed to, if any.
    pub fn entra(&self) -> Option<&EntraProvisioning> {
        self.spec.identity_provider.as_ref()?.entra.as_ref()
    }

    /// The pending imperative rotation request, if any.
    pub fn rotation_request(&self) -> Option<&str> {
        self.annotation(ROTATE_ANNOTATION)
    }

    /// The latest request to end an overlap window early, if any.
    pub fn end_overlap_request(&self) -> Option<&str> {
        self.annotation(END_OVERLAP_ANNOTATION)
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata.annotations.as_ref().and_then(|a| a.get(key)).map(String::as_str).filter(|v| !v.is_empty())
    }

    pub fn ready_condition(&self) -> Option<&Condition> {
        self.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
    }

    /// The `Ready` condition's reason, if it is one the operator writes.
    pub fn ready_reason(&self) -> Option<ReadyReason> {
        self.ready_condition().and_then(|c| ReadyReason::parse(&c.reason))
    }
}

#[cfg(test)]
mod ready_reason_tests {
    use super::ReadyReason;

    #[test]
    fn every_ready_reason_round_trips_and_is_documented_where_users_read_it() {
        let readme = include_str!("../README.md");
        let health = include_str!("../argocd/resource_customizations/scim.tokenops.dev/ScimDirectory/health.lua");
        let plugin = include_str!("../docs/kubectl-scim.md");
        for reason in ReadyReason::ALL {
            assert_eq!(ReadyReason::parse(reason.as_str()), Some(reason));
            let quoted = format!("`{reason}`");
            assert!(readme.contains(&quoted), "README.md does not document {reason}");
            assert!(health.contains(reason.as_str()), "Argo CD's health check does not know {reason}");
            if !reason.is_ready() {
                assert!(plugin.contains(&format!("| {quoted} |")), "docs/kubectl-scim.md does not explain {reason}");
            }
        }
        assert_eq!(ReadyReason::parse("Ready"), None);
    }
}
