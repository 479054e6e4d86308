//! A transfer in progress, staged in `state_dir/ota/transfers/<transfer id>/`: the signed
//! manifest message as received (`push.cbor`), the bundle being assembled at its chunks'
//! offsets (`bundle.part`), and one byte per chunk saying it arrived (`received`), so a
//! transfer resumes after a restart and can say exactly which chunks it still lacks.
//!
//! A chunk's data is written and fsynced before its `received` byte is set: after a crash a
//! chunk marked received is on disk (and the SHA-256 check at the end catches anything else).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::bundle::{sync_dir, write_synced};
use super::wire::{self, Chunk, Manifest, PushMessage, SignedManifest, TransferId};
use super::UpdateError;

const PUSH_FILE: &str = "push.cbor";
const DATA_FILE: &str = "bundle.part";
const RECEIVED_FILE: &str = "received";
const STARTED_FILE: &str = "started";

pub struct Transfer {
    pub id: TransferId,
    pub key_id: String,
    pub manifest: Manifest,
    /// When the manifest arrived (wall clock: the deadline survives restarts).
    pub started: SystemTime,
    dir: PathBuf,
    data: File,
    received_file: File,
    received: Vec<bool>,
    count: u64,
}

/// What a chunk did to its transfer.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkOutcome {
    Stored,
    /// Already had it: duplicates are normal (QoS 1 redelivery, a resend).
    Duplicate,
}

pub fn hex_id(id: &TransferId) -> String {
    hex::encode(id)
}

fn disk(e: io::Error) -> UpdateError {
    UpdateError::disk(e)
}

impl Transfer {
    /// Starts staging a verified manifest's transfer under `root`.
    pub fn create(
        root: &Path,
        signed: &SignedManifest,
        manifest: Manifest,
    ) -> Result<Transfer, UpdateError> {
        let dir = root.join(hex_id(&signed.transfer_id));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(disk)?;
        let started = SystemTime::now();
        let created = (|| {
            write_synced(
                &dir.join(PUSH_FILE),
                &wire::encode_push(&PushMessage::Manifest(signed.clone())),
            )?;
            let since_epoch = started
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis();
            write_synced(&dir.join(STARTED_FILE), since_epoch.to_string().as_bytes())?;
            // Read back for the digest; created new (a leftover was removed above).
            let create = |name| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(dir.join(name))
            };
            let data = create(DATA_FILE)?;
            data.set_len(manifest.size)?;
            let received_file = create(RECEIVED_FILE)?;
            received_file.set_len(manifest.chunks)?;
            sync_dir(&dir)?;
            Ok((data, received_file))
        })();
        let (data, received_file) = match created {
            Ok(files) => files,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(disk(e));
            }
        };
        Ok(Transfer {
            id: signed.transfer_id,
            key_id: signed.key_id.clone(),
            received: vec![false; manifest.chunks as usize],
            manifest,
            started,
            dir,
            data,
            received_file,
            count: 0,
        })
    }

    /// Reopens a staged transfer after a restart: its signed manifest (returned for the caller
    /// to verify again) and which chunks arrived.
    pub fn reopen(dir: &Path, max_bundle_bytes: u64) -> Result<(Transfer, SignedManifest), String> {
        let bytes = fs::read(dir.join(PUSH_FILE)).map_err(|e| e.to_string())?;
        let PushMessage::Manifest(signed) = wire::decode_push(&bytes)? else {
            return Err("push.cbor is not a manifest message".into());
        };
        let manifest = wire::decode_manifest(&signed.manifest, max_bundle_bytes)?;
        let started_ms: u64 = fs::read_to_string(dir.join(STARTED_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let started = SystemTime::UNIX_EPOCH + Duration::from_millis(started_ms);
        let open = |name| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.join(name))
                .map_err(|e| format!("{name}: {e}"))
        };
        let data = open(DATA_FILE)?;
        let mut received_file = open(RECEIVED_FILE)?;
        let mut flags = Vec::new();
        received_file
            .read_to_end(&mut flags)
            .map_err(|e| e.to_string())?;
        flags.resize(manifest.chunks as usize, 0);
        let received: Vec<bool> = flags.iter().map(|&b| b == 1).collect();
        let count = received.iter().filter(|&&r| r).count() as u64;
        Ok((
            Transfer {
                id: signed.transfer_id,
                key_id: signed.key_id.clone(),
                manifest,
                started,
                dir: dir.to_path_buf(),
                data,
                received_file,
                received,
                count,
            },
            signed,
        ))
    }

    /// The bytes chunk `index` must have.
    fn expected_len(&self, index: u64) -> u64 {
        let m = &self.manifest;
        if index + 1 == m.chunks {
            m.size - m.chunk_size * (m.chunks - 1)
        } else {
            m.chunk_size
        }
    }

    /// Stores a chunk at its offset. Out-of-range indices and wrong lengths are the sender's
    /// bug and end the transfer (the caller rejects it with this error).
    pub fn write_chunk(&mut self, chunk: &Chunk) -> Result<ChunkOutcome, UpdateError> {
        let m = &self.manifest;
        if chunk.index >= m.chunks {
            return Err(UpdateError::Protocol(format!(
                "chunk index {} out of range (the manifest has {} chunks, 0..={})",
                chunk.index,
                m.chunks,
                m.chunks - 1
            )));
        }
        let expected = self.expected_len(chunk.index);
        if chunk.data.len() as u64 != expected {
            return Err(UpdateError::Protocol(format!(
                "size mismatch: chunk {} has {} bytes, the manifest (size {}, chunk_size {}) says {expected}",
                chunk.index,
                chunk.data.len(),
                m.size,
                m.chunk_size
            )));
        }
        if self.received[chunk.index as usize] {
            return Ok(ChunkOutcome::Duplicate);
        }
        self.data
            .write_all_at(&chunk.data, chunk.index * m.chunk_size)
            .map_err(disk)?;
        self.data.sync_data().map_err(disk)?;
        self.received_file
            .write_all_at(&[1], chunk.index)
            .map_err(disk)?;
        self.received[chunk.index as usize] = true;
        self.count += 1;
        Ok(ChunkOutcome::Stored)
    }

    pub fn is_complete(&self) -> bool {
        self.count == self.manifest.chunks
    }

    pub fn received_chunks(&self) -> u64 {
        self.count
    }

    /// The missing chunk indices as inclusive ranges `[first, last]`.
    pub fn missing(&self) -> Vec<[u64; 2]> {
        missing_ranges(&self.received)
    }

    pub fn bundle_path(&self) -> PathBuf {
        self.dir.join(DATA_FILE)
    }

    /// Checks the assembled bundle's SHA-256 against the manifest's.
    pub fn verify_digest(&mut self) -> Result<(), UpdateError> {
        let mut hasher = Sha256::new();
        self.data.seek(SeekFrom::Start(0)).map_err(disk)?;
        io::copy(&mut (&self.data).take(self.manifest.size), &mut hasher).map_err(disk)?;
        let digest: [u8; 32] = hasher.finalize().into();
        if digest != self.manifest.sha256 {
            return Err(UpdateError::Digest {
                received: hex::encode(digest),
                expected: hex::encode(self.manifest.sha256),
            });
        }
        Ok(())
    }

    /// Deletes the staging directory.
    pub fn remove(self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            tracing::warn!("removing {}: {e}", self.dir.display());
        }
    }
}

/// Inclusive ranges of the `false` entries.
pub fn missing_ranges(received: &[bool]) -> Vec<[u64; 2]> {
    let mut ranges = Vec::new();
    let mut start = None;
    for (i, &got) in received.iter().enumerate() {
        match (got, start) {
            (false, None) => start = Some(i as u64),
            (true, Some(s)) => {
                ranges.push([s, i as u64 - 1]);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        ranges.push([s, received.len() as u64 - 1]);
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_ranges_are_inclusive_and_merged() {
        assert_eq!(missing_ranges(&[]), Vec::<[u64; 2]>::new());
        assert_eq!(missing_ranges(&[true, true]), Vec::<[u64; 2]>::new());
        assert_eq!(
            missing_ranges(&[false, false, true, false, true, false]),
            vec![[0, 1], [3, 3], [5, 5]]
        );
    }

    #[test]
    fn chunks_in_any_order_assemble_the_bundle_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let bundle: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let manifest = Manifest {
            name: "m".into(),
            version: 1,
            sha256: Sha256::digest(&bundle).into(),
            size: bundle.len() as u64,
            chunk_size: 2048,
            chunks: 3,
            created: "2026-11-27T00:00:00Z".into(),
            min_accuracy: None,
            notes: None,
        };
        let signed = SignedManifest {
            transfer_id: [5; 16],
            manifest: wire::encode_manifest(&manifest),
            signature: [0; 64],
            key_id: "k".into(),
        };
        let chunk = |i: u64| Chunk {
            transfer_id: [5; 16],
            index: i,
            data: bundle[(i * 2048) as usize..((i + 1) * 2048).min(5000) as usize].to_vec(),
        };
        let mut t = Transfer::create(dir.path(), &signed, manifest.clone()).unwrap();
        assert_eq!(t.write_chunk(&chunk(2)).unwrap(), ChunkOutcome::Stored);
        assert_eq!(t.write_chunk(&chunk(2)).unwrap(), ChunkOutcome::Duplicate);
        assert_eq!(t.missing(), vec![[0, 1]]);
        drop(t);
        let (mut t, again) =
            Transfer::reopen(&dir.path().join(hex_id(&[5; 16])), u64::MAX).unwrap();
        assert_eq!(again, signed);
        assert_eq!(t.missing(), vec![[0, 1]]);
        assert_eq!(
            t.write_chunk(&Chunk {
                index: 3,
                ..chunk(0)
            })
            .unwrap_err()
            .to_string(),
            "chunk index 3 out of range (the manifest has 3 chunks, 0..=2)"
        );
        assert_eq!(
            t.write_chunk(&Chunk { data: vec![0; 10], ..chunk(0) }).unwrap_err().to_string(),
            "size mismatch: chunk 0 has 10 bytes, the manifest (size 5000, chunk_size 2048) says 2048"
        );
        t.write_chunk(&chunk(0)).unwrap();
        t.write_chunk(&chunk(1)).unwrap();
        assert!(t.is_complete());
        t.verify_digest().unwrap();
        assert_eq!(fs::read(t.bundle_path()).unwrap(), bundle);
    }
}
