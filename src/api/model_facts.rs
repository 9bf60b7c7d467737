//! What the dialects that describe models (Ollama's `/api/tags` and `/api/show`, LM Studio's
//! `/api/v0/models`) say of the served model, read from its GGUF header (no weights).

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::state::AppState;
use crate::gpu::gguf::MetaValue;
use crate::registry::ModelCard;

/// What Ollama says of a model, from the file and its header.
pub struct Facts {
    pub size: u64,
    pub modified_at: String,
    pub digest: String,
    pub details: Value,
    pub model_info: Value,
    /// `general.architecture`.
    pub arch: String,
    /// The quantization's name (`Q4_1`).
    pub quantization: &'static str,
    /// The GGUF declares a pooling type: an embedding model.
    pub embedding: bool,
}

impl Facts {
    /// The GGUF's chat template, if it has one.
    pub fn template(&self) -> Option<&str> {
        self.model_info
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
    }
}

fn facts(path: &Path) -> Result<Facts, ApiError> {
    let header = crate::gpu::gguf::read_header(path)
        .map_err(|e| ApiError::Internal(format!("reading the model's header: {e}")))?;
    let meta = std::fs::metadata(path)
        .map_err(|e| ApiError::Internal(format!("reading the model file: {e}")))?;
    let modified: chrono::DateTime<chrono::Utc> = meta
        .modified()
        .map(Into::into)
        .unwrap_or_else(|_| chrono::Utc::now());
    let text = |key: &str| match header.metadata.get(key) {
        Some(MetaValue::Str(s)) => Some(s.clone()),
        _ => None,
    };
    let arch = text("general.architecture").unwrap_or_else(|| "unknown".into());
    let quantization = match header.metadata.get("general.file_type") {
        Some(MetaValue::Int(n)) => crate::gpu::gguf::file_type_name(*n),
        _ => "unknown",
    };
    let mut info = Map::new();
    let mut keys: Vec<&String> = header.metadata.keys().collect();
    keys.sort();
    for key in keys {
        let value = match &header.metadata[key] {
            MetaValue::Int(i) => json!(i),
            MetaValue::Float(f) => json!(f),
            MetaValue::Bool(b) => json!(b),
            MetaValue::Str(s) => json!(s),
            // Ollama elides arrays (the vocabulary, merges) unless asked for verbose output.
            MetaValue::Array { .. } | MetaValue::Strings(_) => Value::Null,
        };
        info.insert(key.clone(), value);
    }
    // An identity for this file (path, size, time), not a hash of its bytes: hashing a large
    // model on every listing would take minutes.
    let identity = format!(
        "{}:{}:{}",
        path.display(),
        meta.len(),
        modified.timestamp_nanos_opt().unwrap_or_default()
    );
    Ok(Facts {
        size: meta.len(),
        modified_at: modified.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        digest: format!("{:x}", Sha256::digest(identity.as_bytes())),
        details: json!({
            "parent_model": "",
            "format": "gguf",
            "family": arch.clone(),
            "families": [arch.clone()],
            "parameter_size": text("general.size_label").unwrap_or_default(),
            "quantization_level": quantization,
        }),
        embedding: header
            .metadata
            .contains_key(&format!("{arch}.pooling_type")),
        model_info: Value::Object(info),
        arch,
        quantization,
    })
}

/// A model's facts, read from its header once per file (on the blocking pool) and kept: every LM
/// Studio answer carries some of them. An Ollama blob's digest is its manifest's.
pub async fn model_facts(state: &AppState, card: &ModelCard) -> Result<Arc<Facts>, ApiError> {
    let path = card.found.path.clone();
    let blob_digest = card.found.digest.clone();
    state
        .model_facts(&path)
        .get_or_try_init(|| async move {
            tokio::task::spawn_blocking(move || {
                let mut facts = facts(&path)?;
                if let Some(digest) = blob_digest {
                    facts.digest = digest.trim_start_matches("sha256:").to_owned();
                }
                Ok(Arc::new(facts))
            })
            .await
            .map_err(|e| ApiError::Internal(format!("the header task failed: {e}")))?
        })
        .await
        .cloned()
}
