//! Rules for the text every message carries. PostgreSQL refuses a NUL in `text` and `jsonb`,
//! NATS headers cannot hold line breaks, and a terminal runs escape sequences: so no text
//! field of a command may hold a control character, every one is bounded, and reasons (which
//! agents and berth itself write, from log lines and error texts) are cleaned rather than
//! refused.

use serde_json::Value;

/// Longest text of any one field of a command (a model path is the longest that is needed).
pub const MAX_TEXT_BYTES: usize = 4096;
/// Longest reason berth stores or publishes; a longer one is cut (and marked with `…`).
pub const MAX_REASON_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadText {
    #[error(
        "{field} holds the control character U+{code:04X}; text may not hold control \
         characters (NUL, line breaks, escapes)"
    )]
    Control { field: String, code: u32 },
    #[error("{field} is {len} bytes long; at most {max}")]
    TooLong {
        field: String,
        len: usize,
        max: usize,
    },
}

/// Checks one text field: at most `max` bytes and no control character.
pub fn check(field: &str, value: &str, max: usize) -> Result<(), BadText> {
    if value.len() > max {
        return Err(BadText::TooLong {
            field: field.to_owned(),
            len: value.len(),
            max,
        });
    }
    match value.chars().find(|c| c.is_control()) {
        Some(c) => Err(BadText::Control {
            field: field.to_owned(),
            code: u32::from(c),
        }),
        None => Ok(()),
    }
}

/// Checks every string of a value, map keys included, against [`check`] with
/// [`MAX_TEXT_BYTES`]; the error names the field by its path (`selector.zone`).
pub fn check_all(value: &Value) -> Result<(), BadText> {
    fn walk(v: &Value, path: &mut String) -> Result<(), BadText> {
        match v {
            Value::String(s) => check(field_name(path), s, MAX_TEXT_BYTES),
            Value::Array(items) => items.iter().try_for_each(|item| walk(item, path)),
            Value::Object(map) => {
                for (key, item) in map {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    // The key is checked before it becomes part of a field name in an error.
                    check("a field name", key, MAX_TEXT_BYTES)?;
                    path.push_str(key);
                    walk(item, path)?;
                    path.truncate(len);
                }
                Ok(())
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
        }
    }
    fn field_name(path: &str) -> &str {
        if path.is_empty() { "a value" } else { path }
    }
    walk(value, &mut String::new())
}

/// An error with its causes, on one line (`outer: cause: root`), leaving out a cause whose
/// words the text already holds (many errors repeat their source in their own message).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// A reason as berth stores and publishes it: control characters become spaces and the text
/// is cut at a character boundary to at most [`MAX_REASON_BYTES`], ending with `…` when cut.
pub fn reason(text: &str) -> String {
    const MARK: &str = "…";
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    };
    if text.len() <= MAX_REASON_BYTES {
        return clean(text);
    }
    let mut end = MAX_REASON_BYTES - MARK.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = clean(&text[..end]);
    out.push_str(MARK);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_chain_names_each_cause_once() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let root = E("connection refused", None);
        let repeats = E("connect: connection refused", Some(Box::new(root)));
        let outer = E("upstream failed", Some(Box::new(repeats)));
        assert_eq!(
            error_chain(&outer),
            "upstream failed: connect: connection refused"
        );
    }

    #[test]
    fn control_characters_and_long_text_are_refused() {
        assert!(check("model", "llama-3 8B ünïcode", 64).is_ok());
        assert_eq!(
            check("model", "a\0b", 64),
            Err(BadText::Control {
                field: "model".into(),
                code: 0
            })
        );
        for bad in ["a\nb", "\x1b[2J", "tab\there", "\u{7f}", "\u{85}"] {
            assert!(check("f", bad, 64).is_err(), "{bad:?}");
        }
        assert!(matches!(
            check("f", &"x".repeat(65), 64),
            Err(BadText::TooLong { len: 65, .. })
        ));
    }

    #[test]
    fn every_string_of_a_value_is_checked_and_named_by_its_path() {
        let ok = serde_json::json!({"model": "m", "selector": {"zone": "a"}, "ids": ["x"]});
        assert!(check_all(&ok).is_ok());
        let bad = serde_json::json!({"model": "m", "selector": {"zone": "a\u{0}"}});
        let err = check_all(&bad).unwrap_err().to_string();
        assert!(err.contains("selector.zone"), "{err}");
        let bad_key = serde_json::json!({"selector": {"zo\u{0}ne": "a"}});
        assert!(check_all(&bad_key).is_err());
        let in_array = serde_json::json!({"gpu_ids": ["w:0", "w\n1"]});
        assert!(
            check_all(&in_array)
                .unwrap_err()
                .to_string()
                .contains("gpu_ids")
        );
    }

    #[test]
    fn reasons_are_cleaned_and_bounded_at_a_character_boundary() {
        assert_eq!(reason("exit 1\nlast line"), "exit 1 last line");
        let long = "é".repeat(MAX_REASON_BYTES);
        let cut = reason(&long);
        assert!(cut.len() <= MAX_REASON_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert_eq!(
            reason(&"x".repeat(MAX_REASON_BYTES)).len(),
            MAX_REASON_BYTES
        );
    }

    proptest::proptest! {
        #[test]
        fn a_reason_is_always_short_and_clean(text in ".{0,3000}") {
            let r = reason(&text);
            proptest::prop_assert!(r.len() <= MAX_REASON_BYTES);
            proptest::prop_assert!(check("reason", &r, MAX_REASON_BYTES).is_ok());
        }
    }
}
