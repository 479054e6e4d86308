//! The on-disk model store in `state_dir/models`: one directory per installed version
//! (`<name>-v<version>`, the unpacked bundle plus `release.json`), and `active`, a symbolic link
//! to the one that runs. The default `model.path` is this link.
//!
//! Durability: a version directory is complete (files fsynced, renamed into place from a
//! staging name, the directory fsynced) before `active` can point at it; `active` is replaced
//! by creating a new link and renaming it over the old one, then fsyncing the directory. A
//! crash at any point leaves `active` naming either the old version or the new one, never a
//! half-written one. An update never writes into the directory of the active version.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::bundle::{sync_dir, write_synced};

/// The link to the active version.
pub const ACTIVE_LINK: &str = "active";
/// What a version directory says about itself.
pub const RELEASE_FILE: &str = "release.json";
/// Staging names start with this; a crash leaves them behind and the next start removes them.
const STAGING_PREFIX: &str = ".staging-";

/// An installed version, as `release.json` records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub name: String,
    pub version: u64,
    /// SHA-256 of the bundle as pushed (hex).
    pub bundle_sha256: String,
    /// SHA-256 of its `model.onnx` (hex): what status and telemetry call the model's sha256.
    #[serde(default)]
    pub model_sha256: String,
    pub installed_at: String,
}

impl Installed {
    /// How status and model state name this version.
    pub fn model_ref(&self) -> crate::telemetry::record::ModelRef {
        crate::telemetry::record::ModelRef {
            name: self.release.name.clone(),
            version: Some(self.release.version),
            sha256: self.release.model_sha256.clone(),
        }
    }
}

/// A version directory and its release.
#[derive(Clone, Debug, PartialEq)]
pub struct Installed {
    pub dir: PathBuf,
    pub release: Release,
}

pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating) the store under `state_dir/models` and removes staging left by a crash.
    pub fn open(state_dir: &Path) -> io::Result<Store> {
        let root = state_dir.join("models");
        fs::create_dir_all(&root)?;
        for entry in fs::read_dir(&root)? {
            let entry = entry?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(STAGING_PREFIX)
            {
                tracing::info!(
                    "removing {} left by an interrupted update",
                    entry.path().display()
                );
                fs::remove_dir_all(entry.path())?;
            }
        }
        Ok(Store { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of the `active` link (a model path the engine loads).
    pub fn active_path(&self) -> PathBuf {
        self.root.join(ACTIVE_LINK)
    }

    /// A fresh staging directory name for `version` (not created).
    pub fn staging_dir(&self, release: &Release) -> PathBuf {
        self.root.join(format!(
            "{STAGING_PREFIX}{}-v{}",
            release.name, release.version
        ))
    }

    fn version_dir(&self, release: &Release) -> PathBuf {
        self.root
            .join(format!("{}-v{}", release.name, release.version))
    }

    /// Makes the staged directory (the unpacked bundle) a complete installed version: writes
    /// its `release.json`, fsyncs, renames it into place. An older install of the same version
    /// (a rolled-back one pushed again) is replaced.
    pub fn install(&self, staged: &Path, mut release: Release) -> io::Result<Installed> {
        release.model_sha256 = sha256_file(&staged.join(super::bundle::MODEL_MEMBER))?;
        let json = serde_json::to_vec_pretty(&release).expect("release serializes");
        write_synced(&staged.join(RELEASE_FILE), &json)?;
        sync_dir(staged)?;
        let dir = self.version_dir(&release);
        if dir.exists() {
            if self.active().is_some_and(|a| a.dir == dir) {
                return Err(io::Error::other(format!(
                    "{} is the active version; an update never writes over it",
                    dir.display()
                )));
            }
            fs::remove_dir_all(&dir)?;
        }
        fs::rename(staged, &dir)?;
        sync_dir(&self.root)?;
        Ok(Installed { dir, release })
    }

    /// Points `active` at `installed`, atomically and durably.
    pub fn activate(&self, installed: &Installed) -> io::Result<()> {
        let target = installed
            .dir
            .file_name()
            .expect("version directories have names");
        let temporary = self.root.join(".active.new");
        let _ = fs::remove_file(&temporary);
        std::os::unix::fs::symlink(target, &temporary)?;
        fs::rename(&temporary, self.active_path())?;
        sync_dir(&self.root)
    }

    /// Removes `active`: the configured first model runs again.
    pub fn deactivate(&self) -> io::Result<()> {
        match fs::remove_file(self.active_path()) {
            Ok(()) => sync_dir(&self.root),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The active version, when an update has activated one.
    pub fn active(&self) -> Option<Installed> {
        let target = fs::read_link(self.active_path()).ok()?;
        read_installed(&self.root.join(target))
    }

    /// Every complete installed version, newest version first.
    pub fn installed(&self) -> Vec<Installed> {
        let mut all: Vec<Installed> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                !name.starts_with('.') && name != ACTIVE_LINK
            })
            .filter_map(|e| read_installed(&e.path()))
            .collect();
        all.sort_by_key(|i| std::cmp::Reverse(i.release.version));
        all
    }

    /// The versions kept for rollback: installed ones older than the active, newest first.
    pub fn previous(&self) -> Vec<Installed> {
        let active = self.active().map(|a| a.release.version);
        self.installed()
            .into_iter()
            .filter(|i| active.is_none_or(|v| i.release.version < v))
            .collect()
    }

    /// Removes installed versions beyond the `keep` newest previous ones, and any version
    /// newer than the active one (a rolled-back version is not kept).
    pub fn prune(&self, keep: usize) {
        let Some(active) = self.active() else { return };
        let kept: Vec<PathBuf> = self
            .previous()
            .into_iter()
            .take(keep)
            .map(|p| p.dir)
            .collect();
        for installed in self.installed() {
            if installed.dir != active.dir && !kept.contains(&installed.dir) {
                remove_version(&installed.dir);
            }
        }
    }

    /// Removes one installed version that is not active (a rolled-back one).
    pub fn remove(&self, installed: &Installed) {
        if self.active().is_none_or(|a| a.dir != installed.dir) {
            remove_version(&installed.dir);
        }
    }
}

/// Deletes a version directory; a failure leaves a stale directory behind, which only costs
/// space, so it is logged, not raised.
fn remove_version(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir) {
        tracing::warn!("removing {}: {e}", dir.display());
    }
}

fn sha256_file(path: &Path) -> io::Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    io::copy(&mut fs::File::open(path)?, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// The release of a version directory; `None` for anything incomplete.
pub fn read_installed(dir: &Path) -> Option<Installed> {
    let bytes = fs::read(dir.join(RELEASE_FILE)).ok()?;
    let release: Release = serde_json::from_slice(&bytes).ok()?;
    Some(Installed {
        dir: dir.to_path_buf(),
        release,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(version: u64) -> Release {
        Release {
            name: "digits".into(),
            version,
            bundle_sha256: "00".into(),
            model_sha256: String::new(),
            installed_at: "2026-11-27T00:00:00Z".into(),
        }
    }

    fn install(store: &Store, version: u64) -> Installed {
        let staged = store.staging_dir(&release(version));
        fs::create_dir(&staged).unwrap();
        fs::write(staged.join("model.onnx"), format!("v{version}")).unwrap();
        store.install(&staged, release(version)).unwrap()
    }

    #[test]
    fn activation_moves_the_link_and_keeps_previous_versions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.active(), None);
        let v1 = install(&store, 1);
        store.activate(&v1).unwrap();
        let v2 = install(&store, 2);
        assert_eq!(
            store.active().unwrap().release.version,
            1,
            "installing is not activating"
        );
        store.activate(&v2).unwrap();
        assert_eq!(store.active().unwrap().release.version, 2);
        assert_eq!(
            fs::read_to_string(store.active_path().join("model.onnx")).unwrap(),
            "v2"
        );
        for v in 3..=5 {
            let installed = install(&store, v);
            store.activate(&installed).unwrap();
        }
        store.prune(2);
        let kept: Vec<u64> = store
            .installed()
            .iter()
            .map(|i| i.release.version)
            .collect();
        assert_eq!(kept, vec![5, 4, 3]);
        assert_eq!(
            store
                .previous()
                .iter()
                .map(|i| i.release.version)
                .collect::<Vec<_>>(),
            vec![4, 3]
        );
        // Rollback: the previous version becomes active; the rolled-back one is removed.
        let back = store.previous().remove(0);
        let rolled_back = store.active().unwrap();
        store.activate(&back).unwrap();
        store.remove(&rolled_back);
        assert_eq!(store.active().unwrap().release.version, 4);
        assert_eq!(
            store
                .installed()
                .iter()
                .map(|i| i.release.version)
                .collect::<Vec<_>>(),
            vec![4, 3]
        );
        store.deactivate().unwrap();
        assert_eq!(store.active(), None);
    }

    #[test]
    fn staging_left_by_a_crash_is_removed_and_never_active() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let staged = store.staging_dir(&release(7));
        fs::create_dir(&staged).unwrap();
        fs::write(staged.join("model.onnx"), "half").unwrap();
        assert!(store.installed().is_empty());
        let store = Store::open(dir.path()).unwrap();
        assert!(!staged.exists());
        assert!(store.installed().is_empty());
    }
}
