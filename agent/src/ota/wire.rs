//! The push protocol's messages (PROTOCOL.md "Push: manifest, chunks, events"): decoded from
//! untrusted bytes with an exact, actionable error for every fault, and encoded for `push`.
//!
//! Decoding goes through `ciborium::Value` and checks each field by hand, so a message from
//! any client in any language gets an error that names the field, never a serde internal.

use std::collections::BTreeMap;

use ciborium::Value;

use crate::telemetry::record;

/// A CBOR push message or command is never larger than this (a chunk of the largest allowed
/// size plus its envelope): anything bigger is refused unread.
pub const MAX_MESSAGE_BYTES: usize = MAX_CHUNK_SIZE as usize + 4096;
/// The protocol's default chunk size.
pub const DEFAULT_CHUNK_SIZE: u64 = 256 * 1024;
/// Chunks fit the agent's 1 MiB incoming packet limit with room for the envelope.
pub const MAX_CHUNK_SIZE: u64 = 1024 * 1024 - 8192;
/// Smaller chunks would make a model of a few MB thousands of messages.
pub const MIN_CHUNK_SIZE: u64 = 1024;
/// Model names become directory names in the state directory.
pub const MAX_NAME_LEN: usize = 64;
/// Manifest `notes` beyond this are a mistake, not notes.
pub const MAX_NOTES_LEN: usize = 4096;

/// A transfer's id: 16 random bytes chosen by the sender.
pub type TransferId = [u8; 16];

/// What `manifest` (the signed bytes) says.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    pub name: String,
    pub version: u64,
    pub sha256: [u8; 32],
    pub size: u64,
    pub chunk_size: u64,
    pub chunks: u64,
    pub created: String,
    pub min_accuracy: Option<f64>,
    pub notes: Option<String>,
}

/// A manifest message: the manifest's exact bytes and the signature over them.
#[derive(Clone, Debug, PartialEq)]
pub struct SignedManifest {
    pub transfer_id: TransferId,
    /// The CBOR bytes the signature covers (decoded into [`Manifest`] only after it verifies).
    pub manifest: Vec<u8>,
    pub signature: [u8; 64],
    pub key_id: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    pub transfer_id: TransferId,
    pub index: u64,
    pub data: Vec<u8>,
}

/// A message on a push topic.
#[derive(Clone, Debug, PartialEq)]
pub enum PushMessage {
    Manifest(SignedManifest),
    Chunk(Chunk),
}

/// A message on a command topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Republish status and model state.
    Rebirth,
    /// Roll back from `version`, which must be the active one (a replayed command for an
    /// older version does nothing), to the previous version. Signed: see [`rollback_message`].
    Rollback {
        version: u64,
        signature: [u8; 64],
        key_id: String,
    },
}

/// The bytes a `rollback` command's signature covers: a domain tag and the version, so a
/// signature over a manifest can never pass as a rollback or the other way round.
pub fn rollback_message(version: u64) -> Vec<u8> {
    format!("plaster/v1 rollback {version}").into_bytes()
}

/// A map's fields by name, with errors that say which field and what was wrong.
struct Fields<'a> {
    what: &'a str,
    map: BTreeMap<String, Value>,
}

impl<'a> Fields<'a> {
    fn of(what: &'a str, value: Value) -> Result<Fields<'a>, String> {
        let Value::Map(entries) = value else {
            return Err(format!("{what}: not a CBOR map"));
        };
        let mut map = BTreeMap::new();
        for (key, value) in entries {
            match key {
                Value::Text(key) => {
                    if map.insert(key.clone(), value).is_some() {
                        return Err(format!("{what}: field \"{key}\" appears twice"));
                    }
                }
                _ => return Err(format!("{what}: a key is not text")),
            }
        }
        Ok(Fields { what, map })
    }

    fn take(&mut self, field: &str) -> Result<Value, String> {
        self.map
            .remove(field)
            .ok_or_else(|| format!("{}: field \"{field}\" missing", self.what))
    }

    fn wrong(&self, field: &str, expected: &str) -> String {
        format!("{}: field \"{field}\" is not {expected}", self.what)
    }

    fn text(&mut self, field: &str) -> Result<String, String> {
        match self.take(field)? {
            Value::Text(s) => Ok(s),
            _ => Err(self.wrong(field, "text")),
        }
    }

    fn uint(&mut self, field: &str) -> Result<u64, String> {
        match self.take(field)? {
            Value::Integer(i) => {
                u64::try_from(i).map_err(|_| self.wrong(field, "an unsigned integer"))
            }
            _ => Err(self.wrong(field, "an unsigned integer")),
        }
    }

    fn bytes<const N: usize>(&mut self, field: &str) -> Result<[u8; N], String> {
        match self.take(field)? {
            Value::Bytes(b) => b.try_into().map_err(|b: Vec<u8>| {
                format!(
                    "{}: field \"{field}\" has {} bytes, expected {N}",
                    self.what,
                    b.len()
                )
            }),
            _ => Err(self.wrong(field, &format!("a byte string of {N} bytes"))),
        }
    }

    fn byte_string(&mut self, field: &str) -> Result<Vec<u8>, String> {
        match self.take(field)? {
            Value::Bytes(b) => Ok(b),
            _ => Err(self.wrong(field, "a byte string")),
        }
    }

    fn optional_float(&mut self, field: &str) -> Result<Option<f64>, String> {
        match self.map.remove(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Float(f)) if f.is_finite() => Ok(Some(f)),
            Some(Value::Integer(i)) => Ok(Some(i128::from(i) as f64)),
            Some(_) => Err(self.wrong(field, "a finite number or null")),
        }
    }

    fn optional_text(&mut self, field: &str) -> Result<Option<String>, String> {
        match self.map.remove(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Text(s)) => Ok(Some(s)),
            Some(_) => Err(self.wrong(field, "text or null")),
        }
    }
}

fn parse_cbor(what: &str, bytes: &[u8]) -> Result<Value, String> {
    ciborium::from_reader(bytes).map_err(|e| format!("{what}: {}", record::cbor_error(e)))
}

fn too_big(what: &str, len: usize, limit: usize) -> String {
    format!("{what} of {len} bytes exceeds the {limit}-byte limit")
}

/// Decodes a message from a push topic.
pub fn decode_push(bytes: &[u8]) -> Result<PushMessage, String> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(too_big("push message", bytes.len(), MAX_MESSAGE_BYTES));
    }
    let mut fields = Fields::of("push message", parse_cbor("push message", bytes)?)?;
    match fields.text("type")?.as_str() {
        "manifest" => Ok(PushMessage::Manifest(SignedManifest {
            transfer_id: fields.bytes("transfer_id")?,
            manifest: fields.byte_string("manifest")?,
            signature: fields.bytes("signature")?,
            key_id: fields.text("key_id")?,
        })),
        "chunk" => Ok(PushMessage::Chunk(Chunk {
            transfer_id: fields.bytes("transfer_id")?,
            index: fields.uint("index")?,
            data: fields.byte_string("data")?,
        })),
        other => Err(format!(
            "push message: unknown type {other:?} (expected \"manifest\" or \"chunk\")"
        )),
    }
}

/// Decodes the signed manifest bytes and checks they describe a transfer this agent can take:
/// a usable name, a chunking consistent with the size, and a size within `max_size`.
pub fn decode_manifest(bytes: &[u8], max_size: u64) -> Result<Manifest, String> {
    let mut f = Fields::of("manifest", parse_cbor("manifest", bytes)?)?;
    let manifest = Manifest {
        name: f.text("name")?,
        version: f.uint("version")?,
        sha256: f.bytes("sha256")?,
        size: f.uint("size")?,
        chunk_size: f.uint("chunk_size")?,
        chunks: f.uint("chunks")?,
        created: f.text("created")?,
        min_accuracy: f.optional_float("min_accuracy")?,
        notes: f.optional_text("notes")?,
    };
    check_name(&manifest.name)?;
    if manifest.version == 0 {
        return Err("manifest: version must be 1 or more".into());
    }
    if manifest.size == 0 {
        return Err("manifest: size is 0 (an empty bundle)".into());
    }
    if manifest.size > max_size {
        return Err(format!(
            "size: bundle of {} bytes exceeds ota.max_bundle_bytes {max_size}",
            manifest.size
        ));
    }
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&manifest.chunk_size) {
        return Err(format!(
            "manifest: chunk_size {} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
            manifest.chunk_size
        ));
    }
    let expected_chunks = manifest.size.div_ceil(manifest.chunk_size);
    if manifest.chunks != expected_chunks {
        return Err(format!(
            "manifest: chunks {} does not match size {} / chunk_size {} (expected {expected_chunks})",
            manifest.chunks, manifest.size, manifest.chunk_size
        ));
    }
    if let Some(min) = manifest.min_accuracy {
        if !(0.0..=1.0).contains(&min) {
            return Err(format!("manifest: min_accuracy {min} is outside 0..=1"));
        }
    }
    if manifest
        .notes
        .as_ref()
        .is_some_and(|n| n.len() > MAX_NOTES_LEN)
    {
        return Err(format!("manifest: notes exceed {MAX_NOTES_LEN} bytes"));
    }
    Ok(manifest)
}

/// Model names: letters, digits, `.`, `_`, `-`, at most [`MAX_NAME_LEN`] bytes, not starting
/// with a dot (they name directories in the state directory).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "manifest: name {name:?} must be 1 to {MAX_NAME_LEN} letters, digits, '.', '_' or '-', not starting with '.'"
        ))
    }
}

/// Decodes a command: a CBOR map, or a JSON object for hand-typed `mosquitto_pub` use.
pub fn decode_command(bytes: &[u8]) -> Result<Command, String> {
    if bytes.len() > MAX_COMMAND_BYTES {
        return Err(too_big("message", bytes.len(), MAX_COMMAND_BYTES));
    }
    let value = match record::encoding_of(bytes) {
        crate::config::Encoding::Json => {
            let json: serde_json::Value = serde_json::from_slice(bytes)
                .map_err(|e| format!("command: not a JSON object: {e}"))?;
            Value::serialized(&json).map_err(|e| format!("command: {e}"))?
        }
        crate::config::Encoding::Cbor => parse_cbor("command", bytes)?,
    };
    let mut f = Fields::of("command", value)?;
    match f.text("type")?.as_str() {
        "rebirth" => Ok(Command::Rebirth),
        "rollback" => Ok(Command::Rollback {
            version: f.uint("version")?,
            signature: signature_field(&mut f)?,
            key_id: f.text("key_id")?,
        }),
        other => Err(format!(
            "command: unknown type {other:?} (this agent knows \"rebirth\" and \"rollback\")"
        )),
    }
}

/// Commands are small maps; anything larger is refused unread.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// A signature as CBOR bytes, or (in a JSON command) as base64 text.
fn signature_field(f: &mut Fields) -> Result<[u8; 64], String> {
    use base64::Engine as _;
    match f.take("signature")? {
        Value::Bytes(b) => b.try_into().map_err(|b: Vec<u8>| {
            format!(
                "command: field \"signature\" has {} bytes, expected 64",
                b.len()
            )
        }),
        Value::Text(t) => base64::engine::general_purpose::STANDARD
            .decode(t.trim())
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .ok_or_else(|| "command: field \"signature\" is not 64 bytes in base64".to_string()),
        _ => Err(f.wrong("signature", "a byte string of 64 bytes")),
    }
}

fn field(name: &str, value: Value) -> (Value, Value) {
    (Value::Text(name.into()), value)
}

fn to_cbor(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("CBOR to memory");
    out
}

/// The manifest's CBOR bytes, as the sender signs them.
pub fn encode_manifest(m: &Manifest) -> Vec<u8> {
    to_cbor(&Value::Map(vec![
        field("name", Value::Text(m.name.clone())),
        field("version", m.version.into()),
        field("sha256", Value::Bytes(m.sha256.to_vec())),
        field("size", m.size.into()),
        field("chunk_size", m.chunk_size.into()),
        field("chunks", m.chunks.into()),
        field("created", Value::Text(m.created.clone())),
        field(
            "min_accuracy",
            m.min_accuracy.map_or(Value::Null, Value::Float),
        ),
        field("notes", m.notes.clone().map_or(Value::Null, Value::Text)),
    ]))
}

pub fn encode_push(message: &PushMessage) -> Vec<u8> {
    to_cbor(&Value::Map(match message {
        PushMessage::Manifest(m) => vec![
            field("type", Value::Text("manifest".into())),
            field("transfer_id", Value::Bytes(m.transfer_id.to_vec())),
            field("manifest", Value::Bytes(m.manifest.clone())),
            field("signature", Value::Bytes(m.signature.to_vec())),
            field("key_id", Value::Text(m.key_id.clone())),
        ],
        PushMessage::Chunk(c) => vec![
            field("type", Value::Text("chunk".into())),
            field("transfer_id", Value::Bytes(c.transfer_id.to_vec())),
            field("index", c.index.into()),
            field("data", Value::Bytes(c.data.clone())),
        ],
    }))
}

pub fn encode_command(command: &Command) -> Vec<u8> {
    to_cbor(&Value::Map(match command {
        Command::Rebirth => vec![field("type", Value::Text("rebirth".into()))],
        Command::Rollback {
            version,
            signature,
            key_id,
        } => vec![
            field("type", Value::Text("rollback".into())),
            field("version", (*version).into()),
            field("signature", Value::Bytes(signature.to_vec())),
            field("key_id", Value::Text(key_id.clone())),
        ],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            name: "digits".into(),
            version: 2,
            sha256: [7; 32],
            size: 600_000,
            chunk_size: DEFAULT_CHUNK_SIZE,
            chunks: 3,
            created: "2026-11-27T00:00:00Z".into(),
            min_accuracy: Some(0.9),
            notes: None,
        }
    }

    fn cbor(entries: Vec<(Value, Value)>) -> Vec<u8> {
        to_cbor(&Value::Map(entries))
    }

    #[test]
    fn messages_round_trip() {
        let m = manifest();
        assert_eq!(
            decode_manifest(&encode_manifest(&m), u64::MAX),
            Ok(m.clone())
        );
        let push = PushMessage::Manifest(SignedManifest {
            transfer_id: [1; 16],
            manifest: encode_manifest(&m),
            signature: [2; 64],
            key_id: "ops-1".into(),
        });
        assert_eq!(decode_push(&encode_push(&push)), Ok(push));
        let chunk = PushMessage::Chunk(Chunk {
            transfer_id: [1; 16],
            index: 2,
            data: vec![9; 10],
        });
        assert_eq!(decode_push(&encode_push(&chunk)), Ok(chunk));
        let rollback = Command::Rollback {
            version: 3,
            signature: [4; 64],
            key_id: "ops-1".into(),
        };
        assert_eq!(decode_command(&encode_command(&rollback)), Ok(rollback));
        assert_eq!(
            decode_command(br#"{"type": "rebirth"}"#),
            Ok(Command::Rebirth)
        );
    }

    fn check_manifest(edit: impl FnOnce(&mut Manifest), max: u64, expected: &str) {
        let mut m = manifest();
        edit(&mut m);
        assert_eq!(
            decode_manifest(&encode_manifest(&m), max),
            Err(expected.to_string())
        );
    }

    #[test]
    fn bad_manifests_name_the_fault() {
        check_manifest(
            |m| m.version = 0,
            u64::MAX,
            "manifest: version must be 1 or more",
        );
        check_manifest(
            |m| m.chunks = 4,
            u64::MAX,
            "manifest: chunks 4 does not match size 600000 / chunk_size 262144 (expected 3)",
        );
        check_manifest(
            |_| {},
            500_000,
            "size: bundle of 600000 bytes exceeds ota.max_bundle_bytes 500000",
        );
        check_manifest(
            |m| m.chunk_size = 10,
            u64::MAX,
            "manifest: chunk_size 10 is outside 1024..=1040384",
        );
        check_manifest(
            |m| m.name = "../etc".into(),
            u64::MAX,
            "manifest: name \"../etc\" must be 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'",
        );
        check_manifest(
            |m| m.min_accuracy = Some(1.5),
            u64::MAX,
            "manifest: min_accuracy 1.5 is outside 0..=1",
        );
        assert_eq!(
            decode_manifest(
                &cbor(vec![field("name", Value::Text("digits".into()))]),
                u64::MAX
            ),
            Err("manifest: field \"version\" missing".to_string())
        );
        assert_eq!(
            decode_manifest(b"\xa1\x64name\x01", u64::MAX),
            Err("manifest: field \"name\" is not text".to_string())
        );
    }

    #[test]
    fn bad_push_messages_name_the_fault() {
        let check = |bytes: &[u8], expected: &str| {
            assert_eq!(decode_push(bytes), Err(expected.to_string()));
        };
        check(b"", "push message: the payload ends early");
        check(b"\x01", "push message: not a CBOR map");
        check(
            &cbor(vec![field("type", Value::Text("chunky".into()))]),
            "push message: unknown type \"chunky\" (expected \"manifest\" or \"chunk\")",
        );
        check(
            &cbor(vec![
                field("type", Value::Text("chunk".into())),
                field("transfer_id", Value::Bytes(vec![0; 15])),
            ]),
            "push message: field \"transfer_id\" has 15 bytes, expected 16",
        );
        check(
            &cbor(vec![
                field("type", Value::Text("chunk".into())),
                field("transfer_id", Value::Bytes(vec![0; 16])),
                field("index", Value::Integer((-1).into())),
                field("data", Value::Bytes(vec![])),
            ]),
            "push message: field \"index\" is not an unsigned integer",
        );
        check(
            &vec![0u8; MAX_MESSAGE_BYTES + 1],
            "push message of 1044481 bytes exceeds the 1044480-byte limit",
        );
        check(
            &cbor(vec![
                field("type", Value::Text("chunk".into())),
                field("type", Value::Text("chunk".into())),
            ]),
            "push message: field \"type\" appears twice",
        );
    }

    #[test]
    fn bad_commands_name_the_fault() {
        let check = |bytes: &[u8], expected: &str| {
            assert_eq!(decode_command(bytes), Err(expected.to_string()));
        };
        check(
            br#"{"type": "reboot"}"#,
            "command: unknown type \"reboot\" (this agent knows \"rebirth\" and \"rollback\")",
        );
        check(br#"{"kind": "rebirth"}"#, "command: field \"type\" missing");
        check(
            br#"{"type": "rollback", "version": 3, "signature": "AAAA", "key_id": "k"}"#,
            "command: field \"signature\" is not 64 bytes in base64",
        );
        check(
            &vec![b' '; MAX_COMMAND_BYTES + 1],
            "message of 65537 bytes exceeds the 65536-byte limit",
        );
    }
}

/// Bounded fuzzing of the decoders (CI runs it with the unit tests): arbitrary bytes, and
/// valid messages with bytes flipped, truncated or extended, never panic and never decode
/// into something the checks would have refused.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn valid_messages() -> Vec<Vec<u8>> {
        let manifest = Manifest {
            name: "digits".into(),
            version: 3,
            sha256: [1; 32],
            size: 5000,
            chunk_size: 2048,
            chunks: 3,
            created: "2026-11-27T00:00:00Z".into(),
            min_accuracy: Some(0.5),
            notes: Some("n".into()),
        };
        vec![
            encode_manifest(&manifest),
            encode_push(&PushMessage::Manifest(SignedManifest {
                transfer_id: [2; 16],
                manifest: encode_manifest(&manifest),
                signature: [3; 64],
                key_id: "ops-1".into(),
            })),
            encode_push(&PushMessage::Chunk(Chunk {
                transfer_id: [2; 16],
                index: 1,
                data: vec![4; 100],
            })),
            encode_command(&Command::Rollback {
                version: 2,
                signature: [5; 64],
                key_id: "ops-1".into(),
            }),
        ]
    }

    fn decode_all(bytes: &[u8]) {
        let _ = decode_push(bytes);
        let _ = decode_command(bytes);
        if let Ok(m) = decode_manifest(bytes, 1 << 30) {
            assert!(m.version > 0 && m.size > 0 && m.size <= 1 << 30);
            assert_eq!(m.chunks, m.size.div_ceil(m.chunk_size));
            assert!(check_name(&m.name).is_ok());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            decode_all(&bytes);
        }

        #[test]
        fn mutated_messages(which in 0usize..4, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6), cut in any::<usize>(), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
            let mut bytes = valid_messages()[which].clone();
            for (at, value) in flips {
                let len = bytes.len();
                bytes[at % len] = value;
            }
            bytes.truncate(cut % (bytes.len() + 1));
            bytes.extend(tail);
            decode_all(&bytes);
        }
    }
}
