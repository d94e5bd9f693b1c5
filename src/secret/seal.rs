//! The seal on an issue record: an HMAC-SHA-256, under a key only the operator holds, over the
//! directory the record belongs to and every field of the record.
//!
//! Anyone who may patch a token Secret (a tenant namespace's usual `edit` role) can write its
//! annotations. Without a seal the operator would believe whatever they wrote there: an issue time
//! pushed forward (the token never expires), a previous token revived, a token of their choosing
//! with a matching hash adopted as if the operator had crashed after writing it, another
//! directory's hash planted as this one's previous token. With it, a record the operator did not
//! write is recognised as such ([`crate::policy::RecordState::Unsealed`]) and is believed only as far
//! as the directory's status (which tenants cannot write) vouches for it.
//!
//! The key is 32 bytes from the OS CSPRNG in a Secret of the operator's own namespace, created by the
//! operator on its first start (see [`load_or_create`]). Lose it or replace it and every record is
//! unsealed until re-sealed: one whose fields the status vouches for is re-sealed in place (a
//! metadata write, no new token); one the status cannot vouch for is replaced as tampered.

use hmac::{Hmac, Mac};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use rand::TryRngCore;
use rand::rngs::OsRng;
use serde_json::json;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::api::ScimDirectory;
use crate::policy::IssueRecord;

/// The annotation holding a record's seal.
pub const SEAL_ANNOTATION: &str = "scim.tokenops.dev/record-seal";
/// The record key's Secret unless `--record-key-secret` names another (the chart does).
pub const DEFAULT_KEY_SECRET: &str = "scim-token-operator-record-key";
/// Data key of the record key in its Secret.
pub const KEY_DATA_KEY: &str = "key";
/// Labels of the record key's Secret (never the managed-by label: it is no token Secret).
pub const KEY_LABELS: [(&str, &str); 2] =
    [("app.kubernetes.io/name", "scim-token-operator"), ("app.kubernetes.io/component", "record-key")];
const KEY_LEN: usize = 32;
/// Seals name their scheme: a future one can be told apart from a forgery.
const SCHEME: &str = "v1.";
/// Everything sealed starts with this, so a seal can never be replayed as a MAC of anything else.
const DOMAIN: &str = "scim-token-operator/issue-record/v1";

/// The operator's record key. Its `Debug` shows no key material.
#[derive(Clone)]
pub struct RecordKey(Zeroizing<[u8; KEY_LEN]>);

/// A seal as read from a Secret's annotation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Seal([u8; 32]);

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordKey([redacted])")
    }
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Seal({})", hex::encode(&self.0[..4]))
    }
}

impl Seal {
    /// Parses an annotation value; `None` for anything the operator would not have written.
    pub fn parse(value: &str) -> Option<Seal> {
        let mut mac = [0u8; 32];
        hex::decode_to_slice(value.strip_prefix(SCHEME)?, &mut mac).ok()?;
        Some(Seal(mac))
    }
}

impl RecordKey {
    /// A new key from the OS CSPRNG.
    pub fn generate() -> RecordKey {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        OsRng.try_fill_bytes(key.as_mut()).expect("the operating system's random number generator failed");
        RecordKey(key)
    }

    /// The key as stored in its Secret: exactly 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<RecordKey, String> {
        let key: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| format!("the record key must be {KEY_LEN} bytes, the Secret holds {}", bytes.len()))?;
        Ok(RecordKey(Zeroizing::new(key)))
    }

    /// The annotation value sealing `record` as `dir`'s.
    pub fn seal(&self, dir: &ScimDirectory, record: &IssueRecord) -> String {
        let mac = self.mac(dir, record).finalize().into_bytes();
        format!("{SCHEME}{}", hex::encode(mac))
    }

    /// Whether `seal` is this key's seal of `record` as `dir`'s (in constant time).
    pub fn verifies(&self, dir: &ScimDirectory, record: &IssueRecord, seal: Option<&Seal>) -> bool {
        seal.is_some_and(|seal| self.mac(dir, record).verify_slice(&seal.0).is_ok())
    }

    fn mac(&self, dir: &ScimDirectory, record: &IssueRecord) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.0.as_ref()).expect("HMAC takes a key of any length");
        mac.update(&sealed_bytes(dir, record));
        mac
    }
}

/// What a seal covers, unambiguously encoded (a JSON array: no field can run into the next): the
/// directory (namespace, name, UID: a record copied to another directory's Secret does not verify)
/// and every field of the record.
fn sealed_bytes(dir: &ScimDirectory, record: &IssueRecord) -> Vec<u8> {
    let previous = record.previous.as_ref();
    let mut fields = json!([
        DOMAIN,
        dir.metadata.namespace,
        dir.metadata.name,
        dir.metadata.uid,
        dir.secret_name(),
        record.token_hash.as_str(),
        record.rotation_generation,
        record.expires_in,
        record.rotation_request,
        record.issued_at.to_string(),
        record.expires_at.map(|t| t.to_string()),
        record.reason.as_str(),
        previous.map(|p| p.token_hash.as_str()),
        previous.map(|p| p.valid_until.to_string()),
        record.end_overlap_request,
    ]);
    // Appended only when present: a record without it (every record written before the push
    // existed) seals to exactly the bytes it always did, so its seal still verifies.
    if let Some(idp) = &record.idp {
        let fields = fields.as_array_mut().expect("an array");
        fields.extend([
            json!(idp.target),
            json!(idp.pushed_at.to_string()),
            json!(idp.synced_at.map(|t| t.to_string())),
        ]);
    }
    serde_json::to_vec(&fields).expect("strings and numbers serialize")
}

/// Reads the record key from Secret `namespace/name`, creating it (32 bytes from the OS CSPRNG) if
/// there is none. Two replicas starting at once both try the create; the one refused reads the
/// winner's key. The operator never updates or deletes this Secret (the chart's admission policy
/// allows it exactly this create).
pub async fn load_or_create(client: kube::Client, namespace: &str, name: &str) -> Result<RecordKey, String> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let explain = |action: &str, e: kube::Error| {
        format!("cannot {action} the record key Secret {namespace}/{name} (--record-key-secret): {e}")
    };
    for _ in 0..2 {
        if let Some(secret) = api.get_opt(name).await.map_err(|e| explain("read", e))? {
            // Taken out of the Secret (not copied), so that the one copy is wiped when dropped.
            let bytes =
                Zeroizing::new(secret.data.and_then(|mut d| d.remove(KEY_DATA_KEY)).map(|b| b.0).unwrap_or_default());
            return RecordKey::from_bytes(&bytes)
                .map_err(|e| format!("record key Secret {namespace}/{name}, data key {KEY_DATA_KEY:?}: {e}"));
        }
        let key = RecordKey::generate();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(KEY_LABELS.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_owned()),
            data: Some([(KEY_DATA_KEY.to_owned(), ByteString(key.0.to_vec()))].into()),
            ..Secret::default()
        };
        let params = PostParams { field_manager: Some(crate::FIELD_MANAGER.into()), ..Default::default() };
        match api.create(&params, &secret).await {
            Ok(_) => {
                tracing::info!(namespace, name, "created the record key");
                return Ok(key);
            }
            // Another replica created it first: read theirs.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(explain("create", e)),
        }
    }
    Err(format!("the record key Secret {namespace}/{name} was created and then could not be read"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ScimDirectorySpec;
    use crate::policy::{Desired, IssueReason, PreviousToken, new_record};
    use crate::token::TokenHash;
    use k8s_openapi::jiff::Timestamp;

    fn directory(name: &str, uid: &str) -> ScimDirectory {
        let mut dir = ScimDirectory::new(name, ScimDirectorySpec::default());
        dir.metadata.namespace = Some("tenants".into());
        dir.metadata.uid = Some(uid.into());
        dir
    }

    #[test]
    fn a_seal_covers_the_directory_and_every_field_of_the_record() {
        let key = RecordKey::generate();
        let dir = directory("acme", "uid-1");
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let desired = Desired::parse(1, Some("90d"), None, Some("r1")).unwrap();
        let mut record = new_record(&desired, TokenHash::of_bytes(b"t"), IssueReason::RotationRequested, now);
        record.previous = Some(PreviousToken {
            token_hash: TokenHash::of_bytes(b"old"),
            valid_until: "2026-01-01T01:00:00Z".parse().unwrap(),
        });
        record.end_overlap_request = Some("e1".into());
        let seal = Seal::parse(&key.seal(&dir, &record)).unwrap();
        assert!(key.verifies(&dir, &record, Some(&seal)));
        assert!(!key.verifies(&dir, &record, None), "no seal verifies nothing");
        assert!(!RecordKey::generate().verifies(&dir, &record, Some(&seal)), "another key's seal");

        let later: Timestamp = "2026-01-01T00:00:50Z".parse().unwrap();
        let changed: Vec<(&str, IssueRecord)> = vec![
            ("token hash", IssueRecord { token_hash: TokenHash::of_bytes(b"x"), ..record.clone() }),
            ("generation", IssueRecord { rotation_generation: 2, ..record.clone() }),
            ("lifetime", IssueRecord { expires_in: None, ..record.clone() }),
            ("rotation request", IssueRecord { rotation_request: None, ..record.clone() }),
            ("issue time", IssueRecord { issued_at: later, ..record.clone() }),
            ("expiry", IssueRecord { expires_at: None, ..record.clone() }),
            ("reason", IssueRecord { reason: IssueReason::Initial, ..record.clone() }),
            ("previous token", IssueRecord { previous: None, ..record.clone() }),
            ("end-overlap request", IssueRecord { end_overlap_request: Some("e2".into()), ..record.clone() }),
        ];
        for (what, other) in changed {
            assert!(!key.verifies(&dir, &other, Some(&seal)), "a changed {what} must not verify");
        }
        for (what, other) in [
            ("another directory of the namespace", directory("globex", "uid-1")),
            ("a directory recreated under the name", directory("acme", "uid-2")),
        ] {
            assert!(!key.verifies(&other, &record, Some(&seal)), "{what} must not verify");
        }
    }

    #[test]
    fn the_push_progress_is_sealed_and_records_without_it_seal_as_before() {
        let key = RecordKey::generate();
        let dir = directory("acme", "uid-1");
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let record = new_record(
            &Desired::parse(0, None, None, None).unwrap(),
            TokenHash::of_bytes(b"t"),
            IssueReason::Initial,
            now,
        );
        // The bytes every record was sealed over before the push existed: unchanged, so seals written
        // by an older operator still verify (no new token on upgrade).
        let before = serde_json::to_vec(&json!([
            DOMAIN,
            "tenants",
            "acme",
            "uid-1",
            "acme-scim-token",
            record.token_hash.as_str(),
            0,
            null,
            null,
            "2026-01-01T00:00:00Z",
            null,
            "Initial",
            null,
            null,
            null,
        ]))
        .unwrap();
        assert_eq!(sealed_bytes(&dir, &record), before);
        let pushed = IssueRecord {
            idp: Some(crate::policy::IdpProgress { target: "ab".into(), pushed_at: now, synced_at: None }),
            ..record.clone()
        };
        let seal = Seal::parse(&key.seal(&dir, &pushed)).unwrap();
        assert!(key.verifies(&dir, &pushed, Some(&seal)));
        for other in [
            record.clone(),
            IssueRecord {
                idp: Some(crate::policy::IdpProgress { target: "ac".into(), pushed_at: now, synced_at: None }),
                ..record.clone()
            },
            IssueRecord {
                idp: Some(crate::policy::IdpProgress { target: "ab".into(), pushed_at: now, synced_at: Some(now) }),
                ..record.clone()
            },
        ] {
            assert!(!key.verifies(&dir, &other, Some(&seal)), "{other:?}");
        }
    }

    #[test]
    fn seals_parse_only_as_written_and_keys_never_print() {
        let key = RecordKey::generate();
        let dir = directory("acme", "uid-1");
        let record = new_record(
            &Desired::parse(0, None, None, None).unwrap(),
            TokenHash::of_bytes(b"t"),
            IssueReason::Initial,
            Timestamp::now(),
        );
        let written = key.seal(&dir, &record);
        assert!(Seal::parse(&written).is_some());
        for bad in ["", "v1.", "v2.00", &written[3..], &written[..written.len() - 2], &format!("{written}00")] {
            assert_eq!(Seal::parse(bad), None, "{bad:?}");
        }
        assert_eq!(format!("{key:?}"), "RecordKey([redacted])");
        assert!(RecordKey::from_bytes(&[7; 31]).is_err());
        assert!(RecordKey::from_bytes(&[7; 32]).is_ok());
    }
}
