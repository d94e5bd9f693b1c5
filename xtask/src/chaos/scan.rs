//! Looks for plaintext tokens in logs: any `scim_` string with the token's length, alphabet and a
//! valid checksum (what a secret scanner matches, so a token never seen by the harness is found
//! too), and any base64 run that decodes to one (a Secret's `data.token` as the API carries it).

use std::path::Path;

use scim_token_operator::token::{TOKEN_LEN, TOKEN_PREFIX, has_valid_checksum};

/// Plaintext tokens found in `text`, in either form.
pub(crate) fn tokens_in(text: &[u8]) -> usize {
    plain(text) + base64_encoded(text)
}

/// Plaintext tokens in each of `files` that holds any: (path, count). Missing files are skipped.
pub(crate) fn files(files: &[&Path]) -> Vec<(String, usize)> {
    files
        .iter()
        .filter_map(|path| {
            let text = std::fs::read(path).ok()?;
            let found = tokens_in(&text);
            (found > 0).then(|| (path.display().to_string(), found))
        })
        .collect()
}

fn plain(text: &[u8]) -> usize {
    let prefix = TOKEN_PREFIX.as_bytes();
    let mut found = 0;
    let mut i = 0;
    while i + TOKEN_LEN <= text.len() {
        if text[i..].starts_with(prefix)
            && let Ok(candidate) = std::str::from_utf8(&text[i..i + TOKEN_LEN])
            && has_valid_checksum(candidate)
        {
            found += 1;
            i += TOKEN_LEN;
        } else {
            i += 1;
        }
    }
    found
}

/// Base64 of a 54-byte token is 72 characters without padding: decode every run of base64
/// characters of at least that length at each offset where a token could start.
fn base64_encoded(text: &[u8]) -> usize {
    const ENCODED: usize = TOKEN_LEN.div_ceil(3) * 4;
    let is_b64 = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/';
    let mut found = 0;
    let mut i = 0;
    while i < text.len() {
        if !is_b64(text[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < text.len() && is_b64(text[i]) {
            i += 1;
        }
        let run = &text[start..i];
        // A token is the whole value of `data.token`, so it starts at the run's first character.
        if run.len() >= ENCODED
            && let Some(decoded) = decode(&run[..ENCODED])
            && std::str::from_utf8(&decoded[..TOKEN_LEN]).is_ok_and(has_valid_checksum)
        {
            found += 1;
        }
    }
    found
}

fn decode(chars: &[u8]) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(chars.len() / 4 * 3);
    for quad in chars.chunks(4) {
        let mut n = 0u32;
        for &c in quad {
            n = (n << 6) | value(c)?;
        }
        out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use scim_token_operator::token::Token;

    use super::*;

    fn b64(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        bytes
            .chunks(3)
            .flat_map(|c| {
                let n = (u32::from(c[0]) << 16) | (u32::from(c[1]) << 8) | u32::from(c[2]);
                (0..4).map(move |i| A[(n >> (18 - 6 * i)) as usize & 63] as char)
            })
            .collect()
    }

    #[test]
    fn finds_tokens_plain_and_base64_and_nothing_else() {
        let token = Token::generate();
        let plain_line = format!("level=info msg=\"x\" token={}\n", token.expose());
        assert_eq!(tokens_in(plain_line.as_bytes()), 1);
        let encoded = format!("{{\"data\":{{\"token\":\"{}\"}}}}", b64(token.expose().as_bytes()));
        assert_eq!(tokens_in(encoded.as_bytes()), 1);
        // A hash, a near-miss and the prefix alone are not tokens.
        let mut broken = token.expose().to_string();
        broken.replace_range(10..11, if &broken[10..11] == "a" { "b" } else { "a" });
        let clean = format!("{} {broken} scim_ {}", token.hash(), b64(broken.as_bytes()));
        assert_eq!(tokens_in(clean.as_bytes()), 0);
    }
}
