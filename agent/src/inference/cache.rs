//! Decluttered models cached as NNEF archives, so a restart or a second plan skips ONNX type
//! inference and declutter (the slow part of loading a large model).
//!
//! An entry is keyed by the ONNX file's sha256, the batch its inputs were fixed to and the
//! tract version that wrote it: `<sha256>-b<batch>-tract<version>.nnef.tar`. It holds tract's
//! decluttered graph, before our rewrites: those run after every load (milliseconds), so a
//! change to them never meets a stale cache. A cache that cannot be read or written is
//! skipped with a warning, never an error: it only ever saves time.

use std::fs;
use std::path::PathBuf;

use tract_onnx::prelude::*;
use tract_onnx::WithOnnx;

/// The tract release the agent is built with (`Cargo.lock`; a unit test keeps them equal).
pub const TRACT_VERSION: &str = "0.23.9";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelCache {
    dir: PathBuf,
}

impl ModelCache {
    pub fn new(dir: impl Into<PathBuf>) -> ModelCache {
        ModelCache { dir: dir.into() }
    }

    /// Where the entry of a model at `batch` lives.
    pub fn entry(&self, sha256: &str, batch: usize) -> PathBuf {
        self.dir
            .join(format!("{sha256}-b{batch}-tract{TRACT_VERSION}.nnef.tar"))
    }

    fn nnef() -> tract_nnef::framework::Nnef {
        tract_nnef::nnef().with_onnx()
    }

    /// The cached model, or `None` when there is none (or it is unreadable: then it is removed
    /// so the next store replaces it).
    pub fn load(&self, sha256: &str, batch: usize) -> Option<TypedModel> {
        let path = self.entry(sha256, batch);
        if !path.is_file() {
            return None;
        }
        // NNEF spells some ops its own way (pooling, padding): declutter brings the graph back
        // to the form tract's runtimes and our rewrites expect.
        match Self::nnef()
            .model_for_path(&path)
            .and_then(|model| model.into_decluttered())
        {
            Ok(model) => Some(model),
            Err(e) => {
                tracing::warn!(path = %path.display(), "cached model unreadable, removed: {e:#}");
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Writes `model` as the entry (a temporary file renamed into place, so a reader never
    /// sees half an archive).
    pub fn store(&self, sha256: &str, batch: usize, model: &TypedModel) {
        let path = self.entry(sha256, batch);
        let temp = path.with_extension(format!("tmp{}", std::process::id()));
        let result = (|| -> anyhow::Result<()> {
            fs::create_dir_all(&self.dir)?;
            let file = fs::File::create(&temp)?;
            let file = Self::nnef().write_to_tar(model, file)?;
            file.sync_all()?;
            fs::rename(&temp, &path)?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&temp);
            tracing::warn!(path = %path.display(), "model not cached: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tract_version_matches_the_lock_file() {
        let lock = include_str!("../../../Cargo.lock");
        let needle = "name = \"tract-core\"\nversion = \"";
        let at = lock.find(needle).expect("tract-core in Cargo.lock") + needle.len();
        let version = &lock[at..at + lock[at..].find('"').unwrap()];
        assert_eq!(version, TRACT_VERSION);
    }
}
