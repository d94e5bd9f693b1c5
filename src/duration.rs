//! Token lifetimes as users write them in a `ScimDirectory` spec (`tokenExpiresIn`, `renewBefore`).
//!
//! Two spellings are accepted, so a value can be copied either from Ona's API or from habit:
//!
//! - the protobuf-JSON `Duration` form that Ona's `RegenerateSCIMToken` uses, in whole seconds:
//!   `"15552000s"`;
//! - compound units in the order days, hours, minutes, seconds, each at most once: `"180d"`,
//!   `"4320h"`, `"1h30m"`, `"1d12h"`.
//!
//! Anything else is rejected rather than guessed at: a token lifetime that silently means something
//! other than what was written is a security problem. That includes fractions (`"1.5s"`): token
//! lifetimes have whole-second precision, like the RFC 3339 timestamps they turn into, so a fraction
//! would be rounded away silently (and `"3600.000000001s"` would pass a one-hour minimum that its
//! timestamps then do not keep). Fractions are rejected, not rounded.
//!
//! [`DURATION_PATTERN`] is the same grammar as a regular expression for the CRD schema, so most
//! mistakes are refused by the API server before the operator sees them.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use k8s_openapi::jiff::SignedDuration;

/// The accepted grammar as an anchored regular expression for an OpenAPI `pattern` in the CRD.
///
/// Written in the common subset of ECMA-262 and RE2 (no lookahead), which is what Kubernetes and
/// its clients evaluate. It also matches the empty string, which the parser rejects: set
/// `minLength: 2` next to it (the shortest duration, e.g. `"1s"`, has two characters). Values that
/// match but are too large to represent are rejected by the parser.
pub const DURATION_PATTERN: &str = r"^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$";

/// The shortest token lifetime: shorter ones would have the operator rotating constantly and leave
/// no time to update the identity provider.
pub const MIN_TOKEN_LIFETIME: TokenLifetime = TokenLifetime(Duration::from_secs(60 * 60));

/// The longest token lifetime (ten years). Longer is indistinguishable from "never expires", which
/// is spelled by leaving the field out.
pub const MAX_TOKEN_LIFETIME: TokenLifetime = TokenLifetime(Duration::from_secs(3650 * 24 * 60 * 60));

/// The longest rotation overlap: a day, the bound Chainguard's `scim token regenerate --overlap` uses.
/// Long enough for an identity provider's provisioning cycle (about 40 minutes for Microsoft Entra).
pub const MAX_ROTATION_OVERLAP: TokenLifetime = TokenLifetime(Duration::from_secs(24 * 60 * 60));

/// Examples shown in every parse error, so the message says how to fix the value.
const EXPECTED: &str = r#"expected e.g. "15552000s", "4320h", "1h30m" or "180d""#;

/// A non-negative whole number of seconds parsed from the spec.
///
/// Always representable as a [`SignedDuration`] (the parser refuses larger values), so the
/// conversions below cannot fail. Compares by value: `"1h30m" == "5400s"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenLifetime(Duration);

impl TokenLifetime {
    pub fn as_std(&self) -> Duration {
        self.0
    }

    /// As jiff's duration, the time type of k8s-openapi's `Time`.
    pub fn as_signed_duration(&self) -> SignedDuration {
        SignedDuration::try_from(self.0).expect("the parser only accepts durations that fit a SignedDuration")
    }

    /// The value in seconds, e.g. `"5400s"`.
    ///
    /// One spelling per value, so the operator can store it and compare it later to tell whether the
    /// setting really changed or was only rewritten (`"1h30m"` → `"5400s"`). It is also the form
    /// Ona's API uses, and parses back to the same value.
    pub fn canonical(&self) -> String {
        format!("{}s", self.0.as_secs())
    }

    pub fn as_secs(&self) -> u64 {
        self.0.as_secs()
    }
}

/// Shows the value in the largest units, e.g. `1d12h` or `59m`, for messages meant for humans. Parses
/// back to the same value; use [`TokenLifetime::canonical`] for anything compared or stored.
impl fmt::Display for TokenLifetime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        let parts = [(secs / 86_400, 'd'), (secs % 86_400 / 3600, 'h'), (secs % 3600 / 60, 'm')];
        let mut written = false;
        for (n, unit) in parts.into_iter().filter(|&(n, _)| n > 0) {
            write!(f, "{n}{unit}")?;
            written = true;
        }
        if !secs.is_multiple_of(60) || !written {
            write!(f, "{}s", secs % 60)?;
        }
        Ok(())
    }
}

impl FromStr for TokenLifetime {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s)
    }
}

/// Parses a duration in the grammar described in the module documentation.
pub fn parse_duration(s: &str) -> Result<TokenLifetime, DurationError> {
    parse(s).map(TokenLifetime).map_err(|problem| DurationError::Invalid { input: s.to_owned(), problem })
}

/// Checks that a lifetime is within [`MIN_TOKEN_LIFETIME`] and [`MAX_TOKEN_LIFETIME`].
///
/// Separate from parsing so it can be applied per field; the message leaves out the field name, which
/// the caller prefixes.
pub fn check_token_lifetime(lifetime: &TokenLifetime) -> Result<(), DurationError> {
    if (MIN_TOKEN_LIFETIME..=MAX_TOKEN_LIFETIME).contains(lifetime) {
        Ok(())
    } else {
        Err(DurationError::OutOfBounds { got: *lifetime, min: MIN_TOKEN_LIFETIME, max: MAX_TOKEN_LIFETIME })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The string is not a duration in the accepted grammar.
    #[error("invalid duration {input:?}: {problem}; {EXPECTED}")]
    Invalid { input: String, problem: Problem },
    /// A valid duration outside the range allowed for token lifetimes.
    #[error("must be between {min} and {max}, got {got}")]
    OutOfBounds { got: TokenLifetime, min: TokenLifetime, max: TokenLifetime },
}

/// What exactly is wrong with a string that is not a duration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    Empty,
    Whitespace,
    /// `+` or `-` anywhere: durations are non-negative and unsigned.
    Sign,
    UnknownUnit(String),
    /// A unit with no number before it, e.g. `"h"`.
    MissingNumber(char),
    /// A number with no unit after it, e.g. `"3600"`.
    MissingUnit(String),
    /// A number that is not digits with an optional fraction, e.g. `".5"` or `"1."`.
    MalformedNumber(String),
    /// A fraction, e.g. `"1.5s"` or `"1.5h"`: lifetimes are whole seconds.
    Fraction(String),
    /// A unit after a smaller one, e.g. `"30m1h"`.
    OutOfOrder {
        unit: char,
        after: char,
    },
    Repeated(char),
    UnexpectedCharacter(char),
    /// Too large to represent (beyond about 292 million years).
    Overflow,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Empty => write!(f, "it is empty"),
            Problem::Whitespace => write!(f, "whitespace is not allowed"),
            Problem::Sign => write!(f, "signs are not allowed, durations are non-negative"),
            Problem::UnknownUnit(u) => write!(f, "unknown unit {u:?} (units are d, h, m and s)"),
            Problem::MissingNumber(u) => write!(f, "unit \"{u}\" has no number before it"),
            Problem::MissingUnit(n) => write!(f, "number {n:?} has no unit"),
            Problem::MalformedNumber(n) => write!(f, "malformed number {n:?}"),
            Problem::Fraction(n) => {
                write!(
                    f,
                    "fraction {n:?} is not allowed: token lifetimes are whole seconds (write e.g. \"5400s\" or \"1h30m\")"
                )
            }
            Problem::OutOfOrder { unit, after } => {
                write!(f, "unit \"{unit}\" must come before \"{after}\" (the order is d, h, m, s)")
            }
            Problem::Repeated(u) => write!(f, "unit \"{u}\" appears more than once"),
            Problem::UnexpectedCharacter(c) => write!(f, "unexpected character {c:?}"),
            Problem::Overflow => write!(f, "it is too large"),
        }
    }
}

/// The units, in the only order they may appear.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Unit {
    Day,
    Hour,
    Minute,
    Second,
}

impl Unit {
    fn parse(s: &str) -> Option<Unit> {
        match s {
            "d" => Some(Unit::Day),
            "h" => Some(Unit::Hour),
            "m" => Some(Unit::Minute),
            "s" => Some(Unit::Second),
            _ => None,
        }
    }

    fn symbol(self) -> char {
        match self {
            Unit::Day => 'd',
            Unit::Hour => 'h',
            Unit::Minute => 'm',
            Unit::Second => 's',
        }
    }

    fn seconds(self) -> u64 {
        match self {
            Unit::Day => 86_400,
            Unit::Hour => 3600,
            Unit::Minute => 60,
            Unit::Second => 1,
        }
    }
}

/// Splits `s` after its longest prefix of characters satisfying `pred`.
fn split_while(s: &str, pred: impl Fn(char) -> bool) -> (&str, &str) {
    s.split_at(s.find(|c| !pred(c)).unwrap_or(s.len()))
}

fn parse(s: &str) -> Result<Duration, Problem> {
    // Checked up front so e.g. "-1h" says "sign" rather than "unexpected character '-'".
    if s.is_empty() {
        return Err(Problem::Empty);
    }
    if s.chars().any(char::is_whitespace) {
        return Err(Problem::Whitespace);
    }
    if s.contains(['+', '-']) {
        return Err(Problem::Sign);
    }

    let mut secs: u64 = 0;
    let mut previous: Option<Unit> = None;
    let mut rest = s;
    while !rest.is_empty() {
        // One component: digits, an optional fraction, a unit.
        let (int, after_int) = split_while(rest, |c| c.is_ascii_digit());
        let (frac, after_number) = match after_int.strip_prefix('.') {
            Some(r) => {
                let (frac, r) = split_while(r, |c| c.is_ascii_digit());
                (Some(frac), r)
            }
            None => (None, after_int),
        };
        let number = &rest[..rest.len() - after_number.len()];
        let (unit, after_unit) = split_while(after_number, char::is_alphabetic);
        rest = after_unit;

        if unit.is_empty() {
            return Err(match after_number.chars().next() {
                None => Problem::MissingUnit(number.to_owned()),
                Some(c) => Problem::UnexpectedCharacter(c),
            });
        }
        let unit = Unit::parse(unit).ok_or_else(|| Problem::UnknownUnit(unit.to_owned()))?;
        if number.is_empty() {
            return Err(Problem::MissingNumber(unit.symbol()));
        }
        if int.is_empty() || frac == Some("") {
            return Err(Problem::MalformedNumber(number.to_owned()));
        }
        match previous {
            Some(p) if p == unit => return Err(Problem::Repeated(unit.symbol())),
            Some(p) if p > unit => {
                return Err(Problem::OutOfOrder { unit: unit.symbol(), after: p.symbol() });
            }
            _ => previous = Some(unit),
        }
        if frac.is_some() {
            return Err(Problem::Fraction(number.to_owned()));
        }

        // Digits only, so the only way parsing fails is a value beyond u64.
        let n: u64 = int.parse().map_err(|_| Problem::Overflow)?;
        secs = n.checked_mul(unit.seconds()).and_then(|s| secs.checked_add(s)).ok_or(Problem::Overflow)?;
    }

    let duration = Duration::from_secs(secs);
    // Keeps `TokenLifetime::as_signed_duration` infallible.
    SignedDuration::try_from(duration).map_err(|_| Problem::Overflow)?;
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Strings the parser accepts, with their value.
    const VALID: &[(&str, Duration)] = &[
        ("15552000s", secs(15_552_000)),
        ("4320h", secs(15_552_000)),
        ("90m", secs(5400)),
        ("1h30m", secs(5400)),
        ("180d", secs(15_552_000)),
        ("1d12h", secs(129_600)),
        ("1d2h3m4s", secs(93_784)),
        ("1d1s", secs(86_401)),
        ("01h", secs(3600)),
        ("0s", secs(0)),
        ("0d0h0m0s", secs(0)),
        ("59m", secs(3540)),
        ("3599s", secs(3599)),
        ("1h", secs(3600)),
        ("3600s", secs(3600)),
        ("3650d", secs(315_360_000)),
        ("87600h", secs(315_360_000)),
        ("3650d1s", secs(315_360_001)),
        ("3651d", secs(315_446_400)),
        // The largest whole number of seconds a SignedDuration holds.
        ("9223372036854775807s", secs(9_223_372_036_854_775_807)),
    ];

    /// Strings the parser rejects, with the reason.
    fn invalid() -> Vec<(&'static str, Problem)> {
        use Problem::*;
        let unit = |u: &str| UnknownUnit(u.to_owned());
        vec![
            ("", Empty),
            (" ", Whitespace),
            (" 1h", Whitespace),
            ("1h ", Whitespace),
            ("1h 30m", Whitespace),
            ("1h\n", Whitespace),
            ("\t", Whitespace),
            ("-1h", Sign),
            ("+1h", Sign),
            ("-0s", Sign),
            ("1h-30m", Sign),
            ("1ms", unit("ms")),
            ("2w", unit("w")),
            ("1y", unit("y")),
            ("30x", unit("x")),
            ("1H", unit("H")),
            ("1D", unit("D")),
            ("1µs", unit("µs")),
            ("1hm", unit("hm")),
            ("1h30min", unit("min")),
            ("30m1h", OutOfOrder { unit: 'h', after: 'm' }),
            ("1s1d", OutOfOrder { unit: 'd', after: 's' }),
            ("1h1d", OutOfOrder { unit: 'd', after: 'h' }),
            ("1h1h", Repeated('h')),
            ("1d2d", Repeated('d')),
            ("1s1s", Repeated('s')),
            ("h", MissingNumber('h')),
            ("s", MissingNumber('s')),
            ("d1h", MissingNumber('d')),
            ("1hm30s", unit("hm")),
            ("3600", MissingUnit("3600".to_owned())),
            ("1h30", MissingUnit("30".to_owned())),
            ("1.5", MissingUnit("1.5".to_owned())),
            ("1.5s", Fraction("1.5".to_owned())),
            ("3600.000000001s", Fraction("3600.000000001".to_owned())),
            ("1.0s", Fraction("1.0".to_owned())),
            ("1.5h", Fraction("1.5".to_owned())),
            ("1.5m", Fraction("1.5".to_owned())),
            ("0.5d", Fraction("0.5".to_owned())),
            ("1h0.5s", Fraction("0.5".to_owned())),
            (".5s", MalformedNumber(".5".to_owned())),
            ("1.s", MalformedNumber("1.".to_owned())),
            (".s", MalformedNumber(".".to_owned())),
            ("1.5.5s", UnexpectedCharacter('.')),
            ("1h,30m", UnexpectedCharacter(',')),
            ("1_000s", UnexpectedCharacter('_')),
            ("１h", UnexpectedCharacter('１')),
            ("P1D", unit("P")),
            ("99999999999999999999s", Overflow),
            ("18446744073709551615s", Overflow),
            ("9999999999999999d", Overflow),
            ("213503982334602d", Overflow),
            ("9223372036854775808s", Overflow),
        ]
    }

    #[test]
    fn valid_durations_parse_to_their_value() {
        for &(input, expected) in VALID {
            let parsed = parse_duration(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(parsed.as_std(), expected, "{input:?}");
            assert_eq!(input.parse::<TokenLifetime>().unwrap(), parsed, "{input:?} via FromStr");
        }
    }

    #[test]
    fn invalid_durations_are_rejected_with_the_reason() {
        for (input, expected) in invalid() {
            match parse_duration(input) {
                Err(DurationError::Invalid { input: echoed, problem }) => {
                    assert_eq!(problem, expected, "{input:?}");
                    assert_eq!(echoed, input);
                }
                other => panic!("{input:?}: expected {expected:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn error_messages_name_the_problem_and_the_expected_form() {
        let message = |s: &str| parse_duration(s).unwrap_err().to_string();
        assert_eq!(
            message("30x"),
            r#"invalid duration "30x": unknown unit "x" (units are d, h, m and s); expected e.g. "15552000s", "4320h", "1h30m" or "180d""#
        );
        assert_eq!(
            message("30m1h"),
            r#"invalid duration "30m1h": unit "h" must come before "m" (the order is d, h, m, s); expected e.g. "15552000s", "4320h", "1h30m" or "180d""#
        );
        assert!(message("3600").contains(r#"number "3600" has no unit"#));
        assert!(message("").starts_with(r#"invalid duration "": it is empty;"#));
        // Control characters are escaped, so the message stays on one line.
        assert!(message("1h\n").starts_with(r#"invalid duration "1h\n": whitespace"#));
    }

    #[test]
    fn canonical_form_is_seconds_and_equal_for_equal_values() {
        let canonical = |s: &str| parse_duration(s).unwrap().canonical();
        assert_eq!(canonical("1h30m"), "5400s");
        assert_eq!(canonical("90m"), "5400s");
        assert_eq!(canonical("5400s"), "5400s");
        assert_eq!(canonical("180d"), "15552000s");
        assert_eq!(canonical("4320h"), "15552000s");
        assert_eq!(canonical("0s"), "0s");
        assert_eq!(canonical("1d2h3m4s"), "93784s");
        assert_eq!(parse_duration("1h30m").unwrap(), parse_duration("5400s").unwrap());
        assert_ne!(parse_duration("1h30m").unwrap(), parse_duration("5401s").unwrap());
        for &(input, _) in VALID {
            let parsed = parse_duration(input).unwrap();
            assert_eq!(parse_duration(&parsed.canonical()).unwrap(), parsed, "{input:?} round trip");
        }
    }

    #[test]
    fn display_uses_the_largest_units_and_round_trips() {
        let display = |s: &str| parse_duration(s).unwrap().to_string();
        assert_eq!(display("5400s"), "1h30m");
        assert_eq!(display("129600s"), "1d12h");
        assert_eq!(display("3540s"), "59m");
        assert_eq!(display("15552000s"), "180d");
        assert_eq!(display("86401s"), "1d1s");
        assert_eq!(display("0s"), "0s");
        for &(input, _) in VALID {
            let parsed = parse_duration(input).unwrap();
            assert_eq!(parse_duration(&parsed.to_string()).unwrap(), parsed, "{input:?} round trip");
        }
    }

    #[test]
    fn converts_to_signed_duration() {
        let delta = |s: &str| parse_duration(s).unwrap().as_signed_duration();
        assert_eq!(delta("1h30m"), SignedDuration::from_secs(5400));
        assert_eq!(delta("9223372036854775807s"), SignedDuration::from_secs(i64::MAX));
        for &(input, expected) in VALID {
            assert_eq!(Duration::try_from(delta(input)).unwrap(), expected, "{input:?}");
        }
    }

    #[test]
    fn token_lifetime_bounds() {
        let check = |s: &str| check_token_lifetime(&parse_duration(s).unwrap());
        for ok in ["1h", "3600s", "60m", "180d", "3650d", "87600h", "315360000s"] {
            assert_eq!(check(ok), Ok(()), "{ok:?}");
        }
        for too_short_or_long in ["0s", "59m", "3599s", "3650d1s", "3651d", "9223372036854775s"] {
            assert!(
                matches!(check(too_short_or_long), Err(DurationError::OutOfBounds { .. })),
                "{too_short_or_long:?}"
            );
        }
        assert_eq!(check("59m").unwrap_err().to_string(), "must be between 1h and 3650d, got 59m");
        assert_eq!(check("3651d").unwrap_err().to_string(), "must be between 1h and 3650d, got 3651d");
        assert_eq!(MIN_TOKEN_LIFETIME, parse_duration("1h").unwrap());
        assert_eq!(MAX_TOKEN_LIFETIME, parse_duration("3650d").unwrap());
    }

    /// The CRD pattern and the parser must agree, or the API server would accept specs the operator
    /// then refuses (or the reverse). The only allowed differences: the empty string, excluded by
    /// `minLength: 2` in the schema, and values too large to represent, which a regex cannot see.
    #[test]
    fn pattern_agrees_with_the_parser() {
        let pattern = regex::Regex::new(DURATION_PATTERN).unwrap();
        assert!(DURATION_PATTERN.starts_with('^') && DURATION_PATTERN.ends_with('$'));
        let schema_accepts = |s: &str| s.len() >= 2 && pattern.is_match(s);

        for &(input, _) in VALID {
            assert!(schema_accepts(input), "pattern rejects valid {input:?}");
        }
        for (input, problem) in invalid() {
            let expected = problem == Problem::Overflow;
            assert_eq!(schema_accepts(input), expected, "pattern on {input:?} ({problem:?})");
        }
        assert!(pattern.is_match(""), "documented: the empty string needs minLength");
    }
}
