//! Ollama's store: `manifests/HOST/NAMESPACE/MODEL/TAG` (JSON) naming layers by digest, stored
//! as `blobs/sha256-HEX`. The layer of media type `application/vnd.ollama.image.model` is the
//! GGUF; `…params` holds default options (JSON) and `…system` the default system prompt. Ollama's
//! Go `template` layer is not used: the GGUF's own Jinja template is.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::dir::found;
use super::{io, FoundModel, Source, StoreError};

const MODEL_LAYER: &str = "application/vnd.ollama.image.model";
const PARAMS_LAYER: &str = "application/vnd.ollama.image.params";
const SYSTEM_LAYER: &str = "application/vnd.ollama.image.system";
/// Ollama's default registry and namespace, left out of names (`llama3.2:3b`).
const DEFAULT_HOST: &str = "registry.ollama.ai";
const DEFAULT_NAMESPACE: &str = "library";
/// Params and system layers are small; larger ones are not read.
const MAX_SMALL_LAYER: u64 = 1 << 20;

/// `$OLLAMA_MODELS`, else `~/.ollama/models`.
pub fn default_dir() -> PathBuf {
    std::env::var_os("OLLAMA_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default()
                .join(".ollama/models")
        })
}

/// The blob file of `digest`, only for a digest of Ollama's form (`sha256:` or `sha256-` and 64
/// lower-case hex digits): a manifest is a file anyone who can write the store may edit, and a
/// digest such as `../../etc/hostname` must never become a path (the class of Ollama's
/// CVE-2024-37032).
fn blob(root: &Path, digest: &str) -> Option<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .or_else(|| digest.strip_prefix("sha256-"))?;
    let valid = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    valid.then(|| root.join("blobs").join(format!("sha256-{hex}")))
}

/// Ollama's name for a manifest at `HOST/NAMESPACE/MODEL/TAG`.
fn name(components: &[String]) -> Option<String> {
    let [host, namespace, model, tag] = components else {
        return None;
    };
    Some(match (host.as_str(), namespace.as_str()) {
        (DEFAULT_HOST, DEFAULT_NAMESPACE) => format!("{model}:{tag}"),
        (DEFAULT_HOST, _) => format!("{namespace}/{model}:{tag}"),
        _ => format!("{host}/{namespace}/{model}:{tag}"),
    })
}

fn small_layer(root: &Path, layer: &Value) -> Option<String> {
    let digest = layer["digest"].as_str()?;
    let Some(path) = blob(root, digest) else {
        tracing::warn!(
            digest,
            "an Ollama layer's digest is not sha256:HEX; ignored"
        );
        return None;
    };
    let len = std::fs::metadata(&path).ok()?.len();
    if len > MAX_SMALL_LAYER {
        tracing::warn!(path = %path.display(), len, "an Ollama layer is too large to read; ignored");
        return None;
    }
    std::fs::read_to_string(path).ok()
}

/// Every model the manifests name whose GGUF blob is present. A dangling or unreadable manifest
/// is skipped with a warning, never an error for the rest.
pub fn scan_ollama(root: &Path) -> Result<Vec<FoundModel>, StoreError> {
    let manifests = root.join("manifests");
    if !manifests.is_dir() {
        return Err(io(&manifests, "not an Ollama store (no manifests folder)"));
    }
    let mut files = Vec::new();
    let mut stack = vec![manifests.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let components: Vec<String> = file
            .strip_prefix(&manifests)
            .unwrap_or(&file)
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let Some(id) = name(&components) else {
            continue;
        };
        let manifest: Value = match std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            Some(m) => m,
            None => {
                tracing::warn!(manifest = %file.display(), "unreadable Ollama manifest; skipped");
                continue;
            }
        };
        let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
        let layer = |kind: &str| layers.iter().find(|l| l["mediaType"] == kind);
        let Some(digest) = layer(MODEL_LAYER).and_then(|l| l["digest"].as_str()) else {
            tracing::warn!(manifest = %file.display(), "an Ollama manifest without a model layer; skipped");
            continue;
        };
        let Some(path) = blob(root, digest) else {
            tracing::warn!(manifest = %file.display(), digest, "an Ollama manifest's model digest is not sha256:HEX; skipped");
            continue;
        };
        if !path.is_file() {
            tracing::warn!(manifest = %file.display(), blob = %path.display(), "an Ollama manifest names a missing blob; skipped");
            continue;
        }
        let mut model = found(id, Source::Ollama, path.clone(), vec![path]);
        model.digest = Some(digest.to_owned());
        if let Some(Value::Object(params)) = layer(PARAMS_LAYER)
            .and_then(|l| small_layer(root, l))
            .and_then(|t| serde_json::from_str(&t).ok())
        {
            model.params = params;
        }
        model.system = layer(SYSTEM_LAYER).and_then(|l| small_layer(root, l));
        out.push(model);
    }
    Ok(out)
}
