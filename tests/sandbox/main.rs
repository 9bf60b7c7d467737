//! The sandbox against a real container and a real sshd (feature `container`; needs Docker).
//!
//! Containers are named `lmsbx-test-PID-PURPOSE` and labelled `lm-sandbox.test=1`; each run removes
//! what earlier runs left. Tests that break their container (kill it, fork-bomb it) get their own.
#![cfg(feature = "container")]

mod executor;
mod http;
mod mcp;
mod tenants;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use lm_sandbox::api::{router, ApiConfig, ApiKey, AppState};
use lm_sandbox::engine::fake::FakeRunner;
use lm_sandbox::engine::WorkerConfig;
use lm_sandbox::sandbox::container::{
    self, sandbox_dir, Profile, SandboxState, TransportKind, UpConfig,
};
use lm_sandbox::sandbox::image::{Docker, Progress};
use lm_sandbox::sandbox::keys;
use lm_sandbox::sandbox::ssh::SshExecutor;
use lm_sandbox::sandbox::tenants::{TenantConfig, Tenants};
use lm_sandbox::sandbox::{
    AuditLog, Caller, ExecOutput, ExecRequest, Sandbox, SandboxError, SandboxLimits,
};
use serde_json::{json, Value};

const TEST_LABEL: &str = "lm-sandbox.test=1";

pub(crate) fn docker() -> Docker {
    Docker::new("docker", Progress::Quiet)
}

pub(crate) fn state_root() -> PathBuf {
    std::env::temp_dir().join(format!("lmsbx-test-{}", std::process::id()))
}

pub(crate) fn name(purpose: &str) -> String {
    format!("lmsbx-test-{}-{purpose}", std::process::id())
}

/// Removes the containers and volumes of earlier runs (other PIDs), once per run.
pub(crate) fn clean_stale() {
    static CLEANED: OnceLock<()> = OnceLock::new();
    CLEANED.get_or_init(|| {
        let mine = format!("lmsbx-test-{}-", std::process::id());
        let docker = docker();
        let listed = docker
            .output(&[
                "ps",
                "-a",
                "--filter",
                &format!("label={TEST_LABEL}"),
                "--format",
                "{{.Names}}",
            ])
            .unwrap_or_default();
        for old in listed.lines().filter(|n| !n.starts_with(&mine)) {
            let _ = docker.output(&["rm", "--force", old]);
        }
        let volumes = docker
            .output(&["volume", "ls", "--format", "{{.Name}}"])
            .unwrap_or_default();
        for old in volumes
            .lines()
            .filter(|v| v.starts_with("lmsbx-test-") && !v.starts_with(&mine))
        {
            let _ = docker.output(&["volume", "rm", "--force", old]);
        }
        // Key layers of earlier runs (each run makes new keys); one still in use stays.
        let images = docker
            .output(&["images", "-q", "--filter", &format!("label={TEST_LABEL}")])
            .unwrap_or_default();
        for old in images.lines() {
            let _ = docker.output(&["rmi", old]);
        }
    });
}

pub(crate) struct Fixture {
    name: String,
    dir: PathBuf,
}

pub(crate) fn start(purpose: &str, profile: Profile, transport: TransportKind) -> Fixture {
    clean_stale();
    let config = UpConfig {
        name: name(purpose),
        state_dir: state_root(),
        docker: docker(),
        profile,
        transport,
        labels: vec![TEST_LABEL.into()],
    };
    container::up(&config).unwrap_or_else(|e| panic!("sandbox up {purpose}: {e}"));
    Fixture {
        dir: sandbox_dir(&config.state_dir, &config.name),
        name: config.name,
    }
}

/// The container most tests share (they do not break it).
pub(crate) fn shared() -> &'static Fixture {
    static SHARED: OnceLock<Fixture> = OnceLock::new();
    SHARED.get_or_init(|| start("shared", Profile::default(), TransportKind::Exec))
}

pub(crate) fn executor_with(
    fixture: &Fixture,
    connect_timeout: Duration,
    output_limit: usize,
) -> SshExecutor {
    let state = SandboxState::load(&fixture.dir).unwrap();
    SshExecutor::new(
        state
            .ssh_config(&fixture.dir, connect_timeout, 16, output_limit)
            .unwrap(),
    )
}

pub(crate) fn executor(fixture: &Fixture) -> SshExecutor {
    executor_with(fixture, Duration::from_secs(10), 1 << 20)
}

pub(crate) fn request(command: &str, timeout_s: f64) -> ExecRequest {
    ExecRequest {
        command: command.into(),
        timeout: Duration::from_secs_f64(timeout_s),
        stdin: None,
        cancel: None,
        live: None,
    }
}

pub(crate) async fn run(executor: &SshExecutor, command: &str) -> ExecOutput {
    executor
        .run(request(command, 20.0))
        .await
        .unwrap_or_else(|e| panic!("{command}: {e}"))
}
