// SPDX-License-Identifier: MIT
//! The latched key on disk: `<stateDir>/keys/<guid>.key` (MSP §2.1), with this project's
//! hardening (§11 item 6): the directory is 0700 and never a symlink; the file is created
//! 0600 with `O_EXCL|O_NOFOLLOW` under a temporary name, synced and renamed into place, then
//! re-read and compared; reading refuses symlinks, non-regular files, files other users can
//! read or write, files not owned by us, and files whose content names another key (a
//! rolled-back or swapped file).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::key_doc::{KEY_DOC_MAX_BYTES, KeyDoc};

/// Why a key could not be stored or loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyStoreError {
    /// The guid is not a plain identifier (it names the file: no path tricks).
    BadGuid,
    /// The keys directory could not be created or is unsafe (symlink, not ours, too open).
    UnsafeDirectory,
    /// Creating, writing or renaming the file failed.
    Write(std::io::ErrorKind),
    /// The file is missing.
    Missing,
    /// The file is a symlink, not regular, not ours, or readable by others.
    UnsafeFile,
    /// The file could not be read or parsed.
    Read,
    /// The file's content names another key than its name, or differs from what was written.
    Mismatch,
}

impl core::fmt::Display for KeyStoreError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadGuid => f.write_str("key guid is not a plain identifier"),
            Self::UnsafeDirectory => f.write_str("keys directory is unsafe or cannot be created"),
            Self::Write(k) => write!(f, "writing the key file failed: {k}"),
            Self::Missing => f.write_str("key file missing"),
            Self::UnsafeFile => f.write_str("key file is a symlink, not regular, not root-owned or not 0600"),
            Self::Read => f.write_str("key file unreadable or not a key document"),
            Self::Mismatch => f.write_str("key file does not hold the expected key"),
        }
    }
}

/// The keys directory.
#[derive(Clone, Debug)]
pub struct KeyStore {
    dir: PathBuf,
}

fn valid_guid(guid: &str) -> bool {
    !guid.is_empty() && guid.len() <= 64 && guid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl KeyStore {
    /// `<state_dir>/keys`.
    pub fn new(state_dir: &Path) -> Self {
        Self { dir: state_dir.join("keys") }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory 0700 if needed and checks it is safe to use.
    pub fn ensure_dir(&self) -> Result<(), KeyStoreError> {
        if let Some(parent) = self.dir.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(|_io| KeyStoreError::UnsafeDirectory)?;
        }
        match fs::DirBuilder::new().mode(0o700).create(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(_) => return Err(KeyStoreError::UnsafeDirectory),
        }
        let meta = fs::symlink_metadata(&self.dir).map_err(|_io| KeyStoreError::UnsafeDirectory)?;
        if !meta.is_dir() || meta.uid() != crate::sys::geteuid() {
            return Err(KeyStoreError::UnsafeDirectory);
        }
        if meta.mode() & 0o077 != 0 {
            fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
                .map_err(|_io| KeyStoreError::UnsafeDirectory)?;
        }
        Ok(())
    }

    fn path(&self, guid: &str, ext: &str) -> Result<PathBuf, KeyStoreError> {
        if !valid_guid(guid) {
            return Err(KeyStoreError::BadGuid);
        }
        Ok(self.dir.join(format!("{guid}.{ext}")))
    }

    /// Writes the key atomically and verifies it by reading it back (§2.3 steps 3–4).
    pub fn save(&self, doc: &KeyDoc) -> Result<(), KeyStoreError> {
        self.ensure_dir()?;
        let tmp = self.path(&doc.guid, "tmp")?;
        let dst = self.path(&doc.guid, "key")?;
        let mut json = [0u8; KEY_DOC_MAX_BYTES];
        let len = doc.to_json(&mut json).map_err(|_io| KeyStoreError::Write(std::io::ErrorKind::InvalidData))?;
        // A leftover temp file (crash mid-write) is removed; remove_file never follows links.
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(KeyStoreError::Write(e.kind())),
        }
        let write = || -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)?;
            file.write_all(&json[..len])?;
            file.sync_all()?;
            fs::rename(&tmp, &dst)?;
            File::open(&self.dir)?.sync_all()
        };
        if let Err(e) = write() {
            drop(fs::remove_file(&tmp));
            return Err(KeyStoreError::Write(e.kind()));
        }
        let back = self.load(&doc.guid)?;
        if back.same_key(doc) { Ok(()) } else { Err(KeyStoreError::Mismatch) }
    }

    /// Loads `<guid>.key`, refusing anything unsafe or naming another key.
    pub fn load(&self, guid: &str) -> Result<KeyDoc, KeyStoreError> {
        let path = self.path(guid, "key")?;
        let mut file = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(KeyStoreError::Missing),
            // ELOOP: the final component is a symlink.
            Err(_) => return Err(KeyStoreError::UnsafeFile),
        };
        let meta = file.metadata().map_err(|_io| KeyStoreError::Read)?;
        if !meta.is_file() || meta.uid() != crate::sys::geteuid() || meta.mode() & 0o077 != 0 {
            return Err(KeyStoreError::UnsafeFile);
        }
        let mut buf = [0u8; KEY_DOC_MAX_BYTES];
        let mut n = 0;
        loop {
            match file.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(_) => return Err(KeyStoreError::Read),
            }
            if n == buf.len() {
                return Err(KeyStoreError::Read);
            }
        }
        let doc = KeyDoc::parse(&buf[..n]).map_err(|_io| KeyStoreError::Read)?;
        if doc.guid.as_str() != guid {
            return Err(KeyStoreError::Mismatch);
        }
        Ok(doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &[u8] = br#"{"authorizationScheme":"Azure-HMAC-SHA256","guid":"9cf81e97-0316-4ad3-94a7-8ccbdee8ccbf","issued":"x","key":"4A404E635266556A586E3272357538782F413F4428472B4B6250645367566B59"}"#;

    fn temp_state() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("gpa-keystore-{}-{:?}", std::process::id(), std::thread::current().id()));
        drop(fs::remove_dir_all(&dir));
        dir
    }

    #[test]
    fn save_then_load_round_trips_with_safe_modes() {
        let state = temp_state();
        let store = KeyStore::new(&state);
        let doc = KeyDoc::parse(DOC).unwrap();
        store.save(&doc).unwrap();
        let file = store.dir().join("9cf81e97-0316-4ad3-94a7-8ccbdee8ccbf.key");
        assert_eq!(fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(store.dir()).unwrap().mode() & 0o777, 0o700);
        assert!(store.load(&doc.guid).unwrap().same_key(&doc));
        fs::remove_dir_all(&state).unwrap();
    }

    #[test]
    fn refuses_symlinks_open_modes_renamed_files_and_path_guids() {
        let state = temp_state();
        let store = KeyStore::new(&state);
        let doc = KeyDoc::parse(DOC).unwrap();
        store.save(&doc).unwrap();
        let real = store.dir().join("9cf81e97-0316-4ad3-94a7-8ccbdee8ccbf.key");
        // A copy under another guid's name (a swapped or rolled-back file) is refused.
        let other = store.dir().join("aaaaaaaa-0316-4ad3-94a7-8ccbdee8ccbf.key");
        fs::copy(&real, &other).unwrap();
        fs::set_permissions(&other, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(store.load("aaaaaaaa-0316-4ad3-94a7-8ccbdee8ccbf").unwrap_err(), KeyStoreError::Mismatch);
        // A symlink is never followed.
        let link = store.dir().join("bbbbbbbb-0316-4ad3-94a7-8ccbdee8ccbf.key");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(store.load("bbbbbbbb-0316-4ad3-94a7-8ccbdee8ccbf").unwrap_err(), KeyStoreError::UnsafeFile);
        // A group-readable file is refused.
        fs::set_permissions(&real, fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(store.load(&doc.guid).unwrap_err(), KeyStoreError::UnsafeFile);
        assert_eq!(store.load("../../etc/passwd").unwrap_err(), KeyStoreError::BadGuid);
        assert_eq!(store.load("cccccccc").unwrap_err(), KeyStoreError::Missing);
        fs::remove_dir_all(&state).unwrap();
    }
}
