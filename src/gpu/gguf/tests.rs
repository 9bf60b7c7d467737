//! The GGUF reader on synthetic headers, mutated files and the default model.

use super::*;

/// Writes a small synthetic GGUF: `layers` blocks of two tensors, an output and an embedding.
fn synthetic(layers: u32, with_output: bool) -> (tempfile_path::TempPath, Vec<u64>) {
    let mut meta: Vec<u8> = Vec::new();
    let s = |out: &mut Vec<u8>, text: &str| {
        out.extend((text.len() as u64).to_le_bytes());
        out.extend(text.as_bytes());
    };
    let kv_u32 = |out: &mut Vec<u8>, key: &str, v: u32| {
        s(out, key);
        out.extend(4u32.to_le_bytes());
        out.extend(v.to_le_bytes());
    };
    s(&mut meta, "general.architecture");
    meta.extend(8u32.to_le_bytes());
    s(&mut meta, "llama");
    kv_u32(&mut meta, "llama.block_count", layers);
    kv_u32(&mut meta, "llama.context_length", 4096);
    kv_u32(&mut meta, "llama.embedding_length", 256);
    kv_u32(&mut meta, "llama.attention.head_count", 8);
    kv_u32(&mut meta, "llama.attention.head_count_kv", 2);
    // A vocabulary of 3 strings, skipped but counted.
    s(&mut meta, "tokenizer.ggml.tokens");
    meta.extend(9u32.to_le_bytes());
    meta.extend(8u32.to_le_bytes());
    meta.extend(3u64.to_le_bytes());
    for t in ["a", "bb", "ccc"] {
        s(&mut meta, t);
    }
    let n_kv = 7u64;
    let mut tensors: Vec<(String, u64)> = Vec::new();
    let mut sizes = Vec::new();
    for l in 0..layers {
        let a = 1000 + u64::from(l) * 64;
        tensors.push((format!("blk.{l}.attn_q.weight"), a));
        tensors.push((format!("blk.{l}.ffn_up.weight"), 2 * a));
        sizes.push(3 * a);
    }
    tensors.push(("token_embd.weight".into(), 5000));
    if with_output {
        tensors.push(("output.weight".into(), 6000));
    }
    tensors.push(("output_norm.weight".into(), 64));
    let mut table = Vec::new();
    let mut offset = 0u64;
    for (name, size) in &tensors {
        s(&mut table, name);
        table.extend(1u32.to_le_bytes()); // dims
        table.extend(size.to_le_bytes());
        table.extend(0u32.to_le_bytes()); // type
        table.extend(offset.to_le_bytes());
        offset += size.div_ceil(32) * 32;
    }
    let mut file = Vec::new();
    file.extend(b"GGUF");
    file.extend(3u32.to_le_bytes());
    file.extend((tensors.len() as u64).to_le_bytes());
    file.extend(n_kv.to_le_bytes());
    file.extend(meta);
    file.extend(table);
    while file.len() % 32 != 0 {
        file.push(0);
    }
    file.resize(file.len() + offset as usize, 0);
    let path = tempfile_path::TempPath::new("gguf");
    std::fs::write(&path.0, file).unwrap();
    (path, sizes)
}

/// A file removed on drop, without a tempfile dependency.
mod tempfile_path {
    pub struct TempPath(pub std::path::PathBuf);
    impl TempPath {
        pub fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            Self(std::env::temp_dir().join(format!("lm-sandbox-{tag}-{}-{n}", std::process::id())))
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[test]
fn a_synthetic_file_yields_its_layers_and_output() {
    let (path, sizes) = synthetic(4, true);
    let facts = model_facts(&path.0).unwrap();
    assert_eq!(facts.n_layer, 4);
    assert_eq!(facts.n_head_kv, vec![2; 4]);
    assert_eq!((facts.key_length, facts.value_length), (32, 32));
    assert_eq!(facts.n_vocab, 3);
    // Sizes are offset gaps, so include padding to 32 bytes.
    for (got, want) in facts.layer_bytes.iter().zip(&sizes) {
        assert!(*got >= *want && *got < *want + 64, "{got} vs {want}");
    }
    assert!(facts.output_bytes >= 6064 && facts.output_bytes < 6064 + 64);
    assert_eq!(facts.embedding_bytes, 5024);
}

#[test]
fn tied_embeddings_count_toward_the_output_device() {
    let (path, _) = synthetic(2, false);
    let facts = model_facts(&path.0).unwrap();
    assert_eq!(facts.output_bytes, 64 + facts.embedding_bytes);
}

#[test]
fn a_non_gguf_file_is_refused() {
    let path = tempfile_path::TempPath::new("notgguf");
    std::fs::write(&path.0, b"PK\x03\x04 definitely not").unwrap();
    assert!(matches!(model_facts(&path.0), Err(GgufError::Magic(_))));
}

/// Every way a header can be cut short or mutated is an error, never a panic, an overflow or
/// a huge allocation: truncations at every byte of the first 4 KiB and at 3000 points over
/// the rest of the header, and 3000 seeded random byte flips.
fn fuzz(bytes: &[u8], header_end: usize) {
    use rand::{Rng, SeedableRng};
    let parse = |data: &[u8]| {
        let header = parse_header(std::io::Cursor::new(data), data.len() as u64)?;
        header.facts()
    };
    parse(bytes).expect("the unmutated file parses");
    let header_end = header_end.min(bytes.len());
    let mut cuts: Vec<usize> = (0..header_end.min(4096)).collect();
    cuts.extend((0..3000).map(|i| i * header_end / 3000));
    for cut in cuts {
        assert!(parse(&bytes[..cut]).is_err(), "a file cut at {cut} parsed");
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut mutated = bytes.to_vec();
    for _ in 0..3000 {
        let at = rng.gen_range(0..header_end);
        let old = mutated[at];
        mutated[at] = match rng.gen_range(0..3) {
            0 => rng.gen(),
            1 => 0xff,
            _ => old ^ (1 << rng.gen_range(0..8)),
        };
        // Ok or Err are both fine; the test is that it returns.
        let _ = parse(&mutated);
        mutated[at] = old;
    }
}

#[test]
fn a_mutated_synthetic_file_is_an_error_never_a_panic() {
    let (path, _) = synthetic(4, true);
    let bytes = std::fs::read(&path.0).unwrap();
    let header = read_header(&path.0).unwrap();
    fuzz(&bytes, header.data_start as usize);
}

#[test]
fn absurd_counts_are_refused_before_allocating() {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(u64::MAX.to_le_bytes()); // tensors
    bytes.extend(0u64.to_le_bytes());
    let Err(err) = parse_header(std::io::Cursor::new(&bytes), bytes.len() as u64) else {
        panic!("parsed");
    };
    assert!(err.to_string().contains("cannot fit"), "{err}");
}

#[test]
fn a_sparse_file_cannot_claim_endless_tensors() {
    // 1 TiB on paper, a few bytes on disk: its zeros would read as 24-byte tensor entries.
    let path = std::env::temp_dir().join(format!("lmsbx-sparse-{}.gguf", std::process::id()));
    let mut header = b"GGUF".to_vec();
    header.extend(3u32.to_le_bytes());
    header.extend((40u64 << 30).to_le_bytes()); // tensors: the file's size / 24 allows it
    header.extend(0u64.to_le_bytes());
    std::fs::write(&path, &header).unwrap();
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let started = std::time::Instant::now();
    let result = read_header(&path);
    std::fs::remove_file(&path).unwrap();
    let Err(err) = result else { panic!("parsed") };
    assert!(err.to_string().contains("more than the limit"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // The same for metadata entries and the arrays in them.
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend((1u64 << 40).to_le_bytes());
    let Err(err) = parse_header(std::io::Cursor::new(&bytes), 1 << 50) else {
        panic!("parsed")
    };
    assert!(err.to_string().contains("metadata"), "{err}");
}

#[cfg(feature = "real-model")]
#[test]
fn the_default_models_header_survives_truncation_and_byte_flips() {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let header = read_header(&path).unwrap();
    // The header and tensor table, plus a little of the data (offsets point there).
    let end = header.data_start as usize + 4096;
    let mut file = File::open(&path).unwrap();
    let mut bytes = vec![0u8; end];
    file.read_exact(&mut bytes).unwrap();
    // Parse as if the file were whole: the size only bounds counts and the last tensor.
    let total = header.file_bytes;
    let parse = |data: &[u8], len: u64| {
        parse_header(std::io::Cursor::new(data), len).and_then(|h| h.facts())
    };
    parse(&bytes, total).unwrap();
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for i in 0..200 {
        let cut = if i < 100 {
            rng.gen_range(0..header.data_start as usize)
        } else {
            i - 100
        };
        assert!(parse(&bytes[..cut], cut as u64).is_err(), "cut at {cut}");
    }
    let mut mutated = bytes.clone();
    for _ in 0..200 {
        let at = rng.gen_range(0..header.data_start as usize);
        let old = mutated[at];
        mutated[at] ^= 1 << rng.gen_range(0..8);
        let _ = parse(&mutated, total);
        mutated[at] = old;
    }
}

#[cfg(feature = "real-model")]
#[test]
fn the_default_model_has_30_layers() {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let facts = model_facts(&path).unwrap();
    assert_eq!(facts.architecture, "llama");
    assert_eq!(facts.n_layer, 30);
    assert_eq!(facts.n_head_kv, vec![3; 30]);
    assert_eq!(facts.n_ctx_train, 8192);
    let weights: u64 = facts.layer_bytes.iter().sum::<u64>() + facts.embedding_bytes;
    assert!(
        weights > 80_000_000 && weights < facts.file_bytes,
        "{weights}"
    );
}
