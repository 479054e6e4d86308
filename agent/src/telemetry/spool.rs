//! A durable, bounded, ordered queue of outgoing MQTT records on disk (PROTOCOL.md: telemetry
//! and events produced while the broker is unreachable are kept and published in order after
//! reconnect; when full, the oldest telemetry goes first, never events).
//!
//! One file per record, named by a monotonic id so that directory order is publish order.
//!
//! fsync discipline: a record is written to `<id>.tmp`, fsynced, renamed to its final name and
//! the directory fsynced before `push` returns, so a record `push` accepted survives a crash or
//! power loss. Removal (after the broker's PUBACK) unlinks without fsyncing the directory: a
//! crash can at worst resurrect an acknowledged record, which is then published again (MQTT
//! QoS 1 is at-least-once; consumers see the repeated `seq`). Leftover `.tmp` files are records
//! that were never accepted and are deleted on open.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

/// Telemetry may be dropped when the spool is full; events never are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Telemetry,
    Event,
}

impl RecordKind {
    fn suffix(self) -> &'static str {
        match self {
            RecordKind::Telemetry => "t",
            RecordKind::Event => "e",
        }
    }
}

/// A spooled record: where it goes and what it says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub id: u64,
    pub kind: RecordKind,
    pub topic: String,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {}: {message}", path.display())]
    Io { path: PathBuf, message: String },
    #[error("spool {}: no space left for an event record", path.display())]
    Full { path: PathBuf },
}

/// What happened to a pushed record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Stored under this id.
    Stored(u64),
    /// A telemetry record the spool had no room for (disk full), counted as dropped.
    Dropped,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    id: u64,
    kind: RecordKind,
    bytes: u64,
}

/// File header: a magic tag, then the topic's length (u16, big-endian) and the topic.
const MAGIC: &[u8; 4] = b"PSP1";
/// The persisted count of dropped telemetry records.
const DROPPED_FILE: &str = "dropped";

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    entries: VecDeque<Entry>,
    bytes: u64,
    next_id: u64,
    dropped: u64,
}

impl Spool {
    /// Opens (creating) the spool in `dir`, keeping at most `max_bytes` of telemetry and events.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        let io = |e: std::io::Error| SpoolError::Io {
            path: dir.to_path_buf(),
            message: e.to_string(),
        };
        fs::create_dir_all(dir).map_err(io)?;
        let mut entries = Vec::new();
        for entry in fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Some((id, suffix)) = name.split_once('.') else {
                continue;
            };
            let (Ok(id), Some(kind)) = (id.parse::<u64>(), parse_kind(suffix)) else {
                continue;
            };
            let bytes = entry.metadata().map_err(io)?.len();
            entries.push(Entry { id, kind, bytes });
        }
        entries.sort_by_key(|e| e.id);
        let bytes = entries.iter().map(|e| e.bytes).sum();
        let next_id = entries.last().map_or(1, |e| e.id + 1);
        let dropped = fs::read_to_string(dir.join(DROPPED_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Ok(Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            entries: entries.into(),
            bytes,
            next_id,
            dropped,
        })
    }

    /// Stores a record durably, after the ones already spooled. To stay within its bound the
    /// spool drops its oldest telemetry first (counted); events are never dropped. A telemetry
    /// record that finds the disk full is dropped (counted); an event is an error.
    pub fn push(
        &mut self,
        kind: RecordKind,
        topic: &str,
        payload: &[u8],
    ) -> Result<Pushed, SpoolError> {
        let mut body = Vec::with_capacity(MAGIC.len() + 2 + topic.len() + payload.len());
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&(topic.len().min(u16::MAX as usize) as u16).to_be_bytes());
        body.extend_from_slice(&topic.as_bytes()[..topic.len().min(u16::MAX as usize)]);
        body.extend_from_slice(payload);
        let size = body.len() as u64;
        while self.bytes + size > self.max_bytes {
            let Some(pos) = self
                .entries
                .iter()
                .position(|e| e.kind == RecordKind::Telemetry)
            else {
                break;
            };
            let victim = self.entries.remove(pos).expect("position is in range");
            let _ = fs::remove_file(self.path_of(victim.id, victim.kind));
            self.bytes -= victim.bytes;
            self.count_dropped();
        }
        if kind == RecordKind::Telemetry && self.bytes + size > self.max_bytes {
            // Only events are left and they fill the spool: this telemetry has no room.
            self.count_dropped();
            return Ok(Pushed::Dropped);
        }
        let id = self.next_id;
        match self.write_durably(id, kind, &body) {
            Ok(()) => {
                self.next_id += 1;
                self.entries.push_back(Entry {
                    id,
                    kind,
                    bytes: size,
                });
                self.bytes += size;
                Ok(Pushed::Stored(id))
            }
            Err(e) if is_no_space(&e) => match kind {
                RecordKind::Telemetry => {
                    self.count_dropped();
                    Ok(Pushed::Dropped)
                }
                RecordKind::Event => Err(SpoolError::Full {
                    path: self.dir.clone(),
                }),
            },
            Err(e) => Err(SpoolError::Io {
                path: self.dir.clone(),
                message: e.to_string(),
            }),
        }
    }

    fn write_durably(&self, id: u64, kind: RecordKind, body: &[u8]) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{id:020}.tmp"));
        let result = (|| {
            let mut file = File::create(&tmp)?;
            file.write_all(body)?;
            file.sync_all()?;
            fs::rename(&tmp, self.path_of(id, kind))?;
            File::open(&self.dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// The ids of the spooled records, oldest first.
    pub fn ids(&self) -> Vec<u64> {
        self.entries.iter().map(|e| e.id).collect()
    }

    /// The oldest record after `cursor` (0 for the first), in publish order.
    pub fn next_after(&self, cursor: u64) -> Option<u64> {
        let pos = self.entries.partition_point(|e| e.id <= cursor);
        self.entries.get(pos).map(|e| e.id)
    }

    /// Reads a spooled record back.
    pub fn read(&self, id: u64) -> Result<Record, SpoolError> {
        let entry = self
            .entries
            .iter()
            .find(|e| e.id == id)
            .ok_or_else(|| SpoolError::Io {
                path: self.dir.clone(),
                message: format!("no record {id}"),
            })?;
        let path = self.path_of(id, entry.kind);
        let bytes = fs::read(&path).map_err(|e| SpoolError::Io {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let corrupt = || SpoolError::Io {
            path: path.clone(),
            message: "not a spool record".into(),
        };
        if bytes.len() < 6 || &bytes[..4] != MAGIC {
            return Err(corrupt());
        }
        let topic_len = u16::from_be_bytes([bytes[4], bytes[5]]) as usize;
        let topic = bytes.get(6..6 + topic_len).ok_or_else(corrupt)?;
        Ok(Record {
            id,
            kind: entry.kind,
            topic: String::from_utf8_lossy(topic).into_owned(),
            payload: bytes[6 + topic_len..].to_vec(),
        })
    }

    /// Forgets a record the broker acknowledged.
    pub fn remove(&mut self, id: u64) {
        if let Some(pos) = self.entries.iter().position(|e| e.id == id) {
            let entry = self.entries.remove(pos).expect("position is in range");
            let _ = fs::remove_file(self.path_of(id, entry.kind));
            self.bytes -= entry.bytes;
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Telemetry records dropped for lack of room since the spool was created (persisted).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn count_dropped(&mut self) {
        self.dropped += 1;
        let tmp = self.dir.join(format!("{DROPPED_FILE}.tmp"));
        // Best effort: on a full disk the count lives on in memory and is written next time.
        if fs::write(&tmp, self.dropped.to_string()).is_ok() {
            let _ = fs::rename(&tmp, self.dir.join(DROPPED_FILE));
        }
    }

    fn path_of(&self, id: u64, kind: RecordKind) -> PathBuf {
        self.dir.join(format!("{id:020}.{}", kind.suffix()))
    }
}

fn parse_kind(suffix: &str) -> Option<RecordKind> {
    match suffix {
        "t" => Some(RecordKind::Telemetry),
        "e" => Some(RecordKind::Event),
        _ => None,
    }
}

fn is_no_space(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::StorageFull || e.raw_os_error() == Some(28)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(n: usize) -> Vec<u8> {
        vec![b'x'; n]
    }

    #[test]
    fn records_come_back_in_order_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        for i in 0..5u8 {
            let kind = if i == 2 {
                RecordKind::Event
            } else {
                RecordKind::Telemetry
            };
            assert_eq!(
                spool
                    .push(kind, "plaster/v1/lab/d/telemetry", &[i])
                    .unwrap(),
                Pushed::Stored(u64::from(i) + 1)
            );
        }
        spool.remove(1);
        drop(spool);
        // A crash mid-write leaves a .tmp: it was never accepted and is cleaned up.
        fs::write(dir.path().join("00000000000000000099.tmp"), b"half").unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.ids(), vec![2, 3, 4, 5]);
        let r = spool.read(3).unwrap();
        assert_eq!(
            (r.kind, r.topic.as_str(), r.payload.as_slice()),
            (RecordKind::Event, "plaster/v1/lab/d/telemetry", &[2u8][..])
        );
        assert!(!dir.path().join("00000000000000000099.tmp").exists());
        let mut spool = spool;
        assert_eq!(
            spool.push(RecordKind::Telemetry, "t", b"next").unwrap(),
            Pushed::Stored(6)
        );
    }

    #[test]
    fn when_full_the_oldest_telemetry_goes_never_events() {
        let dir = tempfile::tempdir().unwrap();
        let record = (MAGIC.len() + 2 + 1 + 100) as u64;
        let mut spool = Spool::open(dir.path(), record * 4).unwrap();
        spool
            .push(RecordKind::Telemetry, "t", &payload(100))
            .unwrap(); // 1
        spool.push(RecordKind::Event, "e", &payload(100)).unwrap(); // 2
        spool
            .push(RecordKind::Telemetry, "t", &payload(100))
            .unwrap(); // 3
        spool.push(RecordKind::Event, "e", &payload(100)).unwrap(); // 4
        spool
            .push(RecordKind::Telemetry, "t", &payload(100))
            .unwrap(); // 5 drops 1
        assert_eq!(spool.ids(), vec![2, 3, 4, 5]);
        assert_eq!(spool.dropped(), 1);
        spool.push(RecordKind::Event, "e", &payload(100)).unwrap(); // 6 drops 3
        spool.push(RecordKind::Event, "e", &payload(100)).unwrap(); // 7 drops 5
        assert_eq!(spool.ids(), vec![2, 4, 6, 7]);
        // Only events left: telemetry has no room, events still go in past the bound.
        assert_eq!(
            spool
                .push(RecordKind::Telemetry, "t", &payload(100))
                .unwrap(),
            Pushed::Dropped
        );
        assert_eq!(
            spool.push(RecordKind::Event, "e", &payload(100)).unwrap(),
            Pushed::Stored(8)
        );
        assert_eq!(spool.dropped(), 4);
        drop(spool);
        assert_eq!(
            Spool::open(dir.path(), record * 4).unwrap().dropped(),
            4,
            "the drop count is persisted"
        );
    }
}
