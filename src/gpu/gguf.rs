//! Model facts from a GGUF file's header: metadata and the tensor table, read without loading any
//! weights (a few hundred KiB of a multi-GiB file).
//!
//! Tensor sizes come from the gaps between data offsets (the last one from the file's end), so
//! every quantisation type, present or future, is sized exactly without a table of block sizes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not a GGUF file (magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("unsupported GGUF version {0}")]
    Version(u32),
    #[error("malformed GGUF: {0}")]
    Malformed(String),
    #[error("GGUF lacks `{0}`")]
    Missing(String),
}

/// A metadata value (arrays keep only what the planner needs: their integers, and their length).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array {
        len: u64,
        ints: Vec<i64>,
    },
    /// A string array, kept only by [`read_header_with_arrays`] (the vocabulary, the merges).
    Strings(Vec<String>),
}

impl MetaValue {
    fn as_u64(&self) -> Option<u64> {
        match self {
            Self::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }
}

/// What placement needs to know about a model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelFacts {
    pub architecture: String,
    pub n_layer: u32,
    pub n_ctx_train: u32,
    pub n_embd: u64,
    pub n_head: u32,
    pub n_vocab: u64,
    /// KV heads per layer (GGUF allows a per-layer array).
    pub n_head_kv: Vec<u32>,
    pub key_length: u64,
    pub value_length: u64,
    /// Sliding-window size, and which layers use it (empty: none).
    pub sliding_window: Option<u64>,
    pub swa_layers: Vec<u32>,
    /// Weight bytes of each repeating layer `blk.N.*`.
    pub layer_bytes: Vec<u64>,
    /// `output.weight` plus `output_norm.*` (falls back to the tied embedding when absent).
    pub output_bytes: u64,
    /// `token_embd.*`: stays in host memory in llama.cpp (the input lookup runs on the CPU).
    pub embedding_bytes: u64,
    pub file_bytes: u64,
}

/// Bounds on what a header may claim, so a mutated file is an error, never a huge allocation,
/// an overflow or a panic further on (the planner multiplies these).
const MAX_STRING: u64 = 1 << 24;
/// Total bytes of metadata strings kept (chat templates are kilobytes; the vocabulary is skipped).
const MAX_KEPT_STRINGS: usize = 64 << 20;
const MAX_LAYERS: u64 = 1 << 16;
/// Tensors, metadata entries and array elements a header may declare. A file's size alone does
/// not bound them: a sparse file claims terabytes that cost nothing on disk, and its zeros read
/// as endless 24-byte tensor entries with empty names. Real models have a few thousand tensors,
/// a few dozen keys and vocabularies of a few hundred thousand tokens.
const MAX_TENSORS: u64 = 1 << 18;
const MAX_KV: u64 = 1 << 16;
const MAX_ARRAY: u64 = 1 << 24;
const MAX_DIMS: u32 = 8;
/// Embedding width, head counts, head lengths, vocabulary and context: far above any real model,
/// far below an overflow when the planner multiplies them.
const MAX_WIDTH: u64 = 1 << 24;
const MAX_CONTEXT: u64 = 1 << 27;

fn malformed(what: impl Into<String>) -> GgufError {
    GgufError::Malformed(what.into())
}

struct Reader<R> {
    inner: R,
    /// Bytes the source holds: a count that could not fit in them is refused before anything is
    /// allocated for it.
    len: u64,
    kept: usize,
    /// Keep string arrays and long integer arrays (the tokenizer's tables) instead of skipping
    /// them.
    keep_arrays: bool,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| GgufError::Malformed(e.to_string()))?;
        Ok(buf)
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    /// Refuses a count of `count` items of at least `min_bytes` each that the file cannot hold,
    /// or of more than `max`.
    fn check_count(
        &self,
        what: &str,
        count: u64,
        min_bytes: u64,
        max: u64,
    ) -> Result<(), GgufError> {
        let fits = count.saturating_mul(min_bytes) <= self.len;
        if fits && count > max {
            return Err(malformed(format!(
                "{what}: {count} entries is more than the limit of {max}"
            )));
        }
        if count.saturating_mul(min_bytes) > self.len {
            return Err(malformed(format!(
                "{what}: {count} entries cannot fit in a file of {} bytes",
                self.len
            )));
        }
        Ok(())
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.u64()?;
        if len > MAX_STRING || len > self.len {
            return Err(GgufError::Malformed(format!("string of {len} bytes")));
        }
        self.kept += len as usize;
        if self.kept > MAX_KEPT_STRINGS {
            return Err(malformed(format!(
                "more than {} MiB of metadata strings",
                MAX_KEPT_STRINGS >> 20
            )));
        }
        let mut buf = vec![0u8; len as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| GgufError::Malformed(e.to_string()))?;
        String::from_utf8(buf).map_err(|e| GgufError::Malformed(e.to_string()))
    }
    fn skip(&mut self, n: u64) -> Result<(), GgufError> {
        std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())
            .map_err(|e| GgufError::Malformed(e.to_string()))
            .and_then(|copied| {
                if copied == n {
                    Ok(())
                } else {
                    Err(GgufError::Malformed("truncated".into()))
                }
            })
    }

    /// One scalar of GGUF type `ty`.
    fn scalar(&mut self, ty: u32) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            0 => MetaValue::Int(i64::from(self.bytes::<1>()?[0])),
            1 => MetaValue::Int(i64::from(self.bytes::<1>()?[0] as i8)),
            2 => MetaValue::Int(i64::from(u16::from_le_bytes(self.bytes()?))),
            3 => MetaValue::Int(i64::from(i16::from_le_bytes(self.bytes()?))),
            4 => MetaValue::Int(i64::from(self.u32()?)),
            5 => MetaValue::Int(i64::from(i32::from_le_bytes(self.bytes()?))),
            6 => MetaValue::Float(f64::from(f32::from_le_bytes(self.bytes()?))),
            7 => MetaValue::Bool(self.bytes::<1>()?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            10 => MetaValue::Int(self.u64()? as i64),
            11 => MetaValue::Int(i64::from_le_bytes(self.bytes()?)),
            12 => MetaValue::Float(f64::from_le_bytes(self.bytes()?)),
            other => return Err(GgufError::Malformed(format!("value type {other}"))),
        })
    }

    fn value(&mut self, ty: u32) -> Result<MetaValue, GgufError> {
        if ty != 9 {
            return self.scalar(ty);
        }
        let item = self.u32()?;
        let len = self.u64()?;
        self.check_count("array", len, 1, MAX_ARRAY)?;
        let fixed = match item {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        let mut ints = Vec::new();
        match (item, fixed) {
            // Integer arrays are small (per-layer head counts); keep them. Token types are long:
            // kept when asked for.
            (0..=5 | 10 | 11, Some(_)) if len <= 4096 || self.keep_arrays => {
                for _ in 0..len {
                    if let MetaValue::Int(i) = self.scalar(item)? {
                        ints.push(i);
                    }
                }
            }
            (_, Some(size)) => self.skip(len.saturating_mul(size))?,
            (8, None) if self.keep_arrays => {
                self.check_count("string array", len, 8, MAX_ARRAY)?;
                // Each string is checked against the file and the kept-strings budget.
                let strings = (0..len)
                    .map(|_| self.string())
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(MetaValue::Strings(strings));
            }
            // Strings (the vocabulary): skip each.
            (8, None) => {
                self.check_count("string array", len, 8, MAX_ARRAY)?;
                for _ in 0..len {
                    let n = self.u64()?;
                    if n > MAX_STRING {
                        return Err(malformed(format!("string of {n} bytes")));
                    }
                    self.skip(n)?;
                }
            }
            _ => return Err(GgufError::Malformed(format!("array of type {item}"))),
        }
        Ok(MetaValue::Array { len, ints })
    }
}

/// The raw header: metadata and `(name, offset)` of every tensor, plus where tensor data begins.
pub struct GgufHeader {
    pub metadata: HashMap<String, MetaValue>,
    pub tensors: Vec<(String, u64)>,
    pub data_start: u64,
    pub file_bytes: u64,
    /// Elements over all tensors: the parameter count.
    pub parameters: u64,
}

/// llama.cpp's `general.file_type` numbers, by the names Ollama and LM Studio show.
pub fn file_type_name(n: i64) -> &'static str {
    match n {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4",
        _ => "unknown",
    }
}

impl GgufHeader {
    /// The quantization's name (`Q4_1`), from `general.file_type`.
    pub fn quantization(&self) -> &'static str {
        match self.metadata.get("general.file_type") {
            Some(MetaValue::Int(n)) => file_type_name(*n),
            _ => "unknown",
        }
    }
}

/// Reads the header of the GGUF file at `path`.
pub fn read_header(path: &Path) -> Result<GgufHeader, GgufError> {
    open_header(path, false)
}

/// Reads the header keeping every array: the tokenizer's vocabulary, merges and token types.
pub fn read_header_with_arrays(path: &Path) -> Result<GgufHeader, GgufError> {
    open_header(path, true)
}

fn open_header(path: &Path, keep_arrays: bool) -> Result<GgufHeader, GgufError> {
    let io = |source| GgufError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let file_bytes = file.metadata().map_err(io)?.len();
    read(
        BufReader::with_capacity(1 << 20, file),
        file_bytes,
        keep_arrays,
    )
}

/// Reads a GGUF header from `source`, which holds `file_bytes` bytes. Every count and size is
/// checked against the file before it is used (see the `MAX_*` bounds).
pub fn parse_header(source: impl Read + Seek, file_bytes: u64) -> Result<GgufHeader, GgufError> {
    read(source, file_bytes, false)
}

fn read(
    source: impl Read + Seek,
    file_bytes: u64,
    keep_arrays: bool,
) -> Result<GgufHeader, GgufError> {
    let mut r = Reader {
        inner: source,
        len: file_bytes,
        kept: 0,
        keep_arrays,
    };
    let magic = r.bytes::<4>()?;
    if &magic != b"GGUF" {
        return Err(GgufError::Magic(magic));
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version(version));
    }
    let n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    // A tensor entry is at least 24 bytes, a key/value at least 13.
    r.check_count("tensor table", n_tensors, 24, MAX_TENSORS)?;
    r.check_count("metadata", n_kv, 13, MAX_KV)?;
    let mut metadata = HashMap::new();
    for _ in 0..n_kv {
        let key = r.string()?;
        let ty = r.u32()?;
        metadata.insert(key, r.value(ty)?);
    }
    let mut tensors = Vec::with_capacity((n_tensors as usize).min(1 << 16));
    let mut parameters = 0u64;
    for _ in 0..n_tensors {
        let name = r.string()?;
        let dims = r.u32()?;
        if dims > MAX_DIMS {
            return Err(malformed(format!("tensor {name} has {dims} dimensions")));
        }
        let mut elements = 1u64;
        for _ in 0..dims {
            elements = elements.saturating_mul(r.u64()?);
        }
        parameters = parameters.saturating_add(elements);
        let _ggml_type = r.u32()?;
        let offset = r.u64()?;
        tensors.push((name, offset));
    }
    let position = r
        .inner
        .stream_position()
        .map_err(|e| GgufError::Malformed(e.to_string()))?;
    let alignment = metadata
        .get("general.alignment")
        .and_then(MetaValue::as_u64)
        .unwrap_or(32);
    if !alignment.is_power_of_two() || alignment > 1 << 20 {
        return Err(malformed(format!("alignment {alignment}")));
    }
    let data_start = position.div_ceil(alignment) * alignment;
    if data_start > file_bytes {
        return Err(malformed("the file ends before its tensor data"));
    }
    if let Some((name, offset)) = tensors
        .iter()
        .find(|(_, offset)| *offset > file_bytes - data_start)
    {
        return Err(malformed(format!(
            "tensor {name} at offset {offset} lies past the end of the file"
        )));
    }
    Ok(GgufHeader {
        metadata,
        tensors,
        data_start,
        file_bytes,
        parameters,
    })
}

impl GgufHeader {
    fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn arch_u64(&self, arch: &str, key: &str) -> Option<u64> {
        self.get(&format!("{arch}.{key}"))
            .and_then(MetaValue::as_u64)
    }

    /// Bytes of each tensor, from the gaps between offsets.
    pub fn tensor_sizes(&self) -> Vec<(&str, u64)> {
        let mut by_offset: Vec<(&str, u64)> =
            self.tensors.iter().map(|(n, o)| (n.as_str(), *o)).collect();
        by_offset.sort_by_key(|t| t.1);
        let data_len = self.file_bytes.saturating_sub(self.data_start);
        (0..by_offset.len())
            .map(|i| {
                let end = by_offset.get(i + 1).map_or(data_len, |next| next.1);
                (by_offset[i].0, end.saturating_sub(by_offset[i].1))
            })
            .collect()
    }

    /// The facts placement needs.
    pub fn facts(&self) -> Result<ModelFacts, GgufError> {
        let arch = match self.get("general.architecture") {
            Some(MetaValue::Str(a)) => a.clone(),
            _ => return Err(GgufError::Missing("general.architecture".into())),
        };
        let need = |key: &str| {
            self.arch_u64(&arch, key)
                .ok_or_else(|| GgufError::Missing(format!("{arch}.{key}")))
        };
        let bounded = |key: &str, value: u64, max: u64| {
            if value > max {
                Err(malformed(format!("{arch}.{key} is {value}; at most {max}")))
            } else {
                Ok(value)
            }
        };
        let n_layer = bounded("block_count", need("block_count")?, MAX_LAYERS)? as u32;
        let n_embd = bounded("embedding_length", need("embedding_length")?, MAX_WIDTH)?;
        let n_head = bounded(
            "attention.head_count",
            need("attention.head_count")?,
            MAX_WIDTH,
        )? as u32;
        let n_head_kv = match self.get(&format!("{arch}.attention.head_count_kv")) {
            Some(MetaValue::Int(n)) => {
                let n = bounded("attention.head_count_kv", (*n).max(0) as u64, MAX_WIDTH)?;
                vec![n as u32; n_layer as usize]
            }
            Some(MetaValue::Array { ints, .. }) if ints.len() == n_layer as usize => ints
                .iter()
                .map(|&n| bounded("attention.head_count_kv", n.max(0) as u64, MAX_WIDTH))
                .map(|n| n.map(|n| n as u32))
                .collect::<Result<_, _>>()?,
            _ => vec![n_head; n_layer as usize],
        };
        let head_dim = n_embd / u64::from(n_head.max(1));
        let key_length = bounded(
            "attention.key_length",
            self.arch_u64(&arch, "attention.key_length")
                .unwrap_or(head_dim),
            MAX_WIDTH,
        )?;
        let value_length = bounded(
            "attention.value_length",
            self.arch_u64(&arch, "attention.value_length")
                .unwrap_or(head_dim),
            MAX_WIDTH,
        )?;
        let sliding_window = self.arch_u64(&arch, "attention.sliding_window");
        let swa_layers = match (
            sliding_window,
            self.arch_u64(&arch, "attention.sliding_window_pattern"),
        ) {
            // Gemma-style: every `pattern`-th layer is global, the others use the window.
            (Some(_), Some(pattern)) if pattern > 0 => (0..n_layer)
                .filter(|l| (u64::from(*l) + 1) % pattern != 0)
                .collect(),
            (Some(_), _) => (0..n_layer).collect(),
            _ => Vec::new(),
        };
        let n_vocab = match self.get("tokenizer.ggml.tokens") {
            Some(MetaValue::Array { len, .. }) => *len,
            _ => self.arch_u64(&arch, "vocab_size").unwrap_or(0),
        };
        let n_vocab = bounded("vocab_size", n_vocab, MAX_WIDTH)?;
        let sliding_window = sliding_window
            .map(|w| bounded("attention.sliding_window", w, MAX_CONTEXT))
            .transpose()?;
        let mut layer_bytes = vec![0u64; n_layer as usize];
        let (mut output_bytes, mut embedding_bytes, mut has_output) = (0, 0, false);
        for (name, bytes) in self.tensor_sizes() {
            if let Some(rest) = name.strip_prefix("blk.") {
                let layer: usize = rest
                    .split('.')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| GgufError::Malformed(format!("tensor {name}")))?;
                *layer_bytes.get_mut(layer).ok_or_else(|| {
                    GgufError::Malformed(format!("tensor {name} past block_count"))
                })? += bytes;
            } else if name.starts_with("output") {
                has_output |= name == "output.weight";
                output_bytes += bytes;
            } else if name.starts_with("token_embd") {
                embedding_bytes += bytes;
            }
        }
        if !has_output {
            // Tied embeddings: the output matmul uses a copy of the embedding on the output device.
            output_bytes += embedding_bytes;
        }
        Ok(ModelFacts {
            n_ctx_train: bounded("context_length", need("context_length")?, MAX_CONTEXT)? as u32,
            architecture: arch,
            n_layer,
            n_embd,
            n_head,
            n_vocab,
            n_head_kv,
            key_length,
            value_length,
            sliding_window,
            swa_layers,
            layer_bytes,
            output_bytes,
            embedding_bytes,
            file_bytes: self.file_bytes,
        })
    }
}

/// Reads the model facts of the GGUF file at `path`.
pub fn model_facts(path: &Path) -> Result<ModelFacts, GgufError> {
    read_header(path)?.facts()
}

#[cfg(test)]
mod tests;
