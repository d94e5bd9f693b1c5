//! What the operator keeps of a Secret between reconciles: only what its decisions read.
//!
//! A decision asks a Secret four things: which object controls it, which token it holds (as a
//! hash), which issue record its annotations carry, and whether it carries given labels and
//! annotations. [`SecretView`] answers exactly those and keeps nothing else: at 10,000 directories
//! whole Secret metadata (labels and annotations as B-tree maps, owner references, the record as
//! strings) was the largest single part of the operator's memory (2.4 KiB per Secret).

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::LazyLock;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::{ObservedSecret, SEAL_ANNOTATION, Seal, TEMPLATE_ANNOTATION, read_record};
use crate::api::ScimDirectory;
use crate::policy::RecordState;
use crate::token::TokenHash;

/// A Secret as the controller decides on it, built from a fresh read (a watch event or a look-up).
#[derive(Clone, Debug, PartialEq)]
pub struct SecretView {
    /// The resourceVersion it was read at: writes decided on the view are guarded by it.
    pub resource_version: Option<String>,
    /// UID of the object named by the Secret's controller ownerReference, whatever its kind.
    controller_uid: Option<Box<str>>,
    /// Name of that object when it is a ScimDirectory: a Secret later cut loose from it (its
    /// ownerReference stripped) still triggers that directory, which then reports the conflict.
    directory: Option<Box<str>>,
    /// `type: Opaque`, the only type the operator writes.
    opaque: bool,
    /// Hash of `data.token`; `None` when the key is absent or empty.
    pub token_hash: Option<TokenHash>,
    /// The issue record its annotations carry, read once per version rather than once per decision.
    pub record: RecordState,
    /// The record's seal, as written (checked against the directory in [`super::observe`]).
    pub seal: Option<Seal>,
    /// Whether it carries a template digest annotation.
    templated: bool,
    labels: EntryDigests,
    annotations: EntryDigests,
}

impl SecretView {
    /// The view of a Secret read in full (for tests and for symmetry).
    pub fn of(secret: &Secret) -> SecretView {
        SecretView::from(&ObservedSecret::of(secret))
    }

    /// Whether the Secret's controller ownerReference names exactly this directory (by UID).
    pub fn is_controlled_by(&self, dir: &ScimDirectory) -> bool {
        dir.metadata.uid.is_some() && self.controller_uid.as_deref() == dir.metadata.uid.as_deref()
    }

    /// Whether it carries every label in `labels` with the same value.
    pub fn has_labels(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        labels.into_iter().flatten().all(|(k, v)| self.labels.contains(k, v))
    }

    /// Whether it carries every annotation in `annotations` with the same value.
    pub fn has_annotations(&self, annotations: Option<&BTreeMap<String, String>>) -> bool {
        annotations.into_iter().flatten().all(|(k, v)| self.annotations.contains(k, v))
    }

    /// The controller reference this view was cached under, if a ScimDirectory's.
    pub fn directory_owner(&self) -> Option<OwnerReference> {
        let (uid, name) = (self.controller_uid.as_deref()?, self.directory.as_deref()?);
        Some(OwnerReference {
            api_version: <ScimDirectory as kube::Resource>::api_version(&()).into_owned(),
            kind: <ScimDirectory as kube::Resource>::kind(&()).into_owned(),
            name: name.to_owned(),
            uid: uid.to_owned(),
            controller: Some(true),
            block_owner_deletion: None,
        })
    }

    pub fn is_templated(&self) -> bool {
        self.templated
    }

    pub fn is_opaque(&self) -> bool {
        self.opaque
    }
}

impl From<&ObservedSecret> for SecretView {
    fn from(secret: &ObservedSecret) -> SecretView {
        let meta = &secret.metadata;
        SecretView {
            resource_version: meta.resource_version.clone(),
            controller_uid: controller_uid(meta).map(Box::from),
            directory: super::is_directory_controlled(meta)
                .then(|| meta.owner_references.iter().flatten().find(|r| r.controller == Some(true)))
                .flatten()
                .map(|r| Box::from(r.name.as_str())),
            opaque: secret.type_.as_deref() == Some("Opaque"),
            token_hash: secret.token_hash.clone(),
            record: meta.annotations.as_ref().map_or(RecordState::Absent, read_record),
            seal: meta.annotations.as_ref().and_then(|a| a.get(SEAL_ANNOTATION)).and_then(|v| Seal::parse(v)),
            templated: meta.annotations.as_ref().is_some_and(|a| a.contains_key(TEMPLATE_ANNOTATION)),
            labels: EntryDigests::of(meta.labels.as_ref()),
            annotations: EntryDigests::of(meta.annotations.as_ref()),
        }
    }
}

/// UID of the object a Secret's controller ownerReference names.
pub(super) fn controller_uid(meta: &ObjectMeta) -> Option<&str> {
    meta.owner_references.iter().flatten().find(|r| r.controller == Some(true)).map(|r| r.uid.as_str())
}

/// A map's entries as keyed 64-bit digests, sorted: enough to answer "does it carry `k: v`?",
/// which is all a decision asks of a Secret's labels and annotations (8 bytes an entry instead of
/// two strings and a share of a B-tree node). The key is drawn from the OS at start (SipHash), so
/// no one can craft an entry that collides with another; a collision by chance (2⁻⁶⁴ per
/// comparison) could only skip one metadata repair, never touch a token decision, which reads the
/// parsed record.
#[derive(Clone, Default, PartialEq, Eq)]
struct EntryDigests(Box<[u64]>);

static DIGEST_KEY: LazyLock<std::collections::hash_map::RandomState> =
    LazyLock::new(std::collections::hash_map::RandomState::new);

impl EntryDigests {
    fn of(map: Option<&BTreeMap<String, String>>) -> EntryDigests {
        let mut digests: Vec<u64> = map.into_iter().flatten().map(|(k, v)| entry_digest(k, v)).collect();
        digests.sort_unstable();
        EntryDigests(digests.into_boxed_slice())
    }

    fn contains(&self, key: &str, value: &str) -> bool {
        self.0.binary_search(&entry_digest(key, value)).is_ok()
    }
}

fn entry_digest(key: &str, value: &str) -> u64 {
    // `str` hashes with a terminator, so ("ab", "c") and ("a", "bc") differ.
    DIGEST_KEY.hash_one((key, value))
}

impl std::fmt::Debug for EntryDigests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} entries", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn entry_digests_answer_exactly_whether_an_entry_is_carried() {
        let digests = EntryDigests::of(Some(&map(&[("team", "idp"), ("ab", "c"), ("empty", "")])));
        assert!(digests.contains("team", "idp"));
        assert!(digests.contains("ab", "c"));
        assert!(digests.contains("empty", ""));
        assert!(!digests.contains("team", "IdP"), "another value");
        assert!(!digests.contains("a", "bc"), "the same bytes split elsewhere");
        assert!(!digests.contains("idp", "team"), "key and value swapped");
        assert!(!EntryDigests::of(None).contains("team", "idp"));
    }

    #[test]
    fn the_view_keeps_the_decision_inputs_and_no_data() {
        let secret = Secret {
            metadata: ObjectMeta {
                resource_version: Some("42".into()),
                labels: Some(map(&[("team", "idp")])),
                annotations: Some(map(&[(TEMPLATE_ANNOTATION, "abc"), ("note", "hi")])),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([("token".to_owned(), ByteString(b"scim_plaintext".to_vec()))])),
            ..Secret::default()
        };
        let view = SecretView::of(&secret);
        assert_eq!(view.resource_version.as_deref(), Some("42"));
        assert_eq!(view.token_hash, Some(TokenHash::of_bytes(b"scim_plaintext")));
        assert!(view.is_opaque() && view.is_templated());
        assert!(view.has_labels(Some(&map(&[("team", "idp")]))));
        assert!(view.has_annotations(Some(&map(&[("note", "hi")]))));
        assert!(!view.has_annotations(Some(&map(&[("note", "hi"), ("other", "x")]))));
        assert!(view.has_labels(None), "nothing wanted, nothing missing");
        assert_eq!(view.record, RecordState::Absent);
        assert!(!format!("{view:?}").contains("plaintext"));
    }
}
