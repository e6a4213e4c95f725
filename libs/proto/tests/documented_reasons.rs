//! The reasons docs/protocol.md lists under "Reasons you may see" are the ones berth really
//! gives: each documented text matches a real one (`…` stands for any text), and each real
//! reason of a bad command matches a documented text.

use berth_proto::Command;
use std::path::Path;

/// The backticked texts of the "Reasons you may see" paragraph.
fn documented() -> Vec<String> {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/protocol.md"),
    )
    .expect("docs/protocol.md");
    let start = doc.find("Reasons you may see").expect("the paragraph");
    let rest = &doc[start..];
    let end = rest.find("\n\n").unwrap_or(rest.len());
    let paragraph = &rest[..end];
    // Backticks inside a reason are written \` in the doc.
    let paragraph = paragraph.replace("\\`", "\u{1}");
    paragraph
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|s| s.replace('\u{1}', "`"))
        .filter(|s| !s.is_empty() && s != "op")
        .collect()
}

/// Whether `real` reads as `doc`, `…` in `doc` standing for any text.
fn matches(doc: &str, real: &str) -> bool {
    let mut at = 0;
    let parts: Vec<&str> = doc.split('…').collect();
    for (i, part) in parts.iter().enumerate() {
        let part = part.trim_matches(' ');
        if part.is_empty() {
            continue;
        }
        match real[at..].find(part) {
            Some(found) if i > 0 || found == 0 => at += found + part.len(),
            _ => return false,
        }
    }
    parts.last().is_some_and(|p| p.trim().is_empty()) || at == real.len()
}

fn reason(bytes: &[u8]) -> String {
    Command::decode(bytes)
        .expect_err("a bad command")
        .to_string()
}

fn msgpack(v: &serde_json::Value) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("encode")
}

#[test]
fn every_documented_reason_is_a_real_one_and_every_real_one_is_documented() {
    use serde_json::json;
    let mut real = vec![
        reason(&vec![0x80; 70_000]),
        reason(&msgpack(&json!([1, 2]))),
        reason(&msgpack(&json!({"vram_bytes": 1}))),
        reason(&msgpack(&json!({"op": "x"}))),
        reason(&msgpack(&json!({"op": "start", "gpus": 1}))),
        reason(&msgpack(&json!({"op": "start", "vram_bytes": -5}))),
        reason(&msgpack(&json!({"op": "start", "vram_bytes": 1_i64 << 60}))),
        reason(&msgpack(
            &json!({"op": "start", "vram_bytes": 1, "gpus": 0}),
        )),
        reason(&msgpack(
            &json!({"op": "start", "vram_bytes": 1, "model": "a\u{0}b"}),
        )),
        reason(&msgpack(&json!({"op": "stop", "reason": "x".repeat(5000)}))),
    ];
    // The two the analyzer words itself, as it words them.
    let analyzer = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../services/analyzer/src/commands.rs"),
    )
    .expect("the analyzer's command handling");
    for text in [
        "does not name a valid instance id",
        "the database refused the command: ",
    ] {
        assert!(
            analyzer.contains(text),
            "the analyzer no longer says {text:?}"
        );
    }
    real.push("subject \"a.b\" does not name a valid instance id".into());
    real.push("the database refused the command: value too long".into());

    let doc = documented();
    assert!(doc.len() >= 10, "{doc:?}");
    for d in &doc {
        assert!(
            real.iter().any(|r| matches(d, r)),
            "docs/protocol.md lists {d:?}, which berth never says; it says:\n{real:#?}"
        );
    }
    for r in &real {
        assert!(
            doc.iter().any(|d| matches(d, r)),
            "berth says {r:?}, which docs/protocol.md does not list:\n{doc:#?}"
        );
    }
}

#[test]
fn the_matcher_reads_ellipses_as_any_text() {
    assert!(matches(
        "unknown op \"x\" …",
        "unknown op \"x\" (start or stop)"
    ));
    assert!(matches(
        "… more than any GPU has …",
        "vram 9 is more than any GPU has (limit)"
    ));
    assert!(!matches(
        "gpus must be between 1 and 64, got 0",
        "gpus must be between 1 and 64, got 7"
    ));
    assert!(!matches("payload is …", "the payload is 7"));
}
