//! Formatting for people: relative times in kubectl's style, short hashes, aligned tables, and
//! cluster-provided text made safe for a terminal.

use std::borrow::Cow;
use std::fmt::Write as _;

use k8s_openapi::jiff::Timestamp;

/// Text from the cluster (Event and condition messages, annotations, labels, names, API server
/// messages) as it may be shown on a terminal: every character that steers a terminal or hides or
/// reorders text is shown as an escape instead. Control characters (C0, including ESC and newline,
/// DEL and C1) become `\x1b`, `\n`, `\x9b`...; bidirectional overrides and isolates, zero-width and
/// other invisible format characters, line and paragraph separators become `\u{202e}`... A tenant
/// who can write an annotation or an Event can then neither retitle the admin's terminal, clear it,
/// forge a line of output nor reverse what is read. Backslashes are kept as they are: this is for
/// reading, not for parsing (`-o json|yaml` is for that).
pub fn sanitize(text: &str) -> Cow<'_, str> {
    if !text.chars().any(unsafe_for_terminal) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if unsafe_for_terminal(c) => {
                let _ = write!(out, "\\u{{{:04x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Control characters (Unicode `Cc`: C0, DEL, C1) and the invisible format characters that change
/// how the text around them reads.
pub fn unsafe_for_terminal(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'                      // Arabic letter mark
            | '\u{180e}'                    // Mongolian vowel separator
            | '\u{200b}'..='\u{200f}'        // zero-width space/joiners, LRM, RLM
            | '\u{2028}'..='\u{202e}'        // line/paragraph separators, bidi embeddings and overrides
            | '\u{2060}'..='\u{2064}'        // word joiner, invisible operators
            | '\u{2066}'..='\u{206f}'        // bidi isolates, deprecated format characters
            | '\u{feff}'                    // zero-width no-break space (BOM)
            | '\u{fff9}'..='\u{fffb}'        // interlinear annotations
            | '\u{e0000}'..='\u{e007f}' // tags: invisible ASCII look-alikes
        )
}

/// A duration in whole seconds as kubectl prints ages (`k8s.io/apimachinery/pkg/util/duration`'s
/// `HumanDuration`): `45s`, `3m20s`, `95m`, `5h10m`, `30h`, `3d4h`, `87d`, `2y30d`.
pub fn human_duration(seconds: i64) -> String {
    let seconds = seconds.max(0);
    let (minutes, hours, days) = (seconds / 60, seconds / 3600, seconds / 86_400);
    if seconds < 120 {
        format!("{seconds}s")
    } else if minutes < 10 {
        match seconds % 60 {
            0 => format!("{minutes}m"),
            s => format!("{minutes}m{s}s"),
        }
    } else if minutes < 3 * 60 {
        format!("{minutes}m")
    } else if hours < 8 {
        match minutes % 60 {
            0 => format!("{hours}h"),
            m => format!("{hours}h{m}m"),
        }
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        match hours % 24 {
            0 => format!("{days}d"),
            h => format!("{days}d{h}h"),
        }
    } else if days < 365 * 2 {
        format!("{days}d")
    } else if days < 365 * 8 {
        match days % 365 {
            0 => format!("{}y", days / 365),
            d => format!("{}y{d}d", days / 365),
        }
    } else {
        format!("{}y", days / 365)
    }
}

/// `t` relative to `now`: `in 3d`, `5m ago`, or `now` within a second.
pub fn relative(t: Timestamp, now: Timestamp) -> String {
    let delta = t.as_second() - now.as_second();
    match delta {
        0 => "now".to_owned(),
        d if d > 0 => format!("in {}", human_duration(d)),
        d => format!("{} ago", human_duration(-d)),
    }
}

/// `2026-05-01T00:00:00Z (in 3d)`.
pub fn at(t: Timestamp, now: Timestamp) -> String {
    format!("{} ({})", whole_seconds(t), relative(t, now))
}

/// RFC 3339 without fractions (Kubernetes times have whole seconds; Events have microseconds).
pub fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// `sha256:` and the first 12 hex digits: enough to tell tokens apart in a table.
pub fn short_hash(hash: &str) -> String {
    match hash.strip_prefix("sha256:") {
        Some(hex) if hex.len() > 12 => format!("sha256:{}", &hex[..12]),
        _ => hash.to_owned(),
    }
}

/// Columns separated by three spaces, left-aligned, as `kubectl get` prints them.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 == widths.len() {
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.push_str(&" ".repeat(widths[i] - cell.chars().count() + 3));
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = line(&mut headers.iter().copied());
    out.push('\n');
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl_ages() {
        let cases = [
            (-5, "0s"),
            (0, "0s"),
            (45, "45s"),
            (119, "119s"),
            (120, "2m"),
            (200, "3m20s"),
            (599, "9m59s"),
            (600, "10m"),
            (95 * 60, "95m"),
            (3 * 3600, "3h"),
            (5 * 3600 + 10 * 60, "5h10m"),
            (30 * 3600, "30h"),
            (3 * 86_400, "3d"),
            (3 * 86_400 + 4 * 3600, "3d4h"),
            (87 * 86_400 + 3600, "87d"),
            (730 * 86_400, "2y"),
            (760 * 86_400, "2y30d"),
            (3650 * 86_400, "10y"),
        ];
        for (seconds, want) in cases {
            assert_eq!(human_duration(seconds), want, "{seconds}s");
        }
    }

    #[test]
    fn times_are_relative_to_now() {
        let now: Timestamp = "2026-01-10T12:00:00Z".parse().unwrap();
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        assert_eq!(relative(t("2026-01-13T12:00:00Z"), now), "in 3d");
        assert_eq!(relative(t("2026-01-10T11:55:00Z"), now), "5m ago");
        assert_eq!(relative(now, now), "now");
        assert_eq!(relative(t("2026-01-10T12:00:00.5Z"), now), "now");
        assert_eq!(at(t("2026-01-10T13:30:00.123Z"), now), "2026-01-10T13:30:00Z (in 90m)");
    }

    #[test]
    fn hashes_are_shortened_and_tables_aligned() {
        let hash = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(short_hash(hash), "sha256:ba7816bf8f01");
        assert_eq!(short_hash("weird"), "weird");
        let out = table(&["NAME", "READY"], &[vec!["acme".into(), "True".into()], vec!["b".into(), "-".into()]]);
        assert_eq!(out, "NAME   READY\nacme   True\nb      -\n");
    }

    #[test]
    fn terminal_controls_in_cluster_text_are_shown_escaped() {
        let cases = [
            ("acme", "acme"),
            ("", ""),
            ("caf\u{e9} \u{1f600} \u{4e2d}\u{6587} a\\b", "caf\u{e9} \u{1f600} \u{4e2d}\u{6587} a\\b"),
            // OSC: retitle the window; CSI: clear the screen, colours.
            ("\u{1b}]0;pwned\u{7}", "\\x1b]0;pwned\\x07"),
            ("\u{1b}[2J\u{1b}[31mred", "\\x1b[2J\\x1b[31mred"),
            // A forged second line, a carriage return overwriting the line, tabs breaking the table.
            ("ok\nacme: all fine", "ok\\nacme: all fine"),
            ("secret\rfine", "secret\\rfine"),
            ("a\tb", "a\\tb"),
            ("nul\0 bell\u{7} bs\u{8} del\u{7f}", "nul\\x00 bell\\x07 bs\\x08 del\\x7f"),
            // C1 controls: the 8-bit CSI, OSC, NEL.
            ("\u{9b}2J \u{9d}0;x \u{85}", "\\x9b2J \\x9d0;x \\x85"),
            // Bidi: "txt.exe" shown as "exe.txt".
            ("\u{202e}txt.exe", "\\u{202e}txt.exe"),
            ("\u{2066}a\u{2069} \u{200f}", "\\u{2066}a\\u{2069} \\u{200f}"),
            ("zero\u{200b}width\u{feff}", "zero\\u{200b}width\\u{feff}"),
            ("line\u{2028}sep", "line\\u{2028}sep"),
            ("tag\u{e0041}", "tag\\u{e0041}"),
        ];
        for (input, want) in cases {
            let got = sanitize(input);
            assert_eq!(got, want, "{input:?}");
            assert!(!got.chars().any(unsafe_for_terminal), "{got:?}");
            assert_eq!(matches!(got, Cow::Borrowed(_)), input == want, "no copy of clean text: {input:?}");
        }
    }
}
