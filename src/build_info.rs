//! Build metadata recorded by `build.rs`, for `--version` and `/health`.

/// The crate version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Short git revision, `-dirty` when built from uncommitted changes.
pub const GIT_REVISION: &str = env!("LM_SANDBOX_GIT_REVISION");
const BACKENDS: &str = env!("LM_SANDBOX_BACKENDS");

/// Compiled llama.cpp backends, e.g. `["cpu", "cuda"]`.
pub fn backends() -> Vec<&'static str> {
    BACKENDS.split(',').collect()
}

/// The long `--version` text.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("LM_SANDBOX_GIT_REVISION"),
    "; backends: ",
    env!("LM_SANDBOX_BACKENDS"),
    ")"
);
