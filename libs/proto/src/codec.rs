//! MessagePack encoding: maps with named fields, so other languages see plain dictionaries.
//!
//! Every decoder in berth goes through [`decode`], which refuses nesting deeper than
//! [`MAX_DEPTH`]: a few hundred nested one-byte maps are enough to overflow a thread's stack
//! in a recursive decoder, and no berth message nests more than a handful of levels.

use serde::{Serialize, de::DeserializeOwned};

/// Deepest nesting of arrays and maps any message may have. berth's own messages need
/// fewer than ten levels (a start with a full model profile); the limit leaves room for
/// fields a newer client adds, and keeps the decoder's recursion a few kilobytes of stack.
pub const MAX_DEPTH: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode message: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("cannot decode message: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

/// Encodes `value` as a MessagePack map (struct fields by name).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(rmp_serde::to_vec_named(value)?)
}

/// Decodes a MessagePack value; unknown map fields are ignored, nesting deeper than
/// [`MAX_DEPTH`] is an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    Ok(decode_raw(bytes)?)
}

/// [`decode`] with the decoder's own error, for callers that word their own messages.
pub(crate) fn decode_raw<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut de)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `levels` one-entry maps nested inside each other: `{"a": {"a": … 1 …}}`.
    pub(crate) fn nested_maps(levels: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(levels * 3 + 1);
        for _ in 0..levels {
            bytes.extend_from_slice(&[0x81, 0xa1, b'a']);
        }
        bytes.push(0x01);
        bytes
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        // Run on a small stack so a recursion without a limit would fail here too.
        let handle = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(|| {
                for levels in [MAX_DEPTH + 1, 1_000, 100_000] {
                    let bytes = nested_maps(levels);
                    let err = decode::<serde::de::IgnoredAny>(&bytes)
                        .expect_err("deep nesting must be refused");
                    assert!(err.to_string().contains("depth"), "{err}");
                }
            })
            .unwrap();
        handle.join().unwrap();
        assert!(decode::<serde::de::IgnoredAny>(&nested_maps(MAX_DEPTH - 1)).is_ok());
    }
}
