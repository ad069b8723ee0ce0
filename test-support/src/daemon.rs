//! The backend under test as a child process.
//!
//! Starts a vhost-user backend binary either on a socket path (the frontend connects, retrying
//! while the daemon comes up) or on one end of a socketpair inherited as a numbered fd (`--fd N`,
//! the way a VMM or a supervisor hands over an already connected socket). Output is collected so
//! a failing test can show it; a daemon still running when dropped is killed.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// A running backend process.
pub struct Daemon {
    child: Child,
    socket: Option<PathBuf>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Daemon {
    /// Runs `program args...`; each `(fd, target)` in `fds` is inherited as descriptor `target`.
    pub fn spawn(program: &Path, args: &[String], fds: Vec<(OwnedFd, RawFd)>) -> io::Result<Self> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let pairs: Vec<(RawFd, RawFd)> = fds.iter().map(|(f, t)| (f.as_raw_fd(), *t)).collect();
        if !pairs.is_empty() {
            // SAFETY: the closure runs in the child between fork and exec and only calls
            // async-signal-safe functions (dup2, fcntl) on descriptors that `fds` keeps open in
            // the parent until `spawn` returns.
            unsafe {
                cmd.pre_exec(move || {
                    for &(from, to) in &pairs {
                        vmm_glue::inherit::place(from, to)?;
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn()?;
        drop(fds);
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(collect(out, stdout.clone()));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(collect(err, stderr.clone()));
        }
        Ok(Self {
            child,
            socket: None,
            stdout,
            stderr,
            readers,
            status: None,
        })
    }

    /// Runs `program --socket-path socket args...`.
    pub fn listen(program: &Path, socket: &Path, args: &[String]) -> io::Result<Self> {
        let mut all = vec!["--socket-path".to_string(), socket.display().to_string()];
        all.extend_from_slice(args);
        let mut d = Self::spawn(program, &all, Vec::new())?;
        d.socket = Some(socket.to_path_buf());
        Ok(d)
    }

    /// Runs `program --fd 3 args...` with fd 3 one end of a fresh socketpair; returns the daemon
    /// and the other end, already connected.
    pub fn with_connected_fd(program: &Path, args: &[String]) -> io::Result<(Self, UnixStream)> {
        let (ours, theirs) = UnixStream::pair()?;
        let mut all = vec!["--fd".to_string(), "3".to_string()];
        all.extend_from_slice(args);
        let d = Self::spawn(program, &all, vec![(OwnedFd::from(theirs), 3)])?;
        Ok((d, ours))
    }

    /// Connects to the daemon's socket, retrying until `timeout` while it starts.
    pub fn connect(&mut self, timeout: Duration) -> io::Result<UnixStream> {
        let path = self
            .socket
            .clone()
            .ok_or_else(|| io::Error::other("daemon was not started on a socket path"))?;
        let start = Instant::now();
        loop {
            match UnixStream::connect(&path) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    if let Some(st) = self.try_wait()? {
                        return Err(io::Error::other(format!(
                            "daemon exited ({st}) before accepting: {}",
                            self.stderr()
                        )));
                    }
                    if start.elapsed() >= timeout {
                        return Err(e);
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// The socket path, if started with one.
    pub fn socket(&self) -> Option<&Path> {
        self.socket.as_deref()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Exit status if the daemon has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the daemon to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.try_wait()? {
                self.join_readers();
                return Ok(Some(st));
            }
            if start.elapsed() >= timeout {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the daemon.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).map_err(io::Error::other)?;
        // SAFETY: kill() on the pid of a child we spawned and have not yet reaped, so the pid
        // cannot have been recycled for another process.
        if unsafe { libc::kill(pid, signal) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Lines of the daemon's `/proc/PID/maps` that map the file with inode `inode` (e.g. a
    /// guest memory memfd, see [`crate::frontend::memory::RegionFile::inode`]).
    pub fn mappings_of(&self, inode: u64) -> io::Result<Vec<String>> {
        mappings_of(self.pid(), inode)
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().map(|b| b.clone()).unwrap_or_default())
            .into_owned()
    }

    /// Everything the daemon wrote to stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().map(|b| b.clone()).unwrap_or_default())
            .into_owned()
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.join_readers();
        if thread::panicking() {
            eprintln!(
                "--- backend (pid {}) stderr ---\n{}",
                self.child.id(),
                self.stderr()
            );
        }
    }
}

fn collect(mut from: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut v) = into.lock() {
                v.extend_from_slice(&buf[..n]);
            }
        }
    })
}

/// Lines of `/proc/PID/maps` whose inode field (the fifth) is `inode`.
pub fn mappings_of(pid: u32, inode: u64) -> io::Result<Vec<String>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(maps
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(4)
                .and_then(|f| f.parse::<u64>().ok())
                == Some(inode)
        })
        .map(str::to_string)
        .collect())
}
