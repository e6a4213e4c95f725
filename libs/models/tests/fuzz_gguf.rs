//! Fuzzing the GGUF reader (`parse_gguf` with `GgufLimits`) and the profile built from what
//! it accepts: arbitrary bytes and mutations of valid headers (`berth_proto::fuzzing`) must
//! never panic; a header is accepted only within its limits (counts, alignment, unique tensor
//! names), and a profile is returned only if it passes `ModelProfile::validate`.
//!
//! A few seconds by default; `BERTH_FUZZ_CASES=1000000 cargo test --release -p berth-models
//! --test fuzz_gguf` runs as long as you like. (The command and report decoders' fuzz test
//! is `libs/proto/tests/fuzz_decoders.rs`.)

use berth_models::gguf::{GgufLimits, parse_gguf, profile_from_gguf};
use berth_proto::fuzzing::{apply, mutation};
use proptest::prelude::*;
use std::collections::HashSet;

/// Metadata values the seeds use.
#[derive(Debug, Clone)]
enum Val {
    U32(u32),
    U64(u64),
    F32(f32),
    Bool(bool),
    Str(String),
    U32s(Vec<u32>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A GGUF v3 header with `kvs` and `tensors` (name, dims, ggml type id), tensor offsets
/// aligned to 32, and no data.
fn gguf(kvs: &[(String, Val)], tensors: &[(String, Vec<u64>, u32)]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut out, k);
        let (ty, bytes): (u32, Vec<u8>) = match v {
            Val::U32(x) => (4, x.to_le_bytes().to_vec()),
            Val::U64(x) => (10, x.to_le_bytes().to_vec()),
            Val::F32(x) => (6, x.to_le_bytes().to_vec()),
            Val::Bool(x) => (7, vec![u8::from(*x)]),
            Val::Str(s) => {
                let mut b = Vec::new();
                put_str(&mut b, s);
                (8, b)
            }
            Val::U32s(xs) => {
                let mut b = 4u32.to_le_bytes().to_vec();
                b.extend_from_slice(&(xs.len() as u64).to_le_bytes());
                xs.iter()
                    .for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
                (9, b)
            }
        };
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    let mut offset = 0u64;
    for (name, dims, ty) in tensors {
        put_str(&mut out, name);
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        dims.iter()
            .for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset += 4096;
    }
    out
}

/// A model-shaped header: an architecture, its hyperparameters, some noise, and a few
/// tensors per block.
fn seed() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![
            4 => proptest::sample::select(vec!["llama", "gemma3", "qwen2moe", "deepseek2"])
                .prop_map(str::to_owned),
            1 => "[a-z]{1,8}",
        ],
        1u32..6,
        (1u32..8).prop_map(|k| k * 32),
        1u32..8,
        0u32..8,
        proptest::collection::vec(
            (
                "[a-z.]{1,20}",
                prop_oneof![
                    any::<u32>().prop_map(Val::U32),
                    any::<u64>().prop_map(Val::U64),
                    any::<f32>().prop_map(Val::F32),
                    any::<bool>().prop_map(Val::Bool),
                    "[ -~]{0,16}".prop_map(Val::Str),
                    proptest::collection::vec(0u32..64, 0..8).prop_map(Val::U32s),
                ],
            ),
            0..4,
        ),
        prop_oneof![Just(0u32), Just(1u32), Just(2u32), Just(8u32)],
    )
        .prop_map(|(arch, blocks, embd, heads, kv, noise, ty)| {
            let key = |k: &str| format!("{arch}.{k}");
            let mut kvs = vec![
                ("general.architecture".to_owned(), Val::Str(arch.clone())),
                (key("block_count"), Val::U32(blocks)),
                (key("embedding_length"), Val::U32(embd)),
                (key("feed_forward_length"), Val::U32(embd * 4)),
                (key("context_length"), Val::U32(2048)),
                (key("attention.head_count"), Val::U32(heads)),
                (
                    key("attention.head_count_kv"),
                    Val::U32s(vec![kv; blocks as usize]),
                ),
                (key("expert_count"), Val::U32(kv)),
            ];
            let mut seen: HashSet<String> = kvs.iter().map(|(k, _)| k.clone()).collect();
            kvs.extend(noise.into_iter().filter(|(k, _)| seen.insert(k.clone())));
            let mut tensors = vec![(
                "token_embd.weight".to_owned(),
                vec![u64::from(embd), 100],
                ty,
            )];
            for b in 0..blocks {
                tensors.push((
                    format!("blk.{b}.attn_q.weight"),
                    vec![u64::from(embd), u64::from(embd)],
                    ty,
                ));
                tensors.push((
                    format!("blk.{b}.ffn_up.weight"),
                    vec![u64::from(embd), 4 * u64::from(embd)],
                    ty,
                ));
            }
            gguf(&kvs, &tensors)
        })
}

/// Limits small enough that mutated lengths reach them.
fn tight() -> GgufLimits {
    GgufLimits {
        max_string_len: 64,
        max_array_elements: 256,
        keep_array_len: 16,
        max_array_depth: 2,
        max_kv_count: 32,
        max_tensor_count: 64,
        max_header_bytes: 8 << 10,
        max_kept_bytes: 16 << 10,
    }
}

/// The contract of `parse_gguf` (and the profile of what it accepts) under `limits`.
fn check(bytes: &[u8], limits: &GgufLimits) -> Result<(), TestCaseError> {
    let Ok(g) = parse_gguf(bytes, limits) else {
        return Ok(());
    };
    prop_assert!(g.tensors.len() as u64 <= limits.max_tensor_count);
    prop_assert!(g.metadata.len() as u64 <= limits.max_kv_count);
    prop_assert!(g.alignment.is_power_of_two());
    prop_assert_eq!(g.data_offset % g.alignment, 0);
    prop_assert!(g.data_offset <= limits.max_header_bytes + g.alignment);
    let mut names = HashSet::new();
    for t in &g.tensors {
        prop_assert!(names.insert(&t.name), "tensor {:?} twice", t.name);
        prop_assert_eq!(t.offset % g.alignment, 0);
        prop_assert!(t.dims.len() <= 4);
        prop_assert!(t.name.len() as u64 <= limits.max_string_len);
    }
    if let Ok(p) = profile_from_gguf(&g) {
        prop_assert!(p.validate().is_ok(), "{:?}", p.validate());
    }
    Ok(())
}

proptest! {
    #![proptest_config(berth_proto::fuzzing::config(3000))]

    #[test]
    fn gguf_from_arbitrary_bytes(
        tail in proptest::collection::vec(any::<u8>(), 0..512),
        magic in any::<bool>(),
    ) {
        // With the magic and version in front half the time, so the parser gets past them.
        let mut bytes = if magic { b"GGUF\x03\x00\x00\x00".to_vec() } else { Vec::new() };
        bytes.extend_from_slice(&tail);
        check(&bytes, &GgufLimits::default())?;
        check(&bytes, &tight())?;
    }

    #[test]
    fn gguf_from_mutated_headers(
        mut bytes in seed(),
        mutations in proptest::collection::vec(mutation(), 0..6),
    ) {
        // The seeds are valid headers: the mutations start from something the reader takes.
        let parsed = parse_gguf(&bytes[..], &GgufLimits::default());
        prop_assert!(parsed.is_ok(), "{:?}", parsed.err());
        check(&bytes, &GgufLimits::default())?;
        for m in &mutations {
            apply(&mut bytes, m);
            check(&bytes, &GgufLimits::default())?;
            check(&bytes, &tight())?;
        }
    }
}
