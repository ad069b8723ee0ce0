//! The FIFO behind vublk's test-only `--test-io-gate` (backend/src/io/gate.rs): each byte
//! written to it lets one gated I/O operation through, so a test can hold a request in flight
//! for as long as it needs.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A gate FIFO, open read-write by the test.
pub struct IoGate {
    path: PathBuf,
    fifo: File,
    /// The temporary directory [`IoGate::new`] made for it.
    _dir: Option<tempfile::TempDir>,
}

impl IoGate {
    /// A gate in a temporary directory of its own.
    pub fn new() -> IoGate {
        let dir = tempfile::Builder::new()
            .prefix("vublk-gate-")
            .tempdir()
            .expect("create temp dir");
        let mut gate = IoGate::in_dir(dir.path());
        gate._dir = Some(dir);
        gate
    }

    /// A gate named `gate` in `dir` (where a worker's sandbox lets it open files, say).
    pub fn in_dir(dir: &Path) -> IoGate {
        let path = dir.join("gate");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
        // Read-write, like vublk: opening never blocks, whether vublk has it open yet or not,
        // and a byte written stays until a worker reads it (the gate never sees end-of-file).
        let fifo = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open the gate FIFO");
        IoGate {
            path,
            fifo,
            _dir: None,
        }
    }

    /// The FIFO's path, for `--test-io-gate`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as an argument.
    pub fn arg(&self) -> &str {
        self.path.to_str().expect("a UTF-8 temp path")
    }

    /// Lets `n` more operations through.
    pub fn release(&self, n: usize) {
        (&self.fifo)
            .write_all(&vec![b'g'; n])
            .expect("write to the gate FIFO");
    }
}

impl Default for IoGate {
    fn default() -> IoGate {
        IoGate::new()
    }
}
