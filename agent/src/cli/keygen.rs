//! `plaster-agent keygen --out PREFIX`: an Ed25519 key pair for signing model pushes.
//!
//! `PREFIX.key` is the private key as PKCS#8 PEM (mode 0600; `openssl pkey -in PREFIX.key`
//! reads it); `PREFIX.pub` is the public key as the devices trust it: base64 of its 32 bytes,
//! the value of an `ota.trusted_keys` entry. Existing files are never overwritten.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ed25519_dalek::pkcs8::{spki::der::pem::LineEnding, EncodePrivateKey};
use ed25519_dalek::SigningKey;

#[derive(Debug, Clone, clap::Args)]
pub struct KeygenArgs {
    /// Where to write: PREFIX.key (private, 0600) and PREFIX.pub (base64 public key)
    #[arg(long, value_name = "PREFIX")]
    pub out: PathBuf,

    /// The key id devices will know it by, for the printed config line
    #[arg(long, value_name = "ID", default_value = "ops-1")]
    pub id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    #[error("{}: already exists; keygen never overwrites a key (choose another --out)", .0.display())]
    Exists(PathBuf),
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("encoding the private key: {0}")]
    Encode(String),
    #[error("writing to stdout: {0}")]
    Output(std::io::Error),
}

/// The base64 public key of `key`, as `ota.trusted_keys` takes it.
pub fn public_base64(key: &SigningKey) -> String {
    base64::engine::general_purpose::STANDARD.encode(key.verifying_key().as_bytes())
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Creates `path` (never replacing one) with `mode` and writes `text` to it.
fn create(path: &Path, mode: u32, text: &str) -> Result<(), KeygenError> {
    let io = |error| KeygenError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => KeygenError::Exists(path.to_path_buf()),
            _ => io(e),
        })?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

pub fn run(args: &KeygenArgs) -> Result<(), KeygenError> {
    let key_path = with_suffix(&args.out, ".key");
    let pub_path = with_suffix(&args.out, ".pub");
    for path in [&key_path, &pub_path] {
        if path.exists() {
            return Err(KeygenError::Exists(path.clone()));
        }
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeygenError::Encode(e.to_string()))?;
    let public = public_base64(&key);
    create(&key_path, 0o600, &pem)?;
    create(&pub_path, 0o644, &format!("{public}\n"))?;
    super::write_stdout(&format!(
        "private key: {} (keep it off the devices)\npublic key:  {}\nfor the devices' configuration:\n[ota.trusted_keys]\n\"{}\" = \"{public}\"\n",
        key_path.display(),
        pub_path.display(),
        args.id
    ))
    .map_err(KeygenError::Output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    use ed25519_dalek::Signer;

    #[test]
    fn the_pem_reads_back_as_the_same_signing_key() {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap();
        let back = SigningKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(back.to_bytes(), key.to_bytes());
        let signature = back.sign(b"manifest");
        key.verifying_key()
            .verify_strict(b"manifest", &signature)
            .unwrap();
        assert!(crate::config::is_ed25519_public_key(&public_base64(&key)));
    }
}
