//! The sandbox image: its build context (carried inside the binary), its tag, and building it with
//! the `docker` CLI. Images are cached by tag: the tag is a hash of the build context, so a second
//! `sandbox up` builds nothing, and a changed context builds anew.
//!
//! When the `debian:bookworm` base cannot be pulled (no registry reachable), it is built locally
//! with `mmdebstrap` and `docker import`ed under the same tag.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest as _, Sha256};

use super::keys::{write_file, KeyError};

pub const BASE_IMAGE: &str = "debian:bookworm";
/// Repository of the image built from [`CONTEXT`].
pub const IMAGE_REPOSITORY: &str = "lm-sandbox";
/// Repository of the per-install images that add the keys.
pub const KEYED_REPOSITORY: &str = "lm-sandbox-keyed";

/// The build context: (file name, contents, mode).
pub const CONTEXT: [(&str, &str, u32); 4] = [
    ("Dockerfile", include_str!("image/Dockerfile"), 0o644),
    ("sshd_config", include_str!("image/sshd_config"), 0o644),
    (
        "lm-sandbox-run",
        include_str!("image/lm-sandbox-run"),
        0o755,
    ),
    (
        "lm-sandbox-init",
        include_str!("image/lm-sandbox-init"),
        0o755,
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot run `{program}`: {source} (is Docker installed and on PATH?)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("building {BASE_IMAGE} locally needs mmdebstrap (apt-get install mmdebstrap): {0}")]
    NoMmdebstrap(std::io::Error),
    #[error("writing the build context: {0}")]
    Context(#[from] KeyError),
    #[error("writing the build context: {0}")]
    Io(#[from] std::io::Error),
}

/// Whether long steps (image builds) show their output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Build output goes to this process's stderr.
    Show,
    /// Build output is kept, and shown only in an error.
    Quiet,
}

/// The `docker` CLI.
#[derive(Debug, Clone)]
pub struct Docker {
    pub program: String,
    pub progress: Progress,
}

impl Docker {
    pub fn new(program: impl Into<String>, progress: Progress) -> Self {
        Self {
            program: program.into(),
            progress,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.program);
        command.args(args);
        command
    }

    fn describe(&self, args: &[&str]) -> String {
        format!("{} {}", self.program, args.join(" "))
    }

    /// Runs `docker ARGS` and returns its stdout; stderr goes into the error.
    pub fn output(&self, args: &[&str]) -> Result<String, DockerError> {
        let output = self
            .command(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| DockerError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        if !output.status.success() {
            return Err(DockerError::Failed {
                command: self.describe(args),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs a long step, its output shown as progress (or kept for the error when quiet).
    fn step(&self, args: &[&str]) -> Result<(), DockerError> {
        match self.progress {
            Progress::Quiet => self.output(args).map(drop),
            Progress::Show => {
                let status = self
                    .command(args)
                    .stdin(Stdio::null())
                    .stdout(std::io::stderr())
                    .status()
                    .map_err(|source| DockerError::Spawn {
                        program: self.program.clone(),
                        source,
                    })?;
                if status.success() {
                    Ok(())
                } else {
                    Err(DockerError::Failed {
                        command: self.describe(args),
                        status: status.to_string(),
                        stderr: "see the output above".into(),
                    })
                }
            }
        }
    }

    fn say(&self, message: &str) {
        match self.progress {
            Progress::Show => eprintln!("lm-sandbox: {message}"),
            Progress::Quiet => tracing::info!("{message}"),
        }
    }

    pub fn image_exists(&self, tag: &str) -> bool {
        self.output(&["image", "inspect", "--format", "{{.Id}}", tag])
            .is_ok()
    }

    /// Builds `dir` as `tag`, with `labels` (`key=value`) besides `lm-sandbox.managed=1`.
    fn build(&self, dir: &Path, tag: &str, labels: &[String]) -> Result<(), DockerError> {
        let dir = dir.to_string_lossy();
        let mut args = vec!["build", "--label", "lm-sandbox.managed=1"];
        for label in labels {
            args.extend(["--label", label.as_str()]);
        }
        args.extend(["--tag", tag, &dir]);
        self.step(&args)
    }
}

/// `lm-sandbox:<hash of the build context>`.
pub fn image_tag() -> String {
    let mut hash = Sha256::new();
    for (name, contents, mode) in CONTEXT {
        hash.update(name.as_bytes());
        hash.update(mode.to_le_bytes());
        hash.update((contents.len() as u64).to_le_bytes());
        hash.update(contents.as_bytes());
    }
    format!("{IMAGE_REPOSITORY}:{}", &hex(&hash.finalize())[..12])
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A directory removed when dropped, for build contexts.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(purpose: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt as _;
        let path = std::env::temp_dir().join(format!(
            "lm-sandbox-{purpose}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Best effort: a leftover temp dir is harmless.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The sandbox image, built if missing (and its base too). Returns its tag.
pub fn ensure_image(docker: &Docker) -> Result<String, DockerError> {
    let tag = image_tag();
    if docker.image_exists(&tag) {
        return Ok(tag);
    }
    ensure_base(docker)?;
    docker.say(&format!("building the sandbox image {tag}"));
    let dir = ScratchDir::new("image")?;
    for (name, contents, mode) in CONTEXT {
        write_file(&dir.path().join(name), contents.as_bytes(), mode)?;
    }
    docker.build(dir.path(), &tag, &[])?;
    Ok(tag)
}

/// `debian:bookworm`: present, pulled, or built locally under that tag.
fn ensure_base(docker: &Docker) -> Result<(), DockerError> {
    if docker.image_exists(BASE_IMAGE) {
        return Ok(());
    }
    docker.say(&format!("pulling {BASE_IMAGE}"));
    match docker.output(&["pull", BASE_IMAGE]) {
        Ok(_) => return Ok(()),
        Err(e) => docker.say(&format!(
            "cannot pull {BASE_IMAGE} ({e}); building it locally with mmdebstrap"
        )),
    }
    import_bookworm(docker)
}

/// `mmdebstrap --variant=minbase bookworm - | docker import - debian:bookworm`.
fn import_bookworm(docker: &Docker) -> Result<(), DockerError> {
    let mut strap = Command::new("mmdebstrap")
        .args(["--variant=minbase", "bookworm", "-"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(match docker.progress {
            Progress::Show => Stdio::inherit(),
            Progress::Quiet => Stdio::piped(),
        })
        .spawn()
        .map_err(DockerError::NoMmdebstrap)?;
    let tarball = strap.stdout.take().expect("stdout was piped");
    let imported = docker
        .command(&["import", "--change", "CMD [\"bash\"]", "-", BASE_IMAGE])
        .stdin(tarball)
        .output()
        .map_err(|source| DockerError::Spawn {
            program: docker.program.clone(),
            source,
        })?;
    let mut strap_stderr = String::new();
    if let Some(mut stderr) = strap.stderr.take() {
        let _ = stderr.read_to_string(&mut strap_stderr);
    }
    let strapped = strap.wait()?;
    if !strapped.success() {
        return Err(DockerError::Failed {
            command: "mmdebstrap --variant=minbase bookworm -".into(),
            status: strapped.to_string(),
            stderr: strap_stderr.trim().to_owned(),
        });
    }
    if !imported.status.success() {
        return Err(DockerError::Failed {
            command: format!("{} import - {BASE_IMAGE}", docker.program),
            status: imported.status.to_string(),
            stderr: String::from_utf8_lossy(&imported.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// What the per-install layer adds.
#[derive(Debug, Clone, Copy)]
pub struct KeyedLayer<'a> {
    pub host_key_pem: &'a str,
    pub host_public: &'a str,
    pub client_public: &'a str,
}

/// The image plus this install's keys: the host key (readable by the `sandbox` group, since sshd
/// runs as that user) and the authorized client key, restricted. Cached by a tag derived from the
/// image and both public keys; `labels` mark it (tests mark theirs for clean-up).
pub fn ensure_keyed_image(
    docker: &Docker,
    image: &str,
    keys: &KeyedLayer<'_>,
    labels: &[String],
) -> Result<String, DockerError> {
    let KeyedLayer {
        host_key_pem,
        host_public,
        client_public,
    } = *keys;
    let mut hash = Sha256::new();
    for part in [image, host_public, client_public] {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part.as_bytes());
    }
    let tag = format!("{KEYED_REPOSITORY}:{}", &hex(&hash.finalize())[..12]);
    if docker.image_exists(&tag) {
        return Ok(tag);
    }
    let dir = ScratchDir::new("keys")?;
    let dockerfile = format!(
        "FROM {image}\n\
         COPY --chown=0:0 ssh_host_ed25519_key /etc/lm-sandbox/ssh_host_ed25519_key\n\
         COPY --chown=0:0 authorized_keys /etc/lm-sandbox/authorized_keys\n"
    );
    write_file(&dir.path().join("Dockerfile"), dockerfile.as_bytes(), 0o644)?;
    // COPY keeps the context's mode: the host key is root's alone in the container, so no command
    // (uid 1000) can read it.
    write_file(
        &dir.path().join("ssh_host_ed25519_key"),
        host_key_pem.as_bytes(),
        0o600,
    )?;
    // `restrict`: no forwarding, no PTY, no ~/.ssh/rc, whatever sshd_config says.
    let authorized = format!("restrict {}\n", client_public.trim());
    write_file(
        &dir.path().join("authorized_keys"),
        authorized.as_bytes(),
        0o644,
    )?;
    let quiet = Docker::new(docker.program.clone(), Progress::Quiet);
    quiet.build(dir.path(), &tag, labels)?;
    Ok(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_is_stable_and_names_the_context() {
        let tag = image_tag();
        assert_eq!(tag, image_tag());
        let (repo, hash) = tag.split_once(':').unwrap();
        assert_eq!(repo, IMAGE_REPOSITORY);
        assert_eq!(hash.len(), 12);
        assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn the_context_holds_the_hardening() {
        let (_, sshd, _) = CONTEXT[1];
        for line in [
            "PasswordAuthentication no",
            "PermitRootLogin no",
            "AllowTcpForwarding no",
            "AllowAgentForwarding no",
            "X11Forwarding no",
            "PermitTunnel no",
            "PermitTTY no",
            "DisableForwarding yes",
            "AllowUsers sandbox",
        ] {
            assert!(sshd.lines().any(|l| l == line), "sshd_config lacks {line}");
        }
        let (_, dockerfile, _) = CONTEXT[0];
        // sshd (root, privilege-separated) runs sessions as uid 1000; the tools are root's.
        assert!(dockerfile.contains("useradd --uid 1000"));
        assert!(dockerfile.contains("chown -R root:root /etc/lm-sandbox /usr/local/libexec"));
        assert!(dockerfile.contains("FROM debian:bookworm"));
        let (_, runner, _) = CONTEXT[2];
        assert!(runner.contains("PR_SET_CHILD_SUBREAPER"));
        let (_, init, _) = CONTEXT[3];
        assert!(init.contains("reap_orphans"));
    }
}
