//! A folder of GGUF files (`--models-dir`): every `*.gguf` below it; split files as one model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{io, split_part, FoundModel, Source, StoreError};

/// Every `.gguf` file below `root`, depth first, sorted, symbolic links followed.
pub(super) fn gguf_files(root: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| io(&dir, e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "gguf") && path.is_file() {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Groups files into models: the parts of a split model together, in order. Returns
/// `(first part, parts)`; a split model missing a part is left out with a warning.
pub(super) fn group(files: Vec<PathBuf>) -> Vec<(PathBuf, Vec<PathBuf>)> {
    let mut splits: BTreeMap<(PathBuf, String, u32), Vec<(u32, PathBuf)>> = BTreeMap::new();
    let mut out = Vec::new();
    for file in files {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
        match split_part(name) {
            Some((base, index, total)) => {
                let key = (
                    file.parent().map(Path::to_owned).unwrap_or_default(),
                    base.to_owned(),
                    total,
                );
                splits.entry(key).or_default().push((index, file.clone()));
            }
            None => out.push((file.clone(), vec![file])),
        }
    }
    for ((dir, base, total), mut parts) in splits {
        parts.sort();
        if parts.len() as u32 != total {
            tracing::warn!(dir = %dir.display(), %base, have = parts.len(), total, "a split model is missing parts; skipped");
            continue;
        }
        let parts: Vec<PathBuf> = parts.into_iter().map(|(_, p)| p).collect();
        out.push((parts[0].clone(), parts));
    }
    out.sort();
    out
}

fn size(parts: &[PathBuf]) -> u64 {
    parts
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

pub(super) fn found(id: String, source: Source, path: PathBuf, parts: Vec<PathBuf>) -> FoundModel {
    FoundModel {
        id,
        source,
        size: size(&parts),
        path,
        parts,
        digest: None,
        params: Default::default(),
        system: None,
    }
}

/// The models of a folder: ids are paths below it without `.gguf` (and without the split
/// suffix).
pub fn scan_dir(root: &Path) -> Result<Vec<FoundModel>, StoreError> {
    let models = group(gguf_files(root)?)
        .into_iter()
        .map(|(first, parts)| {
            let relative = first.strip_prefix(root).unwrap_or(&first);
            let mut id = relative.to_string_lossy().into_owned();
            id = id.trim_end_matches(".gguf").to_owned();
            if let Some((base, _, _)) = split_part(&format!("{id}.gguf")) {
                id = base.to_owned();
            }
            found(id, Source::File, first, parts)
        })
        .collect();
    Ok(models)
}
