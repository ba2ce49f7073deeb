// SPDX-License-Identifier: MIT
//! Writes `<logDir>/status.json` atomically (MSP §6.4, §11 item 10): the document goes to
//! `status.json.tmp`, is synced, and is renamed over `status.json`, so a reader sees the old
//! file or the new one, never a partial one.
//!
//! Nothing is ever written through a symlink. The temporary file is opened with `O_NOFOLLOW`
//! (a symlink planted there fails with `ELOOP` and is reported, not followed), and only a
//! regular file with a single link is truncated (a hard link planted there would otherwise
//! let the agent overwrite another file). `rename(2)` replaces a symlink at `status.json`
//! itself rather than following it. The file is mode 0640 whatever the umask or an earlier
//! file's mode; the log directory is created 0755 when missing.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use heapless::String;

use super::document::ModuleStatus;

/// The status file's name in the log directory.
pub const STATUS_FILE_NAME: &str = "status.json";
/// The temporary file renamed over it.
pub const STATUS_TMP_NAME: &str = "status.json.tmp";
/// Owner read/write, group read: the document names users and command lines (redacted), so
/// it is not world-readable.
pub const STATUS_FILE_MODE: u32 = 0o640;
/// Mode of a log directory the writer creates.
pub const LOG_DIR_MODE: u32 = 0o755;
/// Longest monitor message kept (the report cuts at 1024 bytes anyway).
const MONITOR_MESSAGE_MAX_BYTES: usize = 1024;

/// Why the status file could not be written.
#[derive(Debug)]
pub enum WriteError {
    /// The log directory could not be created, or is not a directory.
    CreateDirectory(io::Error),
    /// The temporary file could not be opened.
    OpenTemp(io::Error),
    /// The temporary path is a symlink, or not a regular file with one link; refused.
    UnsafeTemp,
    /// Writing or syncing the temporary file failed.
    Write(io::Error),
    /// Renaming it into place failed.
    Rename(io::Error),
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CreateDirectory(e) => write!(f, "cannot create the log directory: {e}"),
            Self::OpenTemp(e) => write!(f, "cannot open {STATUS_TMP_NAME}: {e}"),
            Self::UnsafeTemp => write!(f, "{STATUS_TMP_NAME} is a symlink or not a plain file; refused"),
            Self::Write(e) => write!(f, "cannot write {STATUS_TMP_NAME}: {e}"),
            Self::Rename(e) => write!(f, "cannot rename {STATUS_TMP_NAME} to {STATUS_FILE_NAME}: {e}"),
        }
    }
}

impl std::error::Error for WriteError {}

/// Writes `json` to `<dir>/status.json` atomically (see the module docs).
pub fn write_atomic(dir: &Path, json: &[u8]) -> Result<(), WriteError> {
    ensure_dir(dir)?;
    let tmp = dir.join(STATUS_TMP_NAME);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .mode(STATUS_FILE_MODE)
        // O_NONBLOCK: a FIFO planted at the path fails at once instead of blocking the loop.
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&tmp)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) { WriteError::UnsafeTemp } else { WriteError::OpenTemp(e) }
        })?;
    let meta = file.metadata().map_err(WriteError::OpenTemp)?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Err(WriteError::UnsafeTemp);
    }
    // O_TRUNC, once the file is known to be ours alone.
    file.set_len(0).map_err(WriteError::Write)?;
    if meta.mode() & 0o7777 != STATUS_FILE_MODE {
        file.set_permissions(fs::Permissions::from_mode(STATUS_FILE_MODE)).map_err(WriteError::Write)?;
    }
    file.write_all(json).map_err(WriteError::Write)?;
    file.sync_all().map_err(WriteError::Write)?;
    drop(file);
    fs::rename(&tmp, dir.join(STATUS_FILE_NAME)).map_err(WriteError::Rename)?;
    // The rename itself is durable once the directory is synced; a failure here only risks
    // the previous version after a crash.
    if let Ok(d) = File::open(dir) {
        drop(d.sync_all());
    }
    Ok(())
}

fn ensure_dir(dir: &Path) -> Result<(), WriteError> {
    match fs::DirBuilder::new().recursive(true).mode(LOG_DIR_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(WriteError::CreateDirectory(e)),
    }
    let meta = fs::metadata(dir).map_err(WriteError::CreateDirectory)?;
    if meta.is_dir() { Ok(()) } else { Err(WriteError::CreateDirectory(io::Error::from(io::ErrorKind::NotADirectory))) }
}

/// The status writer (`monitorStatus` of the report): writes the file and remembers how the
/// last write went.
#[derive(Debug)]
pub struct StatusWriter {
    dir: PathBuf,
    message: String<MONITOR_MESSAGE_MAX_BYTES>,
    /// Successful writes.
    pub writes: u64,
    /// Failed writes.
    pub failures: u64,
}

impl StatusWriter {
    /// A writer for `<log_dir>/status.json`; nothing is touched until [`Self::write`].
    pub fn new(log_dir: &Path) -> Self {
        let mut message = String::new();
        message.push_str("Proxy agent status is running.").ok();
        Self { dir: log_dir.to_owned(), message, writes: 0, failures: 0 }
    }

    /// `<log_dir>/status.json`.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STATUS_FILE_NAME)
    }

    /// Writes `json` (a rendered document) and updates the monitor message (MSP §6.1 wording).
    pub fn write(&mut self, json: &[u8]) -> Result<(), WriteError> {
        use core::fmt::Write as _;
        let result = write_atomic(&self.dir, json);
        self.message.clear();
        // Overflow only shortens the message.
        match &result {
            Ok(()) => {
                self.writes += 1;
                write!(self.message, "Aggregate status written to status file: {}", self.path().display()).ok();
            }
            Err(e) => {
                self.failures += 1;
                write!(self.message, "Error writing aggregate status to status file: {}: {e}", self.path().display())
                    .ok();
            }
        }
        result
    }

    /// `monitorStatus`: running (this code is what reports it), with the last outcome.
    pub fn monitor(&self) -> ModuleStatus<'_> {
        ModuleStatus::running(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("gpa-status-writer-{name}-{}", std::process::id()));
        drop(fs::remove_dir_all(&d));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn writes_atomically_with_mode_0640_and_creates_the_directory_0755() {
        let root = tmpdir("basic");
        let dir = root.join("log/guest-proxy-agent");
        let mut w = StatusWriter::new(&dir);
        assert_eq!(w.monitor().message, "Proxy agent status is running.");
        w.write(b"{\"a\":1}").unwrap();
        assert_eq!(fs::read(dir.join(STATUS_FILE_NAME)).unwrap(), b"{\"a\":1}");
        assert_eq!(mode(&dir.join(STATUS_FILE_NAME)), 0o640);
        assert_eq!(mode(&dir) & 0o022, 0, "not writable by others");
        assert!(!dir.join(STATUS_TMP_NAME).exists(), "the temp file is renamed away");
        // A shorter second document replaces the first completely.
        w.write(b"{}").unwrap();
        assert_eq!(fs::read(dir.join(STATUS_FILE_NAME)).unwrap(), b"{}");
        assert!(w.monitor().message.starts_with("Aggregate status written to status file: "));
        assert_eq!((w.writes, w.failures), (2, 0));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn fixes_the_mode_of_a_leftover_temp_file() {
        let dir = tmpdir("leftover");
        fs::write(dir.join(STATUS_TMP_NAME), b"partial garbage from a crash, longer than the document").unwrap();
        fs::set_permissions(dir.join(STATUS_TMP_NAME), fs::Permissions::from_mode(0o666)).unwrap();
        write_atomic(&dir, b"{}").unwrap();
        assert_eq!(fs::read(dir.join(STATUS_FILE_NAME)).unwrap(), b"{}");
        assert_eq!(mode(&dir.join(STATUS_FILE_NAME)), 0o640);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_symlink_at_the_temp_path_is_refused_not_followed() {
        let dir = tmpdir("tmplink");
        let victim = dir.join("victim");
        fs::write(&victim, b"precious").unwrap();
        symlink(&victim, dir.join(STATUS_TMP_NAME)).unwrap();
        let mut w = StatusWriter::new(&dir);
        assert!(matches!(w.write(b"{}"), Err(WriteError::UnsafeTemp)));
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(!dir.join(STATUS_FILE_NAME).exists());
        assert!(w.monitor().message.starts_with("Error writing aggregate status to status file: "));
        assert_eq!(w.failures, 1);
        // A dangling symlink is not followed either (O_CREAT would create its target).
        fs::remove_file(dir.join(STATUS_TMP_NAME)).unwrap();
        symlink(dir.join("created-through-link"), dir.join(STATUS_TMP_NAME)).unwrap();
        assert!(matches!(write_atomic(&dir, b"{}"), Err(WriteError::UnsafeTemp)));
        assert!(!dir.join("created-through-link").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_hard_link_at_the_temp_path_is_refused_not_truncated() {
        let dir = tmpdir("hardlink");
        let victim = dir.join("victim");
        fs::write(&victim, b"precious").unwrap();
        fs::hard_link(&victim, dir.join(STATUS_TMP_NAME)).unwrap();
        assert!(matches!(write_atomic(&dir, b"{}"), Err(WriteError::UnsafeTemp)));
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_symlink_at_the_final_path_is_replaced_not_followed() {
        let dir = tmpdir("finallink");
        let victim = dir.join("victim");
        fs::write(&victim, b"precious").unwrap();
        symlink(&victim, dir.join(STATUS_FILE_NAME)).unwrap();
        write_atomic(&dir, b"{}").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        let meta = fs::symlink_metadata(dir.join(STATUS_FILE_NAME)).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(fs::read(dir.join(STATUS_FILE_NAME)).unwrap(), b"{}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_log_path_that_is_a_file_is_an_error() {
        let dir = tmpdir("notdir");
        fs::write(dir.join("file"), b"").unwrap();
        assert!(matches!(write_atomic(&dir.join("file"), b"{}"), Err(WriteError::CreateDirectory(_))));
        fs::remove_dir_all(&dir).unwrap();
    }
}
