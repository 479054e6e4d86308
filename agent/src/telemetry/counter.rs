//! A counter persisted in the state directory (telemetry `seq`, MQTT `session_seq`): written
//! to a temporary file, fsynced, renamed over the old one and the directory fsynced, so after a
//! crash or power loss the file holds either the old or the new value, never a torn one.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("state file {}: {message}", path.display())]
pub struct CounterError {
    pub path: PathBuf,
    pub message: String,
}

#[derive(Debug)]
pub struct PersistentCounter {
    path: PathBuf,
    value: u64,
}

impl PersistentCounter {
    /// Opens the counter at `path`; a missing file is 0, an unreadable one an error (a
    /// restarted counter would repeat sequence numbers dashboards already saw).
    pub fn open(path: &Path) -> Result<PersistentCounter, CounterError> {
        let error = |message: String| CounterError {
            path: path.to_path_buf(),
            message,
        };
        let value = match fs::read_to_string(path) {
            Ok(text) => text.trim().parse::<u64>().map_err(|_| {
                error(format!(
                    "holds {:?}, not a counter; remove it to restart the count at 0",
                    text.trim()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(error(e.to_string())),
        };
        Ok(PersistentCounter {
            path: path.to_path_buf(),
            value,
        })
    }

    pub fn get(&self) -> u64 {
        self.value
    }

    /// Stores `value` durably before returning.
    pub fn set(&mut self, value: u64) -> Result<(), CounterError> {
        let tmp = self.path.with_extension("tmp");
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let result = (|| {
            let mut file = File::create(&tmp)?;
            writeln!(file, "{value}")?;
            file.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            File::open(dir)?.sync_all()
        })();
        result.map_err(|e| CounterError {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        self.value = value;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("telemetry.seq");
        let mut counter = PersistentCounter::open(&path).unwrap();
        assert_eq!(counter.get(), 0);
        counter.set(41).unwrap();
        counter.set(42).unwrap();
        assert_eq!(PersistentCounter::open(&path).unwrap().get(), 42);
        assert!(!path.with_extension("tmp").exists());
        fs::write(&path, "forty-two").unwrap();
        assert_eq!(
            PersistentCounter::open(&path).unwrap_err().to_string(),
            format!(
                "state file {}: holds \"forty-two\", not a counter; remove it to restart the count at 0",
                path.display()
            )
        );
    }
}
