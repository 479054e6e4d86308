//! Over-the-air model updates (PROTOCOL.md "Push"): receive a signed manifest and its chunks,
//! stage them durably, verify size, SHA-256 and signature, unpack the bundle safely, load and
//! validate the model, swap it in without failing a request, record it durably, watch it
//! through a canary window and roll back by itself when it regresses.
//!
//! - `wire`: the push messages and commands, decoded from untrusted bytes.
//! - `transfer`: a transfer being staged in `state_dir/ota/transfers/`.
//! - `bundle`: the tar bundle, read without trusting it.
//! - `store`: installed versions and the `active` link in `state_dir/models/`.
//! - `updater`: the task that runs it all and publishes each step as an event.
//!
//! Invariant: an update never writes over the active model; the active model changes only by
//! an atomic rename of the `active` link, after the new version passed validation.

pub mod bundle;
pub mod store;
pub mod transfer;
pub mod updater;
pub mod wire;

use std::collections::BTreeMap;

use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey};

pub use updater::{Input, Updater, UpdaterParts};

/// Why an update was refused: the event's `reason`, a sentence a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The sender broke the protocol (a malformed message, a chunk that does not fit).
    #[error("{0}")]
    Protocol(String),
    #[error("signature: unknown key_id {0:?} (this device trusts: {1})")]
    UnknownKey(String, String),
    #[error("signature: does not verify with key {0:?}")]
    BadSignature(String),
    #[error("version {new} is not newer than active {active}")]
    NotNewer { new: u64, active: u64 },
    #[error(
        "sha256 mismatch: the received bundle hashes to {received}, the manifest says {expected}"
    )]
    Digest { received: String, expected: String },
    #[error("disk: no space left in state directory")]
    DiskFull,
    #[error("disk: {0}")]
    Disk(String),
    #[error(transparent)]
    Bundle(#[from] bundle::BundleError),
    /// The model does not load or run on this device's runtime.
    #[error("{0}")]
    Model(String),
    #[error("accuracy {value:.4} below min_accuracy {min}")]
    BelowMinAccuracy { value: f64, min: f64 },
    #[error("accuracy {value:.4} is more than max_accuracy_drop {drop} below the active model's {active:.4}")]
    AccuracyDrop { value: f64, active: f64, drop: f64 },
    #[error(
        "accuracy: min_accuracy {0} is set but the bundle has no dataset.npz to measure it on"
    )]
    NoDataset(f64),
    #[error("latency: p90 {new_ms:.3} ms is more than {:.0} % above the active model's {active_ms:.3} ms (ota.max_latency_increase)", limit * 100.0)]
    Latency {
        new_ms: f64,
        active_ms: f64,
        limit: f64,
    },
    #[error("{0}")]
    Busy(String),
}

impl UpdateError {
    /// A disk error, with ENOSPC in the protocol's words.
    pub fn disk(e: std::io::Error) -> UpdateError {
        if e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28) {
            UpdateError::DiskFull
        } else {
            UpdateError::Disk(e.to_string())
        }
    }
}

/// The trusted keys of `ota.trusted_keys`, decoded.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys(BTreeMap<String, VerifyingKey>);

impl TrustedKeys {
    /// From the configuration's `key id = base64` table (already checked by the config).
    pub fn from_config(keys: &BTreeMap<String, String>) -> TrustedKeys {
        TrustedKeys(
            keys.iter()
                .filter_map(|(id, b64)| {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(b64.trim())
                        .ok()?;
                    let bytes: [u8; 32] = bytes.try_into().ok()?;
                    Some((id.clone(), VerifyingKey::from_bytes(&bytes).ok()?))
                })
                .collect(),
        )
    }

    /// Checks `signature` over `message` by the key `key_id`.
    pub fn verify(
        &self,
        key_id: &str,
        message: &[u8],
        signature: &[u8; 64],
    ) -> Result<(), UpdateError> {
        let key = self.0.get(key_id).ok_or_else(|| {
            let known: Vec<String> = self.0.keys().map(|k| format!("{k:?}")).collect();
            UpdateError::UnknownKey(
                key_id.to_string(),
                if known.is_empty() {
                    "no keys; set ota.trusted_keys".to_string()
                } else {
                    known.join(", ")
                },
            )
        })?;
        key.verify_strict(message, &Signature::from_bytes(signature))
            .map_err(|_| UpdateError::BadSignature(key_id.to_string()))
    }
}

/// Test-only fault injection: a debug build aborts at the named step of an update when
/// `AGENT_TEST_CRASH_AT` names it, as a power cut would stop it. Release builds never do.
pub(crate) fn crash_point(step: &str) {
    if cfg!(debug_assertions) && std::env::var("AGENT_TEST_CRASH_AT").as_deref() == Ok(step) {
        eprintln!("crash injected at {step}");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    #[test]
    fn signatures_verify_only_with_the_named_trusted_key() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let keys = TrustedKeys::from_config(&BTreeMap::from([(
            "ops-1".to_string(),
            crate::cli::keygen::public_base64(&key),
        )]));
        let signature = key.sign(b"manifest").to_bytes();
        keys.verify("ops-1", b"manifest", &signature).unwrap();
        assert_eq!(
            keys.verify("ops-2", b"manifest", &signature)
                .unwrap_err()
                .to_string(),
            "signature: unknown key_id \"ops-2\" (this device trusts: \"ops-1\")"
        );
        assert_eq!(
            keys.verify("ops-1", b"manifest", &other.sign(b"manifest").to_bytes())
                .unwrap_err()
                .to_string(),
            "signature: does not verify with key \"ops-1\""
        );
        assert_eq!(
            keys.verify("ops-1", b"other bytes", &signature)
                .unwrap_err()
                .to_string(),
            "signature: does not verify with key \"ops-1\""
        );
    }
}
