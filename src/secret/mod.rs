//! The managed Secret: how a token and its issue record are written to it and read back.
//!
//! Everything the operator later decides is derived from these annotations, written in the same
//! request as the token itself, so no decision ever depends on process memory.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use serde::Deserialize;
use zeroize::Zeroize;

use crate::api::{GROUP, ScimDirectory};
use crate::duration::{MAX_ROTATION_OVERLAP, TokenLifetime};
use crate::policy::{IdpProgress, IssueReason, IssueRecord, PreviousToken, RecordState, SecretState};
use crate::token::{Token, TokenHash};

mod cache;
pub mod seal;
mod view;

pub use cache::SecretCache;
pub use seal::{RecordKey, SEAL_ANNOTATION, Seal};
pub use view::SecretView;

/// Data key holding the plaintext token.
pub const TOKEN_KEY: &str = "token";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "scim-token-operator";
/// Label selector for the only Secrets the operator watches and caches.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=scim-token-operator";

pub const DIRECTORY_ANNOTATION: &str = "scim.tokenops.dev/directory";
pub const HASH_ANNOTATION: &str = "scim.tokenops.dev/token-hash";
pub const GENERATION_ANNOTATION: &str = "scim.tokenops.dev/rotation-generation";
pub const REQUEST_ANNOTATION: &str = "scim.tokenops.dev/rotation-request";
pub const EXPIRES_IN_ANNOTATION: &str = "scim.tokenops.dev/token-expires-in";
pub const ISSUED_AT_ANNOTATION: &str = "scim.tokenops.dev/issued-at";
pub const EXPIRES_AT_ANNOTATION: &str = "scim.tokenops.dev/expires-at";
pub const REASON_ANNOTATION: &str = "scim.tokenops.dev/issue-reason";
pub const PREVIOUS_HASH_ANNOTATION: &str = "scim.tokenops.dev/previous-token-hash";
pub const PREVIOUS_VALID_UNTIL_ANNOTATION: &str = "scim.tokenops.dev/previous-valid-until";
pub const END_OVERLAP_REQUEST_ANNOTATION: &str = "scim.tokenops.dev/end-overlap-request";
/// The push of the token to the identity provider: `<target> <pushed-at>[ <synced-at>]`.
pub const IDP_PUSH_ANNOTATION: &str = "scim.tokenops.dev/idp-push";
/// A digest of the `secretTemplate` last applied to the Secret: when the template changes (a key
/// removed, say), the Secret is re-applied and server-side apply prunes what the template dropped.
pub const TEMPLATE_ANNOTATION: &str = "scim.tokenops.dev/template-hash";
/// Value of the expires-in annotation for a token that never expires.
const NEVER: &str = "never";

/// A Secret as the operator reads it (watch events, look-ups): its metadata, its type and the SHA-256
/// of its `token` key, never the plaintext. Deserializing one hashes the token as it arrives and
/// skips every other data key, so neither a token nor a large payload someone else put in a Secret
/// ever sits in the operator's memory. What outlives the read is a [`SecretView`]. The plaintext is
/// read (with a plain [`Secret`]) only in the rare case it must be written back unchanged.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ObservedSecret {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    /// Hash of `data.token`; `None` when the key is absent or empty.
    #[serde(default, rename = "data", deserialize_with = "hash_of_token")]
    pub token_hash: Option<TokenHash>,
}

impl k8s_openapi::Resource for ObservedSecret {
    const API_VERSION: &'static str = <Secret as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Secret as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Secret as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Secret as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Secret as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = <Secret as k8s_openapi::Resource>::Scope;
}

impl k8s_openapi::Metadata for ObservedSecret {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl ObservedSecret {
    /// The view of a Secret the operator already holds in full (for tests and for symmetry).
    pub fn of(secret: &Secret) -> ObservedSecret {
        ObservedSecret {
            metadata: secret.metadata.clone(),
            type_: secret.type_.clone(),
            token_hash: secret
                .data
                .as_ref()
                .and_then(|d| d.get(TOKEN_KEY))
                .filter(|v| !v.0.is_empty())
                .map(|v| TokenHash::of_bytes(&v.0)),
        }
    }
}

/// Deserializes a Secret's `data` map into the hash of its `token` key, ignoring every other key.
fn hash_of_token<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<TokenHash>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Option<TokenHash>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a Secret's data map")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut hash = None;
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if key == TOKEN_KEY {
                    let mut value: ByteString = map.next_value()?;
                    hash = (!value.0.is_empty()).then(|| TokenHash::of_bytes(&value.0));
                    value.0.zeroize();
                } else {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            Ok(hash)
        }
    }
    deserializer.deserialize_option(Visitor)
}

/// Whether a Secret has a controller ownerReference to some ScimDirectory: only those are cached.
pub fn is_directory_controlled(meta: &ObjectMeta) -> bool {
    meta.owner_references.iter().flatten().any(|r| {
        r.controller == Some(true)
            && r.kind == "ScimDirectory"
            && r.api_version.split_once('/').is_some_and(|(group, _)| group == GROUP)
    })
}

/// Classifies a Secret found under the directory's Secret name. A record is
/// [`RecordState::Valid`] only with this directory's seal under `key`.
pub fn observe(dir: &ScimDirectory, secret: Option<&SecretView>, key: &RecordKey) -> SecretState {
    let Some(secret) = secret else { return SecretState::Missing };
    if !secret.is_controlled_by(dir) {
        return SecretState::Foreign;
    }
    let record = match &secret.record {
        RecordState::Valid(record) if !key.verifies(dir, record, secret.seal.as_ref()) => {
            RecordState::Unsealed(record.clone())
        }
        other => other.clone(),
    };
    SecretState::Owned { token_hash: secret.token_hash.clone(), record }
}

/// Whether `meta` carries a controller ownerReference to exactly this directory (by UID).
pub fn is_controlled_by(dir: &ScimDirectory, meta: &ObjectMeta) -> bool {
    dir.metadata.uid.is_some() && view::controller_uid(meta) == dir.metadata.uid.as_deref()
}

/// Reads an issue record from annotations.
///
/// The expiry is derived from the issue time and the recorded lifetime, never taken as written: an
/// `expires-at` annotation that disagrees with them was edited by hand (someone pushing the expiry
/// out), and the record is [`RecordState::Forged`]. A missing or malformed part makes it
/// [`RecordState::Absent`], which the status can vouch for.
pub fn read_record(annotations: &BTreeMap<String, String>) -> RecordState {
    let get = |k: &str| annotations.get(k).map(String::as_str);
    let parsed = (|| {
        let expires_in = match get(EXPIRES_IN_ANNOTATION)? {
            NEVER => None,
            other => Some(other.parse::<TokenLifetime>().ok()?),
        };
        let issued_at = get(ISSUED_AT_ANNOTATION)?.parse::<Timestamp>().ok()?;
        // Whole seconds, as written by `new_record`; anything else was not written by the operator.
        if issued_at.subsec_nanosecond() != 0 {
            return None;
        }
        let expires_at = match &expires_in {
            Some(lifetime) => Some(issued_at.checked_add(lifetime.as_signed_duration()).ok()?),
            None => None,
        };
        Some(IssueRecord {
            token_hash: TokenHash::parse(get(HASH_ANNOTATION)?)?,
            rotation_generation: get(GENERATION_ANNOTATION)?.parse().ok()?,
            expires_in: expires_in.map(|l| l.canonical()),
            rotation_request: get(REQUEST_ANNOTATION).map(str::to_owned),
            issued_at,
            expires_at,
            reason: IssueReason::parse(get(REASON_ANNOTATION)?)?,
            previous: match (get(PREVIOUS_HASH_ANNOTATION), get(PREVIOUS_VALID_UNTIL_ANNOTATION)) {
                (None, None) => None,
                (hash, until) => {
                    Some(PreviousToken { token_hash: TokenHash::parse(hash?)?, valid_until: until?.parse().ok()? })
                }
            },
            end_overlap_request: get(END_OVERLAP_REQUEST_ANNOTATION).map(str::to_owned),
            idp: match get(IDP_PUSH_ANNOTATION) {
                None => None,
                Some(value) => Some(read_idp_progress(value)?),
            },
        })
    })();
    let Some(record) = parsed else { return RecordState::Absent };
    // An overlap can keep the previous token alive for at most a day after the new one was issued,
    // and never for the token itself.
    if let Some(previous) = &record.previous {
        let latest = record.issued_at.saturating_add(MAX_ROTATION_OVERLAP.as_signed_duration()).expect("in range");
        if previous.valid_until > latest || previous.token_hash == record.token_hash {
            return RecordState::Forged(format!(
                "{PREVIOUS_VALID_UNTIL_ANNOTATION} extends the previous token beyond what any overlap allows"
            ));
        }
    }
    let written = get(EXPIRES_AT_ANNOTATION).map(|v| v.parse::<Timestamp>());
    match (written, record.expires_at) {
        // A missing expires-at is restored like any stripped annotation.
        (None, _) => RecordState::Valid(record),
        (Some(Ok(at)), Some(derived)) if at == derived => RecordState::Valid(record),
        (Some(_), Some(derived)) => RecordState::Forged(format!(
            "{EXPIRES_AT_ANNOTATION} is not {ISSUED_AT_ANNOTATION} + {EXPIRES_IN_ANNOTATION} ({derived})"
        )),
        (Some(_), None) => {
            RecordState::Forged(format!("{EXPIRES_AT_ANNOTATION} is set for a token that never expires"))
        }
    }
}

fn read_idp_progress(value: &str) -> Option<IdpProgress> {
    let mut parts = value.split(' ');
    let target = parts.next().filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_hexdigit()))?.to_owned();
    let pushed_at = parts.next()?.parse().ok()?;
    let synced_at = parts.next().map(|t| t.parse()).transpose().ok()?;
    parts.next().is_none().then_some(IdpProgress { target, pushed_at, synced_at })
}

fn write_idp_progress(p: &IdpProgress) -> String {
    match p.synced_at {
        Some(at) => format!("{} {} {at}", p.target, p.pushed_at),
        None => format!("{} {}", p.target, p.pushed_at),
    }
}

/// The issue record as the operator writes it: its annotations, sealed with `key`. Public for the
/// end-to-end tests, which hold the key and back-date records through it (a tenant cannot).
pub fn record_annotations(dir: &ScimDirectory, record: &IssueRecord, key: &RecordKey) -> BTreeMap<String, String> {
    let mut a = BTreeMap::from([
        (SEAL_ANNOTATION.to_owned(), key.seal(dir, record)),
        (DIRECTORY_ANNOTATION.to_owned(), dir.metadata.name.clone().unwrap_or_default()),
        (HASH_ANNOTATION.to_owned(), record.token_hash.to_string()),
        (GENERATION_ANNOTATION.to_owned(), record.rotation_generation.to_string()),
        (EXPIRES_IN_ANNOTATION.to_owned(), record.expires_in.clone().unwrap_or_else(|| NEVER.to_owned())),
        (ISSUED_AT_ANNOTATION.to_owned(), record.issued_at.to_string()),
        (REASON_ANNOTATION.to_owned(), record.reason.as_str().to_owned()),
    ]);
    if let Some(request) = &record.rotation_request {
        a.insert(REQUEST_ANNOTATION.to_owned(), request.clone());
    }
    if let Some(at) = record.expires_at {
        a.insert(EXPIRES_AT_ANNOTATION.to_owned(), at.to_string());
    }
    if let Some(previous) = &record.previous {
        a.insert(PREVIOUS_HASH_ANNOTATION.to_owned(), previous.token_hash.to_string());
        a.insert(PREVIOUS_VALID_UNTIL_ANNOTATION.to_owned(), previous.valid_until.to_string());
    }
    if let Some(request) = &record.end_overlap_request {
        a.insert(END_OVERLAP_REQUEST_ANNOTATION.to_owned(), request.clone());
    }
    if let Some(progress) = &record.idp {
        a.insert(IDP_PUSH_ANNOTATION.to_owned(), write_idp_progress(progress));
    }
    a
}

/// The template's labels and annotations (its annotations never under the operator's own prefix; the
/// CRD rejects those too, this guards objects admitted before a schema change).
fn template(dir: &ScimDirectory) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let template = dir.spec.secret_template.clone().unwrap_or_default();
    let annotations = template.annotations.into_iter().filter(|(k, _)| !k.starts_with("scim.tokenops.dev/")).collect();
    (template.labels, annotations)
}

/// Short digest of a template's labels and annotations; `None` for an empty template (no annotation then).
fn digest(labels: &BTreeMap<String, String>, annotations: &BTreeMap<String, String>) -> Option<String> {
    use sha2::{Digest, Sha256};
    if labels.is_empty() && annotations.is_empty() {
        return None;
    }
    let canonical = serde_json::to_vec(&(labels, annotations)).expect("string maps serialize");
    Some(hex::encode(&Sha256::digest(&canonical)[..12]))
}

/// The complete desired Secret: the token, the issue record, the template and its digest.
pub fn desired_secret(dir: &ScimDirectory, token: &Token, record: &IssueRecord, key: &RecordKey) -> Secret {
    secret_with(metadata(dir, record, key, true), token)
}

/// The Secret as first created (with `create`, which never overwrites): without the template. Fields
/// a `create` sets are owned by an Update-operation manager, which server-side apply never prunes, so
/// the template is added by a server-side apply right after, and a key later dropped from the
/// template is then removed from the Secret.
pub fn initial_secret(dir: &ScimDirectory, token: &Token, record: &IssueRecord, key: &RecordKey) -> Secret {
    secret_with(metadata(dir, record, key, false), token)
}

fn secret_with(metadata: ObjectMeta, token: &Token) -> Secret {
    Secret {
        metadata,
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(TOKEN_KEY.to_owned(), ByteString(token.expose().as_bytes().to_vec()))])),
        ..Secret::default()
    }
}

/// Name, owner, the managed-by label, the issue record and, `with_template`, the template and its digest.
fn metadata(dir: &ScimDirectory, record: &IssueRecord, key: &RecordKey, with_template: bool) -> ObjectMeta {
    let (mut labels, mut annotations) = if with_template { template(dir) } else { Default::default() };
    let template_digest = digest(&labels, &annotations);
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned());
    annotations.extend(record_annotations(dir, record, key));
    if let Some(digest) = template_digest {
        annotations.insert(TEMPLATE_ANNOTATION.to_owned(), digest);
    }
    ObjectMeta {
        name: Some(dir.secret_name()),
        namespace: dir.metadata.namespace.clone(),
        labels: Some(labels),
        annotations: Some(annotations),
        owner_references: Some(vec![owner_reference(dir)]),
        ..ObjectMeta::default()
    }
}

/// Whether the desired Secret carries anything beyond what [`initial_secret`] creates.
pub fn has_template(dir: &ScimDirectory) -> bool {
    let (labels, annotations) = template(dir);
    !labels.is_empty() || !annotations.is_empty()
}

/// The token stored in a Secret read in full, for writing it back unchanged (a metadata repair, a
/// record of its push). Taken out of the Secret rather than copied, so that the only plaintext left
/// is the token's own, zeroed on drop; a value that is not UTF-8 is zeroed here.
pub fn take_stored_token(secret: &mut Secret) -> Option<Token> {
    let bytes = secret.data.as_mut()?.remove(TOKEN_KEY)?;
    match String::from_utf8(bytes.0) {
        Ok(plaintext) => Some(Token::from_plaintext(plaintext)),
        Err(e) => {
            e.into_bytes().zeroize();
            None
        }
    }
}

/// True when the Secret lacks any of the labels/annotations the directory wants on it, or was last
/// given another template (a key the template dropped is still there).
pub fn metadata_drifted(dir: &ScimDirectory, secret: &SecretView, record: &IssueRecord, key: &RecordKey) -> bool {
    let want = metadata(dir, record, key, true);
    // A wanted digest is among the wanted annotations; an unwanted one must be gone.
    let wants_digest = want.annotations.as_ref().is_some_and(|a| a.contains_key(TEMPLATE_ANNOTATION));
    !secret.has_labels(want.labels.as_ref())
        || !secret.has_annotations(want.annotations.as_ref())
        || (secret.is_templated() && !wants_digest)
        || !secret.is_opaque()
}

fn owner_reference(dir: &ScimDirectory) -> OwnerReference {
    // controller=true, blockOwnerDeletion unset: nothing needs a foreground deletion of the directory
    // to wait for its Secret, and setting it would need update on scimdirectories/finalizers under
    // the OwnerReferencesPermissionEnforcement admission plugin (which the test control plane runs).
    dir.controller_owner_ref(&()).expect("a directory read from the API server has a UID")
}

/// A `Debug`-safe view of a Secret for logs: names and keys only, never data.
pub struct Redacted<'a>(pub &'a Secret);

impl std::fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("namespace", &self.0.metadata.namespace)
            .field("name", &self.0.metadata.name)
            .field("data_keys", &self.0.data.as_ref().map(|d| d.keys().collect::<Vec<_>>()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ScimDirectorySpec, SecretTemplate};
    use crate::policy::{Desired, new_record};

    fn directory() -> ScimDirectory {
        let mut dir = ScimDirectory::new(
            "acme",
            ScimDirectorySpec {
                secret_template: Some(SecretTemplate {
                    labels: BTreeMap::from([("team".into(), "idp".into())]),
                    annotations: BTreeMap::from([
                        ("note".into(), "hi".into()),
                        (HASH_ANNOTATION.into(), "sha256:forged".into()),
                    ]),
                }),
                ..ScimDirectorySpec::default()
            },
        );
        dir.metadata.namespace = Some("tenants".into());
        dir.metadata.uid = Some("uid-1".into());
        dir
    }

    #[test]
    fn secret_round_trips_its_record_and_is_owned() {
        let dir = directory();
        let key = RecordKey::generate();
        let token = Token::generate();
        let desired = Desired::parse(3, Some("90d"), None, Some("req-1")).unwrap();
        let record = new_record(&desired, token.hash(), IssueReason::Initial, Timestamp::now());
        let secret = desired_secret(&dir, &token, &record, &key);

        assert_eq!(secret.metadata.name.as_deref(), Some("acme-scim-token"));
        assert_eq!(secret.metadata.labels.as_ref().unwrap()["team"], "idp");
        assert_eq!(secret.metadata.annotations.as_ref().unwrap()["note"], "hi");
        assert_eq!(secret.metadata.annotations.as_ref().unwrap()[HASH_ANNOTATION], token.hash().to_string());
        assert!(!metadata_drifted(&dir, &SecretView::of(&secret), &record, &key));
        assert_eq!(
            observe(&dir, Some(&SecretView::of(&secret)), &key),
            SecretState::Owned { token_hash: Some(token.hash()), record: RecordState::Valid(record.clone()) }
        );
        let mut full = secret.clone();
        assert_eq!(take_stored_token(&mut full).unwrap().expose(), token.expose());
        assert!(full.data.as_ref().is_some_and(|d| !d.contains_key(TOKEN_KEY)), "no copy is left in the Secret");
        full.data.get_or_insert_default().insert(TOKEN_KEY.to_owned(), k8s_openapi::ByteString(vec![0xff, b'x']));
        assert!(take_stored_token(&mut full).is_none(), "not UTF-8: no token");
        // The redacted view never shows the plaintext.
        assert!(!format!("{:?}", Redacted(&secret)).contains(token.expose()));
    }

    #[test]
    fn the_template_is_applied_after_create_and_its_changes_are_drift() {
        let mut dir = directory();
        let key = RecordKey::generate();
        let token = Token::generate();
        let desired = Desired::parse(0, None, None, None).unwrap();
        let record = new_record(&desired, token.hash(), IssueReason::Initial, Timestamp::now());

        // Created without the template (create-owned fields are never pruned by server-side apply).
        let created = initial_secret(&dir, &token, &record, &key);
        assert!(!created.metadata.labels.as_ref().unwrap().contains_key("team"));
        assert!(!created.metadata.annotations.as_ref().unwrap().contains_key(TEMPLATE_ANNOTATION));
        assert_eq!(read_record(created.metadata.annotations.as_ref().unwrap()), RecordState::Valid(record.clone()));
        assert!(has_template(&dir));
        let created = SecretView::of(&created);
        assert!(metadata_drifted(&dir, &created, &record, &key), "the template still has to be applied");

        let applied = SecretView::of(&desired_secret(&dir, &token, &record, &key));
        assert!(!metadata_drifted(&dir, &applied, &record, &key));
        // Another label on the Secret is no drift; a key dropped from the template is.
        let mut extra = desired_secret(&dir, &token, &record, &key);
        extra.metadata.labels.as_mut().unwrap().insert("someone".into(), "else".into());
        assert!(!metadata_drifted(&dir, &SecretView::of(&extra), &record, &key));
        // A label taken off or changed is drift; so is another type.
        for (label, value) in [("team", None), ("team", Some("other")), (MANAGED_BY_LABEL, Some("someone"))] {
            let mut changed = desired_secret(&dir, &token, &record, &key);
            let labels = changed.metadata.labels.as_mut().unwrap();
            match value {
                Some(v) => labels.insert(label.into(), v.into()),
                None => labels.remove(label),
            };
            assert!(metadata_drifted(&dir, &SecretView::of(&changed), &record, &key), "{label}: {value:?}");
        }
        let mut retyped = desired_secret(&dir, &token, &record, &key);
        retyped.type_ = Some("kubernetes.io/basic-auth".into());
        assert!(metadata_drifted(&dir, &SecretView::of(&retyped), &record, &key));
        dir.spec.secret_template.as_mut().unwrap().annotations.remove("note");
        assert!(metadata_drifted(&dir, &applied, &record, &key), "the Secret still carries the dropped key");
        assert!(!metadata_drifted(&dir, &SecretView::of(&desired_secret(&dir, &token, &record, &key)), &record, &key));
        // No template: no digest, nothing to apply after the create.
        dir.spec.secret_template = None;
        assert!(!has_template(&dir));
        assert!(metadata_drifted(&dir, &applied, &record, &key));
        assert!(!metadata_drifted(&dir, &SecretView::of(&initial_secret(&dir, &token, &record, &key)), &record, &key));
    }

    #[test]
    fn ownership_and_stripped_metadata_are_recognised() {
        let dir = directory();
        let key = RecordKey::generate();
        let token = Token::generate();
        let desired = Desired::parse(0, None, None, None).unwrap();
        let record = new_record(&desired, token.hash(), IssueReason::Initial, Timestamp::now());
        let mut secret = ObservedSecret::of(&desired_secret(&dir, &token, &record, &key));
        assert!(is_directory_controlled(&secret.metadata));

        let mut other = dir.clone();
        other.metadata.uid = Some("uid-2".into());
        other.metadata.name = Some("other".into());
        let view = |s: &ObservedSecret| SecretView::from(s);
        assert_eq!(observe(&other, Some(&view(&secret)), &key), SecretState::Foreign, "another directory's Secret");
        assert_eq!(observe(&dir, None, &key), SecretState::Missing);

        secret.metadata.annotations = None;
        assert!(metadata_drifted(&dir, &view(&secret), &record, &key));
        assert_eq!(
            observe(&dir, Some(&view(&secret)), &key),
            SecretState::Owned { token_hash: Some(token.hash()), record: RecordState::Absent }
        );

        secret.metadata.owner_references = None;
        assert_eq!(observe(&dir, Some(&view(&secret)), &key), SecretState::Foreign);
        assert!(!is_directory_controlled(&secret.metadata));
        // A controller reference to something else is not a directory's.
        let mut deployment_owned = dir.controller_owner_ref(&()).unwrap();
        deployment_owned.api_version = "apps/v1".into();
        deployment_owned.kind = "Deployment".into();
        secret.metadata.owner_references = Some(vec![deployment_owned]);
        assert!(!is_directory_controlled(&secret.metadata));
    }

    #[test]
    fn the_cached_view_holds_a_hash_never_the_token_nor_other_data() {
        let token = Token::generate();
        let json = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": { "name": "acme-scim-token", "namespace": "tenants" },
            "type": "Opaque",
            "data": {
                "big": ByteString(vec![b'x'; 4096]),
                "token": ByteString(token.expose().as_bytes().to_vec()),
            },
        });
        let observed: ObservedSecret = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(observed.token_hash, Some(token.hash()));
        assert_eq!(observed.metadata.name.as_deref(), Some("acme-scim-token"));
        assert!(!format!("{observed:?}").contains(token.expose()));
        assert_eq!(observed, ObservedSecret::of(&serde_json::from_value::<Secret>(json).unwrap()));
        // No data, null data, an empty token: no hash.
        for data in [serde_json::json!(null), serde_json::json!({}), serde_json::json!({ "token": "" })] {
            let s: ObservedSecret =
                serde_json::from_value(serde_json::json!({ "metadata": {}, "data": data })).unwrap();
            assert_eq!(s.token_hash, None, "{data}");
        }
        let s: ObservedSecret = serde_json::from_value(serde_json::json!({ "metadata": {} })).unwrap();
        assert_eq!(s.token_hash, None);
    }

    #[test]
    fn the_expiry_is_derived_and_a_forged_one_is_caught() {
        let dir = directory();
        let key = RecordKey::generate();
        let desired = Desired::parse(0, Some("90d"), None, None).unwrap();
        let record = new_record(&desired, Token::generate().hash(), IssueReason::Initial, Timestamp::now());
        let annotations = record_annotations(&dir, &record, &key);
        assert_eq!(read_record(&annotations), RecordState::Valid(record.clone()));

        let with = |key: &str, value: Option<&str>| {
            let mut a = annotations.clone();
            match value {
                Some(v) => a.insert(key.to_owned(), v.to_owned()),
                None => a.remove(key),
            };
            read_record(&a)
        };
        // Pushed out: caught, whatever the format.
        assert!(matches!(with(EXPIRES_AT_ANNOTATION, Some("2099-01-01T00:00:00Z")), RecordState::Forged(_)));
        assert!(matches!(with(EXPIRES_AT_ANNOTATION, Some("soon")), RecordState::Forged(_)));
        // An expiry on a perpetual token.
        assert!(matches!(with(EXPIRES_IN_ANNOTATION, Some("never")), RecordState::Forged(_)));
        // Missing: derived, and the annotation restored as metadata drift.
        assert_eq!(with(EXPIRES_AT_ANNOTATION, None), RecordState::Valid(record.clone()));
        // Unreadable parts make the record absent (the status may vouch for the token).
        assert_eq!(with(ISSUED_AT_ANNOTATION, Some("yesterday")), RecordState::Absent);
        assert_eq!(with(EXPIRES_IN_ANNOTATION, Some("1.5s")), RecordState::Absent);
        assert_eq!(with(HASH_ANNOTATION, None), RecordState::Absent);

        // An overlap round-trips; one extended beyond a day after the issue is forged.
        let mut overlapping = record.clone();
        let until = Timestamp::from_second(record.issued_at.as_second() + 3600).unwrap();
        overlapping.previous = Some(PreviousToken { token_hash: TokenHash::of_bytes(b"old"), valid_until: until });
        overlapping.end_overlap_request = Some("e1".into());
        let annotations = record_annotations(&dir, &overlapping, &key);
        assert_eq!(read_record(&annotations), RecordState::Valid(overlapping.clone()));
        let mut extended = annotations.clone();
        extended.insert(PREVIOUS_VALID_UNTIL_ANNOTATION.into(), "2099-01-01T00:00:00Z".into());
        assert!(matches!(read_record(&extended), RecordState::Forged(_)));
        let mut half = annotations.clone();
        half.remove(PREVIOUS_VALID_UNTIL_ANNOTATION);
        assert_eq!(read_record(&half), RecordState::Absent);
    }

    #[test]
    fn the_push_progress_reads_back_and_a_malformed_one_is_no_record() {
        let dir = directory();
        let key = RecordKey::generate();
        let desired = Desired::parse(0, Some("90d"), None, None).unwrap();
        let record = new_record(&desired, TokenHash::of_bytes(b"t"), IssueReason::Initial, Timestamp::now());
        let at: Timestamp = "2026-01-01T00:00:05Z".parse().unwrap();
        for synced_at in [None, Some(at)] {
            let pushed = IssueRecord {
                idp: Some(IdpProgress { target: "0a1b".into(), pushed_at: at, synced_at }),
                ..record.clone()
            };
            let annotations = record_annotations(&dir, &pushed, &key);
            assert_eq!(read_record(&annotations), RecordState::Valid(pushed.clone()));
        }
        assert!(!record_annotations(&dir, &record, &key).contains_key(IDP_PUSH_ANNOTATION));
        for bad in [
            "",
            "0a1b",
            "0a1b yesterday",
            "zz 2026-01-01T00:00:05Z",
            "0a1b 2026-01-01T00:00:05Z x",
            "0a1b 2026-01-01T00:00:05Z 2026-01-01T00:00:05Z 1",
        ] {
            let mut annotations = record_annotations(&dir, &record, &key);
            annotations.insert(IDP_PUSH_ANNOTATION.into(), bad.into());
            assert_eq!(read_record(&annotations), RecordState::Absent, "{bad:?}");
        }
    }

    #[test]
    fn only_a_record_sealed_for_this_directory_under_the_key_is_valid() {
        let dir = directory();
        let key = RecordKey::generate();
        let token = Token::generate();
        let desired = Desired::parse(0, Some("90d"), None, None).unwrap();
        let record = new_record(&desired, token.hash(), IssueReason::Initial, Timestamp::now());
        let secret = desired_secret(&dir, &token, &record, &key);
        let state = |s: &Secret, d: &ScimDirectory, k: &RecordKey| match observe(d, Some(&SecretView::of(s)), k) {
            SecretState::Owned { record, .. } => record,
            other => panic!("{other:?}"),
        };
        assert_eq!(state(&secret, &dir, &key), RecordState::Valid(record.clone()));
        // Under another key (a lost or replaced key), or without a seal (written before seals): unsealed.
        assert_eq!(state(&secret, &dir, &RecordKey::generate()), RecordState::Unsealed(record.clone()));
        let mut unsealed = secret.clone();
        unsealed.metadata.annotations.as_mut().unwrap().remove(SEAL_ANNOTATION);
        assert_eq!(state(&unsealed, &dir, &key), RecordState::Unsealed(record.clone()));
        // Consistently back-dated by hand (issued-at and expires-at moved together): unsealed.
        let mut moved = secret.clone();
        let later = IssueRecord {
            issued_at: Timestamp::from_second(record.issued_at.as_second() + 50).unwrap(),
            expires_at: record.expires_at.map(|t| Timestamp::from_second(t.as_second() + 50).unwrap()),
            ..record.clone()
        };
        let annotations = moved.metadata.annotations.as_mut().unwrap();
        annotations.insert(ISSUED_AT_ANNOTATION.into(), later.issued_at.to_string());
        annotations.insert(EXPIRES_AT_ANNOTATION.into(), later.expires_at.unwrap().to_string());
        assert_eq!(state(&moved, &dir, &key), RecordState::Unsealed(later));
        // Another directory's sealed record, copied with its seal onto a Secret this one controls.
        let mut other = dir.clone();
        other.metadata.name = Some("globex".into());
        let copied = desired_secret(&other, &token, &record, &key);
        let mut planted = secret.clone();
        planted.metadata.annotations = copied.metadata.annotations.clone();
        assert_eq!(state(&planted, &dir, &key), RecordState::Unsealed(record.clone()));
    }
}
