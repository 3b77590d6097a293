//! The on-disk spool of a job's log: the bytes the server has not acknowledged yet, in a bounded
//! file, so that a runner cut off from its server keeps running the job without holding its
//! output in memory.
//!
//! The file is a ring of at most `capacity` bytes: log offset `o` lives at file position
//! `(o - origin) % capacity`. The log never lets more than `capacity` unacknowledged bytes in, so a
//! write never overwrites bytes still to be sent. Once everything in the file has been sent, the
//! file is truncated, so it is only as large as the longest stretch the server was behind.
//! The file is created on first use and removed when the spool is dropped.
//!
//! Writes happen under the log's lock and go to the page cache; reads happen in the uploader,
//! outside the lock, through [`ReadPlan`] on a blocking thread.

use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A bounded on-disk ring of log bytes `[start, end)`.
#[derive(Debug)]
pub struct Spool {
    path: Option<PathBuf>,
    capacity: u64,
    file: Option<Arc<File>>,
    /// Log offset stored at file position 0.
    origin: u64,
    /// First log offset held.
    start: u64,
    /// One past the last log offset held.
    end: u64,
}

impl Spool {
    /// A spool in the file `path` (created on first use, with its directory), holding at most
    /// `capacity` bytes; `None` means no spool (nothing can be appended).
    pub fn new(path: Option<PathBuf>, capacity: u64) -> Self {
        Self {
            path,
            capacity: capacity.max(1),
            file: None,
            origin: 0,
            start: 0,
            end: 0,
        }
    }

    /// Whether there is a file to spool to.
    pub fn is_enabled(&self) -> bool {
        self.path.is_some()
    }

    /// The spool file's path, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Most bytes the spool holds.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes held.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// First log offset held.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// One past the last log offset held.
    pub fn end(&self) -> u64 {
        self.end
    }

    fn open(&mut self) -> io::Result<Arc<File>> {
        if let Some(f) = &self.file {
            return Ok(f.clone());
        }
        let Some(path) = &self.path else {
            return Err(io::Error::other("the log has no spool directory"));
        };
        if let Some(dir) = path.parent() {
            // The spool holds job output (masked, but still nobody else's business).
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)?,
        );
        self.file = Some(file.clone());
        Ok(file)
    }

    /// Appends `data`, which starts at log offset `offset` (the spool's end, or anywhere when it is
    /// empty). On error nothing is held that was not held before.
    pub fn append(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.is_empty() {
            // Nothing held: the ring starts over at the beginning of the file.
            self.start = offset;
            self.end = offset;
            self.origin = offset;
        }
        debug_assert_eq!(offset, self.end, "spool appends must be contiguous");
        let n = data.len() as u64;
        if self.len() + n > self.capacity {
            return Err(io::Error::other(format!(
                "the spool holds at most {} bytes",
                self.capacity
            )));
        }
        let file = self.open()?;
        let pos = (offset - self.origin) % self.capacity;
        let first = ((self.capacity - pos).min(n)) as usize;
        file.write_all_at(&data[..first], pos)?;
        if first < data.len() {
            file.write_all_at(&data[first..], 0)?;
        }
        self.end += n;
        Ok(())
    }

    /// How to read up to `max` bytes from log offset `from` (which must be held).
    pub fn read_plan(&self, from: u64, max: usize) -> Option<ReadPlan> {
        let file = self.file.clone()?;
        if from < self.start || from >= self.end {
            return None;
        }
        let n = (self.end - from).min(max as u64);
        let pos = (from - self.origin) % self.capacity;
        let first = (self.capacity - pos).min(n);
        let mut segments = vec![(pos, first as usize)];
        if first < n {
            segments.push((0, (n - first) as usize));
        }
        Some(ReadPlan { file, segments })
    }

    /// Forgets everything before log offset `offset` (the server has it); an emptied file is
    /// truncated.
    pub fn consume_to(&mut self, offset: u64) {
        if offset <= self.start {
            return;
        }
        if offset >= self.end {
            self.start = self.end;
            self.truncate();
        } else {
            self.start = offset;
        }
    }

    /// Forgets everything and starts over, empty, at `offset`.
    pub fn reset(&mut self, offset: u64) {
        self.start = offset;
        self.end = offset;
        self.truncate();
    }

    fn truncate(&mut self) {
        self.origin = self.end;
        if let Some(f) = &self.file
            && let Err(e) = f.set_len(0)
        {
            tracing::debug!(error = %e, "could not truncate the log spool");
        }
    }

    /// Removes the file; the spool is empty and unusable afterwards.
    pub fn remove(&mut self) {
        self.start = self.end;
        self.file = None;
        if let Some(path) = self.path.take() {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove the log spool")
                }
                _ => {}
            }
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Where to read a stretch of the spool; reading is blocking file I/O.
#[derive(Debug)]
pub struct ReadPlan {
    file: Arc<File>,
    segments: Vec<(u64, usize)>,
}

impl ReadPlan {
    /// Bytes the stretch holds.
    pub fn len(&self) -> usize {
        self.segments.iter().map(|s| s.1).sum()
    }

    /// Whether the stretch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the stretch.
    pub fn read(&self) -> io::Result<Vec<u8>> {
        let mut out = vec![0; self.len()];
        let mut at = 0;
        for &(pos, len) in &self.segments {
            self.file.read_exact_at(&mut out[at..at + len], pos)?;
            at += len;
        }
        Ok(out)
    }
}

/// Removes spool files left behind by a runner that did not stop cleanly.
pub fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "spool") {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed a log spool left behind")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove a log spool left behind")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_around_without_losing_or_overwriting_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sub/job.spool");
        let mut spool = Spool::new(Some(path.clone()), 10);
        spool.append(100, b"0123456").unwrap();
        let read = |s: &Spool, from, max| s.read_plan(from, max).unwrap().read().unwrap();
        assert_eq!(read(&spool, 100, 4), b"0123");
        spool.consume_to(104);
        // 3 held; 7 more fit, wrapping around the end of the file.
        spool.append(107, b"789abcd").unwrap();
        assert!(spool.append(114, b"x").is_err());
        assert_eq!(read(&spool, 104, 100), b"456789abcd");
        assert!(std::fs::metadata(&path).unwrap().len() <= 10);
        spool.consume_to(114);
        assert!(spool.is_empty());
        // Emptied: the file is truncated, and starts over wherever the log is.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        spool.append(500, b"xyz").unwrap();
        assert_eq!(read(&spool, 500, 10), b"xyz");
        drop(spool);
        assert!(!path.exists(), "the spool file was not removed");
    }

    #[test]
    fn a_full_disk_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("job.spool");
        std::os::unix::fs::symlink("/dev/full", &path).unwrap();
        let mut spool = Spool::new(Some(path), 1 << 20);
        let err = spool.append(0, b"hello").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(28), "{err}"); // ENOSPC
        assert!(spool.is_empty());
    }

    #[test]
    fn stale_spools_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a.spool"), "x").unwrap();
        std::fs::write(tmp.path().join("keep.txt"), "x").unwrap();
        remove_stale(tmp.path());
        assert!(!tmp.path().join("a.spool").exists());
        assert!(tmp.path().join("keep.txt").exists());
    }
}
