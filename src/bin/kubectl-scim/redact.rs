//! A token pasted where a name belongs (`kubectl scim check scim_…` instead of piping it in) is
//! neither sent to the API server (where it would land in the request URL, its audit log and its
//! error message) nor repeated in an error: the arguments are checked before anything is sent, and
//! whatever is printed as an error has token-shaped text redacted.

use std::borrow::Cow;

use scim_token_operator::token::TOKEN_PREFIX;

use crate::Cli;
use crate::cluster::ConnectionArgs;

/// What replaces a token-shaped value in a message.
pub const REDACTED: &str = "scim_<redacted>";

/// Base62 characters after the prefix from which text counts as a token (a whole one has 49). Fewer
/// reveal little (15 of 49 characters leave more than 190 bits unknown), and a shorter bound would
/// catch kubeconfig names such as `scim_admin`.
const MIN_TOKEN_CHARS: usize = 16;

/// Where token-shaped text starts and ends in `text`, in order.
fn token_spans(text: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    text.match_indices(TOKEN_PREFIX).filter_map(move |(start, _)| {
        let body = &text[start + TOKEN_PREFIX.len()..];
        let len = body.bytes().take_while(u8::is_ascii_alphanumeric).count();
        (len >= MIN_TOKEN_CHARS).then_some((start, start + TOKEN_PREFIX.len() + len))
    })
}

/// Whether `text` holds something that looks like a token of this operator (whole or in part).
pub fn contains_token(text: &str) -> bool {
    token_spans(text).next().is_some()
}

/// `text` with every token-shaped part replaced by [`REDACTED`].
pub fn redact(text: &str) -> Cow<'_, str> {
    let mut spans = token_spans(text).peekable();
    if spans.peek().is_none() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    for (start, end) in spans {
        out.push_str(&text[from..start]);
        out.push_str(REDACTED);
        from = end;
    }
    out.push_str(&text[from..]);
    Cow::Owned(out)
}

/// Refuses a command line that has a token where a name or a flag's value belongs, naming the
/// argument but not its value. Checked before the client is made: nothing is sent.
pub fn refuse_token_arguments(cli: &Cli) -> anyhow::Result<()> {
    let ConnectionArgs { kubeconfig, context, cluster, user, namespace, as_user, as_group } = &cli.connection;
    let kubeconfig = kubeconfig.as_ref().map(|p| p.to_string_lossy().into_owned());
    let mut arguments: Vec<(&str, Option<&str>)> = vec![
        ("NAME", cli.command.name()),
        ("--kubeconfig", kubeconfig.as_deref()),
        ("--context", context.as_deref()),
        ("--cluster", cluster.as_deref()),
        ("--user", user.as_deref()),
        ("--namespace", namespace.as_deref()),
        ("--as", as_user.as_deref()),
    ];
    arguments.extend(as_group.iter().map(|g| ("--as-group", Some(g.as_str()))));
    let Some((argument, _)) = arguments.into_iter().find(|(_, value)| value.is_some_and(contains_token)) else {
        return Ok(());
    };
    let hint = if matches!(cli.command, crate::Command::Check { .. }) {
        "pass the ScimDirectory's name: kubectl scim check NAME reads the token on stdin"
    } else {
        "pass the name the argument asks for"
    };
    anyhow::bail!(
        "the {argument} argument looks like a SCIM token ({REDACTED}); it is not sent to the API server nor \
         printed: {hint}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use scim_token_operator::token::Token;

    #[test]
    fn token_shaped_text_is_found_and_redacted() {
        let token = Token::generate();
        let t = token.expose();
        let cases = [
            ("acme".to_owned(), "acme".to_owned()),
            ("scim-acme".to_owned(), "scim-acme".to_owned()),
            ("scim_admin".to_owned(), "scim_admin".to_owned()),
            ("scim_token_operator_leader 1".to_owned(), "scim_token_operator_leader 1".to_owned()),
            ("scim_0123456789abcde".to_owned(), "scim_0123456789abcde".to_owned()),
            ("scim_0123456789abcdef".to_owned(), REDACTED.to_owned()),
            (t.to_owned(), REDACTED.to_owned()),
            (t[..30].to_owned(), REDACTED.to_owned()),
            (
                format!("ScimDirectory \"{t}\" in namespace \"x\" not found"),
                format!("ScimDirectory \"{REDACTED}\" in namespace \"x\" not found"),
            ),
            (format!("Bearer {t}, then {t}."), format!("Bearer {REDACTED}, then {REDACTED}.")),
            (format!("é{t}é"), format!("é{REDACTED}é")),
        ];
        for (input, want) in cases {
            assert_eq!(redact(&input), want);
            assert_eq!(contains_token(&input), input != want, "{want}");
        }
    }

    #[test]
    fn a_token_in_any_name_or_flag_is_refused_without_being_repeated() {
        let token = Token::generate();
        let t = token.expose();
        let header = format!("Bearer {t}");
        for (args, argument) in [
            (vec!["check", t], "NAME"),
            (vec!["check", &header], "NAME"),
            (vec!["status", t], "NAME"),
            (vec!["rotate", t], "NAME"),
            (vec!["end-overlap", t], "NAME"),
            (vec!["token", t], "NAME"),
            (vec!["inspect", "secret", t], "NAME"),
            (vec!["status", "--kubeconfig", t], "--kubeconfig"),
            (vec!["status", "--context", t], "--context"),
            (vec!["status", "--cluster", t], "--cluster"),
            (vec!["status", "--user", t], "--user"),
            (vec!["status", "-n", t], "--namespace"),
            (vec!["status", "--as", t], "--as"),
            (vec!["status", "--as-group", "g", "--as-group", t], "--as-group"),
        ] {
            let cli = Cli::try_parse_from([&["kubectl-scim"][..], &args].concat()).unwrap();
            let err = refuse_token_arguments(&cli).unwrap_err().to_string();
            assert!(err.starts_with(&format!("the {argument} argument looks like a SCIM token")), "{err}");
            assert!(!err.contains(&t[5..]), "{args:?}");
        }
        for args in [vec!["status"], vec!["check", "acme", "--context", "scim_admin"], vec!["completion", "bash"]] {
            let cli = Cli::try_parse_from([&["kubectl-scim"][..], &args].concat()).unwrap();
            assert!(refuse_token_arguments(&cli).is_ok(), "{args:?}");
        }
        // An argument clap rejects is quoted in its message: redacted there.
        let rejected = Cli::try_parse_from(["kubectl-scim", "rotate", "acme", t]).unwrap_err().to_string();
        assert!(rejected.contains(t), "clap quotes it");
        assert!(!redact(&rejected).contains(&t[5..]) && redact(&rejected).contains(REDACTED));
    }
}
