//! The model stores people already have: a folder of GGUF files, Ollama's store
//! (`~/.ollama/models`: manifests naming `sha256-…` blobs) and LM Studio's folder
//! (`~/.lmstudio/models/PUBLISHER/MODEL/*.gguf`). Reading them finds models and their ids;
//! nothing is copied, and files are only opened read-only.
//!
//! Must not: load anything, or trust a blob's name: [`verify_digest`] checks a blob against the
//! digest its manifest names (once, before a first load).

pub mod command;
mod dir;
mod lmstudio;
mod ollama;

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub use dir::scan_dir;
pub use lmstudio::scan_lmstudio;
pub use ollama::scan_ollama;

/// Where a model was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A `-m` file or a `--models-dir` folder.
    File,
    Ollama,
    LmStudio,
}

/// One model a store holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FoundModel {
    /// What clients call it: `name:tag` for Ollama (`:latest` may be omitted), `publisher/model`
    /// for LM Studio, the path below the folder without `.gguf` for a folder.
    pub id: String,
    pub source: Source,
    /// The GGUF (the first part of a split model).
    pub path: PathBuf,
    /// Every part of a split model, in order (one entry otherwise).
    pub parts: Vec<PathBuf>,
    /// Bytes of all parts.
    pub size: u64,
    /// Ollama: the blob's `sha256:…` digest as the manifest names it (checked before loading).
    pub digest: Option<String>,
    /// Ollama's `params` layer: default options (`stop`, `num_ctx`, `temperature`, …).
    pub params: Map<String, Value>,
    /// Ollama's `system` layer: the default system prompt.
    pub system: Option<String>,
}

/// Why a store could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error(
        "{path}: the blob's sha256 is {actual}, but its manifest names {expected}: refusing it"
    )]
    DigestMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

fn io(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// `NAME-00001-of-00003.gguf` → (`NAME`, 1, 3).
fn split_part(file_name: &str) -> Option<(&str, u32, u32)> {
    let stem = file_name.strip_suffix(".gguf")?;
    let (rest, total) = stem.rsplit_once("-of-")?;
    let (base, index) = rest.rsplit_once('-')?;
    let total: u32 = total.parse().ok()?;
    let index: u32 = index.parse().ok()?;
    (index >= 1 && index <= total && total > 1).then_some((base, index, total))
}

/// Checks `path` against an Ollama digest (`sha256:HEX`), reading it in 1 MiB blocks;
/// `progress(done, total)` is called as it goes (large models take a while).
pub fn verify_digest(
    path: &Path,
    digest: &str,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), StoreError> {
    use std::io::Read;
    let expected = digest.strip_prefix("sha256:").unwrap_or(digest);
    let mut file = std::fs::File::open(path).map_err(|e| io(path, e))?;
    let total = file.metadata().map_err(|e| io(path, e))?.len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    loop {
        let n = file.read(&mut buf).map_err(|e| io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(done, total);
    }
    let actual = format!("{:x}", hasher.finalize());
    if actual != expected {
        return Err(StoreError::DigestMismatch {
            path: path.to_owned(),
            expected: format!("sha256:{expected}"),
            actual: format!("sha256:{actual}"),
        });
    }
    Ok(())
}

/// The stores a server or `lm-sandbox models` reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sources {
    /// `--models-dir` folders.
    pub dirs: Vec<PathBuf>,
    /// Ollama's store.
    pub ollama: Option<PathBuf>,
    /// LM Studio's folder.
    pub lmstudio: Option<PathBuf>,
}

/// Every model `sources` hold, and a message for each store that could not be read (it is
/// skipped).
pub fn discover(sources: &Sources) -> (Vec<FoundModel>, Vec<String>) {
    let mut models = Vec::new();
    let mut errors = Vec::new();
    let mut add = |what: &str, found: Result<Vec<FoundModel>, StoreError>| match found {
        Ok(found) => models.extend(found),
        Err(err) => errors.push(format!("{what}: {err}")),
    };
    for dir in &sources.dirs {
        add("--models-dir", scan_dir(dir));
    }
    if let Some(dir) = &sources.ollama {
        add("--ollama-models", scan_ollama(dir));
    }
    if let Some(dir) = &sources.lmstudio {
        add("--lmstudio-models", scan_lmstudio(dir));
    }
    (models, errors)
}

/// The model `name` among `models`: its id, or an Ollama id without `:latest`. Ambiguity (one
/// name, several models) is an error naming them.
pub fn resolve<'m>(models: &'m [FoundModel], name: &str) -> Result<&'m FoundModel, String> {
    let matches: Vec<&FoundModel> = models
        .iter()
        .filter(|m| {
            m.id == name
                || (m.source == Source::Ollama && m.id.strip_suffix(":latest") == Some(name))
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(format!("no model is called {name:?}")),
        many => Err(format!(
            "{name:?} names several models: {}",
            many.iter()
                .map(|m| format!("{} ({:?}, {})", m.id, m.source, m.path.display()))
                .collect::<Vec<_>>()
                .join("; ")
        )),
    }
}

#[cfg(test)]
mod tests;
