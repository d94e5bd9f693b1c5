//! `-o json|yaml` for commands whose output is data.

use std::io::{self, Write};

use clap::ValueEnum;
use serde::Serialize;
use serde_json::ser::{Formatter, PrettyFormatter};

use crate::human::unsafe_for_terminal;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Json,
    Yaml,
}

pub fn print_data(format: OutputFormat, value: &impl Serialize) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => println!("{}", to_json(value)?),
        OutputFormat::Yaml => print!("{}", serde_yaml::to_string(value)?),
    }
    Ok(())
}

/// Pretty JSON in which every character a terminal would act on or hide is a `\uXXXX` escape: still
/// the same data. serde_json escapes C0 controls (ESC included) itself, but writes C1 controls (an
/// 8-bit CSI) and bidi overrides as they are. (serde_yaml escapes C1 controls too, not bidi
/// overrides; those only reorder what is read.)
fn to_json(value: &impl Serialize) -> anyhow::Result<String> {
    let mut out = Vec::new();
    value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, TerminalSafe(PrettyFormatter::new())))?;
    Ok(String::from_utf8(out)?)
}

struct TerminalSafe(PrettyFormatter<'static>);

impl Formatter for TerminalSafe {
    fn write_string_fragment<W: ?Sized + Write>(&mut self, writer: &mut W, fragment: &str) -> io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices().filter(|(_, c)| unsafe_for_terminal(*c)) {
            writer.write_all(&fragment.as_bytes()[start..i])?;
            for unit in c.encode_utf16(&mut [0; 2]) {
                write!(writer, "\\u{unit:04x}")?;
            }
            start = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }

    // The rest is PrettyFormatter's.
    fn begin_array<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.0.begin_array(writer)
    }
    fn end_array<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.0.end_array(writer)
    }
    fn begin_array_value<W: ?Sized + Write>(&mut self, writer: &mut W, first: bool) -> io::Result<()> {
        self.0.begin_array_value(writer, first)
    }
    fn end_array_value<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.0.end_array_value(writer)
    }
    fn begin_object<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.0.begin_object(writer)
    }
    fn end_object<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.0.end_object(writer)
    }
    fn begin_object_key<W: ?Sized + Write>(&mut self, writer: &mut W, first: bool) -> io::Result<()> {
        self.0.begin_object_key(writer, first)
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.0.begin_object_value(writer)
    }
    fn end_object_value<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.0.end_object_value(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escapes_what_a_terminal_acts_on_and_stays_the_same_data() {
        let evil = "a\u{1b}]0;x\u{7}b\u{9b}2Jc\u{202e}d\u{85}e\u{e0041}f é \u{1f600} \"q\" \\ \n";
        let value = serde_json::json!({ "items": [{ "message": evil, "n": 1 }], format!("k\u{9b}"): [] });
        let out = to_json(&value).unwrap();
        assert!(!out.chars().any(|c| unsafe_for_terminal(c) && c != '\n'), "{out:?}");
        assert!(out.contains(r"b\u009b2Jc\u202ed\u0085e\udb40\udc41f é"), "{out}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap(), value);
        // Laid out as serde_json's pretty printer does.
        let plain = serde_json::json!({ "a": [1, { "b": "c" }], "d": {} });
        assert_eq!(to_json(&plain).unwrap(), serde_json::to_string_pretty(&plain).unwrap());
    }
}
