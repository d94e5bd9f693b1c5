//! The decision "does this directory need a new token, and why?".
//!
//! A pure function over what the cluster says (the directory's spec and status, the managed Secret's
//! record of what its token was issued for) and the current time. Like cert-manager's trigger policies
//! it returns a named reason, so Events, metrics and tests all speak the same words.
//!
//! The Secret is the source of truth: it records, in annotations written atomically with the token,
//! the rotation generation, rotation request and expiry setting the token was issued for. Comparing
//! that record with the spec (never the status) is what makes a crash between the Secret write and the
//! status write harmless: on restart the Secret already matches the spec, so nothing is re-issued and
//! the status is adopted from it.

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use sha2::{Digest, Sha256};

use crate::api::{EntraProvisioning, ScimDirectory};
use crate::duration::{DurationError, MAX_ROTATION_OVERLAP, MIN_TOKEN_LIFETIME, TokenLifetime, check_token_lifetime};
use crate::token::TokenHash;

/// Everything a decision reads, gathered in one place (the controller's `gather` step).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// The spec and the directory's annotations, validated.
    pub desired: Result<Desired, SpecError>,
    /// What the status last said about the token.
    pub status: StatusView,
    /// The managed Secret as observed.
    pub secret: SecretState,
    pub now: Timestamp,
    /// Shortest time between two automatic issues (see [`throttle`]).
    pub min_issue_interval: SignedDuration,
}

/// The one entry point: what to do with a directory's token, automatic issues throttled.
pub fn evaluate(input: &Input) -> Decision {
    let decision = decide(input.desired.as_ref(), &input.status, &input.secret, input.now);
    throttle(decision, &input.status, &input.secret, input.now, input.min_issue_interval)
}

/// What a token was issued for, as recorded on its Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssueRecord {
    pub token_hash: TokenHash,
    pub rotation_generation: i64,
    /// Canonical `tokenExpiresIn` the token was issued with; `None` for a perpetual token.
    pub expires_in: Option<String>,
    /// The imperative rotation request (annotation value) that was current when the token was issued.
    pub rotation_request: Option<String>,
    pub issued_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub reason: IssueReason,
    /// The token this one replaced, while a rotation overlap keeps it valid.
    pub previous: Option<PreviousToken>,
    /// The end-overlap request (annotation value) that was current when this record was written, so
    /// that only a new value ends an overlap.
    pub end_overlap_request: Option<String>,
    /// How far this token has been pushed to the identity provider (`spec.identityProvider`); `None`
    /// when it has not been (a new token, or a record written before the push existed).
    pub idp: Option<IdpProgress>,
}

/// The push of a record's token to the identity provider (its steps: `entra::plan`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdpProgress {
    /// Digest of the identity provider settings it was pushed to: other settings push again.
    pub target: String,
    /// When the identity provider accepted the token (the PUT's answer, rounded up to the second).
    pub pushed_at: Timestamp,
    /// When the identity provider's first run after the push succeeded, once it has.
    pub synced_at: Option<Timestamp>,
}

/// The digest of the settings a token is pushed with (tenant, service principal, job, base address):
/// a record pushed under other settings is pushed again. The auth method is not part of it: a new
/// credential for the same job changes nothing Entra holds.
pub fn idp_target(entra: &EntraProvisioning) -> String {
    let canonical = serde_json::to_vec(&(
        &entra.tenant_id.to_ascii_lowercase(),
        &entra.service_principal_id.to_ascii_lowercase(),
        &entra.job_id,
        &entra.base_address,
    ))
    .expect("strings serialize");
    hex::encode(&Sha256::digest(&canonical)[..8])
}

/// A replaced token that stays valid until `valid_until` (a rotation overlap).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreviousToken {
    pub token_hash: TokenHash,
    pub valid_until: Timestamp,
}

/// How far in the future a recorded `issued-at` may lie before it counts as forged: room for the clock
/// skew between the replica that wrote it and the one reading it, nothing more.
pub const MAX_CLOCK_SKEW: SignedDuration = SignedDuration::from_secs(60);

/// Why a spec cannot be acted on. The messages go into the status and an Event as they are.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("spec.rotationGeneration must be >= 0, got {0}")]
    NegativeRotationGeneration(i64),
    /// A duration field that does not parse, or lies outside the bounds of a token lifetime.
    #[error("spec.{field}: {error}")]
    Duration { field: &'static str, error: DurationError },
    #[error("spec.renewBefore requires spec.tokenExpiresIn")]
    RenewBeforeWithoutExpiry,
    /// Renewals would come too soon after each issue (see [`min_renewal_window`]).
    #[error(
        "spec.renewBefore ({renew_before}) leaves {} between a token's issue and its renewal; \
         spec.tokenExpiresIn ({expires_in}) minus spec.renewBefore must be at least {} \
         (the larger of 1h and 10% of spec.tokenExpiresIn), so that renewals cannot come in a storm",
        seconds(*.window),
        seconds(*.min)
    )]
    RenewalWindowTooShort { expires_in: TokenLifetime, renew_before: TokenLifetime, window: u64, min: u64 },
    #[error("spec.rotationOverlap: must be between 1s and {MAX_ROTATION_OVERLAP}, got {0}")]
    RotationOverlapOutOfBounds(TokenLifetime),
}

/// The spec as the policy needs it, already validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub rotation_generation: i64,
    pub expires_in: Option<TokenLifetime>,
    pub renew_before: Option<TokenLifetime>,
    pub rotation_request: Option<String>,
    /// `spec.rotationOverlap`; `None` ends the previous token at once.
    pub rotation_overlap: Option<TokenLifetime>,
    pub end_overlap_request: Option<String>,
    /// Digest of `spec.identityProvider` when every new token is pushed there (see
    /// [`idp_target`]).
    pub idp_target: Option<String>,
}

impl Desired {
    /// The directory's spec and annotations, validated.
    pub fn of(dir: &ScimDirectory) -> Result<Desired, SpecError> {
        let spec = &dir.spec;
        Desired::parse(
            spec.rotation_generation,
            spec.token_expires_in.as_deref(),
            spec.renew_before.as_deref(),
            dir.rotation_request(),
        )?
        .with_overlap(spec.rotation_overlap.as_deref(), dir.end_overlap_request())
        .map(|d| d.with_identity_provider(dir.entra().map(idp_target)))
    }

    /// Pushes every new token to the identity provider at `target`. A planned rotation then always
    /// keeps the previous token for an overlap (the identity provider still holds it until the
    /// push): `spec.rotationOverlap`, or [`DEFAULT_IDP_OVERLAP`] when unset.
    pub fn with_identity_provider(mut self, target: Option<String>) -> Desired {
        if target.is_some() && self.rotation_overlap.is_none() {
            self.rotation_overlap = Some(DEFAULT_IDP_OVERLAP);
        }
        self.idp_target = target;
        self
    }

    /// Validates the parts of the spec the CRD schema cannot (duration bounds with day units, and the
    /// renewal window: see [`min_renewal_window`]).
    pub fn parse(
        rotation_generation: i64,
        token_expires_in: Option<&str>,
        renew_before: Option<&str>,
        rotation_request: Option<&str>,
    ) -> Result<Desired, SpecError> {
        let field = |field: &'static str, value: Option<&str>| -> Result<Option<TokenLifetime>, SpecError> {
            value
                .map(|v| {
                    let lifetime: TokenLifetime = v.parse().map_err(|error| SpecError::Duration { field, error })?;
                    check_token_lifetime(&lifetime).map_err(|error| SpecError::Duration { field, error })?;
                    Ok(lifetime)
                })
                .transpose()
        };
        if rotation_generation < 0 {
            return Err(SpecError::NegativeRotationGeneration(rotation_generation));
        }
        let expires_in = field("tokenExpiresIn", token_expires_in)?;
        let renew_before = field("renewBefore", renew_before)?;
        match (&expires_in, &renew_before) {
            (None, Some(_)) => return Err(SpecError::RenewBeforeWithoutExpiry),
            (Some(e), Some(r)) => {
                let window = e.as_secs().saturating_sub(r.as_secs());
                let min = min_renewal_window(e);
                if window < min {
                    return Err(SpecError::RenewalWindowTooShort { expires_in: *e, renew_before: *r, window, min });
                }
            }
            _ => {}
        }
        Ok(Desired {
            rotation_generation,
            expires_in,
            renew_before,
            rotation_request: rotation_request.map(str::to_owned),
            rotation_overlap: None,
            end_overlap_request: None,
            idp_target: None,
        })
    }

    /// Adds the rotation overlap settings: `spec.rotationOverlap` (at most a day) and the latest
    /// end-overlap request.
    pub fn with_overlap(mut self, overlap: Option<&str>, end_request: Option<&str>) -> Result<Desired, SpecError> {
        self.rotation_overlap = overlap
            .map(|v| {
                let overlap: TokenLifetime =
                    v.parse().map_err(|error| SpecError::Duration { field: "rotationOverlap", error })?;
                if overlap.as_secs() == 0 || overlap > MAX_ROTATION_OVERLAP {
                    return Err(SpecError::RotationOverlapOutOfBounds(overlap));
                }
                Ok(overlap)
            })
            .transpose()?;
        self.end_overlap_request = end_request.map(str::to_owned);
        Ok(self)
    }

    fn expires_in_canonical(&self) -> Option<String> {
        self.expires_in.as_ref().map(TokenLifetime::canonical)
    }
}

/// The overlap of a planned rotation of a directory with an identity provider and no
/// `spec.rotationOverlap`: an hour is ample for a push (seconds) and Entra's next provisioning cycle
/// (every 40 minutes), and the overlap ends as soon as Entra has succeeded with the new token.
pub const DEFAULT_IDP_OVERLAP: TokenLifetime = MIN_TOKEN_LIFETIME;

/// The shortest time a token must stand between its issue and its automatic renewal: the larger of
/// one hour and a tenth of its lifetime. `tokenExpiresIn: 3601s` with `renewBefore: 1h` would
/// otherwise renew every second, forever. The CRD's CEL rule checks the same where it can.
pub fn min_renewal_window(expires_in: &TokenLifetime) -> u64 {
    MIN_TOKEN_LIFETIME.as_secs().max(expires_in.as_secs().div_ceil(10))
}

fn seconds(s: u64) -> String {
    format!("{s}s").parse::<TokenLifetime>().map(|l| l.to_string()).unwrap_or_else(|_| format!("{s}s"))
}

/// The managed Secret as observed.
// One short-lived value per reconcile: boxing the record would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretState {
    /// No Secret of that name.
    Missing,
    /// A Secret of that name that this directory does not control (no controller ownerReference to
    /// its UID). Who controls it is deliberately not kept: the status must not tell a tenant about
    /// objects it may not be allowed to read.
    Foreign,
    /// A Secret controlled by this directory.
    Owned {
        /// Hash of `data.token`; `None` when the key is absent or empty.
        token_hash: Option<TokenHash>,
        /// The issue record from its annotations.
        record: RecordState,
    },
}

/// The issue record as read from a Secret's annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordState {
    Valid(IssueRecord),
    /// Stripped or unreadable: rebuilt from the status if the status vouches for the token.
    Absent,
    /// Readable but inconsistent (an expiry that is not issue time + lifetime): someone wrote it by hand.
    Forged(String),
    /// Readable and consistent, but not sealed with the operator's record key (see
    /// [`crate::secret::seal`]): written by someone else, or before the key existed (an upgrade), or
    /// under a key since lost. Believed only as far as the status vouches for it.
    Unsealed(IssueRecord),
}

/// What the status last said about the token, used only to tell a deleted Secret from a new directory
/// and to restore stripped annotations of a token whose hash the status already vouches for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusView {
    pub token_hash: Option<TokenHash>,
    pub record: Option<IssueRecord>,
}

/// Why a new token is issued. The names appear in Events, condition reasons and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IssueReason {
    /// First token of a new directory.
    Initial,
    RotationGenerationChanged,
    ExpirySettingChanged,
    RotationRequested,
    RenewalDue,
    /// The Secret was deleted after a token had been issued.
    SecretDeleted,
    /// The Secret lost its `token` key.
    TokenMissing,
    /// The Secret's token no longer matches the hash recorded when it was issued.
    TokenChanged,
    /// The Secret's issue record was edited (an expiry pushed out, an issue time in the future).
    RecordTampered,
}

impl IssueReason {
    pub const ALL: [IssueReason; 9] = [
        IssueReason::Initial,
        IssueReason::RotationGenerationChanged,
        IssueReason::ExpirySettingChanged,
        IssueReason::RotationRequested,
        IssueReason::RenewalDue,
        IssueReason::SecretDeleted,
        IssueReason::TokenMissing,
        IssueReason::TokenChanged,
        IssueReason::RecordTampered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IssueReason::Initial => "Initial",
            IssueReason::RotationGenerationChanged => "RotationGenerationChanged",
            IssueReason::ExpirySettingChanged => "ExpirySettingChanged",
            IssueReason::RotationRequested => "RotationRequested",
            IssueReason::RenewalDue => "RenewalDue",
            IssueReason::SecretDeleted => "SecretDeleted",
            IssueReason::TokenMissing => "TokenMissing",
            IssueReason::TokenChanged => "TokenChanged",
            IssueReason::RecordTampered => "RecordTampered",
        }
    }

    pub fn parse(s: &str) -> Option<IssueReason> {
        IssueReason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Re-issues that happen because something outside the spec broke the token: the old plaintext is
    /// gone for good and the identity provider must be updated, so they are Warnings.
    pub fn is_repair(self) -> bool {
        matches!(
            self,
            IssueReason::SecretDeleted
                | IssueReason::TokenMissing
                | IssueReason::TokenChanged
                | IssueReason::RecordTampered
        )
    }

    /// Issues nobody asked for in the spec: renewals and repairs. Only these are rate-limited (see
    /// [`throttle`]); a first token and the rotations a user requests are always immediate.
    pub fn is_automatic(self) -> bool {
        self == IssueReason::RenewalDue || self.is_repair()
    }

    pub fn describe(self) -> &'static str {
        match self {
            IssueReason::Initial => "issued the first token",
            IssueReason::RotationGenerationChanged => "rotated the token: spec.rotationGeneration changed",
            IssueReason::ExpirySettingChanged => "rotated the token: spec.tokenExpiresIn changed",
            IssueReason::RotationRequested => {
                "rotated the token: requested with the scim.tokenops.dev/rotate annotation"
            }
            IssueReason::RenewalDue => "rotated the token: it was due for renewal (spec.renewBefore)",
            IssueReason::SecretDeleted => "re-issued the token: its Secret was deleted; the old token is unrecoverable",
            IssueReason::TokenMissing => {
                "re-issued the token: its Secret had no token key; the old token is unrecoverable"
            }
            IssueReason::TokenChanged => "re-issued the token: the Secret's token was changed outside the operator",
            IssueReason::RecordTampered => {
                "re-issued the token: the issue record on its Secret was edited outside the operator"
            }
        }
    }
}

/// The outcome of the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The spec cannot be acted on; nothing is written but the status.
    InvalidSpec(SpecError),
    /// The Secret belongs to someone else: never touch it.
    Conflict,
    /// Issue a new token and write it, with its record, to the Secret.
    Issue(Issue),
    /// An automatic issue that would come too soon after the previous one (see [`throttle`]): wait
    /// until `until`, then decide again.
    Deferred { reason: IssueReason, last_issued_at: Timestamp, until: Timestamp },
    /// The Secret's token stands. `restore_record` is set when the record on the Secret must be
    /// rewritten: its annotations were stripped (and are rebuilt from the status, which vouches for
    /// the same token hash), or an overlap was ended early (`overlap_ended`).
    Keep { record: IssueRecord, restore_record: bool, expired: bool, overlap_ended: bool },
}

impl Decision {
    /// The reason of a token this decision issues or defers.
    pub fn issue_reason(&self) -> Option<IssueReason> {
        match self {
            Decision::Issue(issue) => Some(issue.reason),
            Decision::Deferred { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

/// A new token to issue: why, and what its record says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    pub reason: IssueReason,
    /// The token it replaces, kept valid for the rotation overlap (see [`overlap`]).
    pub previous: Option<PreviousToken>,
    desired: Desired,
    now: Timestamp,
}

impl Issue {
    fn new(desired: &Desired, reason: IssueReason, secret: &SecretState, now: Timestamp) -> Issue {
        Issue { reason, previous: overlap(desired, reason, secret, now), desired: desired.clone(), now }
    }

    /// The record to write with the new token. The token is generated only once the decision stands,
    /// so its hash comes last.
    pub fn record(&self, token_hash: TokenHash) -> IssueRecord {
        IssueRecord { previous: self.previous.clone(), ..new_record(&self.desired, token_hash, self.reason, self.now) }
    }
}

/// Decides what to do with a directory's token, before throttling.
fn decide(
    desired: Result<&Desired, &SpecError>,
    status: &StatusView,
    secret: &SecretState,
    now: Timestamp,
) -> Decision {
    let desired = match desired {
        Ok(d) => d,
        Err(error) => return Decision::InvalidSpec(error.clone()),
    };
    let issue = |reason| Decision::Issue(Issue::new(desired, reason, secret, now));
    let (token_hash, record) = match secret {
        SecretState::Foreign => return Decision::Conflict,
        SecretState::Missing if status.token_hash.is_some() => {
            return issue(IssueReason::SecretDeleted);
        }
        SecretState::Missing => return issue(IssueReason::Initial),
        SecretState::Owned { token_hash: None, .. } => {
            return issue(IssueReason::TokenMissing);
        }
        SecretState::Owned { token_hash: Some(hash), record } => (hash, record),
    };

    let (record, restore_record) = match record {
        RecordState::Valid(record) if &record.token_hash != token_hash => {
            return issue(IssueReason::TokenChanged);
        }
        // An issue time in the future would postpone renewal and expiry at will.
        RecordState::Valid(record) if record.issued_at > now.saturating_add(MAX_CLOCK_SKEW).expect("in range") => {
            return issue(IssueReason::RecordTampered);
        }
        RecordState::Valid(record) => (record.clone(), false),
        RecordState::Forged(_) => return issue(IssueReason::RecordTampered),
        // Not sealed by us: re-sealed as the status's record if the status says the same, else a
        // record someone else wrote (a token of their choosing with its hash, a pushed-out expiry, a
        // revived or planted previous token) and the token is replaced.
        RecordState::Unsealed(record) => match &status.record {
            Some(from_status) if &record.token_hash == token_hash && vouches(from_status, record, now) => {
                (from_status.clone(), true)
            }
            _ => return issue(IssueReason::RecordTampered),
        },
        // Annotations stripped: the token is still ours if the status vouches for exactly this hash.
        RecordState::Absent => match &status.record {
            Some(from_status) if &from_status.token_hash == token_hash => (from_status.clone(), true),
            _ => return issue(IssueReason::TokenChanged),
        },
    };

    if record.rotation_generation != desired.rotation_generation {
        return issue(IssueReason::RotationGenerationChanged);
    }
    if record.expires_in != desired.expires_in_canonical() {
        return issue(IssueReason::ExpirySettingChanged);
    }
    if desired.rotation_request.is_some() && desired.rotation_request != record.rotation_request {
        return issue(IssueReason::RotationRequested);
    }
    if let Some(renew_at) = renewal_time(desired, &record)
        && now >= renew_at
    {
        return issue(IssueReason::RenewalDue);
    }
    keep(desired, record, restore_record, now)
}

/// The Secret's token stands: whether it has expired, and the record as it must read now.
fn keep(desired: &Desired, record: IssueRecord, restore_record: bool, now: Timestamp) -> Decision {
    let expired = record.expires_at.is_some_and(|at| now >= at);
    // A new end-overlap request drops the previous token from the record (and so from the status and
    // the verifier) now, rather than at the end of the window.
    let overlap_ended = record.previous.is_some()
        && desired.end_overlap_request.is_some()
        && desired.end_overlap_request != record.end_overlap_request;
    let record = if overlap_ended {
        IssueRecord { previous: None, end_overlap_request: desired.end_overlap_request.clone(), ..record }
    } else {
        record
    };
    // A previous token lives no longer than the overlap the spec allows now: none without one.
    let bounded = bound_previous(desired, &record);
    let shortened = bounded.previous != record.previous;
    Decision::Keep {
        record: bounded,
        restore_record: restore_record || overlap_ended || shortened,
        expired,
        overlap_ended,
    }
}

/// Whether the status's record (which tenants cannot write) says what an unsealed record says about
/// everything that decides a token's fate. The reason and the end-overlap request are not compared
/// (the status does not carry the latter); an overlap that has ended is no longer compared either.
fn vouches(from_status: &IssueRecord, record: &IssueRecord, now: Timestamp) -> bool {
    let live = |r: &IssueRecord| r.previous.clone().filter(|p| p.valid_until > now);
    from_status.token_hash == record.token_hash
        && from_status.rotation_generation == record.rotation_generation
        && from_status.rotation_request == record.rotation_request
        && from_status.issued_at == record.issued_at
        && from_status.expires_at == record.expires_at
        && live(from_status) == live(record)
}

/// The record with its previous token cut to what the spec allows: dropped without
/// `spec.rotationOverlap`, ended at most that long after the issue otherwise.
pub fn bound_previous(desired: &Desired, record: &IssueRecord) -> IssueRecord {
    let previous = record.previous.as_ref().and_then(|previous| {
        let window = desired.rotation_overlap.as_ref()?;
        let latest = record.issued_at.saturating_add(window.as_signed_duration()).expect("in range");
        Some(PreviousToken { token_hash: previous.token_hash.clone(), valid_until: previous.valid_until.min(latest) })
    });
    IssueRecord { previous, ..record.clone() }
}

/// The overlap a new token opens for the one it replaces: only for rotations somebody planned (a spec
/// change, a request, a renewal) and only with `spec.rotationOverlap` set. A repair never opens one:
/// a token that may have leaked must die at once. The window never outlives the old token's expiry.
fn overlap(desired: &Desired, reason: IssueReason, secret: &SecretState, now: Timestamp) -> Option<PreviousToken> {
    let window = desired.rotation_overlap.as_ref()?;
    if reason.is_repair() || reason == IssueReason::Initial {
        return None;
    }
    let SecretState::Owned { token_hash: Some(current), record: RecordState::Valid(record) } = secret else {
        return None;
    };
    if &record.token_hash != current {
        return None;
    }
    let now = Timestamp::from_second(now.as_second()).expect("a valid timestamp truncated stays valid");
    let end = now.saturating_add(window.as_signed_duration()).expect("a SignedDuration never fails saturating_add");
    let valid_until = record.expires_at.map_or(end, |expiry| end.min(expiry));
    (valid_until > now).then(|| PreviousToken { token_hash: current.clone(), valid_until })
}

/// Rate-limits automatic issues: a renewal or repair within `min_interval` of the previous issue is
/// deferred until the interval has passed. Whatever a spec says and whatever another writer does to
/// the Secret (a mutating webhook or a tool rewriting `data.token` after every write), the operator
/// then issues at most one token per directory per interval by itself. Requested issues pass.
///
/// The previous issue time is the latest of the Secret's record and the status that is not in the
/// future (a forged future time must not hold a repair back).
fn throttle(
    decision: Decision,
    status: &StatusView,
    secret: &SecretState,
    now: Timestamp,
    min_interval: SignedDuration,
) -> Decision {
    let Decision::Issue(Issue { reason, .. }) = decision else { return decision };
    if !reason.is_automatic() {
        return decision;
    }
    let from_secret = match secret {
        SecretState::Owned { record: RecordState::Valid(r), .. } => Some(r.issued_at),
        _ => None,
    };
    let from_status = status.record.as_ref().map(|r| r.issued_at);
    let Some(last_issued_at) = [from_secret, from_status].into_iter().flatten().filter(|t| *t <= now).max() else {
        return decision;
    };
    match last_issued_at.checked_add(min_interval) {
        Ok(until) if now < until => Decision::Deferred { reason, last_issued_at, until },
        _ => decision,
    }
}

/// The record without its previous token once that token's window has ended.
pub fn with_live_overlap(record: &IssueRecord, now: Timestamp) -> IssueRecord {
    IssueRecord { previous: record.previous.clone().filter(|p| p.valid_until > now), ..record.clone() }
}

/// When a token must be renewed, if `renewBefore` is set and the token expires.
pub fn renewal_time(desired: &Desired, record: &IssueRecord) -> Option<Timestamp> {
    record.expires_at?.checked_sub(desired.renew_before.as_ref()?.as_signed_duration()).ok()
}

/// The next instant at which the decision or the status can change by itself (renewal, expiry, the
/// end of an overlap, when the status drops the previous token), so the controller requeues exactly
/// then instead of polling.
pub fn next_wakeup(desired: &Desired, record: &IssueRecord, now: Timestamp) -> Option<Timestamp> {
    let overlap_end = record.previous.as_ref().map(|p| p.valid_until);
    [renewal_time(desired, record), record.expires_at, overlap_end].into_iter().flatten().filter(|t| *t > now).min()
}

/// The record of a token issued now for `desired`.
pub fn new_record(desired: &Desired, token_hash: TokenHash, reason: IssueReason, now: Timestamp) -> IssueRecord {
    // Whole seconds: RFC 3339 timestamps in status and annotations carry no fractions, and the record
    // must read back exactly as written.
    let issued_at = Timestamp::from_second(now.as_second()).expect("a valid timestamp truncated stays valid");
    let expires_at = desired.expires_in.as_ref().map(|lifetime| {
        issued_at.saturating_add(lifetime.as_signed_duration()).expect("a SignedDuration never fails saturating_add")
    });
    IssueRecord {
        token_hash,
        rotation_generation: desired.rotation_generation,
        expires_in: desired.expires_in_canonical(),
        rotation_request: desired.rotation_request.clone(),
        issued_at,
        expires_at,
        reason,
        previous: None,
        end_overlap_request: desired.end_overlap_request.clone(),
        idp: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }
    fn hash(c: char) -> TokenHash {
        TokenHash::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }
    fn desired(generation: i64, expires_in: Option<&str>, renew: Option<&str>, request: Option<&str>) -> Desired {
        Desired::parse(generation, expires_in, renew, request).unwrap()
    }
    fn record(d: &Desired, h: TokenHash, issued: &str) -> IssueRecord {
        new_record(d, h, IssueReason::Initial, ts(issued))
    }
    fn owned(h: Option<TokenHash>, record: Option<IssueRecord>) -> SecretState {
        SecretState::Owned { token_hash: h, record: record.map_or(RecordState::Absent, RecordState::Valid) }
    }
    fn unsealed(h: Option<TokenHash>, record: IssueRecord) -> SecretState {
        SecretState::Owned { token_hash: h, record: RecordState::Unsealed(record) }
    }
    fn with_previous(r: &IssueRecord, h: TokenHash, until: &str) -> IssueRecord {
        IssueRecord { previous: Some(PreviousToken { token_hash: h, valid_until: ts(until) }), ..r.clone() }
    }
    const T0: &str = "2026-01-01T00:00:00Z";

    /// What the decision table expects: an issue for a reason (the record it carries is
    /// `evaluate`'s table), or exactly this decision.
    #[derive(Debug, PartialEq)]
    #[allow(clippy::large_enum_variant)]
    enum Want {
        Issue(IssueReason),
        Is(Decision),
    }

    /// One situation of the decision table, named by what it is, and the decision it must lead to.
    struct Case<'a> {
        name: &'a str,
        desired: Result<Desired, SpecError>,
        status: StatusView,
        secret: SecretState,
        now: &'a str,
        want: Want,
    }

    fn check(cases: Vec<Case>) {
        for Case { name, desired, status, secret, now, want } in cases {
            let got = match decide(desired.as_ref(), &status, &secret, ts(now)) {
                Decision::Issue(issue) => Want::Issue(issue.reason),
                other => Want::Is(other),
            };
            assert_eq!(got, want, "case {name:?}");
        }
    }

    fn base() -> Desired {
        desired(0, None, None, None)
    }
    fn with_expiry() -> Desired {
        desired(0, Some("90d"), None, None)
    }
    fn renewing() -> Desired {
        desired(0, Some("90d"), Some("7d"), None)
    }
    /// The records of a token `a` issued at T0 for each of the three.
    fn rec() -> IssueRecord {
        record(&base(), hash('a'), T0)
    }
    fn rec_exp() -> IssueRecord {
        record(&with_expiry(), hash('a'), T0)
    }
    fn rec_renew() -> IssueRecord {
        record(&renewing(), hash('a'), T0)
    }
    fn status_with(r: &IssueRecord) -> StatusView {
        StatusView { token_hash: Some(r.token_hash.clone()), record: Some(r.clone()) }
    }
    fn kept(r: &IssueRecord, restore_record: bool, expired: bool) -> Decision {
        Decision::Keep { record: r.clone(), restore_record, expired, overlap_ended: false }
    }

    /// What the Secret holds (or that there is none), and an invalid spec before everything.
    #[test]
    fn decides_on_what_the_secret_holds() {
        check(vec![
            Case {
                name: "new directory",
                desired: Ok(base()),
                status: StatusView::default(),
                secret: SecretState::Missing,
                now: T0,
                want: Want::Issue(IssueReason::Initial),
            },
            Case {
                name: "secret deleted after issue",
                desired: Ok(base()),
                status: status_with(&rec()),
                secret: SecretState::Missing,
                now: T0,
                want: Want::Issue(IssueReason::SecretDeleted),
            },
            Case {
                name: "foreign secret",
                desired: Ok(base()),
                status: StatusView::default(),
                secret: SecretState::Foreign,
                now: T0,
                want: Want::Is(Decision::Conflict),
            },
            Case {
                name: "token key missing",
                desired: Ok(base()),
                status: status_with(&rec()),
                secret: owned(None, Some(rec())),
                now: T0,
                want: Want::Issue(IssueReason::TokenMissing),
            },
            Case {
                name: "token edited by hand",
                desired: Ok(base()),
                status: status_with(&rec()),
                secret: owned(Some(hash('b')), Some(rec())),
                now: T0,
                want: Want::Issue(IssueReason::TokenChanged),
            },
            Case {
                name: "steady state",
                desired: Ok(base()),
                status: status_with(&rec()),
                secret: owned(Some(hash('a')), Some(rec())),
                now: T0,
                want: Want::Is(kept(&rec(), false, false)),
            },
            Case {
                name: "invalid spec wins over everything",
                desired: Err(SpecError::RenewBeforeWithoutExpiry),
                status: StatusView::default(),
                secret: SecretState::Missing,
                now: T0,
                want: Want::Is(Decision::InvalidSpec(SpecError::RenewBeforeWithoutExpiry)),
            },
        ]);
    }

    /// A crash between the Secret write and the status write, and annotations stripped from the Secret.
    #[test]
    fn adopts_the_secret_after_a_crash_and_restores_stripped_annotations() {
        check(vec![
            Case {
                name: "crash after Secret write: status empty, Secret adopted",
                desired: Ok(base()),
                status: StatusView::default(),
                secret: owned(Some(hash('a')), Some(rec())),
                now: T0,
                want: Want::Is(kept(&rec(), false, false)),
            },
            Case {
                name: "crash after rotation: stale status, Secret adopted",
                desired: Ok(desired(1, None, None, None)),
                status: status_with(&rec()),
                secret: owned(Some(hash('b')), Some(record(&desired(1, None, None, None), hash('b'), T0))),
                now: T0,
                want: Want::Is(kept(&record(&desired(1, None, None, None), hash('b'), T0), false, false)),
            },
            Case {
                name: "annotations stripped, status vouches",
                desired: Ok(base()),
                status: status_with(&rec()),
                secret: owned(Some(hash('a')), None),
                now: T0,
                want: Want::Is(kept(&rec(), true, false)),
            },
            Case {
                name: "annotations stripped, unknown token",
                desired: Ok(base()),
                status: status_with(&rec()),
                secret: owned(Some(hash('b')), None),
                now: T0,
                want: Want::Issue(IssueReason::TokenChanged),
            },
        ]);
    }

    /// A record someone edited: an expiry pushed out, an issue time in the future.
    #[test]
    fn replaces_a_token_whose_record_was_forged() {
        check(vec![
            Case {
                name: "forged record (expiry pushed out)",
                desired: Ok(with_expiry()),
                status: status_with(&rec_exp()),
                secret: SecretState::Owned {
                    token_hash: Some(hash('a')),
                    record: RecordState::Forged("expires-at is not issued-at + token-expires-in".into()),
                },
                now: T0,
                want: Want::Issue(IssueReason::RecordTampered),
            },
            Case {
                name: "issue time in the future",
                desired: Ok(with_expiry()),
                status: status_with(&rec_exp()),
                secret: owned(Some(hash('a')), Some(record(&with_expiry(), hash('a'), "2026-01-01T00:01:01Z"))),
                now: T0,
                want: Want::Issue(IssueReason::RecordTampered),
            },
            Case {
                name: "issue time within the clock skew",
                desired: Ok(with_expiry()),
                status: status_with(&rec_exp()),
                secret: owned(Some(hash('a')), Some(record(&with_expiry(), hash('a'), "2026-01-01T00:01:00Z"))),
                now: T0,
                want: Want::Is(kept(&record(&with_expiry(), hash('a'), "2026-01-01T00:01:00Z"), false, false)),
            },
        ]);
    }

    /// The spec and the rotation request against what the token was issued for.
    #[test]
    fn rotates_on_spec_changes_and_requests() {
        check(vec![
            Case {
                name: "rotation generation bumped",
                desired: Ok(desired(1, None, None, None)),
                status: status_with(&rec()),
                secret: owned(Some(hash('a')), Some(rec())),
                now: T0,
                want: Want::Issue(IssueReason::RotationGenerationChanged),
            },
            Case {
                name: "expiry added",
                desired: Ok(with_expiry()),
                status: status_with(&rec()),
                secret: owned(Some(hash('a')), Some(rec())),
                now: T0,
                want: Want::Issue(IssueReason::ExpirySettingChanged),
            },
            Case {
                name: "expiry removed",
                desired: Ok(base()),
                status: status_with(&rec_exp()),
                secret: owned(Some(hash('a')), Some(rec_exp())),
                now: T0,
                want: Want::Issue(IssueReason::ExpirySettingChanged),
            },
            Case {
                name: "expiry changed",
                desired: Ok(desired(0, Some("180d"), None, None)),
                status: status_with(&rec_exp()),
                secret: owned(Some(hash('a')), Some(rec_exp())),
                now: T0,
                want: Want::Issue(IssueReason::ExpirySettingChanged),
            },
            Case {
                name: "expiry rewritten in another unit is no change",
                desired: Ok(desired(0, Some("2160h"), None, None)),
                status: status_with(&rec_exp()),
                secret: owned(Some(hash('a')), Some(rec_exp())),
                now: T0,
                want: Want::Is(kept(&rec_exp(), false, false)),
            },
            Case {
                name: "rotation requested",
                desired: Ok(desired(0, None, None, Some("r1"))),
                status: status_with(&rec()),
                secret: owned(Some(hash('a')), Some(rec())),
                now: T0,
                want: Want::Issue(IssueReason::RotationRequested),
            },
            Case {
                name: "rotation request already handled",
                desired: Ok(desired(0, None, None, Some("r1"))),
                status: StatusView::default(),
                secret: owned(Some(hash('a')), Some(record(&desired(0, None, None, Some("r1")), hash('a'), T0))),
                now: T0,
                want: Want::Is(kept(&record(&desired(0, None, None, Some("r1")), hash('a'), T0), false, false)),
            },
            Case {
                name: "rotation request annotation removed later",
                desired: Ok(base()),
                status: StatusView::default(),
                secret: owned(Some(hash('a')), Some(record(&desired(0, None, None, Some("r1")), hash('a'), T0))),
                now: T0,
                want: Want::Is(kept(&record(&desired(0, None, None, Some("r1")), hash('a'), T0), false, false)),
            },
        ]);
    }

    /// Renewal and expiry, to the second.
    #[test]
    fn renews_and_expires_on_time() {
        check(vec![
            Case {
                name: "not yet due for renewal",
                desired: Ok(renewing()),
                status: status_with(&rec_renew()),
                secret: owned(Some(hash('a')), Some(rec_renew())),
                now: "2026-03-24T23:59:59Z",
                want: Want::Is(kept(&rec_renew(), false, false)),
            },
            Case {
                name: "due for renewal",
                desired: Ok(renewing()),
                status: status_with(&rec_renew()),
                secret: owned(Some(hash('a')), Some(rec_renew())),
                now: "2026-03-25T00:00:00Z",
                want: Want::Issue(IssueReason::RenewalDue),
            },
            Case {
                name: "expired without renewal",
                desired: Ok(with_expiry()),
                status: status_with(&rec_exp()),
                secret: owned(Some(hash('a')), Some(rec_exp())),
                now: "2026-04-01T00:00:00Z",
                want: Want::Is(kept(&rec_exp(), false, true)),
            },
            Case {
                name: "one second before expiry",
                desired: Ok(with_expiry()),
                status: status_with(&rec_exp()),
                secret: owned(Some(hash('a')), Some(rec_exp())),
                now: "2026-03-31T23:59:59Z",
                want: Want::Is(kept(&rec_exp(), false, false)),
            },
        ]);
    }

    /// Records without the operator's seal.
    #[test]
    fn believes_an_unsealed_record_only_as_far_as_the_status_vouches() {
        check(vec![
            Case {
                name: "unsealed record the status vouches for (an upgrade, a lost key): re-sealed, no new token",
                desired: Ok(with_expiry()),
                status: status_with(&rec_exp()),
                secret: unsealed(Some(hash('a')), rec_exp()),
                now: T0,
                want: Want::Is(kept(&rec_exp(), true, false)),
            },
            Case {
                name: "unsealed record with the issue time pushed forward",
                desired: Ok(with_expiry()),
                status: status_with(&rec_exp()),
                secret: unsealed(Some(hash('a')), record(&with_expiry(), hash('a'), "2026-01-01T00:00:50Z")),
                now: T0,
                want: Want::Issue(IssueReason::RecordTampered),
            },
            Case {
                name: "unsealed record no status vouches for (a planted Secret record)",
                desired: Ok(base()),
                status: StatusView::default(),
                secret: unsealed(Some(hash('a')), rec()),
                now: T0,
                want: Want::Issue(IssueReason::RecordTampered),
            },
            Case {
                name: "unsealed record naming a token of someone's choosing, with its hash",
                desired: Ok(base()),
                status: status_with(&rec()),
                secret: unsealed(Some(hash('b')), record(&base(), hash('b'), T0)),
                now: T0,
                want: Want::Issue(IssueReason::RecordTampered),
            },
            Case {
                name: "unsealed record with a previous token planted",
                desired: Ok(base()),
                status: status_with(&rec()),
                secret: unsealed(Some(hash('a')), with_previous(&rec(), hash('c'), "2026-01-01T01:00:00Z")),
                now: T0,
                want: Want::Issue(IssueReason::RecordTampered),
            },
        ]);
    }

    /// A previous token on a sealed record against the overlap the spec allows now.
    #[test]
    fn bounds_a_sealed_previous_token_by_the_spec() {
        check(vec![
            Case {
                name: "sealed previous token, but the spec has no rotationOverlap (any more): dropped",
                desired: Ok(base()),
                status: status_with(&rec()),
                secret: owned(Some(hash('a')), Some(with_previous(&rec(), hash('c'), "2026-01-01T01:00:00Z"))),
                now: T0,
                want: Want::Is(kept(&rec(), true, false)),
            },
            Case {
                name: "sealed previous token beyond the spec's overlap: cut to it",
                desired: Ok(base().with_overlap(Some("10m"), None).unwrap()),
                status: status_with(&rec()),
                secret: owned(Some(hash('a')), Some(with_previous(&rec(), hash('c'), "2026-01-01T01:00:00Z"))),
                now: T0,
                want: Want::Is(kept(&with_previous(&rec(), hash('c'), "2026-01-01T00:10:00Z"), true, false)),
            },
            Case {
                name: "sealed previous token within the spec's overlap: kept as is",
                desired: Ok(base().with_overlap(Some("1h"), None).unwrap()),
                status: status_with(&rec()),
                secret: owned(Some(hash('a')), Some(with_previous(&rec(), hash('c'), "2026-01-01T01:00:00Z"))),
                now: T0,
                want: Want::Is(kept(&with_previous(&rec(), hash('c'), "2026-01-01T01:00:00Z"), false, false)),
            },
        ]);
    }

    #[test]
    fn every_issue_reason_round_trips_through_its_name() {
        for reason in IssueReason::ALL {
            assert_eq!(IssueReason::parse(reason.as_str()), Some(reason));
        }
    }

    #[test]
    fn desired_rejects_what_the_schema_cannot() {
        /// A spec with these durations, and what the error names.
        struct Rejected {
            expires_in: Option<&'static str>,
            renew_before: Option<&'static str>,
            says: &'static str,
        }
        for Rejected { expires_in, renew_before, says } in [
            Rejected { expires_in: Some("30m"), renew_before: None, says: "spec.tokenExpiresIn" },
            Rejected { expires_in: Some("3651d"), renew_before: None, says: "spec.tokenExpiresIn" },
            Rejected { expires_in: Some("10x"), renew_before: None, says: "spec.tokenExpiresIn" },
            Rejected { expires_in: Some("1.5s"), renew_before: None, says: "whole seconds" },
            Rejected { expires_in: Some("90d"), renew_before: Some("90d"), says: "must be at least 9d" },
            Rejected { expires_in: Some("90d"), renew_before: Some("100d"), says: "leaves 0s between" },
            Rejected { expires_in: None, renew_before: Some("7d"), says: "requires spec.tokenExpiresIn" },
            Rejected { expires_in: Some("90d"), renew_before: Some("5m"), says: "spec.renewBefore" },
            // The storms: a renewal a second after each issue, or right at it.
            Rejected {
                expires_in: Some("3601s"),
                renew_before: Some("1h"),
                says: "leaves 1s between a token's issue and its renewal",
            },
            Rejected { expires_in: Some("2h"), renew_before: Some("1h1s"), says: "must be at least 1h" },
            Rejected { expires_in: Some("3600.000000001s"), renew_before: Some("1h"), says: "whole seconds" },
            // 10% of the lifetime once that is more than an hour.
            Rejected { expires_in: Some("100d"), renew_before: Some("90d1s"), says: "must be at least 10d" },
        ] {
            let err = Desired::parse(0, expires_in, renew_before, None).unwrap_err().to_string();
            assert!(err.contains(says), "{expires_in:?}/{renew_before:?}: {err}");
        }
        assert!(Desired::parse(-1, None, None, None).unwrap_err().to_string().contains("rotationGeneration"));
        assert!(Desired::parse(3, Some("90d"), Some("7d"), Some("x")).is_ok());
        // The edges of the renewal window are allowed.
        assert!(Desired::parse(0, Some("2h"), Some("1h"), None).is_ok());
        assert!(Desired::parse(0, Some("100d"), Some("90d"), None).is_ok());
        assert_eq!(min_renewal_window(&"3650d".parse().unwrap()), 365 * 86_400);
        assert_eq!(min_renewal_window(&"1h".parse().unwrap()), 3600);
    }

    #[test]
    fn records_use_whole_seconds_and_compute_expiry() {
        let d = desired(2, Some("1h30m"), None, Some("req"));
        let r = new_record(&d, hash('c'), IssueReason::RotationRequested, ts("2026-01-01T00:00:00.75Z"));
        assert_eq!(r.issued_at, ts("2026-01-01T00:00:00Z"));
        assert_eq!(r.expires_at, Some(ts("2026-01-01T01:30:00Z")));
        assert_eq!(r.expires_in.as_deref(), Some("5400s"));
        assert_eq!(r.rotation_generation, 2);
        assert_eq!(r.rotation_request.as_deref(), Some("req"));
        assert_eq!(new_record(&desired(0, None, None, None), hash('c'), IssueReason::Initial, ts(T0)).expires_at, None);
    }

    #[test]
    fn automatic_issues_are_throttled_requested_ones_are_not() {
        let d = desired(0, Some("90d"), None, None);
        let rec = record(&d, hash('a'), T0);
        let status = StatusView { token_hash: Some(hash('a')), record: Some(rec.clone()) };
        let secret = owned(Some(hash('b')), Some(rec.clone()));
        let minute = SignedDuration::from_secs(60);
        let issue = |reason| Decision::Issue(Issue { reason, previous: None, desired: d.clone(), now: ts(T0) });
        let deferred = |reason, until: &str| Decision::Deferred { reason, last_issued_at: ts(T0), until: ts(until) };
        struct Case<'a> {
            name: &'a str,
            decision: Decision,
            status: &'a StatusView,
            secret: &'a SecretState,
            now: &'a str,
            want: Decision,
        }
        let none = StatusView::default();
        let future = owned(Some(hash('a')), Some(record(&d, hash('a'), "2099-01-01T00:00:00Z")));
        let cases = vec![
            Case {
                name: "repair right after an issue waits",
                decision: issue(IssueReason::TokenChanged),
                status: &status,
                secret: &secret,
                now: "2026-01-01T00:00:30Z",
                want: deferred(IssueReason::TokenChanged, "2026-01-01T00:01:00Z"),
            },
            Case {
                name: "repair once the interval has passed",
                decision: issue(IssueReason::TokenChanged),
                status: &status,
                secret: &secret,
                now: "2026-01-01T00:01:00Z",
                want: issue(IssueReason::TokenChanged),
            },
            Case {
                name: "renewal waits too",
                decision: issue(IssueReason::RenewalDue),
                status: &status,
                secret: &secret,
                now: "2026-01-01T00:00:01Z",
                want: deferred(IssueReason::RenewalDue, "2026-01-01T00:01:00Z"),
            },
            Case {
                name: "Secret deleted: the status knows the last issue",
                decision: issue(IssueReason::SecretDeleted),
                status: &status,
                secret: &SecretState::Missing,
                now: "2026-01-01T00:00:10Z",
                want: deferred(IssueReason::SecretDeleted, "2026-01-01T00:01:00Z"),
            },
            Case {
                name: "requested rotation is immediate",
                decision: issue(IssueReason::RotationRequested),
                status: &status,
                secret: &secret,
                now: "2026-01-01T00:00:01Z",
                want: issue(IssueReason::RotationRequested),
            },
            Case {
                name: "spec change is immediate",
                decision: issue(IssueReason::RotationGenerationChanged),
                status: &status,
                secret: &secret,
                now: "2026-01-01T00:00:01Z",
                want: issue(IssueReason::RotationGenerationChanged),
            },
            Case {
                name: "first token is immediate",
                decision: issue(IssueReason::Initial),
                status: &none,
                secret: &SecretState::Missing,
                now: T0,
                want: issue(IssueReason::Initial),
            },
            Case {
                name: "a future issue time holds nothing back",
                decision: issue(IssueReason::RecordTampered),
                status: &none,
                secret: &future,
                now: T0,
                want: issue(IssueReason::RecordTampered),
            },
            Case {
                name: "keep passes through",
                decision: keep_of(&rec),
                status: &status,
                secret: &secret,
                now: T0,
                want: keep_of(&rec),
            },
        ];
        for Case { name, decision, status, secret, now, want } in cases {
            assert_eq!(throttle(decision, status, secret, ts(now), minute), want, "case {name:?}");
        }
    }

    #[test]
    fn only_renewals_and_repairs_are_automatic() {
        for reason in IssueReason::ALL {
            let requested = matches!(
                reason,
                IssueReason::Initial
                    | IssueReason::RotationGenerationChanged
                    | IssueReason::ExpirySettingChanged
                    | IssueReason::RotationRequested
            );
            assert_eq!(reason.is_automatic(), !requested, "{reason:?}");
        }
    }

    #[test]
    fn evaluate_throttles_and_draws_up_the_record() {
        let overlapping = desired(0, Some("90d"), Some("7d"), None).with_overlap(Some("1h"), None).unwrap();
        let requested = desired(0, Some("90d"), Some("7d"), Some("r1")).with_overlap(Some("1h"), None).unwrap();
        let rec = record(&overlapping, hash('a'), T0);
        let status = StatusView { token_hash: Some(hash('a')), record: Some(rec.clone()) };
        let secret = owned(Some(hash('a')), Some(rec.clone()));
        let changed = owned(Some(hash('b')), Some(rec.clone()));
        let previous = |until: &str| Some(PreviousToken { token_hash: hash('a'), valid_until: ts(until) });
        struct Case<'a> {
            name: &'a str,
            desired: Result<Desired, SpecError>,
            secret: &'a SecretState,
            now: &'a str,
            /// The reason and the previous token of the record to write, or exactly this decision.
            want: Result<(IssueReason, Option<PreviousToken>), Decision>,
        }
        let cases = vec![
            Case {
                name: "requested rotation right after an issue: at once, the old token kept for the overlap",
                desired: Ok(requested.clone()),
                secret: &secret,
                now: "2026-01-01T00:00:10.5Z",
                want: Ok((IssueReason::RotationRequested, previous("2026-01-01T01:00:10Z"))),
            },
            Case {
                name: "renewal due: issued with an overlap",
                desired: Ok(overlapping.clone()),
                secret: &secret,
                now: "2026-03-25T00:00:00Z",
                want: Ok((IssueReason::RenewalDue, previous("2026-03-25T01:00:00Z"))),
            },
            Case {
                name: "renewal due an hour before expiry: the overlap ends with the old token",
                desired: Ok(overlapping.clone()),
                secret: &secret,
                now: "2026-03-31T23:30:00Z",
                want: Ok((IssueReason::RenewalDue, previous("2026-04-01T00:00:00Z"))),
            },
            Case {
                name: "token changed right after an issue: deferred, whatever the overlap",
                desired: Ok(overlapping.clone()),
                secret: &changed,
                now: "2026-01-01T00:00:30Z",
                want: Err(Decision::Deferred {
                    reason: IssueReason::TokenChanged,
                    last_issued_at: ts(T0),
                    until: ts("2026-01-01T00:01:00Z"),
                }),
            },
            Case {
                name: "token changed once the interval has passed: replaced with no overlap",
                desired: Ok(overlapping.clone()),
                secret: &changed,
                now: "2026-01-01T00:01:00Z",
                want: Ok((IssueReason::TokenChanged, None)),
            },
            Case {
                name: "invalid spec: nothing else is read",
                desired: Err(SpecError::RenewBeforeWithoutExpiry),
                secret: &changed,
                now: T0,
                want: Err(Decision::InvalidSpec(SpecError::RenewBeforeWithoutExpiry)),
            },
        ];
        for Case { name, desired, secret, now, want } in cases {
            let input = Input {
                desired,
                status: status.clone(),
                secret: secret.clone(),
                now: ts(now),
                min_issue_interval: SignedDuration::from_secs(60),
            };
            match (evaluate(&input), want) {
                (Decision::Issue(issue), Ok((reason, previous))) => {
                    let written = issue.record(hash('e'));
                    let now = Timestamp::from_second(ts(now).as_second()).unwrap();
                    assert_eq!(
                        written,
                        IssueRecord { previous, ..new_record(input.desired.as_ref().unwrap(), hash('e'), reason, now) },
                        "case {name:?}"
                    );
                }
                (got, want) => assert_eq!(Err(got), want, "case {name:?}"),
            }
        }
        assert_eq!(
            SpecError::RenewBeforeWithoutExpiry.to_string(),
            "spec.renewBefore requires spec.tokenExpiresIn",
            "the messages are what users read"
        );
    }

    #[test]
    fn planned_rotations_open_an_overlap_repairs_never() {
        let d = desired(0, Some("90d"), None, None).with_overlap(Some("1h"), None).unwrap();
        let rec = record(&d, hash('a'), T0);
        let secret = owned(Some(hash('a')), Some(rec.clone()));
        let at = |s: &str| ts(s);
        let prev = |until: &str| Some(PreviousToken { token_hash: hash('a'), valid_until: at(until) });
        let now = "2026-01-02T00:00:00.5Z";
        assert_eq!(overlap(&d, IssueReason::RotationRequested, &secret, at(now)), prev("2026-01-02T01:00:00Z"));
        assert_eq!(overlap(&d, IssueReason::RotationGenerationChanged, &secret, at(now)), prev("2026-01-02T01:00:00Z"));
        assert_eq!(overlap(&d, IssueReason::RenewalDue, &secret, at(now)), prev("2026-01-02T01:00:00Z"));
        for repair in
            [IssueReason::TokenChanged, IssueReason::SecretDeleted, IssueReason::RecordTampered, IssueReason::Initial]
        {
            assert_eq!(overlap(&d, repair, &secret, at(now)), None, "{repair:?}");
        }
        // Never past the old token's own expiry; nothing for an expired one.
        assert_eq!(
            overlap(&d, IssueReason::RotationRequested, &secret, at("2026-03-31T23:30:00Z")),
            prev("2026-04-01T00:00:00Z")
        );
        assert_eq!(overlap(&d, IssueReason::RotationRequested, &secret, at("2026-04-01T00:00:00Z")), None);
        // No overlap configured, or a Secret whose token is not the recorded one.
        let without = desired(0, Some("90d"), None, None);
        assert_eq!(overlap(&without, IssueReason::RotationRequested, &secret, at(now)), None);
        let changed = owned(Some(hash('b')), Some(rec.clone()));
        assert_eq!(overlap(&d, IssueReason::RotationRequested, &changed, at(now)), None);
        // Bounds.
        assert!(desired(0, None, None, None).with_overlap(Some("24h"), None).is_ok());
        assert!(desired(0, None, None, None).with_overlap(Some("1d"), None).is_ok());
        for bad in ["24h1s", "2d", "0s", "1.5s"] {
            let err = desired(0, None, None, None).with_overlap(Some(bad), None).unwrap_err().to_string();
            assert!(err.starts_with("spec.rotationOverlap"), "{bad}: {err}");
        }
    }

    #[test]
    fn an_identity_provider_gives_every_planned_rotation_an_overlap() {
        let plain = desired(0, Some("90d"), None, None);
        let pushed = plain.clone().with_identity_provider(Some("0a1b".into()));
        assert_eq!(pushed.rotation_overlap, Some(DEFAULT_IDP_OVERLAP));
        assert_eq!(DEFAULT_IDP_OVERLAP.as_secs(), 3600);
        let explicit =
            plain.clone().with_overlap(Some("2h"), None).unwrap().with_identity_provider(Some("0a1b".into()));
        assert_eq!(explicit.rotation_overlap.map(|o| o.as_secs()), Some(7200), "spec.rotationOverlap wins");
        let rec = record(&pushed, hash('a'), T0);
        let secret = owned(Some(hash('a')), Some(rec.clone()));
        let now = ts("2026-01-02T00:00:00Z");
        assert_eq!(
            overlap(&pushed, IssueReason::RotationRequested, &secret, now),
            Some(PreviousToken { token_hash: hash('a'), valid_until: ts("2026-01-02T01:00:00Z") })
        );
        assert_eq!(overlap(&plain, IssueReason::RotationRequested, &secret, now), None);
        assert_eq!(overlap(&pushed, IssueReason::TokenChanged, &secret, now), None, "repairs never");
        // A record that knows nothing of pushes (written before them) is kept as it is: no new token.
        assert_eq!(decide(Ok(&pushed), &StatusView::default(), &secret, now), keep_of(&rec));
    }

    #[test]
    fn a_new_end_overlap_request_ends_the_window_once() {
        let d = desired(0, None, None, None).with_overlap(Some("1h"), Some("old")).unwrap();
        let mut rec = record(&d, hash('b'), T0);
        rec.previous = Some(PreviousToken { token_hash: hash('a'), valid_until: ts("2026-01-01T01:00:00Z") });
        let secret = owned(Some(hash('b')), Some(rec.clone()));
        let status = StatusView { token_hash: Some(hash('b')), record: Some(rec.clone()) };
        // The request that was current at the rotation does not end the overlap it opened.
        assert_eq!(decide(Ok(&d), &status, &secret, ts(T0)), keep_of(&rec));
        // A new value does, once.
        let ended = d.clone().with_overlap(Some("1h"), Some("new")).unwrap();
        let want = IssueRecord { previous: None, end_overlap_request: Some("new".into()), ..rec.clone() };
        assert_eq!(
            decide(Ok(&ended), &status, &secret, ts(T0)),
            Decision::Keep { record: want.clone(), restore_record: true, expired: false, overlap_ended: true }
        );
        let after = owned(Some(hash('b')), Some(want.clone()));
        assert_eq!(decide(Ok(&ended), &status, &after, ts(T0)), keep_of(&want));
        // Without a previous token there is nothing to end and nothing to write.
        let plain = record(&d, hash('b'), T0);
        let secret = owned(Some(hash('b')), Some(plain.clone()));
        assert_eq!(decide(Ok(&ended), &status, &secret, ts(T0)), keep_of(&plain));
    }

    fn keep_of(r: &IssueRecord) -> Decision {
        Decision::Keep { record: r.clone(), restore_record: false, expired: false, overlap_ended: false }
    }

    #[test]
    fn wakeup_is_the_earliest_future_event() {
        let renewing = desired(0, Some("90d"), Some("7d"), None);
        let r = record(&renewing, hash('a'), T0);
        assert_eq!(next_wakeup(&renewing, &r, ts(T0)), Some(ts("2026-03-25T00:00:00Z")));
        assert_eq!(next_wakeup(&renewing, &r, ts("2026-03-26T00:00:00Z")), Some(ts("2026-04-01T00:00:00Z")));
        assert_eq!(next_wakeup(&renewing, &r, ts("2026-04-02T00:00:00Z")), None);
        let perpetual = desired(0, None, None, None);
        assert_eq!(next_wakeup(&perpetual, &record(&perpetual, hash('a'), T0), ts(T0)), None);
        // The end of an overlap: the status then drops the previous token.
        let overlapping = with_previous(&record(&perpetual, hash('a'), T0), hash('b'), "2026-01-01T01:00:00Z");
        assert_eq!(next_wakeup(&perpetual, &overlapping, ts(T0)), Some(ts("2026-01-01T01:00:00Z")));
        assert_eq!(with_live_overlap(&overlapping, ts("2026-01-01T00:59:59Z")), overlapping);
        assert_eq!(with_live_overlap(&overlapping, ts("2026-01-01T01:00:00Z")).previous, None);
    }

    #[test]
    fn the_target_names_the_job_and_the_base_address() {
        let entra = EntraProvisioning {
            tenant_id: "11111111-1111-1111-1111-111111111111".into(),
            service_principal_id: "22222222-2222-2222-2222-222222222222".into(),
            job_id: None,
            base_address: "https://scim.example.com/scim/v2".into(),
            auth: Default::default(),
        };
        let t = idp_target(&entra);
        assert_eq!(t.len(), 16);
        let upper = EntraProvisioning { tenant_id: entra.tenant_id.to_uppercase(), ..entra.clone() };
        assert_eq!(idp_target(&upper), t, "GUIDs compare without case");
        let moved = EntraProvisioning { base_address: "https://scim2.example.com/scim/v2".into(), ..entra.clone() };
        assert_ne!(idp_target(&moved), t);
        let mut other_auth = entra.clone();
        other_auth.auth.workload_identity = Some(crate::api::WorkloadIdentityAuth { client_id: "x".into() });
        assert_eq!(idp_target(&other_auth), t);
    }
}
