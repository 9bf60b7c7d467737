//! The store readers on synthetic trees built here: files, blobs and manifests.

use std::path::PathBuf;

use serde_json::json;
use sha2::{Digest, Sha256};

use super::*;

struct Tree(PathBuf);

impl Tree {
    fn new(tag: &str) -> Self {
        let root = std::env::temp_dir().join(format!(
            "lmsbx-store-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&root).unwrap();
        Self(root)
    }

    fn file(&self, relative: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// A blob under its own digest; returns `sha256:HEX`.
    fn blob(&self, bytes: &[u8]) -> String {
        let hex = format!("{:x}", Sha256::digest(bytes));
        self.file(&format!("blobs/sha256-{hex}"), bytes);
        format!("sha256:{hex}")
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ids(models: &[FoundModel]) -> Vec<&str> {
    models.iter().map(|m| m.id.as_str()).collect()
}

#[test]
fn a_folder_lists_every_gguf_with_split_files_as_one() {
    let t = Tree::new("dir");
    t.file("a.gguf", b"GGUF1");
    t.file("sub/b.gguf", b"GGUF22");
    t.file("big-00001-of-00002.gguf", b"p1");
    t.file("big-00002-of-00002.gguf", b"p22");
    t.file("broken-00001-of-00003.gguf", b"x");
    t.file("notes.txt", b"not a model");
    let models = scan_dir(&t.0).unwrap();
    assert_eq!(ids(&models), ["a", "big", "sub/b"]);
    let big = &models[1];
    assert_eq!(big.parts.len(), 2);
    assert_eq!(big.size, 5);
    assert!(big.path.ends_with("big-00001-of-00002.gguf"));
}

#[test]
fn lm_studio_ids_are_publisher_and_model_or_the_file_when_there_are_several() {
    let t = Tree::new("lms");
    t.file(
        "lmstudio-community/Qwen3-8B-GGUF/Qwen3-8B-Q4_K_M.gguf",
        b"q",
    );
    t.file(
        "bartowski/Llama-3.2-3B-GGUF/Llama-3.2-3B-Q4_K_M.gguf",
        b"l4",
    );
    t.file("bartowski/Llama-3.2-3B-GGUF/Llama-3.2-3B-Q8_0.gguf", b"l8");
    t.file("someone/Vision-GGUF/model.gguf", b"v");
    t.file("someone/Vision-GGUF/mmproj-model-f16.gguf", b"proj");
    t.file("stray.gguf", b"s");
    let models = scan_lmstudio(&t.0).unwrap();
    assert_eq!(
        ids(&models),
        [
            "bartowski/Llama-3.2-3B-GGUF/Llama-3.2-3B-Q4_K_M",
            "bartowski/Llama-3.2-3B-GGUF/Llama-3.2-3B-Q8_0",
            "lmstudio-community/Qwen3-8B-GGUF",
            "someone/Vision-GGUF",
        ]
    );
    assert!(models.iter().all(|m| m.source == Source::LmStudio));
}

fn manifest(model: &str, params: Option<&str>, system: Option<&str>) -> serde_json::Value {
    let mut layers = vec![json!({"mediaType": MODEL, "digest": model, "size": 4})];
    if let Some(p) = params {
        layers.push(json!({"mediaType": "application/vnd.ollama.image.params", "digest": p}));
    }
    if let Some(s) = system {
        layers.push(json!({"mediaType": "application/vnd.ollama.image.system", "digest": s}));
    }
    layers
        .push(json!({"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:00"}));
    json!({"schemaVersion": 2, "layers": layers})
}

const MODEL: &str = "application/vnd.ollama.image.model";

#[test]
fn ollama_manifests_name_blobs_params_and_system() {
    let t = Tree::new("ollama");
    let gguf = t.blob(b"GGUF-llama");
    let params = t.blob(br#"{"stop": ["<|eot_id|>"], "temperature": 0.6, "num_ctx": 8192}"#);
    let system = t.blob(b"You are helpful.");
    let m = manifest(&gguf, Some(&params), Some(&system));
    t.file(
        "manifests/registry.ollama.ai/library/llama3.2/3b",
        m.to_string().as_bytes(),
    );
    t.file(
        "manifests/registry.ollama.ai/library/llama3.2/latest",
        manifest(&gguf, None, None).to_string().as_bytes(),
    );
    t.file(
        "manifests/registry.ollama.ai/someone/tiny/q4",
        manifest(&gguf, None, None).to_string().as_bytes(),
    );
    t.file(
        "manifests/hf.co/bartowski/Qwen3-GGUF/Q4_K_M",
        manifest(&gguf, None, None).to_string().as_bytes(),
    );
    // Dangling (no blob) and unreadable manifests are skipped.
    t.file(
        "manifests/registry.ollama.ai/library/gone/latest",
        manifest(&format!("sha256:{}", "f".repeat(64)), None, None)
            .to_string()
            .as_bytes(),
    );
    // A digest that is a path never reaches the file system: not as the model, not as a layer.
    t.file("secret", b"GGUF host file");
    for (n, evil) in [
        "../secret",
        "sha256:../../secret",
        "sha256-../secret",
        "/etc/hostname",
        &format!("sha256:{}", "A".repeat(64)),
        &format!("sha256:{}/..", "a".repeat(61)),
    ]
    .into_iter()
    .enumerate()
    {
        t.file(
            &format!("manifests/registry.ollama.ai/library/evil{n}/latest"),
            manifest(evil, None, None).to_string().as_bytes(),
        );
    }
    t.file(
        "manifests/registry.ollama.ai/library/leaky/latest",
        manifest(&gguf, Some("sha256:../secret"), Some("../secret"))
            .to_string()
            .as_bytes(),
    );
    t.file(
        "manifests/registry.ollama.ai/library/junk/latest",
        b"{not json",
    );
    let models = scan_ollama(&t.0).unwrap();
    assert_eq!(
        ids(&models),
        [
            "hf.co/bartowski/Qwen3-GGUF:Q4_K_M",
            "leaky:latest",
            "llama3.2:3b",
            "llama3.2:latest",
            "someone/tiny:q4",
        ]
    );
    let leaky = &models[1];
    assert!(
        leaky.system.is_none() && leaky.params.is_empty(),
        "{leaky:?}"
    );
    let llama = &models[2];
    assert_eq!(llama.digest.as_deref(), Some(gguf.as_str()));
    assert_eq!(llama.params["temperature"], json!(0.6));
    assert_eq!(llama.params["stop"], json!(["<|eot_id|>"]));
    assert_eq!(llama.system.as_deref(), Some("You are helpful."));
    assert!(llama
        .path
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("sha256-"));
    // Names: `:latest` may be left out; ambiguity is an error naming both.
    assert_eq!(resolve(&models, "llama3.2").unwrap().id, "llama3.2:latest");
    assert_eq!(resolve(&models, "llama3.2:3b").unwrap().id, "llama3.2:3b");
    assert!(resolve(&models, "nope").is_err());
    let mut twice = models.clone();
    twice.push(FoundModel {
        source: Source::File,
        ..models[2].clone()
    });
    let err = resolve(&twice, "llama3.2:3b").unwrap_err();
    assert!(err.contains("several"), "{err}");
    assert!(scan_ollama(&t.0.join("blobs")).is_err(), "not a store");
}

#[test]
fn a_blob_whose_digest_does_not_match_is_refused() {
    let t = Tree::new("digest");
    let digest = t.blob(b"the real bytes");
    let path = t.0.join(format!("blobs/{}", digest.replacen(':', "-", 1)));
    let mut seen = 0;
    verify_digest(&path, &digest, |done, total| {
        assert!(done <= total);
        seen = done;
    })
    .unwrap();
    assert_eq!(seen, 14);
    std::fs::write(&path, b"tampered bytes").unwrap();
    let err = verify_digest(&path, &digest, |_, _| {}).unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
}
