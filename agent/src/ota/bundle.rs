//! Model bundles (PROTOCOL.md "Model bundle"): an uncompressed tar of at most these members,
//! at its root: `model.onnx` (required), `dataset.npz`, `labels.txt`, `bundle.toml`. Any other
//! member, a path with a directory part, a link or a device node makes the bundle invalid.
//!
//! Unpacking never trusts the archive: each member is checked before a byte of it is written,
//! files are created new (never followed through a link) inside a directory only this module
//! made, and their sizes are capped by the bundle's verified size.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// The members a bundle may hold, in the order `push` writes them.
pub const MEMBERS: [&str; 4] = ["model.onnx", "dataset.npz", "labels.txt", "bundle.toml"];
pub const MODEL_MEMBER: &str = "model.onnx";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The archive breaks the bundle rules; the message says which member and why.
    #[error("bundle: {0}")]
    Invalid(String),
    /// Writing the unpacked files failed (the disk, not the bundle).
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

fn invalid(message: impl Into<String>) -> BundleError {
    BundleError::Invalid(message.into())
}

/// Unpacks the bundle `tar` into `dest` (created here; it must not exist) and returns the
/// members written. `max_bytes` caps the sum of member sizes.
pub fn unpack(tar_path: &Path, dest: &Path, max_bytes: u64) -> Result<Vec<String>, BundleError> {
    let file = File::open(tar_path).map_err(|source| BundleError::Io {
        path: tar_path.to_path_buf(),
        source,
    })?;
    fs::create_dir(dest).map_err(|source| BundleError::Io {
        path: dest.to_path_buf(),
        source,
    })?;
    let result = unpack_into(file, dest, max_bytes);
    if result.is_err() {
        let _ = fs::remove_dir_all(dest);
    }
    result
}

/// Reads a bundle from `reader` and checks every member, writing them into `dest` when given
/// (`None`: only check, as the fuzz tests do).
pub fn unpack_into(
    reader: impl Read,
    dest: &Path,
    max_bytes: u64,
) -> Result<Vec<String>, BundleError> {
    unpack_checked(reader, Some(dest), max_bytes)
}

pub fn check(reader: impl Read, max_bytes: u64) -> Result<Vec<String>, BundleError> {
    unpack_checked(reader, None, max_bytes)
}

fn unpack_checked(
    reader: impl Read,
    dest: Option<&Path>,
    max_bytes: u64,
) -> Result<Vec<String>, BundleError> {
    let mut archive = tar::Archive::new(reader);
    let mut seen: Vec<String> = Vec::new();
    let mut total = 0u64;
    let entries = archive
        .entries()
        .map_err(|e| invalid(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| invalid(format!("not a tar archive: {e}")))?;
        let raw = entry.path_bytes();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        if !MEMBERS.contains(&name.as_str()) {
            return Err(invalid(
                if name.contains('/') || name == ".." || name == "." {
                    format!("member {name:?} not allowed (members sit at the root, without directories)")
                } else {
                    format!(
                        "member {name:?} not allowed (allowed: {})",
                        MEMBERS.join(", ")
                    )
                },
            ));
        }
        if !kind.is_file() {
            let what = if kind.is_symlink() {
                "a symbolic link"
            } else if kind.is_hard_link() {
                "a hard link"
            } else if kind.is_character_special() || kind.is_block_special() {
                "a device node"
            } else if kind.is_dir() {
                "a directory"
            } else {
                "not a regular file"
            };
            return Err(invalid(format!(
                "member {name:?} is {what}; only regular files are allowed"
            )));
        }
        if seen.contains(&name) {
            return Err(invalid(format!("member {name:?} appears twice")));
        }
        let size = entry.size();
        total = total.saturating_add(size);
        if total > max_bytes {
            return Err(invalid(format!(
                "members add up to more than {max_bytes} bytes"
            )));
        }
        match dest {
            Some(dest) => write_member(&mut entry, &dest.join(&name), size)?,
            None => {
                io::copy(&mut entry, &mut io::sink())
                    .map_err(|e| invalid(format!("member {name:?}: {e}")))?;
            }
        }
        seen.push(name);
    }
    if !seen.iter().any(|m| m == MODEL_MEMBER) {
        return Err(invalid(format!(
            "no {MODEL_MEMBER} (a bundle needs one at its root)"
        )));
    }
    Ok(seen)
}

fn write_member(entry: &mut impl Read, path: &Path, size: u64) -> Result<(), BundleError> {
    let io = |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io)?;
    let copied = io::copy(&mut entry.take(size), &mut out).map_err(io)?;
    if copied != size {
        return Err(invalid(format!(
            "member {:?} ends early ({copied} of {size} bytes)",
            path.file_name().unwrap_or_default()
        )));
    }
    out.sync_all().map_err(io)
}

/// Builds a bundle (tar bytes) from `(member, contents)` pairs, as `push` sends it: regular
/// files, mode 0644, owner 0, time 0, so the same inputs give the same bytes (and SHA-256).
pub fn build(members: &[(&str, Vec<u8>)]) -> Result<Vec<u8>, BundleError> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, contents) in members {
        if !MEMBERS.contains(name) {
            return Err(invalid(format!(
                "member {name:?} not allowed (allowed: {})",
                MEMBERS.join(", ")
            )));
        }
        let mut header = tar::Header::new_ustar();
        header.set_size(contents.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, name, contents.as_slice())
            .map_err(|e| invalid(format!("member {name:?}: {e}")))?;
    }
    builder
        .into_inner()
        .map_err(|e| invalid(format!("finishing the archive: {e}")))
}

/// fsyncs a directory, so the names created or renamed in it survive a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A raw tar entry with any name and type, as a hostile sender would write it (the
    /// `tar` crate's builder refuses some of these names).
    pub fn raw_entry(name: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>) -> Vec<u8> {
        let mut header = tar::Header::new_gnu();
        {
            let gnu = header.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        }
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(kind);
        if let Some(link) = link {
            header.set_link_name(link).unwrap();
        }
        header.set_cksum();
        let mut out = header.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    pub fn archive(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut out: Vec<u8> = entries.concat();
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    fn check_bundle(tar: &[u8], expected: Result<Vec<&str>, &str>) {
        let got = check(tar, 1 << 20).map_err(|e| e.to_string());
        assert_eq!(
            got,
            expected
                .map(|m| m.iter().map(|s| s.to_string()).collect())
                .map_err(str::to_string)
        );
    }

    #[test]
    fn a_built_bundle_unpacks_to_the_same_files() {
        let tar = build(&[
            ("model.onnx", b"onnx".to_vec()),
            ("labels.txt", b"a\nb\n".to_vec()),
        ])
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("v1");
        let tar_path = dir.path().join("b.tar");
        fs::write(&tar_path, &tar).unwrap();
        assert_eq!(
            unpack(&tar_path, &dest, 1 << 20).unwrap(),
            vec!["model.onnx", "labels.txt"]
        );
        assert_eq!(fs::read(dest.join("model.onnx")).unwrap(), b"onnx");
        assert_eq!(fs::read(dest.join("labels.txt")).unwrap(), b"a\nb\n");
        // Deterministic: the same inputs give the same bytes.
        assert_eq!(
            tar,
            build(&[
                ("model.onnx", b"onnx".to_vec()),
                ("labels.txt", b"a\nb\n".to_vec())
            ])
            .unwrap()
        );
    }

    #[test]
    fn hostile_bundles_are_refused_with_the_member_at_fault() {
        use tar::EntryType as T;
        let model = raw_entry("model.onnx", T::Regular, b"onnx", None);
        check_bundle(
            &archive(std::slice::from_ref(&model)),
            Ok(vec!["model.onnx"]),
        );
        check_bundle(
            &archive(&[model.clone(), raw_entry("../x", T::Regular, b"x", None)]),
            Err("bundle: member \"../x\" not allowed (members sit at the root, without directories)"),
        );
        check_bundle(
            &archive(&[raw_entry("/etc/passwd", T::Regular, b"x", None), model.clone()]),
            Err("bundle: member \"/etc/passwd\" not allowed (members sit at the root, without directories)"),
        );
        check_bundle(
            &archive(&[
                model.clone(),
                raw_entry("labels.txt", T::Symlink, b"", Some("/etc/passwd")),
            ]),
            Err("bundle: member \"labels.txt\" is a symbolic link; only regular files are allowed"),
        );
        check_bundle(
            &archive(&[
                model.clone(),
                raw_entry("labels.txt", T::Link, b"", Some("model.onnx")),
            ]),
            Err("bundle: member \"labels.txt\" is a hard link; only regular files are allowed"),
        );
        check_bundle(
            &archive(&[model.clone(), raw_entry("dataset.npz", T::Char, b"", None)]),
            Err("bundle: member \"dataset.npz\" is a device node; only regular files are allowed"),
        );
        check_bundle(
            &archive(&[model.clone(), raw_entry("extra.bin", T::Regular, b"x", None)]),
            Err("bundle: member \"extra.bin\" not allowed (allowed: model.onnx, dataset.npz, labels.txt, bundle.toml)"),
        );
        check_bundle(
            &archive(&[raw_entry("labels.txt", T::Regular, b"x", None)]),
            Err("bundle: no model.onnx (a bundle needs one at its root)"),
        );
        check_bundle(
            &archive(&[model.clone(), model.clone()]),
            Err("bundle: member \"model.onnx\" appears twice"),
        );
        check_bundle(
            &archive(&[raw_entry("model.onnx", T::Regular, &vec![0; 2 << 20], None)]),
            Err("bundle: members add up to more than 1048576 bytes"),
        );
    }

    #[test]
    fn unpacking_a_bad_bundle_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let tar_path = dir.path().join("b.tar");
        fs::write(
            &tar_path,
            archive(&[
                raw_entry("model.onnx", tar::EntryType::Regular, b"onnx", None),
                raw_entry("../x", tar::EntryType::Regular, b"x", None),
            ]),
        )
        .unwrap();
        let dest = dir.path().join("v1");
        assert!(unpack(&tar_path, &dest, 1 << 20).is_err());
        assert!(!dest.exists());
        assert!(!dir.path().join("x").exists());
    }
}

/// Bounded fuzzing of the tar reader: mutated bundles never panic, never yield a member
/// outside the allowed names, and never exceed the size cap.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        #[test]
        fn mutated_bundles(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
            let mut tar = build(&[("model.onnx", vec![7; 700]), ("labels.txt", b"a\n".to_vec())]).unwrap();
            for (at, value) in flips {
                let len = tar.len();
                // Mostly the headers, where the structure is.
                let at = if at % 4 == 0 { at % len } else { at % 512 + (at / 512 % 3) * 512 * ((at % 2) + 1) % len };
                tar[at % len] = value;
            }
            tar.truncate(cut % (tar.len() + 1));
            if let Ok(members) = check(tar.as_slice(), 4096) {
                prop_assert!(members.iter().all(|m| MEMBERS.contains(&m.as_str())));
                prop_assert!(members.iter().any(|m| m == MODEL_MEMBER));
            }
        }
    }
}
