//! The backend under test as a child process: vublk, a program that execs it
//! (systemd-socket-activate), or another vhost-user backend (qemu-storage-daemon, for
//! vublk-bench).
//!
//! Everything it writes to stdout and stderr goes to one log file: in the test's directory when
//! the test names one (a guest test keeps its directory when it fails), else in a temp dir of the
//! daemon's own. It dies with the thread that started it ([`die_with_parent`]). What the test
//! chose at start ([`Options`]) decides the rest:
//!
//! - **the stop contract** ([`Daemon::stop`]): SIGTERM, then exit 0 within the timeout, no panic
//!   in the log, the socket removed if the daemon created it (`--socket-path`) or left in place
//!   if it inherited it (`--fd`, socket activation), and, for a quiet daemon, no WARN or ERROR
//!   line;
//! - **a daemon still running when dropped** is either killed, or stopped and held to that
//!   contract (the end-to-end tests' default: every test also checks a clean stop); while a
//!   test panics it is killed and its log printed;
//! - **a watchdog** may kill a daemon that lives too long: a hung backend would otherwise hang
//!   a frontend (libblkio waits for replies without a timeout), and the whole test run.
//!
//! Checks come in two forms: one that returns an error carrying the log (`try_*`, and
//! [`Daemon::running`]), for harnesses that report with `Result` (the guest tests, vublk-bench),
//! and one that panics with it, as a test assertion does.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::process::die_with_parent;

/// How long a daemon may take to start listening or to exit after SIGTERM, unless its
/// [`Options::timeout`] says otherwise.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a daemon started by [`Daemon::spawn`] (the end-to-end tests) may live.
pub const DAEMON_LIFETIME: Duration = Duration::from_secs(120);

/// What a clean stop does to the socket clients connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketAtExit {
    /// The daemon created it (`--socket-path`) and removes it.
    Removed,
    /// The daemon inherited it (`--fd`, socket activation) and leaves it.
    Kept,
    /// Not checked (another backend's socket).
    Unchecked,
}

/// How a daemon is started and watched; [`Options::spawn`] starts it.
pub struct Options {
    name: Option<String>,
    log: Option<PathBuf>,
    socket: Option<(PathBuf, SocketAtExit)>,
    log_level: Option<&'static str>,
    lifetime: Option<Duration>,
    timeout: Duration,
    stop_at_drop: bool,
    quiet: bool,
    fds: Vec<(OwnedFd, RawFd)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            name: None,
            log: None,
            socket: None,
            log_level: None,
            lifetime: None,
            timeout: DAEMON_TIMEOUT,
            stop_at_drop: false,
            quiet: false,
            fds: Vec::new(),
        }
    }
}

impl Options {
    /// The name messages give the daemon (default: the program's file name).
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// Writes the daemon's output to `path`.
    pub fn log_file(mut self, path: PathBuf) -> Self {
        self.log = Some(path);
        self
    }

    /// Writes the daemon's output to a new file in `dir`.
    pub fn log_in(self, dir: &Path) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        self.log_file(dir.join(format!("vublk-{nanos}.log")))
    }

    /// The socket clients connect to, and what a clean stop does to it.
    pub fn socket(mut self, path: PathBuf, at_exit: SocketAtExit) -> Self {
        self.socket = Some((path, at_exit));
        self
    }

    /// `RUST_LOG` for the daemon, unless the command or this process's environment sets it.
    pub fn log_level(mut self, level: &'static str) -> Self {
        self.log_level = Some(level);
        self
    }

    /// Kills the daemon once it has lived `lifetime`.
    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = Some(lifetime);
        self
    }

    /// How long the daemon may take to come up, or to exit after SIGTERM.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// A daemon still running when dropped (and no test panicking) is stopped and checked as by
    /// [`Daemon::stop`], instead of killed.
    pub fn stop_at_drop(mut self) -> Self {
        self.stop_at_drop = true;
        self
    }

    /// A clean stop also means no WARN or ERROR line in the log ([`Daemon::complaints`]).
    pub fn quiet(mut self) -> Self {
        self.quiet = true;
        self
    }

    /// The daemon inherits `fd` as descriptor `target`.
    pub fn fd(mut self, fd: OwnedFd, target: RawFd) -> Self {
        self.fds.push((fd, target));
        self
    }

    /// Starts `cmd` (stdin empty, stdout and stderr to the log, `NO_COLOR=1`).
    pub fn spawn(self, mut cmd: Command) -> io::Result<Daemon> {
        let name = self.name.unwrap_or_else(|| {
            Path::new(cmd.get_program())
                .file_name()
                .unwrap_or(cmd.get_program())
                .to_string_lossy()
                .into_owned()
        });
        let (log, log_dir) = match self.log {
            Some(path) => (path, None),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix(&format!("{name}-log-"))
                    .tempdir()?;
                (dir.path().join(format!("{name}.log")), Some(dir))
            }
        };
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        if let Some(level) = self.log_level {
            // A command that sets RUST_LOG itself (e.g. `info`, to count lines) keeps it.
            let own_level = cmd.get_envs().any(|(key, _)| key == "RUST_LOG");
            if !own_level && std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", level);
            }
        }
        cmd.env("NO_COLOR", "1");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        die_with_parent(&mut cmd);
        let pairs: Vec<(RawFd, RawFd)> =
            self.fds.iter().map(|(f, t)| (f.as_raw_fd(), *t)).collect();
        if !pairs.is_empty() {
            // SAFETY: the closure runs in the child between fork and exec and only calls
            // async-signal-safe functions (dup2, fcntl) on descriptors that `self.fds` keeps open
            // in the parent until `spawn` returns.
            unsafe {
                cmd.pre_exec(move || {
                    for &(from, to) in &pairs {
                        vmm_glue::inherit::place(from, to)?;
                    }
                    Ok(())
                });
            }
        }
        let program = PathBuf::from(cmd.get_program());
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawn {name}: {e}")))?;
        drop(self.fds);
        let reaped = Arc::new(Mutex::new(false));
        if let Some(lifetime) = self.lifetime {
            spawn_watchdog(&name, child.id(), lifetime, Arc::clone(&reaped));
        }
        let (socket, socket_at_exit) = match self.socket {
            Some((path, at_exit)) => (Some(path), at_exit),
            None => (None, SocketAtExit::Unchecked),
        };
        Ok(Daemon {
            child,
            reaped,
            program,
            name,
            socket,
            socket_at_exit,
            log,
            _log_dir: log_dir,
            status: None,
            timeout: self.timeout,
            stop_at_drop: self.stop_at_drop,
            quiet: self.quiet,
        })
    }
}

/// A running backend process.
pub struct Daemon {
    child: Child,
    /// True once the child has been reaped; held while the watchdog signals it, so the watchdog
    /// can never signal a recycled pid.
    reaped: Arc<Mutex<bool>>,
    program: PathBuf,
    name: String,
    socket: Option<PathBuf>,
    socket_at_exit: SocketAtExit,
    log: PathBuf,
    /// The temp dir holding the log when the test gave none.
    _log_dir: Option<tempfile::TempDir>,
    status: Option<ExitStatus>,
    timeout: Duration,
    stop_at_drop: bool,
    quiet: bool,
}

impl Daemon {
    /// `program --socket-path DIR/vublk.sock ARGS...` as [`Daemon::spawn`] starts it, once it
    /// listens: the socket file exists from `bind` on, but vublk sets its mode after that, so a
    /// test that changes the mode must wait for the "listening" line (logged at the level
    /// [`Daemon::spawn`] sets; with a `RUST_LOG` of the caller's, only for the file).
    pub fn start(program: impl AsRef<OsStr>, dir: &Path, args: &[&str]) -> Daemon {
        let socket = dir.join("vublk.sock");
        let mut cmd = Command::new(program);
        cmd.arg("--socket-path").arg(&socket).args(args);
        let mut d = Daemon::spawn(cmd, dir, socket.clone(), true);
        d.wait_for(&socket);
        if std::env::var_os("RUST_LOG").is_none() {
            if let Err(e) = d.try_wait_for_log(&format!("listening on {}", socket.display())) {
                panic!("{e}");
            }
        }
        d
    }

    /// Starts `cmd` the way the end-to-end tests run vublk: its log in `dir` at `RUST_LOG=debug`
    /// (unless set), killed after [`DAEMON_LIFETIME`], stopped and checked when dropped. `socket`
    /// is the path clients use; `owns_socket` says whether vublk creates (and removes) it.
    pub fn spawn(cmd: Command, dir: &Path, socket: PathBuf, owns_socket: bool) -> Daemon {
        let at_exit = if owns_socket {
            SocketAtExit::Removed
        } else {
            SocketAtExit::Kept
        };
        Options::default()
            .name("vublk")
            .log_in(dir)
            .socket(socket, at_exit)
            .log_level("debug")
            .lifetime(DAEMON_LIFETIME)
            .stop_at_drop()
            .spawn(cmd)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `program --socket-path socket args...`, killed when dropped; clients [`Daemon::connect`].
    pub fn listen(program: &Path, socket: &Path, args: &[String]) -> io::Result<Self> {
        let mut cmd = Command::new(program);
        cmd.arg("--socket-path").arg(socket).args(args);
        Options::default()
            .socket(socket.to_path_buf(), SocketAtExit::Removed)
            .spawn(cmd)
    }

    /// `program --fd 3 args...` with fd 3 one end of a fresh socketpair, killed when dropped;
    /// returns the daemon and the other end, already connected.
    pub fn with_connected_fd(program: &Path, args: &[String]) -> io::Result<(Self, UnixStream)> {
        let (ours, theirs) = UnixStream::pair()?;
        let mut cmd = Command::new(program);
        cmd.arg("--fd").arg("3").args(args);
        let d = Options::default().fd(OwnedFd::from(theirs), 3).spawn(cmd)?;
        Ok((d, ours))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The socket clients connect to.
    #[track_caller]
    pub fn socket(&self) -> &Path {
        self.socket
            .as_deref()
            .unwrap_or_else(|| panic!("{} was started without a socket path", self.name))
    }

    /// The per-VM worker the supervisor started for the current client (a child of the daemon
    /// running `--worker-control-fd`); the daemon itself when it runs `--single-process`.
    /// Waits up to 5 s for it to appear.
    pub fn serving_pid(&self) -> u32 {
        let daemon = self.pid();
        let cmdline = std::fs::read(format!("/proc/{daemon}/cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).any(|a| a == b"--single-process") {
            return daemon;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(pid) = workers_of(daemon).into_iter().next() {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "no worker process under daemon {daemon}\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Lines of the daemon's `/proc/PID/maps` that map the file with inode `inode` (e.g. a
    /// guest memory memfd, see [`crate::frontend::memory::RegionFile::inode`]).
    pub fn mappings_of(&self, inode: u64) -> io::Result<Vec<String>> {
        mappings_of(self.pid(), inode)
    }

    /// Everything the daemon wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<cannot read log: {e}>"))
    }

    /// Waits up to 10 s for the log to contain `needle` (a worker's lines reach it through the
    /// supervisor's relay, a moment after the worker wrote them); true if it did.
    pub fn log_shows(&self, needle: &str) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Log lines at ERROR or WARN level: a well-behaved frontend causes none.
    pub fn complaints(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
            .map(str::to_string)
            .collect()
    }

    /// The exit status if the daemon has exited (without waiting, as `Child::try_wait`).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            let mut reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
            self.status = self.child.try_wait().expect("waitpid");
            *reaped = self.status.is_some();
        }
        self.status
    }

    /// Waits up to `timeout` for the daemon to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `ready` holds, failing (with the log) if the daemon exits first or `ready`
    /// does not hold within the timeout.
    fn try_until(&mut self, what: &str, mut ready: impl FnMut(&Self) -> bool) -> io::Result<()> {
        let deadline = Instant::now() + self.timeout;
        while !ready(self) {
            if let Some(status) = self.try_wait() {
                return Err(io::Error::other(format!(
                    "{} exited with {status} before {what}; log:\n{}",
                    self.name,
                    self.log()
                )));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "{} did not get to {what} within {:?}; log:\n{}",
                    self.name,
                    self.timeout,
                    self.log()
                )));
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Waits until the daemon has created `path` (its socket, a `--control-socket`).
    pub fn try_wait_for(&mut self, path: &Path) -> io::Result<()> {
        self.try_until(&format!("creating {}", path.display()), |_| path.exists())
    }

    /// [`Daemon::try_wait_for`], panicking.
    #[track_caller]
    pub fn wait_for(&mut self, path: &Path) {
        if let Err(e) = self.try_wait_for(path) {
            panic!("{e}");
        }
    }

    /// Waits until the log contains `needle` (vublk logs "listening" once its sockets accept).
    pub fn try_wait_for_log(&mut self, needle: &str) -> io::Result<()> {
        self.try_until(&format!("logging {needle:?}"), |d| d.log().contains(needle))
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
                    if let Some(st) = self.try_wait() {
                        return Err(io::Error::other(format!(
                            "{} exited ({st}) before accepting: {}",
                            self.name,
                            self.log()
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

    /// `vublk status --control-socket CONTROL --json` of this daemon's program, parsed.
    pub fn status(&self, control: &Path) -> io::Result<serde_json::Value> {
        let mut cmd = Command::new(&self.program);
        cmd.arg("status")
            .arg("--control-socket")
            .arg(control)
            .arg("--json");
        let out = crate::process::run(cmd, self.timeout)?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "{} status failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            io::Error::other(format!("{} status --json printed no JSON: {e}", self.name))
        })
    }

    /// Ok while the daemon runs; once it has exited, an error with its status and log.
    pub fn running(&mut self) -> io::Result<()> {
        match self.try_wait() {
            Some(status) => Err(io::Error::other(format!(
                "{} exited unexpectedly with {status}; log:\n{}",
                self.name,
                self.log()
            ))),
            None => Ok(()),
        }
    }

    /// [`Daemon::running`], panicking.
    #[track_caller]
    pub fn assert_running(&mut self) {
        if let Err(e) = self.running() {
            panic!("{e}");
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the daemon.
    pub fn signal(&mut self, signal: libc::c_int) -> io::Result<()> {
        if let Some(s) = self.try_wait() {
            return Err(io::Error::other(format!(
                "{} had already exited with {s}; log:\n{}",
                self.name,
                self.log()
            )));
        }
        let reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
        if *reaped {
            return Err(io::Error::other(format!("{} was reaped", self.name)));
        }
        // SAFETY: kill(2) only sends a signal; the child is not reaped (checked under the lock
        // that reaping takes), so its pid cannot have been recycled for another process.
        if unsafe { libc::kill(self.pid() as libc::pid_t, signal) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends `sig` and waits for the exit status, panicking after the timeout.
    pub fn signal_and_wait(&mut self, sig: libc::c_int) -> ExitStatus {
        self.signal(sig).unwrap_or_else(|e| panic!("{e}"));
        let timeout = self.timeout;
        self.wait_exit(timeout).unwrap_or_else(|| {
            panic!(
                "{} did not exit within {timeout:?} of signal {sig}; log:\n{}",
                self.name,
                self.log()
            )
        })
    }

    /// Sends SIGTERM and waits for the exit status; after the timeout, kills the daemon and
    /// fails. The status at once if it had already exited.
    pub fn try_terminate(&mut self) -> io::Result<ExitStatus> {
        if let Some(s) = self.try_wait() {
            return Ok(s);
        }
        self.signal(libc::SIGTERM)?;
        if let Some(s) = self.wait_exit(self.timeout) {
            return Ok(s);
        }
        let s = self.kill()?;
        Err(io::Error::other(format!(
            "{} did not exit within {:?} of SIGTERM (killed: {s}); log:\n{}",
            self.name,
            self.timeout,
            self.log()
        )))
    }

    /// [`Daemon::try_terminate`], panicking.
    pub fn terminate(&mut self) -> ExitStatus {
        self.try_terminate().unwrap_or_else(|e| panic!("{e}"))
    }

    /// SIGKILL (unless it has exited) and the exit status.
    fn kill(&mut self) -> io::Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let mut reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.child.kill();
        let s = self.child.wait()?;
        *reaped = true;
        self.status = Some(s);
        Ok(s)
    }

    /// SIGTERM, then the stop contract (see the module docs).
    pub fn try_stop(&mut self) -> io::Result<()> {
        let status = self.try_terminate()?;
        match self.exit_problem(status, "after SIGTERM") {
            Some(problem) => Err(io::Error::other(problem)),
            None => Ok(()),
        }
    }

    /// [`Daemon::try_stop`], panicking.
    #[track_caller]
    pub fn stop(&mut self) {
        if let Err(e) = self.try_stop() {
            panic!("{e}");
        }
    }

    /// Panics unless `status` (the daemon's exit, `when`) meets the stop contract.
    #[track_caller]
    pub fn check_clean_exit(&self, status: ExitStatus, when: &str) {
        if let Some(problem) = self.exit_problem(status, when) {
            panic!("{problem}");
        }
    }

    /// What breaks the stop contract, if anything.
    fn exit_problem(&self, status: ExitStatus, when: &str) -> Option<String> {
        let name = &self.name;
        let log = self.log();
        if !status.success() {
            return Some(format!(
                "{name} exited with {status} (signal {:?}) {when}; log:\n{log}",
                status.signal()
            ));
        }
        if log.contains("panicked") {
            return Some(format!("{name} panicked {when}; log:\n{log}"));
        }
        if let Some(socket) = &self.socket {
            match self.socket_at_exit {
                SocketAtExit::Removed if socket.exists() => {
                    return Some(format!(
                        "{name} left its socket {} behind {when}",
                        socket.display()
                    ))
                }
                SocketAtExit::Kept if !socket.exists() => {
                    return Some(format!(
                        "{name} removed {}, a socket it did not create, {when}",
                        socket.display()
                    ))
                }
                _ => {}
            }
        }
        let complaints = self.complaints();
        if self.quiet && !complaints.is_empty() {
            return Some(format!(
                "{name} logged problems {when}:\n{}",
                complaints.join("\n")
            ));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if thread::panicking() {
            // The test already failed: make sure the daemon goes away and show what it said.
            let _ = self.kill();
            eprintln!(
                "----- {} log ({}) -----\n{}",
                self.name,
                self.log.display(),
                self.log()
            );
            return;
        }
        if !self.stop_at_drop {
            let _ = self.kill();
            return;
        }
        // An exit the test did not see is checked too.
        let seen_exit = self.status.is_some();
        let status = self.terminate();
        if !seen_exit {
            self.check_clean_exit(status, "after SIGTERM at the end of the test");
        }
    }
}

/// Kills `pid` (a child not yet reaped, as `reaped` says) once it has lived `lifetime`.
fn spawn_watchdog(name: &str, pid: u32, lifetime: Duration, reaped: Arc<Mutex<bool>>) {
    let name = name.to_string();
    thread::spawn(move || {
        let deadline = Instant::now() + lifetime;
        while Instant::now() < deadline {
            thread::sleep(Duration::from_millis(200));
            if *reaped.lock().unwrap_or_else(|e| e.into_inner()) {
                return;
            }
        }
        let reaped = reaped.lock().unwrap_or_else(|e| e.into_inner());
        if !*reaped {
            eprintln!("watchdog: {name} (pid {pid}) still running after {lifetime:?}; killing it");
            // SAFETY: kill(2) only sends a signal; the child is not reaped (checked under the
            // lock the reaping code holds), so `pid` is still our child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    });
}

/// The worker processes (children running `--worker-control-fd`) of `daemon`.
pub fn workers_of(daemon: u32) -> Vec<u32> {
    let mut workers = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(daemon)
            && cmdline
                .split(|b| *b == 0)
                .any(|a| a == b"--worker-control-fd")
        {
            workers.push(pid);
        }
    }
    workers
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
