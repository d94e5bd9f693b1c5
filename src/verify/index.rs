//! The verifier's index, from token hash to directory, and the pure verification over it.
//!
//! Built only from what ScimDirectory statuses say (`tokenHash`, `tokenExpiresAt`,
//! `previousTokenHash`, `previousTokenValidUntil`): the verifier never sees a plaintext but the one
//! in the request it is checking, which it hashes and forgets.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use sha2::{Digest, Sha256};

pub use super::directory::DirectoryId;
use super::directory::WatchedDirectory;
use crate::token::{TOKEN_LEN, TOKEN_PREFIX, TokenHash, has_valid_checksum};

/// A route's directory binding that is not `<namespace>/<name>`: the proxy's configuration is wrong,
/// and its requests are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MalformedBinding;

/// Which of a directory's tokens a request used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenKind {
    Current,
    /// The token a rotation replaced, inside its overlap window.
    Previous,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Current => "current",
            TokenKind::Previous => "previous",
        }
    }
}

/// One token the index accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Credential {
    directory: Arc<DirectoryId>,
    kind: TokenKind,
    /// `None`: valid until the status says otherwise.
    valid_until: Option<Timestamp>,
}

type Digest32 = [u8; 32];

/// Token hash → directory, for every directory the verifier watches.
#[derive(Debug, Default)]
pub struct Index {
    /// Several credentials under one hash only if two statuses claim the same token: see [`owner`]
    /// for whom it authenticates.
    by_hash: HashMap<Digest32, Vec<Credential>>,
    /// The hashes each directory contributed, to replace them when its status changes.
    by_directory: HashMap<Arc<DirectoryId>, Vec<Digest32>>,
}

/// Why a request is refused with 401.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Denial {
    /// No `Authorization` header.
    Missing,
    /// Not `Bearer <token>`, or not a token of ours (prefix, length, checksum): refused without a lookup.
    Malformed,
    /// A well-formed token no directory has (never issued, rotated out, or claimed as current by two
    /// directories, or as previous by two).
    Unknown,
    /// A known token past its expiry or the end of its overlap window.
    Expired,
}

impl Denial {
    pub fn as_str(self) -> &'static str {
        match self {
            Denial::Missing => "missing",
            Denial::Malformed => "malformed",
            Denial::Unknown => "unknown",
            Denial::Expired => "expired",
        }
    }
}

/// The answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed {
        directory: Arc<DirectoryId>,
        kind: TokenKind,
    },
    /// 401.
    Denied(Denial),
    /// 403: a valid token of another directory than the route's.
    WrongDirectory {
        directory: Arc<DirectoryId>,
        expected: DirectoryId,
    },
}

/// Upper bound on an `Authorization` header worth looking at: a token is 54 characters.
pub const MAX_AUTHORIZATION_LEN: usize = 256;

impl Index {
    /// Number of directories with at least one token.
    pub fn directories(&self) -> usize {
        self.by_directory.len()
    }

    /// Puts a directory's tokens (from its status) in the index, replacing what it had.
    pub fn apply(&mut self, dir: &WatchedDirectory) {
        let Some(id) = dir.id() else { return };
        self.remove(&id);
        let Some(status) = &dir.status else { return };
        let id = Arc::new(id);
        let current = status.token_hash.as_deref().and_then(digest_of).map(|digest| {
            let valid_until = status.token_expires_at.as_ref().map(|t| t.0);
            (digest, Credential { directory: id.clone(), kind: TokenKind::Current, valid_until })
        });
        // A previous token only with the end of its window: an overlap without an end is no overlap.
        let previous =
            match (status.previous_token_hash.as_deref().and_then(digest_of), &status.previous_token_valid_until) {
                (Some(digest), Some(until)) => Some((
                    digest,
                    Credential { directory: id.clone(), kind: TokenKind::Previous, valid_until: Some(until.0) },
                )),
                _ => None,
            };
        let mut digests = Vec::with_capacity(2);
        for (digest, credential) in current.into_iter().chain(previous) {
            self.by_hash.entry(digest).or_default().push(credential);
            digests.push(digest);
        }
        if !digests.is_empty() {
            self.by_directory.insert(id, digests);
        }
    }

    /// Removes a directory's tokens.
    pub fn remove(&mut self, id: &DirectoryId) {
        let Some(digests) = self.by_directory.remove(id) else { return };
        for digest in digests {
            if let Some(credentials) = self.by_hash.get_mut(&digest) {
                credentials.retain(|c| *c.directory != *id);
                if credentials.is_empty() {
                    self.by_hash.remove(&digest);
                }
            }
        }
    }

    /// Replaces every directory of `scope` (a namespace, or all with `None`) with those of `fresh`, an
    /// index of a new full list. Returns the directories that are gone.
    pub fn replace_scope(&mut self, scope: Option<&str>, fresh: Index) -> Vec<DirectoryId> {
        let in_scope: Vec<Arc<DirectoryId>> =
            self.by_directory.keys().filter(|id| scope.is_none_or(|ns| id.namespace == ns)).cloned().collect();
        let gone = in_scope
            .iter()
            .filter(|id| !fresh.by_directory.contains_key(id.as_ref()))
            .map(|id| (**id).clone())
            .collect();
        for id in in_scope {
            self.remove(&id);
        }
        self.by_directory.extend(fresh.by_directory);
        for (digest, credentials) in fresh.by_hash {
            self.by_hash.entry(digest).or_default().extend(credentials);
        }
        gone
    }

    /// Decides one request: its `Authorization` header, the directory the route belongs to (if the
    /// proxy says), and the time. Cheap checks come first: a header that is not a well-formed token
    /// of ours is refused before any hashing or lookup.
    pub fn verify(&self, authorization: Option<&[u8]>, expected: Option<&DirectoryId>, now: Timestamp) -> Verdict {
        let Some(header) = authorization else { return Verdict::Denied(Denial::Missing) };
        let Some(token) = bearer_token(header) else { return Verdict::Denied(Denial::Malformed) };
        let digest: Digest32 = Sha256::digest(token.as_bytes()).into();
        let Some(credential) = self.by_hash.get(&digest).and_then(|claims| owner(claims)) else {
            return Verdict::Denied(Denial::Unknown);
        };
        if credential.valid_until.is_some_and(|until| now >= until) {
            return Verdict::Denied(Denial::Expired);
        }
        match expected {
            Some(expected) if *expected != *credential.directory => {
                Verdict::WrongDirectory { directory: credential.directory.clone(), expected: expected.clone() }
            }
            _ => Verdict::Allowed { directory: credential.directory.clone(), kind: credential.kind },
        }
    }
}

/// The one credential a hash authenticates among the statuses claiming it, if any. A current claim
/// wins over previous claims of other directories: a previous hash can be planted through a
/// directory's own Secret, and must not lock the directory whose current token it is out. Two current
/// claims, or (without a current one) two previous claims, authenticate nobody: a status can be
/// copied, a token cannot be shared.
fn owner(claims: &[Credential]) -> Option<&Credential> {
    let mut current = claims.iter().filter(|c| c.kind == TokenKind::Current);
    if let Some(first) = current.next() {
        return current.next().is_none().then_some(first);
    }
    match claims {
        [one] => Some(one),
        _ => None,
    }
}

/// The token of an `Authorization: Bearer <token>` header, if it is shaped like one of ours.
fn bearer_token(header: &[u8]) -> Option<&str> {
    if header.len() > MAX_AUTHORIZATION_LEN {
        return None;
    }
    let header = std::str::from_utf8(header).ok()?;
    let (scheme, token) = header.trim().split_once(' ')?;
    // The scheme is case-insensitive (RFC 7235); the token is exact.
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim_start_matches(' ');
    (token.len() == TOKEN_LEN && token.starts_with(TOKEN_PREFIX) && has_valid_checksum(token)).then_some(token)
}

fn digest_of(hash: &str) -> Option<Digest32> {
    let hex = TokenHash::parse(hash)?.as_str().strip_prefix("sha256:")?.to_owned();
    hex::decode(hex).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::api::{ScimDirectory, ScimDirectorySpec, ScimDirectoryStatus};
    use crate::token::Token;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn directory(ns: &str, name: &str, current: &Token, expires: Option<&str>) -> ScimDirectory {
        let mut dir = ScimDirectory::new(name, ScimDirectorySpec::default());
        dir.metadata.namespace = Some(ns.into());
        dir.status = Some(ScimDirectoryStatus {
            token_hash: Some(current.hash().to_string()),
            token_expires_at: expires.map(|e| Time(ts(e))),
            ..ScimDirectoryStatus::default()
        });
        dir
    }

    fn bearer(token: &Token) -> Vec<u8> {
        format!("Bearer {}", token.expose()).into_bytes()
    }

    fn id(s: &str) -> DirectoryId {
        DirectoryId::parse(s).unwrap()
    }

    const NOW: &str = "2026-06-01T00:00:00Z";

    #[test]
    fn verdicts() {
        let (a, b, old, stranger) = (Token::generate(), Token::generate(), Token::generate(), Token::generate());
        let mut index = Index::default();
        let mut dir_a = directory("t1", "a", &a, Some("2026-06-02T00:00:00Z"));
        let status = dir_a.status.as_mut().unwrap();
        status.previous_token_hash = Some(old.hash().to_string());
        status.previous_token_valid_until = Some(Time(ts("2026-06-01T00:30:00Z")));
        index.apply(&WatchedDirectory::from(&dir_a));
        index.apply(&WatchedDirectory::from(&directory("t2", "b", &b, None)));
        assert_eq!(index.directories(), 2);

        let allowed = |dir: &str, kind| Verdict::Allowed { directory: Arc::new(id(dir)), kind };
        let now = ts(NOW);
        type Case<'a> = (&'a str, Option<Vec<u8>>, Option<DirectoryId>, Timestamp, Verdict);
        let cases: Vec<Case> = vec![
            ("current token", Some(bearer(&a)), None, now, allowed("t1/a", TokenKind::Current)),
            (
                "scheme is case-insensitive",
                Some(format!("bearer {}", a.expose()).into_bytes()),
                None,
                now,
                allowed("t1/a", TokenKind::Current),
            ),
            ("perpetual token", Some(bearer(&b)), None, now, allowed("t2/b", TokenKind::Current)),
            ("previous token in its window", Some(bearer(&old)), None, now, allowed("t1/a", TokenKind::Previous)),
            (
                "previous token at the end of its window",
                Some(bearer(&old)),
                None,
                ts("2026-06-01T00:30:00Z"),
                Verdict::Denied(Denial::Expired),
            ),
            (
                "current token at its expiry",
                Some(bearer(&a)),
                None,
                ts("2026-06-02T00:00:00Z"),
                Verdict::Denied(Denial::Expired),
            ),
            (
                "one second before",
                Some(bearer(&a)),
                None,
                ts("2026-06-01T23:59:59Z"),
                allowed("t1/a", TokenKind::Current),
            ),
            ("unknown token", Some(bearer(&stranger)), None, now, Verdict::Denied(Denial::Unknown)),
            ("no header", None, None, now, Verdict::Denied(Denial::Missing)),
            ("basic auth", Some(b"Basic dXNlcjpwYXNz".to_vec()), None, now, Verdict::Denied(Denial::Malformed)),
            ("no token", Some(b"Bearer".to_vec()), None, now, Verdict::Denied(Denial::Malformed)),
            (
                "bad checksum",
                Some({
                    let mut h = bearer(&a);
                    let n = h.len();
                    h[n - 1] ^= 1;
                    h
                }),
                None,
                now,
                Verdict::Denied(Denial::Malformed),
            ),
            (
                "not our prefix",
                Some(format!("Bearer ghp_{}", &a.expose()[5..]).into_bytes()),
                None,
                now,
                Verdict::Denied(Denial::Malformed),
            ),
            ("huge header", Some(vec![b'x'; 100_000]), None, now, Verdict::Denied(Denial::Malformed)),
            ("not UTF-8", Some(vec![0xff, 0xfe]), None, now, Verdict::Denied(Denial::Malformed)),
            ("right directory", Some(bearer(&a)), Some(id("t1/a")), now, allowed("t1/a", TokenKind::Current)),
            (
                "another directory's route",
                Some(bearer(&a)),
                Some(id("t2/b")),
                now,
                Verdict::WrongDirectory { directory: Arc::new(id("t1/a")), expected: id("t2/b") },
            ),
            (
                "an unknown token on a bound route is still 401",
                Some(bearer(&stranger)),
                Some(id("t2/b")),
                now,
                Verdict::Denied(Denial::Unknown),
            ),
        ];
        for (name, header, expected, at, want) in cases {
            assert_eq!(index.verify(header.as_deref(), expected.as_ref(), at), want, "case {name:?}");
        }
    }

    #[test]
    fn rotations_and_deletions_update_the_index() {
        let (a, a2) = (Token::generate(), Token::generate());
        let mut index = Index::default();
        index.apply(&WatchedDirectory::from(&directory("t1", "a", &a, None)));
        let now = ts(NOW);
        assert!(matches!(index.verify(Some(&bearer(&a)), None, now), Verdict::Allowed { .. }));
        // Rotated without overlap: the old token is unknown at once.
        index.apply(&WatchedDirectory::from(&directory("t1", "a", &a2, None)));
        assert_eq!(index.verify(Some(&bearer(&a)), None, now), Verdict::Denied(Denial::Unknown));
        assert!(matches!(index.verify(Some(&bearer(&a2)), None, now), Verdict::Allowed { .. }));
        // A status without a token (a conflict) removes it; deletion too.
        let mut empty = directory("t1", "a", &a2, None);
        empty.status = None;
        index.apply(&WatchedDirectory::from(&empty));
        assert_eq!(index.verify(Some(&bearer(&a2)), None, now), Verdict::Denied(Denial::Unknown));
        index.apply(&WatchedDirectory::from(&directory("t1", "a", &a2, None)));
        index.remove(&id("t1/a"));
        assert_eq!(index.verify(Some(&bearer(&a2)), None, now), Verdict::Denied(Denial::Unknown));
        assert_eq!(index.directories(), 0);
        assert!(index.by_hash.is_empty());
    }

    #[test]
    fn a_token_two_statuses_claim_authenticates_nobody() {
        let a = Token::generate();
        let mut index = Index::default();
        index.apply(&WatchedDirectory::from(&directory("t1", "a", &a, None)));
        index.apply(&WatchedDirectory::from(&directory("t2", "copycat", &a, None)));
        assert_eq!(index.verify(Some(&bearer(&a)), None, ts(NOW)), Verdict::Denied(Denial::Unknown));
        index.remove(&id("t2/copycat"));
        assert!(matches!(index.verify(Some(&bearer(&a)), None, ts(NOW)), Verdict::Allowed { .. }));
    }

    /// Who a hash authenticates when several statuses claim it: a current claim wins over any number
    /// of previous claims of other directories (a previous hash can be planted through a directory's
    /// own Secret, and must not lock another directory out); two claims of the same kind of different
    /// directories authenticate nobody.
    #[test]
    fn claims_on_one_hash() {
        let now = ts(NOW);
        let until = "2026-06-01T00:30:00Z";
        // (directory, claim as its current token?, claim as its previous token?)
        type Claim = (&'static str, bool, bool);
        let cases: Vec<(&str, Vec<Claim>, Verdict)> = vec![
            (
                "one current",
                vec![("t1/victim", true, false)],
                Verdict::Allowed { directory: Arc::new(id("t1/victim")), kind: TokenKind::Current },
            ),
            (
                "one previous",
                vec![("t1/victim", false, true)],
                Verdict::Allowed { directory: Arc::new(id("t1/victim")), kind: TokenKind::Previous },
            ),
            (
                "current beats another directory's previous",
                vec![("t1/victim", true, false), ("t2/attacker", false, true)],
                Verdict::Allowed { directory: Arc::new(id("t1/victim")), kind: TokenKind::Current },
            ),
            (
                "the previous claim first: the same",
                vec![("t2/attacker", false, true), ("t1/victim", true, false)],
                Verdict::Allowed { directory: Arc::new(id("t1/victim")), kind: TokenKind::Current },
            ),
            (
                "current beats any number of previous claims",
                vec![("t2/a", false, true), ("t1/victim", true, false), ("t3/b", false, true), ("t4/c", false, true)],
                Verdict::Allowed { directory: Arc::new(id("t1/victim")), kind: TokenKind::Current },
            ),
            (
                "two currents: nobody",
                vec![("t1/victim", true, false), ("t2/copycat", true, false)],
                Verdict::Denied(Denial::Unknown),
            ),
            (
                "two currents and a previous: nobody",
                vec![("t1/victim", true, false), ("t2/copycat", true, false), ("t3/b", false, true)],
                Verdict::Denied(Denial::Unknown),
            ),
            (
                "two previous: nobody",
                vec![("t1/victim", false, true), ("t2/attacker", false, true)],
                Verdict::Denied(Denial::Unknown),
            ),
            (
                "current and previous of one directory: its current",
                vec![("t1/victim", true, true)],
                Verdict::Allowed { directory: Arc::new(id("t1/victim")), kind: TokenKind::Current },
            ),
        ];
        for (name, claims, want) in cases {
            let shared = Token::generate();
            let mut index = Index::default();
            for (dir, current, previous) in &claims {
                let id = id(dir);
                // Every directory has a token of its own besides the shared hash.
                let own = Token::generate();
                let mut d = directory(&id.namespace, &id.name, if *current { &shared } else { &own }, None);
                if *previous {
                    let status = d.status.as_mut().unwrap();
                    status.previous_token_hash = Some(shared.hash().to_string());
                    status.previous_token_valid_until = Some(Time(ts(until)));
                }
                index.apply(&WatchedDirectory::from(&d));
            }
            assert_eq!(index.verify(Some(&bearer(&shared)), None, now), want, "case {name:?}");
            // Each claim withdrawn in turn: the verdict is that of the claims left.
            if let Some((dir, ..)) = claims.first() {
                index.remove(&id(dir));
                let rest: Vec<&Claim> = claims[1..].iter().collect();
                let currents = rest.iter().filter(|c| c.1).count();
                let previous = rest.iter().filter(|c| c.2 && !c.1).count();
                let left = index.verify(Some(&bearer(&shared)), None, now);
                let allowed = currents == 1 || (currents == 0 && previous == 1);
                assert_eq!(matches!(left, Verdict::Allowed { .. }), allowed, "case {name:?} without {dir}: {left:?}");
            }
        }
    }

    #[test]
    fn a_fresh_list_replaces_its_scope_only() {
        let (a, b, c) = (Token::generate(), Token::generate(), Token::generate());
        let mut index = Index::default();
        index.apply(&WatchedDirectory::from(&directory("t1", "a", &a, None)));
        index.apply(&WatchedDirectory::from(&directory("t2", "b", &b, None)));
        let mut fresh = Index::default();
        fresh.apply(&WatchedDirectory::from(&directory("t1", "c", &c, None)));
        assert_eq!(index.replace_scope(Some("t1"), fresh), vec![id("t1/a")]);
        let now = ts(NOW);
        assert_eq!(index.verify(Some(&bearer(&a)), None, now), Verdict::Denied(Denial::Unknown));
        assert!(matches!(index.verify(Some(&bearer(&b)), None, now), Verdict::Allowed { .. }));
        assert!(matches!(index.verify(Some(&bearer(&c)), None, now), Verdict::Allowed { .. }));
        // All namespaces.
        assert_eq!(index.replace_scope(None, Index::default()).len(), 2);
        assert_eq!(index.directories(), 0);
        assert!(index.by_hash.is_empty());
    }

    #[test]
    fn directory_ids_parse() {
        assert_eq!(id("ns/name"), DirectoryId { namespace: "ns".into(), name: "name".into() });
        for bad in ["", "ns", "/name", "ns/", "a/b/c"] {
            assert_eq!(DirectoryId::parse(bad), None, "{bad:?}");
        }
    }
}
