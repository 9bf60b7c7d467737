//! The sandbox container's lifecycle (`sandbox up`, `down`, `status`) and its run profile.
//!
//! The profile: every capability dropped, no-new-privileges, a read-only root with tmpfs for /tmp
//! and /run, a named volume for /workspace, limits on pids, memory (no swap beyond it) and CPUs, no
//! IPC namespace sharing (so no /dev/shm), no Docker socket, no host mounts, and no network at all
//! by default: sshd is reached through `docker exec -i` over stdio. The TCP transport puts the
//! container on an internal network (no route out) and reaches sshd at its address there.
//!
//! What `up` writes to the state directory (`STATE_DIR/NAME/`): the client key pair, the host key
//! pair, and `sandbox.json` ([`SandboxState`]), which pins the host key. `serve --sandbox` and
//! `sandbox exec` read it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::image::{
    ensure_image, ensure_keyed_image, Docker, DockerError, KeyedLayer, KEYED_REPOSITORY,
};
use super::keys::{self, KeyError};
use super::ssh::{SshConfig, Transport, SSHD_CONFIG};

/// The unprivileged user commands run as.
pub const USER: &str = "sandbox";
/// sshd's port for the TCP transport.
pub const SSH_PORT: u16 = 2222;
/// The internal network of the TCP transport.
pub const INTERNAL_NETWORK: &str = "lm-sandbox-internal";
const STATE_FILE: &str = "sandbox.json";
const CLIENT_KEY: &str = "client_ed25519";
const HOST_KEY: &str = "host_ed25519";

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason} (run `lm-sandbox sandbox up` first)")]
    State { path: PathBuf, reason: String },
    #[error("the container {name} has no address on {INTERNAL_NETWORK}")]
    NoAddress { name: String },
}

/// How commands reach sshd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    /// `docker exec -i` + `sshd -i` over stdio; the container has no network.
    Exec,
    /// sshd listening on an internal Docker network.
    Tcp,
}

/// Resource limits of the container (recorded in `sandbox.json`, so tenants get the same).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Profile {
    /// Docker's `--memory` (swap is capped at the same, so none).
    pub memory: String,
    pub cpus: String,
    pub pids_limit: u32,
    /// Size of the /tmp tmpfs.
    pub tmp_size: String,
}

impl Default for Profile {
    fn default() -> Self {
        Self {
            memory: "1g".into(),
            cpus: "1".into(),
            pids_limit: 256,
            tmp_size: "256m".into(),
        }
    }
}

/// What `sandbox up` needs.
#[derive(Debug, Clone)]
pub struct UpConfig {
    pub name: String,
    pub state_dir: PathBuf,
    pub docker: Docker,
    pub profile: Profile,
    pub transport: TransportKind,
    /// Extra `key=value` labels (tests mark their containers).
    pub labels: Vec<String>,
}

/// `STATE_DIR/NAME/sandbox.json`: how to reach a sandbox that `up` started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxState {
    pub name: String,
    pub image: String,
    pub volume: String,
    pub docker: String,
    pub transport: TransportKind,
    /// `HOST:PORT` for the TCP transport.
    pub addr: Option<String>,
    pub user: String,
    /// The pinned host key, `ssh-ed25519 AAAA...`.
    pub host_key: String,
    /// The limits `up` started the container with; tenants get the same.
    #[serde(default)]
    pub profile: Profile,
    /// Extra labels `up` was given; tenants carry them too.
    #[serde(default)]
    pub labels: Vec<String>,
}

/// Label that marks a tenant container and names the sandbox it belongs to.
pub const TENANT_LABEL: &str = "lm-sandbox.tenant-of";
/// The label naming the key (its id) a tenant container belongs to.
pub const OWNER_LABEL: &str = "lm-sandbox.owner";

/// Where a container's /workspace lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workspace {
    /// A named volume (the `up` container: kept across restarts, no size limit).
    Volume(String),
    /// A tmpfs of at most this many bytes (tenants: filling it is ENOSPC inside the container,
    /// never the host's disk; its pages count against the container's memory limit).
    Tmpfs { bytes: u64 },
}

/// The default state directory: `$XDG_STATE_HOME/lm-sandbox`, else `~/.local/state/lm-sandbox`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("lm-sandbox");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".local/state/lm-sandbox")
}

/// `--sandbox-state-dir` if given, else [`default_state_dir`].
pub fn resolve_state_dir(given: Option<&Path>) -> PathBuf {
    given.map_or_else(default_state_dir, Path::to_path_buf)
}

/// Where one sandbox's files live.
pub fn sandbox_dir(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join(name)
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ContainerError + '_ {
    move |source| ContainerError::Io {
        path: path.to_owned(),
        source,
    }
}

impl SandboxState {
    pub fn load(dir: &Path) -> Result<Self, ContainerError> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| ContainerError::State {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        serde_json::from_str(&text).map_err(|e| ContainerError::State {
            path,
            reason: e.to_string(),
        })
    }

    fn save(&self, dir: &Path) -> Result<(), ContainerError> {
        let path = dir.join(STATE_FILE);
        let text = serde_json::to_string_pretty(self).expect("the state serializes") + "\n";
        keys::write_file(&path, text.as_bytes(), 0o600)?;
        Ok(())
    }

    /// The executor's configuration for this sandbox (keys read from `dir`).
    pub fn ssh_config(
        &self,
        dir: &Path,
        connect_timeout: Duration,
        max_concurrent: usize,
        output_limit: usize,
    ) -> Result<SshConfig, ContainerError> {
        let client_key = keys::load_private(&dir.join(CLIENT_KEY))?;
        let host_key = keys::parse_public(&self.host_key, &dir.join(STATE_FILE))?;
        let transport = match (self.transport, &self.addr) {
            (TransportKind::Exec, _) => Transport::DockerExec {
                docker: self.docker.clone(),
                container: self.name.clone(),
            },
            (TransportKind::Tcp, Some(addr)) => Transport::Tcp { addr: addr.clone() },
            (TransportKind::Tcp, None) => {
                return Err(ContainerError::State {
                    path: dir.join(STATE_FILE),
                    reason: "the TCP transport needs `addr`".into(),
                })
            }
        };
        Ok(SshConfig {
            transport,
            user: self.user.clone(),
            client_key: Arc::new(client_key),
            host_key,
            connect_timeout,
            max_concurrent,
            output_limit,
            queue_timeout: super::ssh::DEFAULT_QUEUE_TIMEOUT,
        })
    }
}

/// The `docker run` arguments of the profile (everything but `run` itself).
pub fn run_args(config: &UpConfig, image: &str, workspace: &Workspace) -> Vec<String> {
    let p = &config.profile;
    let mut args: Vec<String> = [
        "--detach",
        "--name",
        &config.name,
        "--hostname",
        "sandbox",
        "--label",
        "lm-sandbox.managed=1",
        // Root in the container runs only sshd (privilege separation: it switches to `sandbox`,
        // uid 1000, for every command) and lm-sandbox-init; these four capabilities are all they
        // need, and no command holds any of them.
        "--user",
        "0:0",
        "--cap-drop",
        "ALL",
        "--cap-add",
        "SETUID",
        "--cap-add",
        "SETGID",
        "--cap-add",
        "SYS_CHROOT",
        "--cap-add",
        "KILL",
        "--security-opt",
        "no-new-privileges",
        "--read-only",
        "--tmpfs",
        &format!("/tmp:rw,nosuid,nodev,exec,mode=1777,size={}", p.tmp_size),
        "--tmpfs",
        "/run:rw,nosuid,nodev,noexec,mode=0755,size=8m",
        "--pids-limit",
        &p.pids_limit.to_string(),
        "--memory",
        &p.memory,
        "--memory-swap",
        &p.memory,
        "--cpus",
        &p.cpus,
        "--ipc",
        "none",
        "--restart",
        "unless-stopped",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match workspace {
        Workspace::Volume(volume) => {
            args.extend(["--volume".into(), format!("{volume}:/workspace")]);
        }
        Workspace::Tmpfs { bytes } => args.extend([
            "--tmpfs".into(),
            format!("/workspace:rw,nosuid,nodev,exec,size={bytes},uid=1000,gid=1000,mode=0750"),
        ]),
    }
    for label in &config.labels {
        args.extend(["--label".into(), label.clone()]);
    }
    match config.transport {
        TransportKind::Exec => {
            args.extend(["--network".into(), "none".into(), image.into()]);
        }
        TransportKind::Tcp => {
            args.extend([
                "--network".into(),
                INTERNAL_NETWORK.into(),
                image.into(),
                "/usr/sbin/sshd".into(),
                "-D".into(),
                "-e".into(),
                "-f".into(),
                SSHD_CONFIG.into(),
            ]);
        }
    }
    args
}

/// A key pair at `path`, generated if missing. Returns (private PEM, public line).
fn key_pair(path: &Path, comment: &str) -> Result<(String, String), ContainerError> {
    let key = match keys::load_private(path) {
        Ok(key) => key,
        Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            let key = keys::generate(comment);
            keys::write_pair(path, &key)?;
            key
        }
        Err(e) => return Err(e.into()),
    };
    let pem = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| KeyError::Encode(e.to_string()))?;
    Ok((pem.to_string(), keys::public_line(key.public_key())?))
}

/// What `docker inspect` says of the container: (running, image).
fn inspect(docker: &Docker, name: &str) -> Option<(bool, String)> {
    let out = docker
        .output(&[
            "container",
            "inspect",
            "--format",
            "{{.State.Running}} {{.Config.Image}}",
            name,
        ])
        .ok()?;
    let (running, image) = out.trim().split_once(' ')?;
    Some((running == "true", image.to_owned()))
}

/// Builds what is missing, starts the container with the profile, and records the pinned host
/// key. Idempotent: a running container of the current image is left alone.
pub fn up(config: &UpConfig) -> Result<SandboxState, ContainerError> {
    let dir = sandbox_dir(&config.state_dir, &config.name);
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_error(&dir))?;
    }
    let (_, client_public) = key_pair(&dir.join(CLIENT_KEY), "lm-sandbox client")?;
    let (host_pem, host_public) = key_pair(&dir.join(HOST_KEY), "lm-sandbox host")?;
    let docker = &config.docker;
    let base = ensure_image(docker)?;
    let keys = KeyedLayer {
        host_key_pem: &host_pem,
        host_public: &host_public,
        client_public: &client_public,
    };
    let image = ensure_keyed_image(docker, &base, &keys, &config.labels)?;
    let volume = format!("{}-workspace", config.name);
    if config.transport == TransportKind::Tcp
        && docker
            .output(&["network", "inspect", INTERNAL_NETWORK])
            .is_err()
    {
        docker.output(&["network", "create", "--internal", INTERNAL_NETWORK])?;
    }
    match inspect(docker, &config.name) {
        Some((true, current)) if current == image => {}
        Some((false, current)) if current == image => {
            docker.output(&["start", &config.name])?;
        }
        other => {
            if other.is_some() {
                // Another image (an older build, other keys): replace the container; the
                // workspace volume stays.
                docker.output(&["rm", "--force", &config.name])?;
            }
            let args = run_args(config, &image, &Workspace::Volume(volume.clone()));
            let mut all = vec!["run"];
            all.extend(args.iter().map(String::as_str));
            docker.output(&all)?;
        }
    }
    let addr = match config.transport {
        TransportKind::Exec => None,
        TransportKind::Tcp => Some(format!("{}:{SSH_PORT}", address(docker, &config.name)?)),
    };
    let state = SandboxState {
        name: config.name.clone(),
        image,
        volume,
        docker: docker.program.clone(),
        transport: config.transport,
        addr,
        user: USER.into(),
        host_key: host_public,
        profile: config.profile.clone(),
        labels: config.labels.clone(),
    };
    state.save(&dir)?;
    Ok(state)
}

/// The container's address on the internal network.
fn address(docker: &Docker, name: &str) -> Result<String, ContainerError> {
    let format =
        format!("{{{{(index .NetworkSettings.Networks \"{INTERNAL_NETWORK}\").IPAddress}}}}");
    let ip = docker.output(&["container", "inspect", "--format", &format, name])?;
    let ip = ip.trim();
    if ip.is_empty() || ip == "<no value>" {
        return Err(ContainerError::NoAddress { name: name.into() });
    }
    Ok(ip.to_owned())
}

/// Stops and removes the container (and its workspace volume with `remove_volume`). The keys stay,
/// so the next `up` keeps the same pinned host key.
pub fn down(docker: &Docker, name: &str, remove_volume: bool) -> Result<bool, ContainerError> {
    for tenant in tenants(docker, name)? {
        remove_tenant(docker, &tenant.name)?;
    }
    let found = inspect(docker, name);
    let existed = found.is_some();
    if let Some((_, image)) = found {
        docker.output(&["rm", "--force", name])?;
        // The per-install key layer goes too (`up` rebuilds it in a second); best effort, since
        // another container may still use it.
        if image.starts_with(&format!("{KEYED_REPOSITORY}:")) {
            let _ = docker.output(&["rmi", &image]);
        }
    }
    if remove_volume {
        let volume = format!("{name}-workspace");
        if docker.output(&["volume", "inspect", &volume]).is_ok() {
            docker.output(&["volume", "rm", &volume])?;
        }
    }
    Ok(existed)
}

/// A size as Docker writes them (`1g`, `512m`, `64k`, `1GiB`, or bytes); `None` if it is not one.
pub fn parse_size(text: &str) -> Option<u64> {
    let lower = text.trim().to_ascii_lowercase();
    let lower = lower.trim_end_matches("ib").trim_end_matches('b');
    let (digits, unit) = match lower.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => lower.split_at(at),
        None => (lower, ""),
    };
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// Starts tenant container `tenant` of the sandbox `state` (same image, keys and profile, its own
/// size-limited workspace, no network), or starts or unpauses it if it exists.
pub fn start_tenant(
    docker: &Docker,
    state: &SandboxState,
    tenant: &str,
    owner: &str,
    disk_bytes: u64,
) -> Result<(), ContainerError> {
    match docker
        .output(&[
            "container",
            "inspect",
            "--format",
            "{{.State.Status}}",
            tenant,
        ])
        .map(|s| s.trim().to_owned())
    {
        Ok(status) if status == "running" => return Ok(()),
        Ok(status) if status == "paused" => {
            docker.output(&["unpause", tenant])?;
            return Ok(());
        }
        Ok(_) => {
            docker.output(&["start", tenant])?;
            return Ok(());
        }
        Err(_) => {}
    }
    let mut labels = state.labels.clone();
    labels.push(format!("{TENANT_LABEL}={}", state.name));
    labels.push(format!("{OWNER_LABEL}={owner}"));
    // The workspace is a tmpfs, whose pages count against the container's memory: the tenant gets
    // its processes' limit plus the workspace, so a full workspace is ENOSPC, not an OOM kill.
    let mut profile = state.profile.clone();
    if let Some(memory) = parse_size(&profile.memory).and_then(|m| m.checked_add(disk_bytes)) {
        profile.memory = memory.to_string();
    }
    let config = UpConfig {
        name: tenant.to_owned(),
        state_dir: PathBuf::new(),
        docker: docker.clone(),
        profile,
        transport: TransportKind::Exec,
        labels,
    };
    let args = run_args(
        &config,
        &state.image,
        &Workspace::Tmpfs { bytes: disk_bytes },
    );
    let mut all = vec!["run"];
    all.extend(args.iter().map(String::as_str));
    docker.output(&all)?;
    Ok(())
}

/// One tenant container as Docker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantContainer {
    pub name: String,
    pub status: String,
    pub created: String,
    /// The key id of its owner (empty for a container of a version that did not record it).
    pub owner: String,
}

/// The tenant containers of sandbox `name`.
pub fn tenants(docker: &Docker, name: &str) -> Result<Vec<TenantContainer>, ContainerError> {
    let out = docker.output(&[
        "ps",
        "--all",
        "--filter",
        &format!("label={TENANT_LABEL}={name}"),
        "--format",
        &format!(
            "{{{{.Names}}}}\t{{{{.State}}}}\t{{{{.Label \"{OWNER_LABEL}\"}}}}\t{{{{.CreatedAt}}}}"
        ),
    ])?;
    Ok(out
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(4, '\t');
            Some(TenantContainer {
                name: parts.next()?.to_owned(),
                status: parts.next()?.to_owned(),
                owner: parts.next().unwrap_or("").to_owned(),
                created: parts.next().unwrap_or("").to_owned(),
            })
        })
        .collect())
}

/// Removes tenant container `tenant` (its workspace is a tmpfs and goes with it).
pub fn remove_tenant(docker: &Docker, tenant: &str) -> Result<(), ContainerError> {
    docker.output(&["rm", "--force", tenant])?;
    Ok(())
}

/// Docker's view of the container: `None` if it does not exist.
pub fn container_status(docker: &Docker, name: &str) -> Option<String> {
    docker
        .output(&[
            "container",
            "inspect",
            "--format",
            "{{.State.Status}} (image {{.Config.Image}}, started {{.State.StartedAt}})",
            name,
        ])
        .ok()
        .map(|s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::image::Progress;

    fn config(transport: TransportKind) -> UpConfig {
        UpConfig {
            name: "lm-sandbox".into(),
            state_dir: PathBuf::from("/tmp/state"),
            docker: Docker::new("docker", Progress::Quiet),
            profile: Profile::default(),
            transport,
            labels: vec!["lm-sandbox.test=1".into()],
        }
    }

    fn flag<'a>(args: &'a [String], name: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == name)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn the_default_profile_is_locked_down() {
        let args = run_args(
            &config(TransportKind::Exec),
            "img",
            &Workspace::Volume("vol".into()),
        );
        assert_eq!(flag(&args, "--cap-drop"), ["ALL"]);
        assert_eq!(
            flag(&args, "--cap-add"),
            ["SETUID", "SETGID", "SYS_CHROOT", "KILL"]
        );
        assert_eq!(flag(&args, "--security-opt"), ["no-new-privileges"]);
        assert!(args.contains(&"--read-only".to_string()));
        assert_eq!(flag(&args, "--network"), ["none"]);
        assert_eq!(flag(&args, "--ipc"), ["none"]);
        assert_eq!(flag(&args, "--user"), ["0:0"]);
        assert_eq!(flag(&args, "--pids-limit"), ["256"]);
        assert_eq!(flag(&args, "--memory"), ["1g"]);
        assert_eq!(flag(&args, "--memory-swap"), ["1g"]);
        assert_eq!(flag(&args, "--volume"), ["vol:/workspace"]);
        let tmpfs = flag(&args, "--tmpfs");
        assert!(tmpfs[0].starts_with("/tmp:"));
        assert!(tmpfs[1].starts_with("/run:"));
        // No host paths: the only volume is the named one, and nothing mentions the Docker socket.
        assert!(!args
            .iter()
            .any(|a| a.contains("docker.sock") || a == "--privileged"));
        assert!(!args.iter().any(|a| a == "--mount" || a == "-v"));
        assert_eq!(args.last().unwrap(), "img");
    }

    #[test]
    fn sizes_parse_as_docker_writes_them() {
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("1x"), None);
        assert_eq!(parse_size("99999999999999g"), None);
    }

    #[test]
    fn the_tcp_profile_uses_the_internal_network_and_a_listening_sshd() {
        let args = run_args(
            &config(TransportKind::Tcp),
            "img",
            &Workspace::Volume("vol".into()),
        );
        assert_eq!(flag(&args, "--network"), [INTERNAL_NETWORK]);
        assert!(!args.iter().any(|a| a == "--publish" || a == "-p"));
        let image_at = args.iter().position(|a| a == "img").unwrap();
        assert_eq!(
            args[image_at + 1..],
            ["/usr/sbin/sshd", "-D", "-e", "-f", SSHD_CONFIG]
        );
    }

    #[test]
    fn the_state_round_trips() {
        let dir = std::env::temp_dir().join(format!("lm-sandbox-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let state = SandboxState {
            name: "n".into(),
            image: "i".into(),
            volume: "v".into(),
            docker: "docker".into(),
            transport: TransportKind::Tcp,
            addr: Some("172.18.0.2:2222".into()),
            user: USER.into(),
            host_key: "ssh-ed25519 AAAA".into(),
            profile: Profile::default(),
            labels: vec!["x=1".into()],
        };
        state.save(&dir).unwrap();
        assert_eq!(SandboxState::load(&dir).unwrap(), state);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
