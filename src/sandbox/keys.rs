//! The two SSH key pairs that pin both ends of the sandbox connection: the client key the server
//! authorizes, and the host key the client pins. Both are Ed25519, generated here (no ssh-keygen
//! needed on the host), stored in OpenSSH format.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use rand::RngCore as _;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{HashAlg, PrivateKey, PublicKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an OpenSSH key: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("cannot encode a key: {0}")]
    Encode(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A fresh Ed25519 key pair from the OS's random source.
pub fn generate(comment: &str) -> PrivateKey {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    seed.fill(0);
    key.set_comment(comment);
    key
}

/// `ssh-ed25519 AAAA... comment`, one line.
pub fn public_line(key: &PublicKey) -> Result<String, KeyError> {
    key.to_openssh()
        .map_err(|e| KeyError::Encode(e.to_string()))
}

/// `SHA256:...`, as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Writes the private key readable by its owner only, and `PATH.pub` beside it.
pub fn write_pair(path: &Path, key: &PrivateKey) -> Result<(), KeyError> {
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| KeyError::Encode(e.to_string()))?;
    write_file(path, pem.as_bytes(), 0o600)?;
    let public = public_line(key.public_key())? + "\n";
    write_file(&pub_path(path), public.as_bytes(), 0o644)
}

pub fn pub_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// Creates or replaces `path` with `mode` from the start (never briefly world-readable).
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), KeyError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    // `mode` applies only when the file is created; an older file keeps its bits otherwise.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io(path))?;
    file.write_all(contents).map_err(io(path))
}

pub fn load_private(path: &Path) -> Result<PrivateKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    PrivateKey::from_openssh(text.trim()).map_err(|e| KeyError::Parse {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

pub fn parse_public(line: &str, path: &Path) -> Result<PublicKey, KeyError> {
    PublicKey::from_openssh(line.trim()).map_err(|e| KeyError::Parse {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

pub fn load_public(path: &Path) -> Result<PublicKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    parse_public(&text, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_pair_round_trips_through_files() {
        let dir = std::env::temp_dir().join(format!("lm-sandbox-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("client_ed25519");
        let key = generate("test");
        write_pair(&path, &key).unwrap();
        let loaded = load_private(&path).unwrap();
        assert_eq!(loaded.public_key().key_data(), key.public_key().key_data());
        let public = load_public(&pub_path(&path)).unwrap();
        assert_eq!(public.key_data(), key.public_key().key_data());
        assert!(fingerprint(&public).starts_with("SHA256:"));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn two_keys_differ() {
        assert_ne!(
            generate("a").public_key().key_data(),
            generate("b").public_key().key_data()
        );
    }
}
