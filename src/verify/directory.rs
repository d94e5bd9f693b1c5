//! What the verifier reads of a ScimDirectory: its name and the token part of its status.
//!
//! Decoding keeps nothing else: the spec, managedFields, annotations (kubectl's last-applied copy of
//! the whole object among them), labels and conditions are skipped as they are parsed. A watch of
//! 10,000 directories then costs the verifier little more than its index.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::Resource;
use serde::Deserialize;

use crate::api::ScimDirectory;

/// A ScimDirectory as the verifier watches it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct WatchedDirectory {
    #[serde(default, deserialize_with = "identity_only")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub status: Option<TokenStatus>,
}

/// The status fields the verifier's index is built from.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenStatus {
    pub token_hash: Option<String>,
    pub token_expires_at: Option<Time>,
    pub previous_token_hash: Option<String>,
    pub previous_token_valid_until: Option<Time>,
}

impl WatchedDirectory {
    pub fn id(&self) -> Option<DirectoryId> {
        Some(DirectoryId { namespace: self.metadata.namespace.clone()?, name: self.metadata.name.clone()? })
    }
}

impl From<&ScimDirectory> for WatchedDirectory {
    fn from(dir: &ScimDirectory) -> Self {
        WatchedDirectory {
            metadata: ObjectMeta {
                name: dir.metadata.name.clone(),
                namespace: dir.metadata.namespace.clone(),
                resource_version: dir.metadata.resource_version.clone(),
                uid: dir.metadata.uid.clone(),
                ..ObjectMeta::default()
            },
            status: dir.status.as_ref().map(|s| TokenStatus {
                token_hash: s.token_hash.clone(),
                token_expires_at: s.token_expires_at.clone(),
                previous_token_hash: s.previous_token_hash.clone(),
                previous_token_valid_until: s.previous_token_valid_until.clone(),
            }),
        }
    }
}

/// The metadata a watch needs (name, namespace, resourceVersion, uid); everything else is skipped.
fn identity_only<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Identity {
        name: Option<String>,
        namespace: Option<String>,
        resource_version: Option<String>,
        uid: Option<String>,
    }
    let Identity { name, namespace, resource_version, uid } = Identity::deserialize(deserializer)?;
    Ok(ObjectMeta { name, namespace, resource_version, uid, ..ObjectMeta::default() })
}

impl k8s_openapi::Resource for WatchedDirectory {
    const API_VERSION: &'static str = "scim.tokenops.dev/v1alpha1";
    const GROUP: &'static str = "scim.tokenops.dev";
    const KIND: &'static str = "ScimDirectory";
    const VERSION: &'static str = "v1alpha1";
    const URL_PATH_SEGMENT: &'static str = "scimdirectories";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for WatchedDirectory {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The same API resource as [`ScimDirectory`], checked so the two cannot drift apart.
pub fn same_resource_as_the_crd() -> bool {
    use kube::Resource as _;
    <WatchedDirectory as Resource>::api_version(&()) == ScimDirectory::api_version(&())
        && <WatchedDirectory as Resource>::plural(&()) == ScimDirectory::plural(&())
        && <WatchedDirectory as Resource>::kind(&()) == ScimDirectory::kind(&())
}

/// A directory, as named in allow responses and tenant bindings (`<namespace>/<name>`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DirectoryId {
    pub namespace: String,
    pub name: String,
}

impl DirectoryId {
    /// Parses `<namespace>/<name>`.
    pub fn parse(s: &str) -> Option<DirectoryId> {
        let (namespace, name) = s.split_once('/')?;
        (!namespace.is_empty() && !name.is_empty() && !name.contains('/'))
            .then(|| DirectoryId { namespace: namespace.to_owned(), name: name.to_owned() })
    }
}

impl std::fmt::Display for DirectoryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_keeps_the_name_and_the_token_status_only() {
        assert!(same_resource_as_the_crd());
        let json = serde_json::json!({
            "apiVersion": "scim.tokenops.dev/v1alpha1",
            "kind": "ScimDirectory",
            "metadata": {
                "name": "acme", "namespace": "t1", "resourceVersion": "42", "uid": "u",
                "annotations": { "kubectl.kubernetes.io/last-applied-configuration": "x".repeat(10_000) },
                "managedFields": [{ "manager": "kubectl", "operation": "Apply" }],
            },
            "spec": { "rotationGeneration": 3, "secretTemplate": { "labels": { "a": "b" } } },
            "status": {
                "tokenHash": "sha256:aa",
                "tokenExpiresAt": "2026-01-01T00:00:00Z",
                "conditions": [{ "type": "Ready", "status": "True", "reason": "TokenIssued", "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z" }],
            },
        });
        let dir: WatchedDirectory = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(dir.id(), Some(DirectoryId { namespace: "t1".into(), name: "acme".into() }));
        assert_eq!(dir.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(dir.metadata.annotations, None);
        assert_eq!(dir.metadata.managed_fields, None);
        assert_eq!(dir.status.as_ref().unwrap().token_hash.as_deref(), Some("sha256:aa"));
        // The same as converting a full object.
        let full: ScimDirectory = serde_json::from_value(json).unwrap();
        let converted = WatchedDirectory::from(&full);
        assert_eq!(converted.status, dir.status);
        assert_eq!(converted.metadata.name, dir.metadata.name);
        // No status yet.
        let fresh: WatchedDirectory =
            serde_json::from_value(serde_json::json!({ "metadata": { "name": "n", "namespace": "t" } })).unwrap();
        assert_eq!(fresh.status, None);
    }
}
