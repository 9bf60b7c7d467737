//! `--models-preset FILE`: per-model settings in TOML, over the server-wide flags.
//!
//! ```toml
//! [models."llama3.2:3b"]
//! ctx = 8192                   # total context (as --ctx-size)
//! parallel = 2                 # sequences (as --parallel)
//! n-gpu-layers = 20
//! policy = "prefer-fast"       # auto, proportional, prefer-fast
//! template-file = "llama3.jinja"
//! aliases = ["llama"]
//! system = "You are terse."    # default system prompt
//! tool-choice = "required"     # a user turn with tools must call one
//! [models."llama3.2:3b".defaults]
//! temperature = 0.2            # Ollama's option names, as an Ollama `params` layer has them
//! num_predict = 256
//!
//! [models.extra]
//! path = "/data/extra.gguf"    # a model no store holds
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::gpu::plan::Policy;
use crate::template::ChatTemplate;

/// A preset's `tool-choice`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ToolChoicePreset {
    Auto,
    Required,
}

/// One model's settings.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Preset {
    pub ctx: Option<u32>,
    pub parallel: Option<u32>,
    pub n_gpu_layers: Option<u32>,
    pub policy: Option<Policy>,
    pub template_file: Option<PathBuf>,
    #[serde(default)]
    pub aliases: Vec<String>,
    pub system: Option<String>,
    #[serde(default)]
    pub defaults: Map<String, Value>,
    /// `required`: a request that gives tools and ends with a user message must call one (a
    /// request's own `tool_choice` wins; after a tool result the model answers freely, so agent
    /// loops such as LM Studio's `act()` end). `auto`: as the request says.
    pub tool_choice: Option<ToolChoicePreset>,
    /// A GGUF file to add as this model (no store holds it).
    pub path: Option<PathBuf>,
    /// `template_file`'s text, read and checked when the file is loaded.
    #[serde(skip)]
    pub template: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    models: BTreeMap<String, Preset>,
}

/// Presets by model id.
pub type Presets = BTreeMap<String, Preset>;

/// Reads and checks `path`: TOML syntax, known keys, template files that compile, sizes that
/// make sense. Relative paths are taken from the file's folder.
pub fn load(path: &Path) -> Result<Presets, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file: File = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut presets = file.models;
    for (id, preset) in presets.iter_mut() {
        let bad = |message: String| format!("{}: models.{id:?}: {message}", path.display());
        if preset.parallel == Some(0) {
            return Err(bad("parallel must be at least 1".into()));
        }
        if let (Some(ctx), parallel) = (preset.ctx, preset.parallel.unwrap_or(1)) {
            if ctx != 0 && ctx / parallel < 16 {
                return Err(bad(format!(
                    "ctx {ctx} over parallel {parallel} leaves under 16 tokens per sequence"
                )));
            }
        }
        if preset.aliases.iter().any(|a| a.trim().is_empty()) {
            return Err(bad("aliases must not be empty".into()));
        }
        if let Some(file) = &mut preset.template_file {
            if file.is_relative() {
                *file = base.join(&*file);
            }
            let source = std::fs::read_to_string(&*file)
                .map_err(|e| bad(format!("template-file {}: {e}", file.display())))?;
            ChatTemplate::new(&source)
                .map_err(|e| bad(format!("template-file {}: {e}", file.display())))?;
            preset.template = Some(source);
        }
        if let Some(model) = &mut preset.path {
            if model.is_relative() {
                *model = base.join(&*model);
            }
            if !model.is_file() {
                return Err(bad(format!("path {} is not a file", model.display())));
            }
        }
    }
    Ok(presets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn presets_read_check_and_resolve_relative_paths() {
        let dir = std::env::temp_dir().join(format!("lmsbx-preset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write(
            &dir,
            "t.jinja",
            "{% for m in messages %}{{ m.content }}{% endfor %}",
        );
        write(&dir, "x.gguf", "GGUF");
        let file = write(
            &dir,
            "presets.toml",
            r#"
[models."llama3.2:3b"]
ctx = 8192
parallel = 2
n-gpu-layers = 20
policy = "prefer-fast"
template-file = "t.jinja"
aliases = ["llama"]
system = "Be terse."
tool-choice = "required"
[models."llama3.2:3b".defaults]
temperature = 0.2

[models.extra]
path = "x.gguf"
"#,
        );
        let presets = load(&file).unwrap();
        let llama = &presets["llama3.2:3b"];
        assert_eq!(
            (llama.ctx, llama.parallel, llama.n_gpu_layers),
            (Some(8192), Some(2), Some(20))
        );
        assert_eq!(llama.policy, Some(Policy::PreferFast));
        assert!(llama.template.as_deref().unwrap().contains("m.content"));
        assert_eq!(llama.defaults["temperature"], 0.2);
        assert_eq!(llama.tool_choice, Some(ToolChoicePreset::Required));
        assert_eq!(
            presets["extra"].path.as_deref(),
            Some(dir.join("x.gguf").as_path())
        );
        // Unknown keys, bad sizes, templates that do not compile, missing files: each named.
        for (text, words) in [
            ("[models.a]\nctxx = 1\n", "unknown field"),
            ("[models.a]\nctx = 16\nparallel = 4\n", "under 16 tokens"),
            ("[models.a]\nparallel = 0\n", "at least 1"),
            ("[models.a]\npath = \"missing.gguf\"\n", "not a file"),
            (
                "[models.a]\ntemplate-file = \"missing.jinja\"\n",
                "template-file",
            ),
            ("[models.a]\npolicy = \"fastest\"\n", "unknown variant"),
        ] {
            let file = write(&dir, "bad.toml", text);
            let err = load(&file).unwrap_err();
            assert!(err.contains(words), "{text}: {err}");
        }
        write(&dir, "broken.jinja", "{% for %}");
        let file = write(
            &dir,
            "bad.toml",
            "[models.a]\ntemplate-file = \"broken.jinja\"\n",
        );
        assert!(load(&file).unwrap_err().contains("broken.jinja"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
