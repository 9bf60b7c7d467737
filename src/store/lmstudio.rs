//! LM Studio's folder: `ROOT/PUBLISHER/MODEL/FILE.gguf`. A folder with one model is
//! `publisher/model`; with several, each is `publisher/model/file`. Vision projectors
//! (`mmproj-*`) are not models.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::dir::{found, gguf_files, group};
use super::{FoundModel, Source, StoreError};

/// The default folders, in order: `~/.lmstudio/models`, then `~/.cache/lm-studio/models`.
pub fn default_dirs() -> Vec<PathBuf> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    vec![
        home.join(".lmstudio/models"),
        home.join(".cache/lm-studio/models"),
    ]
}

pub fn scan_lmstudio(root: &Path) -> Result<Vec<FoundModel>, StoreError> {
    let files: Vec<PathBuf> = gguf_files(root)?
        .into_iter()
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("mmproj"))
        })
        .collect();
    // Models per PUBLISHER/MODEL folder.
    let mut folders: BTreeMap<String, Vec<(PathBuf, Vec<PathBuf>)>> = BTreeMap::new();
    for (first, parts) in group(files) {
        let Ok(relative) = first.strip_prefix(root) else {
            continue;
        };
        let components: Vec<String> = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if components.len() < 3 {
            // Not in PUBLISHER/MODEL/: LM Studio does not list it either.
            continue;
        }
        let folder = format!("{}/{}", components[0], components[1]);
        folders.entry(folder).or_default().push((first, parts));
    }
    let mut out = Vec::new();
    for (folder, models) in folders {
        let single = models.len() == 1;
        for (first, parts) in models {
            let id = if single {
                folder.clone()
            } else {
                let file = first
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let file = super::split_part(&format!("{file}.gguf"))
                    .map_or(file.clone(), |(base, _, _)| base.to_owned());
                format!("{folder}/{file}")
            };
            out.push(found(id, Source::LmStudio, first, parts));
        }
    }
    Ok(out)
}
