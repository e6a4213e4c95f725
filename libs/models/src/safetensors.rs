//! safetensors headers (`u64 LE length`, then that many bytes of JSON mapping tensor names
//! to `{dtype, shape, data_offsets}`), read as a stream: each tensor is added to the totals as
//! the parser meets it and nothing of it is kept, so a 100 MB header costs its longest single
//! string and a read buffer, not a document tree many times its size.

use crate::hf::HfWeights;
use crate::read::ProfileError;
use crate::roots::ModelAccess;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// safetensors refuses headers over 100 MB (`MAX_HEADER_SIZE`); so do we.
pub const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;
/// Tensors over all the files of a model: far more than any published model has.
pub const MAX_SAFETENSORS_TENSORS: u64 = 1 << 21;
/// Distinct dtypes counted by name; more than that is not a real model.
const MAX_DTYPES: usize = 64;
/// A dtype name longer than this is not one.
const MAX_DTYPE_LEN: usize = 32;
/// A tensor name in an error is cut to this many bytes.
const SHOWN_NAME_LEN: usize = 96;

/// Reads the header of every safetensors file in `files` (opened through `access`) and sums
/// the weights, per layer when `layers` is known.
pub fn weights_from_safetensors(
    files: &[PathBuf],
    layers: Option<u64>,
    access: &ModelAccess,
) -> Result<HfWeights, ProfileError> {
    let mut tally = Tally::new(usize::try_from(layers.unwrap_or(0)).unwrap_or(0));
    for path in files {
        read_one(path, access, &mut tally)?;
    }
    Ok(tally.finish())
}

fn read_one(path: &Path, access: &ModelAccess, tally: &mut Tally) -> Result<(), ProfileError> {
    let bad = |reason: String| ProfileError::Safetensors {
        path: path.to_owned(),
        reason,
    };
    let io_err = |source| ProfileError::Io {
        path: path.to_owned(),
        source,
    };
    let (_, file_len, mut f) = access.open_file(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| {
        if access.cancel.is_cancelled() {
            io_err(e)
        } else {
            bad("shorter than its 8-byte header length".into())
        }
    })?;
    let n = u64::from_le_bytes(len);
    if n > MAX_SAFETENSORS_HEADER {
        return Err(bad(format!(
            "header of {n} bytes exceeds {MAX_SAFETENSORS_HEADER}"
        )));
    }
    if n.saturating_add(8) > file_len {
        return Err(bad(format!(
            "header of {n} bytes does not fit in {file_len}"
        )));
    }
    tally.data_len = file_len - 8 - n;
    let mut problem = None;
    let reader = BufReader::with_capacity(64 << 10, f.take(n));
    let mut de = serde_json::Deserializer::from_reader(reader);
    let parsed = Header {
        tally,
        problem: &mut problem,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end());
    match (parsed, problem) {
        (_, Some(reason)) => Err(bad(reason)),
        (Err(e), None) if e.is_io() => Err(io_err(std::io::Error::other(e.to_string()))),
        (Err(e), None) => Err(bad(format!("header is not a JSON object: {e}"))),
        (Ok(()), None) => Ok(()),
    }
}

/// The sums over the tensors met so far.
struct Tally {
    w: HfWeights,
    params: u64,
    tensors: u64,
    by_dtype: Vec<(String, u64)>,
    /// Data bytes of the file being read, which every tensor must lie within.
    data_len: u64,
}

impl Tally {
    fn new(layers: usize) -> Self {
        Tally {
            w: HfWeights {
                layers: vec![0; layers],
                ..HfWeights::default()
            },
            params: 0,
            tensors: 0,
            by_dtype: Vec::new(),
            data_len: 0,
        }
    }

    fn add(&mut self, name: &Name, t: &Entry) -> Result<(), String> {
        let shown = &name.shown;
        let (start, end) = t
            .offsets
            .ok_or_else(|| format!("tensor {shown} has no data_offsets"))?;
        if end < start || end > self.data_len {
            return Err(format!(
                "tensor {shown} spans {start}..{end} of {} data bytes",
                self.data_len
            ));
        }
        let elements = t
            .elements
            .ok_or_else(|| format!("tensor {shown} has no valid shape"))?;
        self.tensors += 1;
        if self.tensors > MAX_SAFETENSORS_TENSORS {
            return Err(format!("more than {MAX_SAFETENSORS_TENSORS} tensors"));
        }
        let bytes = end - start;
        self.params = self.params.saturating_add(elements);
        self.w.total = self.w.total.saturating_add(bytes);
        let dtype = t.dtype.as_deref().unwrap_or("?");
        let room = self.by_dtype.len() < MAX_DTYPES;
        match self.by_dtype.iter_mut().find(|(d, _)| d == dtype) {
            Some((_, b)) => *b = b.saturating_add(bytes),
            None if room => self.by_dtype.push((dtype.to_owned(), bytes)),
            None => {}
        }
        let w = &mut self.w;
        match name.part {
            Part::Layer(i) if i < w.layers.len() => w.layers[i] = w.layers[i].saturating_add(bytes),
            Part::Input => w.input = w.input.saturating_add(bytes),
            Part::LmHead => {
                w.has_lm_head = true;
                w.output = w.output.saturating_add(bytes);
            }
            Part::Layer(_) | Part::Other => w.output = w.output.saturating_add(bytes),
        }
        Ok(())
    }

    fn finish(self) -> HfWeights {
        let mut w = self.w;
        w.parameters = Some(self.params);
        w.dtype = self
            .by_dtype
            .into_iter()
            .max_by_key(|(_, b)| *b)
            .map(|(d, _)| d);
        w
    }
}

/// Where a tensor's bytes go, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Layer(usize),
    Input,
    LmHead,
    Other,
}

fn classify(name: &str) -> Part {
    let mut prev = "";
    for seg in name.split('.') {
        if matches!(prev, "layers" | "h" | "blocks" | "layer")
            && let Ok(i) = seg.parse::<usize>()
        {
            return Part::Layer(i);
        }
        prev = seg;
    }
    if name.contains("lm_head") {
        Part::LmHead
    } else if name.contains("embed_tokens")
        || name.contains("wte")
        || name.contains("word_embeddings")
    {
        Part::Input
    } else {
        Part::Other
    }
}

/// A key of the header: what its tensor is for, and its name as an error shows it.
struct Name {
    metadata: bool,
    part: Part,
    shown: String,
}

/// Reads a key without keeping it.
struct NameSeed;

impl<'de> DeserializeSeed<'de> for NameSeed {
    type Value = Name;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Name, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for NameSeed {
    type Value = Name;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a tensor name")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Name, E> {
        let shown = if s.len() <= SHOWN_NAME_LEN {
            format!("{s:?}")
        } else {
            let mut end = SHOWN_NAME_LEN;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            format!("{:?}…", &s[..end])
        };
        Ok(Name {
            metadata: s == "__metadata__",
            part: classify(s),
            shown,
        })
    }
}

/// The whole header: a map of tensors, each added to the tally as it is read.
struct Header<'a> {
    tally: &'a mut Tally,
    /// Why a tensor was refused (the parse is stopped with a stand-in error).
    problem: &'a mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for Header<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Header<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of tensors")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(name) = map.next_key_seed(NameSeed)? {
            if name.metadata {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let entry: Entry = map.next_value()?;
            if let Err(reason) = self.tally.add(&name, &entry) {
                *self.problem = Some(reason);
                return Err(de::Error::custom("refused tensor"));
            }
        }
        Ok(())
    }
}

/// What a tensor entry says that the tally needs; anything else is skipped unread.
#[derive(Debug, Default)]
struct Entry {
    dtype: Option<String>,
    /// The product of the shape; `None` when absent, not a list of counts, or overflowing.
    elements: Option<u64>,
    offsets: Option<(u64, u64)>,
}

impl<'de> de::Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Entry, D::Error> {
        d.deserialize_any(EntryVisitor)
    }
}

/// Anything but an object is an entry with nothing in it (refused by the tally).
struct EntryVisitor;

impl<'de> Visitor<'de> for EntryVisitor {
    type Value = Entry;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a tensor entry")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entry, A::Error> {
        let mut e = Entry::default();
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Dtype => e.dtype = map.next_value::<Lenient<Dtype>>()?.0,
                Field::Shape => e.elements = map.next_value::<Lenient<Shape>>()?.0,
                Field::Offsets => e.offsets = map.next_value::<Lenient<Offsets>>()?.0,
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(e)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Entry, A::Error> {
        drain_seq(seq).map(|()| Entry::default())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Entry, E> {
        Ok(Entry::default())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Entry, E> {
        Ok(Entry::default())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Entry, E> {
        Ok(Entry::default())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Entry, E> {
        Ok(Entry::default())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Entry, E> {
        Ok(Entry::default())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Entry, E> {
        Ok(Entry::default())
    }
}

enum Field {
    Dtype,
    Shape,
    Offsets,
    Other,
}

impl<'de> de::Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Field, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Field, E> {
                Ok(match s {
                    "dtype" => Field::Dtype,
                    "shape" => Field::Shape,
                    "data_offsets" => Field::Offsets,
                    _ => Field::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// A value of the kind `T` reads, or `None` for a value of any other kind (skipped).
struct Lenient<T: Kind>(Option<T::Out>);

/// One kind of value an entry holds: what it reads from a string, a number or a list.
trait Kind {
    type Out;
    const EXPECTING: &'static str;
    fn from_str(_: &str) -> Option<Self::Out> {
        None
    }
    fn from_u64(_: u64) -> Option<Self::Out> {
        None
    }
    fn from_seq<'de, A: SeqAccess<'de>>(seq: A) -> Result<Option<Self::Out>, A::Error> {
        drain_seq(seq).map(|()| None)
    }
}

impl<'de, T: Kind> de::Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Kind> Visitor<'de> for V<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(T::EXPECTING)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Lenient(T::from_str(s)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Lenient(T::from_u64(v)))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                T::from_seq(seq).map(Lenient)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Lenient(None))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// A number in a list.
struct Count;
impl Kind for Count {
    type Out = u64;
    const EXPECTING: &'static str = "a count";
    fn from_u64(v: u64) -> Option<u64> {
        Some(v)
    }
}

struct Dtype;
impl Kind for Dtype {
    type Out = String;
    const EXPECTING: &'static str = "a dtype name";
    fn from_str(s: &str) -> Option<String> {
        (s.len() <= MAX_DTYPE_LEN).then(|| s.to_owned())
    }
}

/// A shape, as the product of its dimensions.
struct Shape;
impl Kind for Shape {
    type Out = u64;
    const EXPECTING: &'static str = "a shape";
    fn from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Option<u64>, A::Error> {
        let mut product = Some(1u64);
        while let Some(d) = seq.next_element::<Lenient<Count>>()? {
            product = product.zip(d.0).and_then(|(p, d)| p.checked_mul(d));
        }
        Ok(product)
    }
}

/// `[start, end]`.
struct Offsets;
impl Kind for Offsets {
    type Out = (u64, u64);
    const EXPECTING: &'static str = "data offsets";
    fn from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Option<(u64, u64)>, A::Error> {
        let mut got = [None; 2];
        let mut n = 0usize;
        while let Some(v) = seq.next_element::<Lenient<Count>>()? {
            if let Some(slot) = got.get_mut(n) {
                *slot = v.0;
            }
            n += 1;
        }
        Ok(match got {
            [Some(a), Some(b)] if n == 2 => Some((a, b)),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_header(dir: &Path, header: &[u8], data: usize) -> PathBuf {
        let path = dir.join("x.safetensors");
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.resize(bytes.len() + data, 0);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn the_stream_reads_what_the_tree_read() {
        let dir = tempfile::tempdir().unwrap();
        let header = br#"{"__metadata__": {"format": "pt", "nested": [1, {"a": 2}]},
            "model.layers.1.mlp.weight": {"shape": [4, 2], "dtype": "BF16", "data_offsets": [0, 16], "extra": {"x": [1]}},
            "model.embed_tokens.weight": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]},
            "lm_head.weight": {"data_offsets": [24, 40], "dtype": "BF16", "shape": [8]}}   "#;
        let f = file_with_header(dir.path(), header, 40);
        let w = weights_from_safetensors(&[f], Some(2), &ModelAccess::anywhere()).unwrap();
        assert_eq!(w.total, 40);
        assert_eq!(w.layers, vec![0, 16]);
        assert_eq!((w.input, w.output), (8, 16));
        assert!(w.has_lm_head);
        assert_eq!(w.parameters, Some(8 + 2 + 8));
        assert_eq!(w.dtype.as_deref(), Some("BF16"));
    }

    #[test]
    fn odd_entries_are_refused_by_name_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let long = "n".repeat(10_000);
        let cases = [
            (format!(r#"{{"{long}": 5}}"#), "no data_offsets"),
            (
                r#"{"a": {"shape": [1, "x"], "data_offsets": [0, 0]}}"#.to_owned(),
                "no valid shape",
            ),
            (
                r#"{"a": {"shape": [1], "data_offsets": [0, 0, 0]}}"#.to_owned(),
                "no data_offsets",
            ),
            (
                r#"{"a": {"shape": [4294967296, 4294967296], "data_offsets": [0, 0]}}"#.to_owned(),
                "no valid shape",
            ),
            (r#"[1, 2]"#.to_owned(), "not a JSON object"),
            (
                r#"{"a": {"shape": [1], "data_offsets": [0, 0]}} x"#.to_owned(),
                "not a JSON object",
            ),
        ];
        for (header, want) in cases {
            let f = file_with_header(dir.path(), header.as_bytes(), 0);
            let e = weights_from_safetensors(&[f], None, &ModelAccess::anywhere())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "want {want:?}: {e}");
            assert!(e.len() < 400, "{} bytes", e.len());
        }
    }
}
