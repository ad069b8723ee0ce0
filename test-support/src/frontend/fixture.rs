//! A ready-made test bed: a temp dir, a raw image with known contents, the backend listening on a
//! socket in that dir, and sessions connected to it.
//!
//! Test code, so failures panic with context instead of returning errors. The image holds the
//! [pattern](crate::pattern) of [`IMAGE_SEED`] ([`image_pattern`]), which differs at every
//! 8-byte word, so data landing in the wrong place or coming from the wrong offset is caught.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::session::{Session, SessionConfig, Step};
use crate::daemon::Daemon;
use crate::pattern::{create_image, pattern};

/// How long a daemon may take to come up.
pub const START_TIMEOUT: Duration = crate::daemon::DAEMON_TIMEOUT;

/// The seed of a fixture image's [pattern](crate::pattern).
pub const IMAGE_SEED: u64 = 0x5bd1_e995;

/// Bytes `[offset, offset + len)` of a fixture image as it was written.
pub fn image_pattern(offset: u64, len: usize) -> Vec<u8> {
    pattern(IMAGE_SEED, offset, len)
}

/// A backend serving one image from a temp dir.
pub struct Fixture {
    // Field order matters: the daemon goes (and is killed) before the dir is removed.
    pub daemon: Daemon,
    pub image: PathBuf,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Fixture {
    /// Writes a `size`-byte image of [`image_pattern`] and starts `program --socket-path S
    /// --blk-file IMG args...`, killed when dropped.
    pub fn start(program: &str, size: u64, args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vublk-fixture-")
            .tempdir()
            .expect("create temp dir");
        let image = dir.path().join("disk.img");
        create_image(&image, size, IMAGE_SEED);
        let socket = dir.path().join("vhost.sock");
        let mut all = vec!["--blk-file".to_string(), image.display().to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        let daemon = Daemon::listen(Path::new(program), &socket, &all)
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        Self {
            daemon,
            image,
            socket,
            dir,
        }
    }

    /// A new connection to the daemon.
    pub fn stream(&mut self) -> UnixStream {
        self.daemon
            .connect(START_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect: {e}\nlog:\n{}", self.daemon.log()))
    }

    /// Connects and runs `steps`.
    pub fn session_with(&mut self, config: SessionConfig, steps: &[Step]) -> Session {
        let stream = self.stream();
        match Session::connect(stream, config, steps) {
            Ok(s) => s,
            Err(e) => panic!(
                "handshake failed: {e} ({:?})\nlog:\n{}",
                std::error::Error::source(&e).map(|s| s.to_string()),
                self.daemon.log()
            ),
        }
    }

    /// Connects with the default config and QEMU's handshake: queue 0 ready for I/O.
    pub fn session(&mut self) -> Session {
        let config = SessionConfig::default();
        let steps = Step::qemu(config.num_queues);
        self.session_with(config, &steps)
    }

    /// Reads `len` bytes of the image file at `offset` (what the backend wrote, bypassing it).
    pub fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut f = File::open(&self.image).expect("open image");
        f.seek(SeekFrom::Start(offset)).expect("seek image");
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf).expect("read image");
        buf
    }

    /// Overwrites image bytes at `offset` behind the backend's back.
    pub fn write_image_bytes(&self, offset: u64, data: &[u8]) {
        let mut f = OpenOptions::new()
            .write(true)
            .open(&self.image)
            .expect("open image");
        f.seek(SeekFrom::Start(offset)).expect("seek image");
        f.write_all(data).expect("write image");
    }

    /// Waits, up to `timeout`, until the daemon keeps device state (a guest's write-cache
    /// choice) in its state directory, `vublk-state` beside the socket: a worker reports it to
    /// the supervisor on its own time. Returns whether a file is there.
    pub fn wait_for_kept_state(&self, timeout: Duration) -> bool {
        let state = self.dir.path().join("vublk-state");
        let kept = || std::fs::read_dir(&state).map_or(0, |d| d.count()) > 0;
        let deadline = Instant::now() + timeout;
        while !kept() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        kept()
    }
}
