//! Model pushes as any outside sender would make them: bundles, signed manifests and chunks
//! built with the protocol's published encoding, published on a real broker, and the device's
//! events read back.

use std::path::Path;
use std::time::Duration;

use ed25519_dalek::pkcs8::DecodePrivateKey;
use ed25519_dalek::{Signer, SigningKey};
use plaster_agent::ota::wire::{self, Chunk, Manifest, PushMessage, SignedManifest};
use sha2::{Digest, Sha256};

use crate::mqtt::{publish, Message, Subscriber};

/// A signing key made by `plaster-agent keygen` (the operator's way), and its public half.
pub struct Key {
    pub path: std::path::PathBuf,
    pub id: String,
    pub public: String,
    pub signing: SigningKey,
}

impl Key {
    pub fn generate(dir: &Path, id: &str) -> Key {
        let prefix = dir.join(id);
        let run = crate::agent(&["keygen", "--out", prefix.to_str().unwrap(), "--id", id]);
        assert_eq!(run.code, 0, "keygen: {}", run.stderr);
        let public = std::fs::read_to_string(prefix.with_extension("pub"))
            .unwrap()
            .trim()
            .to_string();
        let path = prefix.with_extension("key");
        let signing = SigningKey::from_pkcs8_pem(&std::fs::read_to_string(&path).unwrap()).unwrap();
        Key {
            path,
            id: id.to_string(),
            public,
            signing,
        }
    }

    /// The `[ota]` section that trusts this key, plus `extra` lines.
    pub fn ota_section(&self, extra: &str) -> String {
        format!(
            "\n[ota]\ntrusted_keys = {{ \"{}\" = \"{}\" }}\n{extra}\n",
            self.id, self.public
        )
    }
}

/// The digits bundle as `push` builds it from `models/digits` (model, dataset, labels).
pub fn digits_bundle() -> Vec<u8> {
    bundle_of(&[
        ("model.onnx", crate::model_path("digits/model.onnx")),
        ("dataset.npz", crate::model_path("digits/dataset.npz")),
        ("labels.txt", crate::model_path("digits/labels.txt")),
    ])
}

pub fn bundle_of(members: &[(&str, std::path::PathBuf)]) -> Vec<u8> {
    let members: Vec<(&str, Vec<u8>)> = members
        .iter()
        .map(|(name, path)| (*name, std::fs::read(path).unwrap()))
        .collect();
    plaster_agent::ota::bundle::build(&members).unwrap()
}

/// A transfer ready to publish: its manifest message and its chunks.
pub struct Transfer {
    pub id: [u8; 16],
    pub manifest: Manifest,
    pub manifest_message: Vec<u8>,
    pub chunks: Vec<Vec<u8>>,
}

impl Transfer {
    /// `bundle` as version `version`, signed by `key` (under `key_id`).
    pub fn new(bundle: &[u8], version: u64, key: &SigningKey, key_id: &str) -> Transfer {
        Transfer::with(bundle, version, key, key_id, |_| {})
    }

    /// As [`Transfer::new`], with the manifest edited before signing.
    pub fn with(
        bundle: &[u8],
        version: u64,
        key: &SigningKey,
        key_id: &str,
        edit: impl FnOnce(&mut Manifest),
    ) -> Transfer {
        let chunk_size = 64 * 1024;
        let mut manifest = Manifest {
            name: "digits".into(),
            version,
            sha256: Sha256::digest(bundle).into(),
            size: bundle.len() as u64,
            chunk_size,
            chunks: (bundle.len() as u64).div_ceil(chunk_size),
            created: "2026-11-27T00:00:00Z".into(),
            min_accuracy: None,
            notes: None,
        };
        edit(&mut manifest);
        let id: [u8; 16] = rand_id();
        let bytes = wire::encode_manifest(&manifest);
        let manifest_message = wire::encode_push(&PushMessage::Manifest(SignedManifest {
            transfer_id: id,
            signature: key.sign(&bytes).to_bytes(),
            manifest: bytes,
            key_id: key_id.to_string(),
        }));
        let chunks = bundle
            .chunks(chunk_size as usize)
            .enumerate()
            .map(|(index, data)| {
                wire::encode_push(&PushMessage::Chunk(Chunk {
                    transfer_id: id,
                    index: index as u64,
                    data: data.to_vec(),
                }))
            })
            .collect();
        Transfer {
            id,
            manifest,
            manifest_message,
            chunks,
        }
    }

    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }

    /// Publishes the manifest and then the chunks with `indices`.
    pub fn send(&self, port: u16, device: &str, indices: impl IntoIterator<Item = usize>) {
        let topic = push_topic(device);
        publish(port, &topic, self.manifest_message.clone(), false);
        for index in indices {
            publish(port, &topic, self.chunks[index].clone(), false);
        }
    }

    pub fn send_all(&self, port: u16, device: &str) {
        self.send(port, device, 0..self.chunks.len());
    }
}

fn rand_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let digest = Sha256::digest(format!("{nanos}-{:?}", std::thread::current().id()));
    id.copy_from_slice(&digest[..16]);
    id
}

pub fn push_topic(device: &str) -> String {
    format!("plaster/v1/lab/{device}/model/push")
}

pub fn events_topic(device: &str) -> String {
    format!("plaster/v1/lab/{device}/model/events")
}

/// Waits for the event of transfer `id` (hex) in `state`; returns it as JSON.
pub fn wait_event(
    sub: &Subscriber,
    device: &str,
    id: &[u8; 16],
    state: &str,
    timeout: Duration,
) -> serde_json::Value {
    let topic = events_topic(device);
    let id = id.to_vec();
    sub.wait_for(&format!("a {state:?} event"), timeout, |m: &Message| {
        m.topic == topic && {
            let v = m.value();
            v["state"] == state && transfer_id(&v) == id
        }
    })
    .value()
}

/// A CBOR byte string reads back as an array of numbers.
pub fn transfer_id(event: &serde_json::Value) -> Vec<u8> {
    event["transfer_id"]
        .as_array()
        .map(|a| a.iter().map(|b| b.as_u64().unwrap_or(0) as u8).collect())
        .unwrap_or_default()
}
