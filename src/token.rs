//! SCIM bearer tokens: generation, the offline-checkable format, and the hash that stands in for them.
//!
//! A token looks like `scim_` + 43 random base62 characters + a 6-character base62 CRC32 checksum
//! (54 characters, URL-safe). 43 base62 characters carry 43·log2(62) ≈ 256 bits of entropy. The
//! checksum follows GitHub's token format so secret scanners can recognise a leaked token offline,
//! without a round trip to any service.
//!
//! The plaintext only ever lives in [`Token`], which cannot be printed, serialized or copied into
//! another string except through [`Token::expose`]. Everything else (status, annotations, logs,
//! Events) talks about a token through its [`TokenHash`].

use std::fmt;

use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

/// Every token starts with this, so scanners and humans can tell what a leaked string is.
pub const TOKEN_PREFIX: &str = "scim_";

/// Number of random base62 characters: the smallest count that reaches 256 bits of entropy.
const RANDOM_LEN: usize = 43;
/// Base62 characters of the checksum: 62^6 > 2^32, so any CRC32 fits.
const CHECKSUM_LEN: usize = 6;
/// Total length of a generated token.
pub const TOKEN_LEN: usize = TOKEN_PREFIX.len() + RANDOM_LEN + CHECKSUM_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Bytes at or above this are rejected when sampling: 248 = 4·62 is the largest multiple of 62 that
/// fits in a byte, so `byte % 62` over the accepted bytes is exactly uniform (no modulo bias).
const REJECT_FROM: u8 = 248;

/// A plaintext SCIM bearer token.
///
/// Deliberately has no `Display`, `Clone`, `Serialize` or any other way to turn into a string except
/// [`Token::expose`], so every place that handles the plaintext is easy to find. The memory holding it
/// is zeroed when the token is dropped.
pub struct Token(Zeroizing<String>);

impl Token {
    /// Generates a new token from the operating system's CSPRNG.
    ///
    /// # Panics
    ///
    /// If the operating system cannot provide random bytes. There is no safe fallback for a credential,
    /// and on the platforms the operator runs on this does not happen after boot.
    pub fn generate() -> Token {
        Token::generate_with(|buf| {
            OsRng.try_fill_bytes(buf).expect("the operating system's random number generator failed")
        })
    }

    /// Builds a token from `fill`, a source of random bytes. Split out so tests can check the sampling
    /// with a deterministic source.
    fn generate_with(fill: impl FnMut(&mut [u8])) -> Token {
        // Capacity up front: a reallocation would leave an unzeroed copy of the prefix of the secret in
        // freed memory.
        let mut s = Zeroizing::new(String::with_capacity(TOKEN_LEN));
        s.push_str(TOKEN_PREFIX);
        push_base62_random(&mut s, RANDOM_LEN, fill);
        let checksum = checksum(s.as_bytes());
        s.push_str(&checksum);
        debug_assert_eq!(s.len(), TOKEN_LEN);
        Token(s)
    }

    /// Wraps a token read back from a Secret. Not validated: a user may have put anything there, and
    /// the operator still has to hash it to notice the change.
    pub fn from_plaintext(plaintext: String) -> Token {
        Token(Zeroizing::new(plaintext))
    }

    /// The plaintext. The only way to see it: call this exactly where it is written to a Secret.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The hash by which status, annotations and logs refer to this token.
    pub fn hash(&self) -> TokenHash {
        TokenHash::of_bytes(self.expose().as_bytes())
    }

    /// `text` with every form of this token a request carrying it could echo replaced: the plaintext
    /// and its base64 (a Secret's `data`, with and without padding, standard and URL-safe alphabets).
    pub fn redact_from(&self, text: &str) -> String {
        // k8s-openapi's ByteString serializes as standard, padded base64: the form `data` carries.
        let mut bytes = k8s_openapi::ByteString(self.expose().as_bytes().to_vec());
        let encoded = Zeroizing::new(serde_json::to_string(&bytes).expect("bytes serialize"));
        bytes.0.zeroize();
        let padded = Zeroizing::new(encoded.trim_matches('"').to_owned());
        let unpadded = padded.trim_end_matches('=');
        let url_safe = Zeroizing::new(unpadded.replace('+', "-").replace('/', "_"));
        let mut out = text.to_owned();
        for form in [self.expose(), padded.as_str(), unpadded, url_safe.as_str()] {
            if !form.is_empty() {
                out = out.replace(form, "[redacted]");
            }
        }
        out
    }
}

impl fmt::Debug for Token {
    /// Never the plaintext, not even a prefix: Debug output ends up in logs and panic messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Appends `n` characters drawn uniformly from [`BASE62`], taking random bytes from `fill` and
/// rejecting those that would bias the result.
fn push_base62_random(out: &mut String, n: usize, mut fill: impl FnMut(&mut [u8])) {
    // About 3% of bytes are rejected, so one 64-byte batch almost always covers 43 characters.
    let mut buf = [0u8; 64];
    let mut pushed = 0;
    while pushed < n {
        fill(&mut buf);
        for &b in buf.iter().filter(|&&b| b < REJECT_FROM) {
            if pushed == n {
                break;
            }
            out.push(char::from(BASE62[usize::from(b % 62)]));
            pushed += 1;
        }
    }
    // The raw bytes determine the token; don't leave them on the stack.
    buf.zeroize();
}

/// The checksum of a token body (prefix and random part): its CRC32 as 6 base62 digits, most
/// significant first, left-padded with '0'.
fn checksum(body: &[u8]) -> String {
    let mut value = crc32fast::hash(body);
    let mut digits = [b'0'; CHECKSUM_LEN];
    for d in digits.iter_mut().rev() {
        *d = BASE62[(value % 62) as usize];
        value /= 62;
    }
    digits.iter().map(|&b| char::from(b)).collect()
}

/// Whether `s` is a well-formed token: prefix, length, alphabet and checksum. This is what a secret
/// scanner would check; it says nothing about whether the token was ever issued.
pub fn has_valid_checksum(s: &str) -> bool {
    s.len() == TOKEN_LEN
        && s.starts_with(TOKEN_PREFIX)
        && s.bytes().skip(TOKEN_PREFIX.len()).all(|b| b.is_ascii_alphanumeric())
        && {
            let (body, sum) = s.split_at(TOKEN_LEN - CHECKSUM_LEN);
            checksum(body.as_bytes()) == sum
        }
}

/// The SHA-256 of a token, as `sha256:<64 lowercase hex digits>`.
///
/// Matches `printf %s "$TOKEN" | sha256sum`, so an administrator can tell which token is in use
/// without the operator ever publishing the token itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenHash(String);

const HASH_PREFIX: &str = "sha256:";

impl TokenHash {
    /// The hash of raw bytes, e.g. the `token` key of a Secret, which need not be valid UTF-8.
    pub fn of_bytes(bytes: &[u8]) -> TokenHash {
        TokenHash(format!("{HASH_PREFIX}{}", hex::encode(Sha256::digest(bytes))))
    }

    /// Parses a hash as written to status or annotations. Only the exact form [`TokenHash::of_bytes`]
    /// produces is accepted, so that equal hashes are equal strings.
    pub fn parse(s: &str) -> Option<TokenHash> {
        let hex = s.strip_prefix(HASH_PREFIX)?;
        let well_formed = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        well_formed.then(|| TokenHash(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_part(t: &str) -> &str {
        &t[TOKEN_PREFIX.len()..TOKEN_LEN - CHECKSUM_LEN]
    }

    #[test]
    fn generated_token_has_expected_shape() {
        let token = Token::generate();
        let s = token.expose();
        assert_eq!(s.len(), 54);
        assert_eq!(TOKEN_LEN, 54);
        assert!(s.starts_with("scim_"));
        assert!(s[TOKEN_PREFIX.len()..].bytes().all(|b| b.is_ascii_alphanumeric()), "{s}");
        // URL-safe without any escaping (RFC 3986 unreserved characters).
        assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)));
    }

    #[test]
    fn generated_tokens_have_valid_checksums() {
        for _ in 0..200 {
            let token = Token::generate();
            assert!(has_valid_checksum(token.expose()));
        }
    }

    #[test]
    fn changing_any_single_character_invalidates_the_token() {
        let token = Token::generate();
        let original = token.expose().as_bytes();
        let replacements = BASE62.iter().chain(b"_-.~ ");
        for i in 0..original.len() {
            for &r in replacements.clone().filter(|&&r| r != original[i]) {
                let mut changed = original.to_vec();
                changed[i] = r;
                let changed = String::from_utf8(changed).unwrap();
                assert!(!has_valid_checksum(&changed), "position {i} changed to {:?}", char::from(r));
            }
        }
    }

    #[test]
    fn checksum_rejects_malformed_strings() {
        let token = Token::generate();
        let s = token.expose();
        assert!(!has_valid_checksum(""));
        assert!(!has_valid_checksum(TOKEN_PREFIX));
        assert!(!has_valid_checksum(&s[..TOKEN_LEN - 1]));
        assert!(!has_valid_checksum(&format!("{s}0")));
        assert!(!has_valid_checksum(&format!(" {s}")));
        assert!(!has_valid_checksum(&format!("SCIM_{}", &s[TOKEN_PREFIX.len()..])));
        assert!(!has_valid_checksum(&format!("ghp_x{}", &s[TOKEN_PREFIX.len()..])));
        // Right byte length, but a two-byte character in the random part.
        let mut multibyte = s.to_owned();
        multibyte.replace_range(10..12, "é");
        assert_eq!(multibyte.len(), TOKEN_LEN);
        assert!(!has_valid_checksum(&multibyte));
    }

    /// Pins the checksum encoding, so that external scanners written against it keep working.
    #[test]
    fn checksum_known_answers() {
        assert_eq!(checksum(b""), "000000"); // CRC32 of nothing is 0.
        // CRC32("123456789") = 0xCBF43926 = 3421780262, the standard check value.
        assert_eq!(crc32fast::hash(b"123456789"), 3_421_780_262);
        assert_eq!(checksum(b"123456789"), "3jZRME");
        let body = format!("{TOKEN_PREFIX}{}", "0".repeat(RANDOM_LEN));
        let token = format!("{body}{}", checksum(body.as_bytes()));
        assert_eq!(token, "scim_000000000000000000000000000000000000000000030Xdgi");
        assert!(has_valid_checksum(&token));
    }

    #[test]
    fn two_tokens_differ() {
        let a = Token::generate();
        let b = Token::generate();
        assert_ne!(a.expose(), b.expose());
        assert_ne!(random_part(a.expose()), random_part(b.expose()));
        assert_ne!(a.hash(), b.hash());
    }

    #[test]
    fn sampling_rejects_biased_bytes_and_maps_the_rest_modulo_62() {
        let mut batches = [[255u8, 248, 0, 61, 62, 247, 123, 249], [1, 2, 3, 4, 5, 6, 7, 8]].into_iter();
        let mut out = String::new();
        push_base62_random(&mut out, 8, |buf| {
            buf.fill(250); // Rejected filler after the interesting bytes.
            let batch = batches.next().expect("asked for more bytes than needed");
            buf[..batch.len()].copy_from_slice(&batch);
        });
        // 0 -> '0', 61 -> 'z', 62 -> '0', 247 -> 'z', 123 -> 'z' (123 = 62 + 61), then the next batch.
        assert_eq!(out, "0z0zz123");
    }

    #[test]
    fn generation_with_deterministic_bytes_is_well_formed() {
        let token = Token::generate_with(|buf| buf.fill(0));
        assert_eq!(token.expose(), "scim_000000000000000000000000000000000000000000030Xdgi");
    }

    #[test]
    fn every_alphabet_character_appears_with_plausible_frequency() {
        let mut counts = [0u32; 128];
        let tokens = 2000;
        for _ in 0..tokens {
            let token = Token::generate();
            for b in random_part(token.expose()).bytes() {
                counts[usize::from(b)] += 1;
            }
        }
        // Expected count per character ≈ 1387 with a standard deviation ≈ 37; the bounds below are
        // about 18 standard deviations wide, so they only catch real bias (e.g. a missing character or
        // a broken rejection step), never chance.
        let expected = (tokens * RANDOM_LEN) as u32 / 62;
        for &c in BASE62 {
            let n = counts[usize::from(c)];
            assert!(
                n > expected / 2 && n < expected * 2,
                "{:?} appeared {n} times, expected ~{expected}",
                char::from(c)
            );
        }
        let total: u32 = counts.iter().sum();
        assert_eq!(total, (tokens * RANDOM_LEN) as u32, "only alphabet characters are produced");
    }

    #[test]
    fn debug_never_shows_the_plaintext() {
        // A fixed string, whatever the token: nothing of the plaintext can leak through it.
        let token = Token::generate();
        assert_eq!(format!("{token:?}"), "Token(<redacted>)");
        assert_eq!(format!("{token:#?}"), "Token(<redacted>)");
        assert_eq!(format!("{:?}", Some(&token)), "Some(Token(<redacted>))");

        // And no run of 4 characters of a token, not even of the prefix (a deterministic token, so
        // the random part cannot spell "reda" by chance).
        let token = Token::generate_with(|buf| buf.fill(7));
        let debug = format!("{token:?} {token:#?}");
        for window in token.expose().as_bytes().windows(4) {
            let window = std::str::from_utf8(window).unwrap();
            assert!(!debug.contains(window), "{debug:?} contains {window:?}");
        }
    }

    #[test]
    fn hash_known_answer() {
        let expected = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(TokenHash::of_bytes(b"abc").as_str(), expected);
        assert_eq!(Token::from_plaintext("abc".to_owned()).hash().as_str(), expected);
        assert_eq!(TokenHash::of_bytes(b"abc").to_string(), expected);
        assert_eq!(
            TokenHash::of_bytes(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn token_hash_is_of_the_exposed_bytes() {
        let token = Token::generate();
        assert_eq!(token.hash(), TokenHash::of_bytes(token.expose().as_bytes()));
    }

    #[test]
    fn from_plaintext_keeps_anything() {
        for s in ["", "not a token", "scim_short", "é\n"] {
            assert_eq!(Token::from_plaintext(s.to_owned()).expose(), s);
        }
    }

    #[test]
    fn hash_parse_accepts_only_the_canonical_form() {
        let hash = TokenHash::of_bytes(b"abc");
        assert_eq!(TokenHash::parse(hash.as_str()), Some(hash.clone()));
        assert_eq!(TokenHash::parse(&hash.to_string()), Some(hash.clone()));

        let hex = &hash.as_str()[HASH_PREFIX.len()..];
        for bad in [
            String::new(),
            "sha256:".to_owned(),
            hex.to_owned(),
            format!("SHA256:{hex}"),
            format!("sha512:{hex}"),
            format!("sha256:{}", hex.to_uppercase()),
            format!("sha256:{}", &hex[1..]),
            format!("sha256:{hex}0"),
            format!("sha256: {}", &hex[1..]),
            format!("sha256:{}g", &hex[1..]),
            format!(" {}", hash.as_str()),
            format!("{}\n", hash.as_str()),
        ] {
            assert_eq!(TokenHash::parse(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn redaction_covers_the_plaintext_and_its_base64() {
        let token = Token::generate();
        let b64 = serde_json::to_string(&k8s_openapi::ByteString(token.expose().as_bytes().to_vec())).unwrap();
        let b64 = b64.trim_matches('"');
        let message =
            format!("data.token: Invalid value: \"{b64}\" and {} and {}", token.expose(), b64.trim_end_matches('='));
        let redacted = token.redact_from(&message);
        assert!(!redacted.contains(token.expose()), "{redacted}");
        assert!(!redacted.contains(b64.trim_end_matches('=')), "{redacted}");
        assert_eq!(redacted.matches("[redacted]").count(), 3, "{redacted}");
        assert_eq!(token.redact_from("nothing here"), "nothing here");
    }
}
