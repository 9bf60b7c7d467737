//! The module that touches `llama_cpp_2` (and `llama_cpp_sys_2`, for what the binding lacks):
//! model loading, the context, the batch, samplers; `readback` (where llama.cpp put each layer) and
//! `rpc` (llama.cpp's RPC backend, both ends). `fit.rs` holds the one other use, llama.cpp's fit.
//!
//! Everything here runs on the engine thread except [`Tokenizer`], which only reads the immutable
//! vocabulary (llama.cpp's vocab is `Sync`) so the HTTP side can validate prompt lengths before a
//! request is queued.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::{LlamaModelParams, LlamaSplitMode};
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;

mod readback;
mod rpc;

pub use rpc::{link_workers, remote_gpus, serve_worker, WorkerConfig as RpcWorkerConfig};

use super::runner::{BatchEntry, Logits, ModelRunner, RunnerError};
use super::scheduler::Scheduler;
use super::worker;
use super::{
    EngineCommand, EngineHandle, LiveCounts, ModelInfo, SamplingParams, SeqId, Token, TokenizeText,
};

/// What the engine thread needs to load and serve one model, in llama.cpp's words.
#[derive(Debug, Clone)]
pub struct LlamaEngineConfig {
    pub model_path: PathBuf,
    /// Used to name the engine thread.
    pub model_id: String,
    /// Total context over all sequences; 0 takes the model's trained context.
    pub n_ctx: u32,
    /// Sequences decoded together (`--parallel`).
    pub n_seq: u32,
    /// Most tokens in one decode (`--batch-size`).
    pub n_batch: u32,
    pub n_threads: i32,
    pub max_queue: usize,
    /// What the placement plan offloads.
    pub offload: GpuOffload,
}

/// The placement plan in llama.cpp's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuOffload {
    /// llama.cpp's `n_gpu_layers` (`n_layer + 1` includes the output layer).
    pub n_gpu_layers: u32,
    /// PCI bus ids of the GPUs to use, in device order (the last holds the last layers).
    pub devices: Vec<String>,
    /// `--split-mode none`: everything on the first device.
    pub single_gpu: bool,
    /// The plan's repeating layers on each of `devices` (its `tensor_split`).
    pub layers: Vec<u32>,
    /// The plan's bytes on each of `devices` (weights, KV cache, compute, output).
    pub bytes: Vec<u64>,
    /// The model's repeating layers.
    pub n_layer: u32,
}

/// Errors while loading a model or creating its context.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("llama.cpp backend: {0}")]
    Backend(String),
    #[error("cannot load model {path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("cannot create a context of {n_ctx} tokens: {reason}")]
    Context { n_ctx: u32, reason: String },
    #[error("--ctx-size {n_ctx} leaves less than 16 tokens for each of {n_seq} sequences")]
    ContextTooSmall { n_ctx: u32, n_seq: u32 },
    #[error("placement: {0}")]
    Placement(String),
    /// A device the model was placed on went away while serving.
    #[error("{0}")]
    Lost(String),
}

/// llama.cpp's device index for each of `bus_ids`, matched by PCI bus id (never by position: NVML
/// orders by bus, CUDA fastest-first and after `CUDA_VISIBLE_DEVICES`).
fn devices_by_bus_id(bus_ids: &[String]) -> Result<Vec<usize>, LoadError> {
    use crate::gpu::inventory::normalize_bus_id;
    let mut known = Vec::new();
    // SAFETY: plain getters over llama.cpp's static device registry; `props` is written by
    // `ggml_backend_dev_get_props` and its strings live as long as the device.
    unsafe {
        for index in 0..llama_cpp_sys_2::ggml_backend_dev_count() {
            let device = llama_cpp_sys_2::ggml_backend_dev_get(index);
            let mut props: llama_cpp_sys_2::ggml_backend_dev_props = std::mem::zeroed();
            llama_cpp_sys_2::ggml_backend_dev_get_props(device, &raw mut props);
            if !props.device_id.is_null() {
                let id = std::ffi::CStr::from_ptr(props.device_id).to_string_lossy();
                known.push((index, normalize_bus_id(&id)));
            }
        }
    }
    bus_ids
        .iter()
        .map(|bus| {
            if let Some((worker, index)) = crate::rpc::parse_device_id(bus) {
                return rpc::device_index(worker, index);
            }
            let bus = normalize_bus_id(bus);
            known
                .iter()
                .find(|(_, id)| *id == bus)
                .map(|(index, _)| *index)
                .ok_or_else(|| {
                    LoadError::Placement(format!(
                        "llama.cpp has no device with PCI bus id {bus} (it sees {:?})",
                        known.iter().map(|(_, id)| id.as_str()).collect::<Vec<_>>()
                    ))
                })
        })
        .collect()
}

/// The model parameters for the plan, on llama.cpp's devices `indices` (those of
/// `offload.devices`). With several GPUs in a CUDA build the split goes through llama.cpp's fit
/// with the plan's margins (see `fit.rs`); with any GPU, llama.cpp's own fit is logged beside the
/// plan.
/// `free` is each device's free memory, read just before (used by the CUDA build's fit).
fn model_params(
    config: &LlamaEngineConfig,
    indices: &[usize],
    free: &[u64],
) -> Result<LlamaModelParams, LoadError> {
    let offload = &config.offload;
    let params = LlamaModelParams::default().with_n_gpu_layers(offload.n_gpu_layers);
    if indices.is_empty() {
        return Ok(params);
    }
    // llama.cpp's fit swaps the process-wide logger for one pointing into its own stack frame and
    // puts the old one back after: two fits at once (two servers in one process, as in the tests)
    // would leave a logger pointing into a finished frame. One fit at a time.
    static FIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _fitting = FIT.lock().unwrap_or_else(|e| e.into_inner());
    compare_with_llama_fit(config, indices);
    if indices.len() > 1 && !offload.single_gpu {
        if let Some(fitted) = fitted_to_plan(config, indices, free) {
            return Ok(fitted);
        }
    }
    let mut params = params
        .with_devices(indices)
        .map_err(|e| LoadError::Placement(e.to_string()))?;
    if offload.single_gpu {
        params = params
            .with_split_mode(LlamaSplitMode::None)
            .with_main_gpu(0);
    }
    Ok(params)
}

/// Free memory of each of llama.cpp's devices `indices`.
fn devices_free(indices: &[usize]) -> Vec<u64> {
    indices
        .iter()
        .map(|&i| super::fit::device_free(i))
        .collect()
}

/// The layers llama.cpp put on each planned device (placement id, count), read back from its load,
/// logged beside the plan; a disagreement is a warning with both tables.
fn read_back(
    config: &LlamaEngineConfig,
    indices: &[usize],
    assigned: &[(u32, String)],
) -> Vec<(String, u32)> {
    let offload = &config.offload;
    if indices.is_empty() {
        return Vec::new();
    }
    let names: Vec<String> = indices
        .iter()
        // SAFETY: a getter; `indices` came from llama.cpp's device list.
        .map(|&i| unsafe {
            std::ffi::CStr::from_ptr(llama_cpp_sys_2::ggml_backend_dev_name(
                llama_cpp_sys_2::ggml_backend_dev_get(i),
            ))
        })
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    let loaded = readback::counts(assigned, &names);
    let planned = super::fit::plan_split(offload.n_layer, offload.n_gpu_layers, &offload.layers);
    let table = |counts: &[u32]| {
        offload
            .devices
            .iter()
            .zip(&names)
            .zip(counts)
            .map(|((id, name), n)| format!("{id} ({name}): {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if assigned.is_empty() {
        tracing::warn!(
            "placement: llama.cpp stated no layer assignments; the split is not checked"
        );
    } else if loaded == planned || offload.layers.is_empty() {
        tracing::info!(loaded = %table(&loaded), "placement: llama.cpp put the layers where the plan did");
    } else {
        tracing::warn!(
            planned = %table(&planned),
            loaded = %table(&loaded),
            "placement: llama.cpp's split differs from the plan"
        );
    }
    offload.devices.iter().cloned().zip(loaded).collect()
}

/// The context a fit measures, or `None` before the context size is known.
fn fit_context(config: &LlamaEngineConfig) -> Option<super::fit::FitContext> {
    (config.n_ctx > 0).then(|| super::fit::FitContext {
        n_ctx: config.n_ctx,
        n_seq: config.n_seq.max(1),
        n_batch: config.n_batch,
        n_ubatch: n_ubatch(config),
    })
}

/// Runs llama.cpp's fit on `indices` with `margins` and names, as `who`, how its split differs
/// from the plan.
fn fit_against_plan(
    config: &LlamaEngineConfig,
    indices: &[usize],
    margins: &[u64],
    who: &str,
) -> Result<(super::fit::FitSplit, Vec<String>), String> {
    use super::fit;
    let context = fit_context(config).ok_or("the context size is not known yet")?;
    let offload = &config.offload;
    let split = fit::llama_fit(
        &config.model_path,
        offload.n_layer,
        indices,
        context,
        margins,
    )?;
    let said = fit::disagreements(
        who,
        offload.n_layer,
        offload.n_gpu_layers,
        &offload.layers,
        &offload.devices,
        &split,
    );
    Ok((split, said))
}

/// Logs where llama.cpp's own fit (its default 1 GiB margin per device) would put the model, and
/// how that differs from the plan.
fn compare_with_llama_fit(config: &LlamaEngineConfig, indices: &[usize]) {
    let margins = vec![super::fit::LLAMA_DEFAULT_MARGIN; indices.len()];
    match fit_against_plan(config, indices, &margins, "llama.cpp's own fit") {
        Ok((split, said)) if said.is_empty() => {
            tracing::info!(?split, "llama.cpp's own fit agrees with the plan");
        }
        Ok((_, said)) => {
            for line in said {
                tracing::info!("plan vs llama.cpp: {line}");
            }
        }
        Err(err) => tracing::info!("plan vs llama.cpp: llama.cpp's own fit: {err}"),
    }
}

/// The plan's split through llama.cpp's fit: margins that leave each device the plan's bytes.
/// `None` (with a warning) when the fit cannot reproduce it; llama.cpp's default split applies.
fn fitted_to_plan(
    config: &LlamaEngineConfig,
    indices: &[usize],
    free: &[u64],
) -> Option<LlamaModelParams> {
    use super::fit;
    let offload = &config.offload;
    let context = fit_context(config)?;
    let mut margins = fit::margins_for_plan(free, &offload.bytes, &offload.layers);
    let planned = fit::plan_split(offload.n_layer, offload.n_gpu_layers, &offload.layers);
    // The fit is run with the margins, and the margins corrected by the layers it moved, until it
    // lands on the plan (a few rounds at most: each corrects every device by half a layer per
    // layer moved).
    let mut rounds = 0;
    loop {
        rounds += 1;
        match fit_against_plan(config, indices, &margins, "the fit to the plan's margins") {
            Ok((split, said)) => {
                // The plan's layer count is a ceiling (it may be the user's --n-gpu-layers).
                if split.n_gpu_layers > offload.n_gpu_layers {
                    tracing::warn!(
                        "placement: the fit would offload more layers than planned; llama.cpp's default split applies"
                    );
                    return None;
                }
                let fitted = split.layers.clone().unwrap_or_default();
                match fit::corrected_margins(&margins, &offload.bytes, &planned, &fitted) {
                    None => {
                        tracing::info!(
                            ?split,
                            rounds,
                            "llama.cpp's fit reproduces the plan's split"
                        );
                        break;
                    }
                    Some(corrected) if rounds < 6 && split.overrides == 0 => {
                        tracing::debug!(
                            ?fitted,
                            ?planned,
                            "placement: correcting the fit's margins"
                        );
                        margins = corrected;
                    }
                    Some(_) => {
                        for line in said {
                            tracing::warn!("placement: {line}");
                        }
                        break;
                    }
                }
            }
            Err(err) => {
                tracing::warn!(
                    "placement: {err}; llama.cpp's default split (by free memory) applies"
                );
                return None;
            }
        }
    }
    let mut params = match LlamaModelParams::default().with_devices(indices) {
        Ok(params) => params,
        Err(err) => {
            tracing::warn!("placement: {err}");
            return None;
        }
    };
    let mut cparams = context_params(config, context.n_ctx);
    let path = std::ffi::CString::new(config.model_path.as_os_str().as_encoded_bytes()).ok()?;
    let mut margin_buf = fit::margin_buffer(&margins, llama_cpp_2::max_devices());
    let fitted = std::pin::Pin::new(&mut params).fit_params(
        &path,
        &mut cparams,
        &mut margin_buf,
        context.n_ctx,
        llama_cpp_sys_2::GGML_LOG_LEVEL_WARN,
    );
    match fitted {
        Ok(_) => Some(params),
        Err(err) => {
            tracing::warn!("placement: llama.cpp's fit: {err}; its default split applies");
            None
        }
    }
}

/// The micro-batch: llama.cpp's 512, or less when the batch is smaller.
fn n_ubatch(config: &LlamaEngineConfig) -> u32 {
    config.n_batch.min(512)
}

/// The context parameters the engine runs with, for a total context of `n_ctx`.
fn context_params(config: &LlamaEngineConfig, n_ctx: u32) -> LlamaContextParams {
    // One KV stream per sequence (not unified): each sequence's attention spans only its own
    // n_ctx / n_seq cells, not every cell any sequence (active or cached) occupies, which keeps
    // decode and prefill fast when many sequences hold prefix caches. The scheduler bounds each
    // sequence to n_ctx / n_seq positions, so no stream can overflow.
    LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(config.n_batch)
        .with_n_ubatch(n_ubatch(config))
        .with_n_seq_max(config.n_seq.max(1))
        .with_n_threads(config.n_threads)
        .with_n_threads_batch(config.n_threads)
        .with_kv_unified(false)
}

/// `LlamaBackend::init` may run once per process; every engine shares it.
fn backend() -> Result<&'static LlamaBackend, LoadError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            // llama.cpp's own logging goes through `tracing` (filtered by RUST_LOG), not stderr.
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            readback::install();
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| LoadError::Backend(e.clone()))
}

/// Loads the model, publishes its facts through `on_ready`, then runs the batching loop until every
/// handle is gone. Blocks the calling (engine) thread throughout.
pub fn serve_model(
    config: &LlamaEngineConfig,
    commands: &mut mpsc::Receiver<EngineCommand>,
    live: &LiveCounts,
    on_ready: &dyn Fn(ModelInfo),
) -> Result<(), LoadError> {
    let backend = backend()?;
    let started = std::time::Instant::now();
    let offload = &config.offload;
    let indices = if offload.n_gpu_layers == 0 || offload.devices.is_empty() {
        Vec::new()
    } else {
        devices_by_bus_id(&offload.devices)?
    };
    // Reading a device's free memory creates its CUDA context first, so the difference after
    // loading is what the model and its context took, without the runtime's own share.
    let free_before = devices_free(&indices);
    let params = model_params(config, &indices, &free_before)?;
    let (loaded, assigned) =
        readback::recording(|| LlamaModel::load_from_file(backend, &config.model_path, &params));
    let model = loaded.map_err(|e| LoadError::Model {
        path: config.model_path.clone(),
        reason: e.to_string(),
    })?;
    let device_layers = read_back(config, &indices, &assigned);
    let model = Arc::new(model);
    let n_ctx = if config.n_ctx == 0 {
        model.n_ctx_train()
    } else {
        config.n_ctx
    };
    let n_seq = config.n_seq.max(1);
    if n_ctx / n_seq < 16 {
        return Err(LoadError::ContextTooSmall { n_ctx, n_seq });
    }
    let ctx = model
        .new_context(backend, context_params(config, n_ctx))
        .map_err(|e| LoadError::Context {
            n_ctx,
            reason: e.to_string(),
        })?;
    let n_ctx_seq = ctx.n_ctx() / n_seq;
    let device_memory: Vec<(String, u64)> = offload
        .devices
        .iter()
        .zip(free_before.iter().zip(devices_free(&indices)))
        .map(|(bus, (before, after))| {
            // An RPC device: what its worker reported allocating for us, through the relay.
            let remote = crate::rpc::parse_device_id(bus)
                .and_then(|(worker, n)| Some(crate::rpc::by_worker(worker)?.allocated(n)));
            (bus.clone(), remote.unwrap_or(before.saturating_sub(after)))
        })
        .collect();
    for (bus, bytes) in &device_memory {
        tracing::info!(gpu = %bus, mib = bytes >> 20, "llama.cpp allocated on the GPU while loading");
    }
    let vocab = model.vocab();
    let token_text = |t: LlamaToken| {
        vocab
            .text(t)
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let (pooling, pooling_text) = pooling_of(&model);
    let n_ctx_embed = n_ctx_embed(config, model.n_ctx_train());
    let info = ModelInfo {
        n_ctx_embed,
        n_embd: model.n_embd_out().max(0) as u32,
        pooling: pooling_text,
        n_ctx_seq,
        n_ctx_train: model.n_ctx_train(),
        n_vocab: model.n_vocab(),
        chat_template: model
            .chat_template(None)
            .ok()
            .and_then(|t| t.to_string().ok()),
        bos_token: token_text(vocab.bos()),
        eos_token: token_text(vocab.eos()),
        tokenizer: Arc::new(Tokenizer {
            model: Arc::clone(&model),
        }),
        device_memory,
        device_layers,
        load_id: 0,
    };
    tracing::info!(
        model = %config.model_path.display(),
        n_ctx = ctx.n_ctx(),
        n_ctx_seq,
        n_seq,
        n_batch = config.n_batch,
        threads = config.n_threads,
        load_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    on_ready(info);

    let runner = LlamaRunner {
        model: &model,
        batch: LlamaBatch::new(config.n_batch as usize, 1),
        samplers: (0..n_seq).map(|_| None).collect(),
        kept: vec![Vec::new(); n_seq as usize],
        ctx,
        embedder: None,
        embed_params: EmbedParams {
            n_ctx: n_ctx_embed,
            pooling,
            n_threads: config.n_threads,
        },
        links: offload
            .devices
            .iter()
            .filter_map(|id| crate::rpc::parse_device_id(id))
            .filter_map(|(worker, _)| crate::rpc::by_worker(worker))
            .collect(),
        host_kv: offload.devices.is_empty(),
        deferred_copies: Vec::new(),
    };
    let scheduler = Scheduler::new(runner, n_seq as usize, config.n_batch as usize, n_ctx_seq);
    worker::run(scheduler, commands, live).map_err(LoadError::Lost)
}

/// The most sequences one embedding decode packs.
const EMBED_SEQS: u32 = 64;

/// The embedding context's size: the batch size, within the trained context. One decode covers
/// a whole input (pooling needs every token of a sequence in the same micro-batch).
fn n_ctx_embed(config: &LlamaEngineConfig, n_ctx_train: u32) -> u32 {
    config.n_batch.min(n_ctx_train.max(16))
}

/// The pooling the GGUF declares (`ARCH.pooling_type`), else mean, and how to say so.
fn pooling_of(model: &LlamaModel) -> (LlamaPoolingType, String) {
    let declared = model
        .meta_val_str("general.architecture")
        .ok()
        .and_then(|arch| model.meta_val_str(&format!("{arch}.pooling_type")).ok())
        .and_then(|v| v.trim().parse::<i32>().ok())
        .map(LlamaPoolingType::from);
    match declared {
        Some(LlamaPoolingType::Mean) => (LlamaPoolingType::Mean, "mean".into()),
        Some(LlamaPoolingType::Cls) => (LlamaPoolingType::Cls, "cls".into()),
        Some(LlamaPoolingType::Last) => (LlamaPoolingType::Last, "last".into()),
        Some(LlamaPoolingType::Rank) => (LlamaPoolingType::Rank, "rank".into()),
        _ => (
            LlamaPoolingType::Mean,
            "mean (the model declares no pooling)".into(),
        ),
    }
}

/// How the embedding context is made, when the first embedding request comes.
struct EmbedParams {
    n_ctx: u32,
    pooling: LlamaPoolingType,
    n_threads: i32,
}

/// A context with embeddings on (llama.cpp's embedding path, not the generation context), its
/// batch, made on first use so a server that never embeds pays nothing for it.
struct Embedder<'m> {
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
}

impl<'m> Embedder<'m> {
    fn new(model: &'m LlamaModel, params: &EmbedParams) -> Result<Self, String> {
        let backend = backend().map_err(|e| e.to_string())?;
        let cparams = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(params.n_ctx))
            .with_n_batch(params.n_ctx)
            .with_n_ubatch(params.n_ctx)
            .with_n_seq_max(EMBED_SEQS)
            .with_n_threads(params.n_threads)
            .with_n_threads_batch(params.n_threads)
            .with_embeddings(true)
            .with_pooling_type(params.pooling)
            // Sequences share one KV stream: it is cleared after every decode.
            .with_kv_unified(true);
        let ctx = model
            .new_context(backend, cparams)
            .map_err(|e| format!("cannot create the embedding context: {e}"))?;
        tracing::info!(n_ctx = params.n_ctx, pooling = ?params.pooling, "embedding context created");
        Ok(Self {
            ctx,
            batch: LlamaBatch::new(params.n_ctx as usize, 1),
        })
    }

    /// One decode over `inputs` (the scheduler packs them within [`ModelRunner::embed_limits`]).
    fn embed(&mut self, inputs: &[Vec<Token>]) -> Result<Vec<Vec<f32>>, String> {
        let n_ctx = self.ctx.n_ctx() as usize;
        let tokens: usize = inputs.iter().map(Vec::len).sum();
        if tokens > n_ctx || inputs.len() > EMBED_SEQS as usize {
            return Err(format!(
                "{} inputs of {tokens} tokens do not fit the embedding context of {n_ctx}",
                inputs.len()
            ));
        }
        self.batch.clear();
        self.ctx.clear_kv_cache();
        for (seq, input) in inputs.iter().enumerate() {
            for (pos, &token) in input.iter().enumerate() {
                // Every token is an output: pooling reads them all.
                self.batch
                    .add(LlamaToken(token), pos as i32, &[seq as i32], true)
                    .map_err(|e| e.to_string())?;
            }
        }
        let decoded = self
            .ctx
            .decode(&mut self.batch)
            .map_err(|e| format!("embedding decode failed: {e}"));
        let out = decoded.and_then(|()| {
            (0..inputs.len())
                .map(|seq| {
                    self.ctx
                        .embeddings_seq_ith(seq as i32)
                        .map(<[f32]>::to_vec)
                        .map_err(|e| format!("no pooled embedding for an input: {e}"))
                })
                .collect()
        });
        self.ctx.clear_kv_cache();
        out
    }
}

/// llama.cpp's tokenizer for the GGUF at `path`, without its weights (`vocab_only`).
pub fn load_vocabulary(path: &std::path::Path) -> Result<Tokenizer, LoadError> {
    let backend = backend()?;
    let params = LlamaModelParams::default().with_vocab_only(true);
    let model =
        LlamaModel::load_from_file(backend, path, &params).map_err(|e| LoadError::Model {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(Tokenizer {
        model: Arc::new(model),
    })
}

/// Tokenizes with the loaded model's vocabulary, from any thread.
pub struct Tokenizer {
    model: Arc<LlamaModel>,
}

impl TokenizeText for Tokenizer {
    fn tokenize(&self, text: &str, add_bos: bool) -> Vec<Token> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_bos, true)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    fn piece(&self, token: Token) -> Vec<u8> {
        let mut out = Vec::new();
        self.model
            .vocab()
            .token_to_piece_into(LlamaToken(token), &mut out, true, None);
        out
    }
}

/// llama.cpp behind the [`ModelRunner`] seam.
struct LlamaRunner<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    samplers: Vec<Option<SequenceSampler>>,
    /// Each sequence's kept logits row (`ModelRunner::keep_logits`); empty until one is kept.
    kept: Vec<Vec<f32>>,
    embedder: Option<Embedder<'m>>,
    embed_params: EmbedParams,
    /// The RPC workers holding some of the model's layers.
    links: Vec<Arc<crate::rpc::Link>>,
    /// Every layer, and so the KV cache, is in host memory (no GPU or RPC device).
    host_kv: bool,
    /// Sequences a whole-stream copy into is queued for the next decode: their cells' data is
    /// not there yet.
    deferred_copies: Vec<SeqId>,
}

impl LlamaRunner<'_> {
    /// Copies `src`'s cells into `dst` (emptied first) through a serialized state, now; `false`
    /// if llama.cpp refused, with `dst` emptied.
    fn copy_by_state(&mut self, src: SeqId, dst: SeqId) -> bool {
        let _ = self.ctx.clear_kv_cache_seq(Some(dst as u32), None, None);
        let copied = self
            .ctx
            .state_seq_get(src, LlamaStateSeqFlags::empty())
            .and_then(|state| self.ctx.state_seq_set(&state, dst));
        if let Err(err) = &copied {
            tracing::warn!(src, dst, %err, "serialized KV copy refused; copying the whole stream");
            let _ = self.ctx.clear_kv_cache_seq(Some(dst as u32), None, None);
        }
        copied.is_ok()
    }

    /// Why a worker this model runs on is gone, if one is: its layers' results are stand-ins
    /// from then on (`rpc::fuse`), so no decode result can be trusted.
    fn lost(&self) -> Result<(), RunnerError> {
        for link in &self.links {
            if let Some(reason) = link.lost() {
                return Err(RunnerError::Lost(format!(
                    "RPC worker {} holding layers of this model is gone ({reason}); the model must be reloaded",
                    link.worker
                )));
            }
        }
        Ok(())
    }
}

/// One sequence's samplers: the chain, and a grammar kept apart so it is consulted for one token
/// at a time (see [`SequenceSampler::sample`]).
struct SequenceSampler {
    chain: LlamaSampler,
    grammar: Option<LlamaSampler>,
    /// The distribution log-probabilities are reported from.
    shaping: super::logprobs::Shaping,
}

impl SequenceSampler {
    fn new(params: &SamplingParams, model: &LlamaModel) -> Result<Self, String> {
        let grammar = match &params.grammar {
            None => None,
            // The API checks grammars already; this guard keeps llama.cpp's parser away from any
            // that slipped past (it has no bounds of its own). llama.cpp logs its own parse
            // errors and returns no sampler.
            Some(grammar) => Some(
                super::grammar::check(grammar)
                    .map_err(|e| format!("the grammar is refused: {e}"))
                    .and_then(|_| {
                        LlamaSampler::grammar(model, grammar, "root").map_err(|e| {
                            format!(
                    "llama.cpp refused the grammar ({e}): check its syntax, that `root` and every \
                     rule it uses are defined, and that no rule is left-recursive"
                )
                        })
                    })?,
            ),
        };
        Ok(Self {
            chain: sampler_chain(params, model),
            grammar,
            shaping: super::logprobs::Shaping::new(params.temperature, &params.logit_bias),
        })
    }

    /// llama-server's order with a grammar: sample freely, check just that token against the
    /// grammar, and only when it is refused constrain the whole vocabulary and sample again, so most
    /// steps do not run the grammar over every candidate.
    ///
    /// A token is only ever accepted into the grammar after the grammar admitted it: llama.cpp
    /// throws a C++ exception (which would abort the process) when asked to accept one it refuses.
    /// So when no token at all is admissible, this returns `Err` and accepts nothing.
    fn sample(&mut self, row: Row<'_, '_>) -> Result<LlamaToken, String> {
        let free = match (&row, self.grammar.is_some()) {
            // `llama_sampler_sample` also accepts the token into the chain (penalty history).
            (Row::Batch(ctx, index), false) => return Ok(self.chain.sample(ctx, *index)),
            _ => {
                let mut candidates = row.candidates();
                candidates.apply_sampler(&mut self.chain);
                candidates
                    .selected_token()
                    .expect("the chain ends in a selecting sampler")
            }
        };
        let Some(grammar) = self.grammar.as_mut() else {
            self.chain.accept(free);
            return Ok(free);
        };
        let mut single = LlamaTokenDataArray::new(vec![LlamaTokenData::new(free, 1.0, 0.0)], false);
        single.apply_sampler(grammar);
        let token = if single.data[0].logit() > f32::NEG_INFINITY {
            free
        } else {
            let mut candidates = row.candidates();
            candidates.apply_sampler(grammar);
            // Indexed by token id: the array holds the whole vocabulary, in id order, until
            // the chain sorts or truncates it.
            let admitted: Vec<bool> = candidates
                .data
                .iter()
                .map(|d| d.logit() > f32::NEG_INFINITY)
                .collect();
            if !admitted.contains(&true) {
                return Err(NO_ADMISSIBLE_TOKEN.into());
            }
            candidates.apply_sampler(&mut self.chain);
            match candidates.selected_token() {
                Some(token) if admitted.get(token.0 as usize) == Some(&true) => token,
                _ => return Err(NO_ADMISSIBLE_TOKEN.into()),
            }
        };
        grammar.accept(token);
        self.chain.accept(token);
        Ok(token)
    }
}

/// The logits a sequence samples from: a batch entry's, or its kept row.
enum Row<'a, 'm> {
    Batch(&'a LlamaContext<'m>, i32),
    Kept(&'a [f32]),
}

impl<'a, 'm> Row<'a, 'm> {
    /// Where `logits` are for sequence `seq`, given every sequence's kept row.
    fn of(ctx: &'a LlamaContext<'m>, kept: &'a [Vec<f32>], seq: SeqId, logits: Logits) -> Self {
        match logits {
            Logits::Batch(index) => Row::Batch(ctx, index as i32),
            Logits::Kept => Row::Kept(&kept[seq as usize]),
        }
    }

    fn logits(&self) -> &[f32] {
        match self {
            Row::Batch(ctx, index) => ctx.get_logits_ith(*index),
            Row::Kept(row) => row,
        }
    }

    /// Every token of the vocabulary with its logit, in id order.
    fn candidates(&self) -> LlamaTokenDataArray {
        let data = self
            .logits()
            .iter()
            .enumerate()
            .map(|(id, &logit)| LlamaTokenData::new(LlamaToken(id as i32), logit, 0.0));
        LlamaTokenDataArray::from_iter(data, false)
    }
}

const NO_ADMISSIBLE_TOKEN: &str =
    "the grammar admits no token of this model's vocabulary at this point of the output";

fn sampler_chain(params: &SamplingParams, model: &LlamaModel) -> LlamaSampler {
    let n_vocab = model.n_vocab();
    // llama-server's order: biases and penalties reshape logits, then truncation, then temperature.
    let mut chain = Vec::new();
    if !params.logit_bias.is_empty() {
        let biases: Vec<LlamaLogitBias> = params
            .logit_bias
            .iter()
            .map(|&(token, bias)| LlamaLogitBias::new(LlamaToken(token), bias))
            .collect();
        chain.push(LlamaSampler::logit_bias(n_vocab, &biases));
    }
    if params.has_penalties() {
        chain.push(LlamaSampler::penalties(
            n_vocab,
            params.penalty_last_n,
            params.repeat_penalty,
            params.frequency_penalty,
            params.presence_penalty,
        ));
    }
    if params.is_greedy() {
        chain.push(LlamaSampler::greedy());
    } else {
        if params.top_k > 0 {
            chain.push(LlamaSampler::top_k(params.top_k));
        }
        if params.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(params.top_p, 1));
        }
        if params.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(params.min_p, 1));
        }
        chain.push(LlamaSampler::temp(params.temperature));
        let seed = params.seed.unwrap_or_else(rand::random);
        chain.push(LlamaSampler::dist(seed));
    }
    LlamaSampler::chain_simple(chain)
}

impl ModelRunner for LlamaRunner<'_> {
    fn begin_sequence(&mut self, seq: SeqId, params: &SamplingParams) -> Result<(), String> {
        self.samplers[seq as usize] = Some(SequenceSampler::new(params, self.model)?);
        Ok(())
    }

    fn decode(&mut self, batch: &[BatchEntry]) -> Result<(), RunnerError> {
        self.lost()?;
        self.batch.clear();
        for entry in batch {
            self.batch
                .add(
                    LlamaToken(entry.token),
                    entry.pos as i32,
                    &[entry.seq],
                    entry.logits,
                )
                .map_err(|e| RunnerError::Decode(e.to_string()))?;
        }
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| RunnerError::Decode(e.to_string()))?;
        // Queued stream copies are done at the start of a decode. (After a failed one they may
        // still be queued: kept on record, later copies from those sequences take the stream too.)
        self.deferred_copies.clear();
        // A worker lost during the decode answered with stand-ins: the logits are not the model's.
        self.lost()
    }

    fn sample(&mut self, seq: SeqId, logits: Logits) -> Result<Token, String> {
        let sampler = self.samplers[seq as usize]
            .as_mut()
            .expect("begin_sequence runs before any sample for a sequence");
        sampler
            .sample(Row::of(&self.ctx, &self.kept, seq, logits))
            .map(|t| t.0)
    }

    fn keep_logits(&mut self, seq: SeqId, batch_index: usize) {
        let row = &mut self.kept[seq as usize];
        row.clear();
        row.extend_from_slice(self.ctx.get_logits_ith(batch_index as i32));
    }

    fn logprobs(
        &self,
        seq: SeqId,
        logits: Logits,
        chosen: Token,
        top_n: usize,
    ) -> (f32, Vec<(Token, f32)>) {
        let sampler = self.samplers[seq as usize]
            .as_ref()
            .expect("begin_sequence runs before any sample for a sequence");
        // The row `sample` just read: batch entries with logits keep them until the next decode.
        let row = Row::of(&self.ctx, &self.kept, seq, logits);
        sampler.shaping.logprobs(row.logits(), chosen, top_n)
    }

    fn end_sequence(&mut self, seq: SeqId) {
        self.samplers[seq as usize] = None;
    }

    fn truncate_sequence(&mut self, seq: SeqId, keep: u32) {
        // `llama_memory_seq_rm` over [keep, end). It only fails for a partial removal in a
        // recurrent model's state, which this engine does not load.
        match self
            .ctx
            .clear_kv_cache_seq(Some(seq as u32), Some(keep), None)
        {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                tracing::warn!(
                    seq,
                    keep,
                    "partial KV removal refused; clearing the sequence"
                );
                let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
            }
        }
    }

    fn copy_prefix(&mut self, src: SeqId, dst: SeqId, keep: u32) {
        // Each sequence has its own KV stream, and llama.cpp copies across streams in one of two
        // ways: the whole stream, every cell used or not (n_ctx_seq cells; ~47 MB for the default
        // model at 2048, some 15 ms of one core's memcpy on a CPU), deferred to the next decode;
        // or now, through a serialized state of `src`'s cells (each read and written once). The
        // state goes through host memory, so it is only taken when the cache is there, when it
        // moves fewer bytes, and when `src`'s data is in place (not itself awaiting a deferred
        // copy). Then the tail past `keep` is dropped.
        let src_cells = u32::try_from(self.ctx.kv_cache_seq_pos_max(src) + 1).unwrap_or(0);
        // Each sequence's stream has n_ctx / n_seq cells.
        let stream_cells = self.ctx.n_ctx() / self.samplers.len() as u32;
        let by_state = self.host_kv
            && 2 * src_cells < stream_cells
            && !self.deferred_copies.contains(&src)
            && self.copy_by_state(src, dst);
        if !by_state {
            let copied = self.ctx.copy_kv_cache_seq(src, dst, None, None);
            debug_assert!(copied.is_ok(), "no positions given, none can overflow");
            self.deferred_copies.push(dst);
        }
        self.truncate_sequence(dst, keep);
    }

    fn token_bytes(&self, token: Token, special: bool, out: &mut Vec<u8>) {
        self.model
            .vocab()
            .token_to_piece_into(LlamaToken(token), out, special, None);
    }

    fn is_end_of_generation(&self, token: Token) -> bool {
        self.model.vocab().is_eog(LlamaToken(token))
    }

    fn embed_limits(&self) -> (usize, usize) {
        (self.embed_params.n_ctx as usize, EMBED_SEQS as usize)
    }

    fn embed(&mut self, inputs: &[Vec<Token>]) -> Result<Vec<Vec<f32>>, String> {
        if self.embedder.is_none() {
            self.embedder = Some(Embedder::new(self.model, &self.embed_params)?);
        }
        self.embedder
            .as_mut()
            .expect("created just above")
            .embed(inputs)
    }
}

/// Starts the llama.cpp engine thread: it loads the model (publishing `Loading`, then `Ready` or
/// `Failed`) and then serves requests, reloading after a fault (see [`worker::supervise`]).
pub fn spawn_llama_engine(
    config: LlamaEngineConfig,
) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let (tx, mut rx, state_tx, state_rx) = worker::channels(config.max_queue);
    let handle = EngineHandle::new(tx, state_rx);
    let live = Arc::clone(handle.live());
    let name = format!("engine-{}", config.model_id);
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        worker::supervise(
            &state_tx,
            &mut rx,
            worker::RestartPolicy::default(),
            |commands, on_ready| {
                serve_model(&config, commands, &live, on_ready).map_err(|e| e.to_string())
            },
        );
    })?;
    Ok((handle, thread))
}
