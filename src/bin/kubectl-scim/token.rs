//! `kubectl scim token NAME` (the plaintext, for pasting into the identity provider) and
//! `kubectl scim check NAME` (is the token on stdin the one that works?).
//!
//! The plaintext only ever goes to stdout, and only to a terminal unless the user says otherwise: it
//! is never part of a message, an error or stderr. What is said about a token uses its hash.
#![allow(unsafe_code)] // libc (the terminal calls) has no safe wrapper here: each call carries its SAFETY note

use std::io::{IsTerminal, Read, Write};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::ListParams;
use scim_token_operator::api::{ScimDirectory, ScimDirectoryStatus};
use scim_token_operator::secret::{TOKEN_KEY, is_controlled_by, take_stored_token};
use scim_token_operator::token::{TOKEN_LEN, TOKEN_PREFIX, Token, TokenHash, has_valid_checksum};
use zeroize::Zeroizing;

use crate::cluster::Cluster;
use crate::human::{at, sanitize, short_hash};

/// The flag that lets the plaintext go to a pipe or a file.
pub const FORCE_FLAG: &str = "--force-stdout";

pub async fn token(cluster: &Cluster, name: &str, force_stdout: bool) -> anyhow::Result<()> {
    let what = cluster.directory_ref(name);
    // Refused before anything is read: no plaintext is fetched that will not be shown.
    let to_terminal = std::io::stdout().is_terminal();
    if !to_terminal && !force_stdout {
        anyhow::bail!(
            "refusing to write the token of {what} to a pipe or file (stdout is not a terminal); pass {FORCE_FLAG} if \
             that is what you want"
        );
    }
    let dir = cluster.directories().get(name).await.map_err(|e| cluster.fail(e, &what))?;
    let secret_name = dir.status.as_ref().and_then(|s| s.secret_name.clone()).unwrap_or_else(|| dir.secret_name());
    let secret_ref = format!("Secret {secret_name:?} of {what}");
    let mut secret = cluster.secrets().get(&secret_name).await.map_err(|e| cluster.fail(e, &secret_ref))?;
    if !is_controlled_by(&dir, &secret.metadata) {
        anyhow::bail!(
            "Secret {secret_name:?} in namespace {:?} is not managed by ScimDirectory {name:?}; its content is not \
             this directory's token, so it is not shown",
            cluster.namespace
        );
    }
    let token = take_stored_token(&mut secret);
    let Some(token) = token.filter(|t| !t.expose().is_empty()) else {
        anyhow::bail!("{secret_ref} holds no token (key {TOKEN_KEY:?}); see kubectl scim status {name}");
    };

    let now = Timestamp::now();
    let hash = token.hash();
    let status = dir.status.clone().unwrap_or_default();
    let expires = status.token_expires_at.as_ref().map_or_else(|| "never".to_owned(), |t| at(t.0, now));
    let about = format!(
        "token of ScimDirectory {}/{name} (Secret {secret_name}): {hash}, expires {expires}",
        cluster.namespace
    );
    eprintln!("{}", sanitize(&about));
    if status.token_hash.as_deref() != Some(hash.as_str()) {
        let other = status.token_hash.as_deref().map_or_else(|| "none".to_owned(), short_hash);
        eprintln!(
            "warning: the directory's status names another token ({}): the operator may be rotating it right now; \
             check with kubectl scim status {name}",
            sanitize(&other)
        );
    } else if status.token_expires_at.as_ref().is_some_and(|t| t.0 <= now) {
        eprintln!("warning: this token has expired; rotate it first: kubectl scim rotate {name} --wait");
    }
    let mut out = std::io::stdout().lock();
    out.write_all(token.expose().as_bytes())?;
    if to_terminal {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// What `check` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The directory's current token, not expired.
    Current { expires_at: Option<Timestamp> },
    /// The token a rotation replaced, still accepted in its overlap window.
    Previous { valid_until: Timestamp },
    /// The current token, past its expiry.
    Expired { at: Timestamp },
    /// The previous token, after its overlap window.
    OverlapEnded { at: Timestamp },
    /// A well-formed token that is neither: rotated out, or never this directory's.
    NotCurrent,
    /// Not a token of this operator at all (prefix, length, alphabet or checksum).
    Malformed,
    /// The directory has no token yet.
    NoToken,
}

impl Verdict {
    /// Whether a request with this token is accepted now (by the verifier, and by whatever the
    /// identity provider talks to when it reads the directory's status).
    pub fn works(&self) -> bool {
        matches!(self, Verdict::Current { .. } | Verdict::Previous { .. })
    }

    /// One line: yes or no, why, and what to do.
    pub fn line(&self, ns: &str, name: &str, now: Timestamp) -> String {
        let dir = format!("ScimDirectory {ns}/{name}");
        match self {
            Verdict::Current { expires_at: None } => format!("yes: the current token of {dir}; it never expires"),
            Verdict::Current { expires_at: Some(t) } => {
                format!("yes: the current token of {dir}; it expires {}", at(*t, now))
            }
            Verdict::Previous { valid_until } => format!(
                "yes, until {}: the previous token of {dir}, still accepted in its rotation overlap; give the \
                 identity provider the current one (kubectl scim token {name})",
                at(*valid_until, now)
            ),
            Verdict::Expired { at: t } => format!(
                "no: the current token of {dir}, but it expired {}; rotate it (kubectl scim rotate {name} --wait)",
                at(*t, now)
            ),
            Verdict::OverlapEnded { at: t } => format!(
                "no: the previous token of {dir}; its overlap window ended {}; give the identity provider the current \
                 one (kubectl scim token {name})",
                at(*t, now)
            ),
            Verdict::NotCurrent => format!(
                "no: not a token of {dir} (rotated out, or never issued for it); give the identity provider the \
                 current one (kubectl scim token {name})"
            ),
            Verdict::Malformed => format!(
                "no: malformed: not a token of this operator ({TOKEN_PREFIX} + {} base62 characters with a valid \
                 checksum); check for a truncated or wrongly copied value",
                TOKEN_LEN - TOKEN_PREFIX.len()
            ),
            Verdict::NoToken => format!("no: {dir} has no token yet; see kubectl scim status {name}"),
        }
    }
}

/// Judges a token against a directory's status, as the verifier does. Pure.
pub fn judge(token: &str, status: Option<&ScimDirectoryStatus>, now: Timestamp) -> Verdict {
    if !has_valid_checksum(token) {
        return Verdict::Malformed;
    }
    let Some(status) = status.filter(|s| s.token_hash.is_some()) else { return Verdict::NoToken };
    let hash = TokenHash::of_bytes(token.as_bytes());
    if status.token_hash.as_deref() == Some(hash.as_str()) {
        let expires_at = status.token_expires_at.as_ref().map(|t| t.0);
        return match expires_at {
            Some(at) if now >= at => Verdict::Expired { at },
            _ => Verdict::Current { expires_at },
        };
    }
    // A previous token only with the end of its window, as the verifier reads it.
    if status.previous_token_hash.as_deref() == Some(hash.as_str())
        && let Some(until) = &status.previous_token_valid_until
    {
        return if now >= until.0 {
            Verdict::OverlapEnded { at: until.0 }
        } else {
            Verdict::Previous { valid_until: until.0 }
        };
    }
    Verdict::NotCurrent
}

/// The token as pasted: surrounding whitespace, an `Authorization:` header name and a `Bearer ` scheme
/// are not part of it.
pub fn normalize(input: &str) -> &str {
    fn strip<'a>(s: &'a str, prefix: &str) -> &'a str {
        match s.get(..prefix.len()) {
            Some(head) if head.eq_ignore_ascii_case(prefix) => s[prefix.len()..].trim_start(),
            _ => s,
        }
    }
    strip(strip(input.trim(), "authorization:"), "bearer ")
}

/// `check`: exit code 0 only for a token that works now, 1 for one that does not.
pub async fn check(cluster: &Cluster, name: &str) -> anyhow::Result<bool> {
    let what = cluster.directory_ref(name);
    let input = read_stdin_token()?;
    let token = Token::from_plaintext(normalize(&input).to_owned());
    drop(input);
    if token.expose().is_empty() {
        anyhow::bail!("no token on stdin: pipe it in, e.g. kubectl scim check {name} < token.txt");
    }
    let dir = cluster.directories().get(name).await.map_err(|e| cluster.fail(e, &what))?;
    let now = Timestamp::now();
    let verdict = judge(token.expose(), dir.status.as_ref(), now);
    let mut line = verdict.line(&cluster.namespace, name, now);
    if verdict == Verdict::NotCurrent {
        // The 401 a support engineer sees is often a token of the tenant next door.
        if let Some(other) = owner_elsewhere(cluster, &dir, &token.hash()).await {
            line.push_str(&format!("; it is {other}"));
        }
    }
    // The answer, yes or no, goes to stdout; the exit code says it too.
    println!("{}", sanitize(&line));
    Ok(verdict.works())
}

/// Which other directory of the namespace has this token, if the caller may list them.
async fn owner_elsewhere(cluster: &Cluster, dir: &ScimDirectory, hash: &TokenHash) -> Option<String> {
    let list = cluster.directories().list(&ListParams::default()).await.ok()?;
    list.items.into_iter().filter(|d| d.name_any() != dir.name_any()).find_map(|d| {
        let status = d.status.as_ref()?;
        if status.token_hash.as_deref() == Some(hash.as_str()) {
            Some(format!("the current token of ScimDirectory {}/{}", cluster.namespace, d.name_any()))
        } else if status.previous_token_hash.as_deref() == Some(hash.as_str()) {
            Some(format!("the previous token of ScimDirectory {}/{}", cluster.namespace, d.name_any()))
        } else {
            None
        }
    })
}

/// Reads the token from stdin: from a terminal one line without echo, else at most 4 KiB.
fn read_stdin_token() -> anyhow::Result<Zeroizing<String>> {
    const LIMIT: u64 = 4096;
    let stdin = std::io::stdin();
    let mut bytes = Zeroizing::new(Vec::with_capacity(LIMIT as usize + 1));
    if stdin.is_terminal() {
        eprint!("Paste the token, then press Enter: ");
        let _echo_off = EchoOff::new();
        let mut line = Zeroizing::new(String::with_capacity(LIMIT as usize));
        stdin.read_line(&mut line)?;
        eprintln!();
        bytes.extend_from_slice(line.as_bytes());
    } else {
        stdin.lock().take(LIMIT + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > LIMIT {
            anyhow::bail!("stdin holds more than {LIMIT} bytes: that is not a token");
        }
    }
    // Invalid UTF-8 cannot be a token; it is judged malformed rather than refused.
    let text = match std::str::from_utf8(&bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from("\u{fffd}"),
    };
    Ok(Zeroizing::new(text))
}

/// Turns the terminal's echo off while a token is typed or pasted; restores it on drop.
struct EchoOff(Option<libc::termios>);

impl EchoOff {
    fn new() -> EchoOff {
        // SAFETY: tcgetattr/tcsetattr on stdin with a termios we own; a failure leaves echo as it was.
        unsafe {
            let mut term = std::mem::zeroed::<libc::termios>();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut term) != 0 {
                return EchoOff(None);
            }
            let saved = term;
            term.c_lflag &= !libc::ECHO;
            term.c_lflag |= libc::ECHONL;
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &term) != 0 {
                return EchoOff(None);
            }
            EchoOff(Some(saved))
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restores the attributes read in `new`.
            unsafe {
                libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn verdicts_follow_the_status_as_the_verifier_does() {
        let (current, previous, other) = (Token::generate(), Token::generate(), Token::generate());
        let now = t("2026-01-10T00:00:00Z");
        let status = ScimDirectoryStatus {
            token_hash: Some(current.hash().to_string()),
            token_expires_at: Some(Time(t("2026-02-01T00:00:00Z"))),
            previous_token_hash: Some(previous.hash().to_string()),
            previous_token_valid_until: Some(Time(t("2026-01-10T00:05:00Z"))),
            ..ScimDirectoryStatus::default()
        };
        let judge_at = |token: &str, now: Timestamp| judge(token, Some(&status), now);
        assert_eq!(judge_at(current.expose(), now), Verdict::Current { expires_at: Some(t("2026-02-01T00:00:00Z")) });
        assert_eq!(judge_at(previous.expose(), now), Verdict::Previous { valid_until: t("2026-01-10T00:05:00Z") });
        assert_eq!(judge_at(other.expose(), now), Verdict::NotCurrent);
        // At the instant of expiry or the end of the window: no longer.
        assert_eq!(
            judge_at(previous.expose(), t("2026-01-10T00:05:00Z")),
            Verdict::OverlapEnded { at: t("2026-01-10T00:05:00Z") }
        );
        assert_eq!(
            judge_at(current.expose(), t("2026-02-01T00:00:00Z")),
            Verdict::Expired { at: t("2026-02-01T00:00:00Z") }
        );
        // Malformed before anything else: a changed character, a truncated token, a hash.
        let mut changed = current.expose().to_owned();
        changed.replace_range(10..11, if &changed[10..11] == "A" { "B" } else { "A" });
        for bad in [changed.as_str(), &current.expose()[..50], "", "sha256:abc", "hunter2"] {
            assert_eq!(judge_at(bad, now), Verdict::Malformed, "{bad:?}");
        }
        // A previous hash without the end of its window is no overlap; no status is no token.
        let open_ended = ScimDirectoryStatus { previous_token_valid_until: None, ..status.clone() };
        assert_eq!(judge(previous.expose(), Some(&open_ended), now), Verdict::NotCurrent);
        assert_eq!(judge(current.expose(), None, now), Verdict::NoToken);
        // A perpetual token.
        let perpetual = ScimDirectoryStatus { token_expires_at: None, ..status.clone() };
        assert_eq!(judge(current.expose(), Some(&perpetual), now), Verdict::Current { expires_at: None });
    }

    #[test]
    fn only_working_tokens_say_yes_and_no_line_shows_a_token() {
        let now = t("2026-01-10T00:00:00Z");
        let verdicts = [
            (Verdict::Current { expires_at: None }, true, "yes: the current token"),
            (Verdict::Current { expires_at: Some(t("2026-01-13T00:00:00Z")) }, true, "(in 3d)"),
            (Verdict::Previous { valid_until: t("2026-01-10T00:05:00Z") }, true, "yes, until 2026-01-10T00:05:00Z"),
            (
                Verdict::Expired { at: t("2026-01-09T00:00:00Z") },
                false,
                "no: the current token of ScimDirectory t/acme, but it expired",
            ),
            (Verdict::OverlapEnded { at: t("2026-01-09T00:00:00Z") }, false, "overlap window ended"),
            (Verdict::NotCurrent, false, "rotated out"),
            (Verdict::Malformed, false, "no: malformed"),
            (Verdict::NoToken, false, "no token yet"),
        ];
        for (verdict, works, want) in verdicts {
            assert_eq!(verdict.works(), works, "{verdict:?}");
            let line = verdict.line("t", "acme", now);
            assert!(line.contains(want), "{line:?} lacks {want:?}");
            assert!(!line.contains('\n'), "{line:?}");
        }
    }

    #[test]
    fn pasted_headers_and_whitespace_are_stripped() {
        assert_eq!(normalize("  scim_abc \n"), "scim_abc");
        assert_eq!(normalize("Bearer scim_abc\r\n"), "scim_abc");
        assert_eq!(normalize("Authorization: Bearer scim_abc"), "scim_abc");
        assert_eq!(normalize("authorization:bearer  scim_abc"), "scim_abc");
        assert_eq!(normalize("Bearer"), "Bearer");
        assert_eq!(normalize(""), "");
        assert_eq!(normalize("é"), "é");
    }
}
