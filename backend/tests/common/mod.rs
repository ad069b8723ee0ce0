//! Shared harness for the end-to-end tests: runs `vublk` as a child process and drives it with
//! libblkio's `virtio-blk-vhost-user` driver as the frontend.
//!
//! - [`Daemon`] spawns the binary with a socket in a test's own temp dir, keeps its stderr in a
//!   file (printed when a test fails), and stops it with SIGTERM on drop, checking that it exits 0
//!   and removes the socket it created.
//! - [`Client`] connects with N queues and hands out one [`Queue`] per virtqueue, each owning a
//!   private slice of one shared memory region (libblkio's vhost-user driver only accepts buffers
//!   inside mapped regions, because the daemon must be able to mmap them).
//! - [`Queue::run`] submits a batch of requests at once (so many are in flight), waits for every
//!   completion and returns the per-request result, indexed like the batch.
//! - Images are filled with the deterministic, position-dependent pattern of
//!   `vublk_test_support::pattern`, so any byte that lands in the wrong place is detected.

#![allow(dead_code)]

use std::fs::File;
use std::mem::MaybeUninit;
use std::os::unix::io::RawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, Errno, ReqFlags};

/// How long a daemon may take to start listening or to exit after SIGTERM.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a batch of requests may take to complete before the test gives up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * MIB;

/// The binary under test; `VUBLK_E2E_BIN` overrides it (e.g. to run these tests against another
/// build, or a wrapper around a reference backend to check the tests themselves).
pub fn vublk_bin() -> String {
    std::env::var("VUBLK_E2E_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_vublk").to_string())
}

/// A fresh temp dir for one test.
pub fn test_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vublk-e2e-")
        .tempdir()
        .expect("create temp dir")
}

// The data pattern, the PRNG and the byte comparison every test shares (each test file uses
// some of them).
#[allow(unused_imports)]
pub use vublk_test_support::pattern::{assert_same, create_image, first_difference, pattern, Rng};

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

/// A running `vublk`.
pub struct Daemon {
    child: Option<Child>,
    /// True once the child has been reaped; held while the watchdog signals it, so the watchdog
    /// can never signal a recycled pid.
    reaped: Arc<Mutex<bool>>,
    /// The socket clients connect to.
    pub socket: PathBuf,
    /// Whether vublk created the socket itself (and so must remove it on exit).
    owns_socket: bool,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Daemon {
    /// `vublk --socket-path DIR/vublk.sock ARGS...`, waiting until the socket file appears.
    pub fn start(dir: &Path, args: &[&str]) -> Daemon {
        let socket = dir.join("vublk.sock");
        let mut cmd = Command::new(vublk_bin());
        cmd.arg("--socket-path").arg(&socket).args(args);
        let mut d = Daemon::spawn(cmd, dir, socket, true);
        d.wait_for_socket();
        d
    }

    /// Spawns `cmd` with stdout and stderr going to DIR/vublk.log. `socket` is the path clients
    /// will use; `owns_socket` says whether vublk is expected to create (and remove) it.
    pub fn spawn(mut cmd: Command, dir: &Path, socket: PathBuf, owns_socket: bool) -> Daemon {
        let log = dir.join(format!(
            "vublk-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let out = File::create(&log).expect("create log file");
        let err = out.try_clone().expect("dup log file");
        // A command that sets RUST_LOG itself (e.g. `info`, to count lines) keeps it.
        let own_log_level = cmd.get_envs().any(|(key, _)| key == "RUST_LOG");
        if !own_log_level && std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "debug");
        }
        cmd.env("NO_COLOR", "1");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("spawn vublk");
        let reaped = Arc::new(Mutex::new(false));
        spawn_watchdog(child.id(), Arc::clone(&reaped));
        Daemon {
            child: Some(child),
            reaped,
            socket,
            owns_socket,
            log,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon already reaped").id()
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
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(pid) = workers_of(daemon).into_iter().next() {
                return pid;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no worker process under daemon {daemon}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything vublk wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<cannot read log: {e}>"))
    }

    fn wait_for_socket(&mut self) {
        let socket = self.socket.clone();
        self.wait_for(&socket);
    }

    /// Waits until vublk has created `path` (a socket it makes, such as --control-socket's).
    pub fn wait_for(&mut self, path: &Path) {
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        while !path.exists() {
            if let Some(status) = self.try_wait() {
                panic!(
                    "vublk exited with {status} before creating {}; log:\n{}",
                    path.display(),
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "vublk did not create {} within {DAEMON_TIMEOUT:?}; log:\n{}",
                path.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit status if vublk has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                let mut reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
                self.status = child.try_wait().expect("waitpid");
                *reaped = self.status.is_some();
            }
        }
        self.status
    }

    /// Waits up to `timeout` for vublk to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Panics (with the log) unless vublk is still running.
    #[track_caller]
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_wait() {
            panic!(
                "vublk exited unexpectedly with {status}; log:\n{}",
                self.log()
            );
        }
    }

    /// Sends `sig` to vublk and waits for its exit status, panicking after [`DAEMON_TIMEOUT`].
    pub fn signal_and_wait(&mut self, sig: libc::c_int) -> ExitStatus {
        if let Some(s) = self.try_wait() {
            panic!("vublk had already exited with {s}; log:\n{}", self.log());
        }
        // SAFETY: kill(2) only sends a signal; `pid` is our own unreaped child.
        unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
        self.wait_exit(DAEMON_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "vublk did not exit within {DAEMON_TIMEOUT:?} of signal {sig}; log:\n{}",
                self.log()
            )
        })
    }

    /// Sends SIGTERM and waits for the exit status (SIGKILL after [`DAEMON_TIMEOUT`]).
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(s) = self.try_wait() {
            return s;
        }
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill(2) only sends a signal; `pid` is our own unreaped child, so the pid cannot
        // have been reused for another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if let Some(s) = self.wait_exit(DAEMON_TIMEOUT) {
            return s;
        }
        let child = self.child.as_mut().unwrap();
        let mut reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let s = child.wait().expect("waitpid");
        *reaped = true;
        drop(reaped);
        self.status = Some(s);
        panic!(
            "vublk did not exit within {DAEMON_TIMEOUT:?} of SIGTERM (killed: {s}); log:\n{}",
            self.log()
        );
    }

    /// SIGTERM, then checks the contract for a clean stop: exit status 0, and the socket removed
    /// if vublk created it (or left in place if it did not).
    #[track_caller]
    pub fn stop(&mut self) {
        let status = self.terminate();
        self.check_clean_exit(status, "after SIGTERM");
    }

    #[track_caller]
    pub fn check_clean_exit(&self, status: ExitStatus, when: &str) {
        assert!(
            status.success(),
            "vublk exited with {status} (signal {:?}) {when}; log:\n{}",
            status.signal(),
            self.log()
        );
        let log = self.log();
        assert!(
            !log.contains("panicked"),
            "vublk panicked {when}; log:\n{log}"
        );
        if self.owns_socket {
            assert!(
                !self.socket.exists(),
                "vublk left its socket {} behind {when}",
                self.socket.display()
            );
        } else {
            assert!(
                self.socket.exists(),
                "vublk removed {}, a socket it did not create, {when}",
                self.socket.display()
            );
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test already failed: make sure the daemon goes away and show what it said.
            if let Some(child) = self.child.as_mut() {
                if self.status.is_none() {
                    let mut reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = child.kill();
                    let _ = child.wait();
                    *reaped = true;
                }
            }
            eprintln!(
                "----- vublk log ({}) -----\n{}",
                self.log.display(),
                self.log()
            );
            return;
        }
        if self.child.is_some() {
            let already_exited = self.status.is_some();
            let status = self.terminate();
            if !already_exited {
                self.check_clean_exit(status, "after SIGTERM at the end of the test");
            }
        }
    }
}

/// How long any one daemon may live. A hung vublk would otherwise hang libblkio (which blocks
/// on replies without a timeout) and the whole test run; killing it turns that into an error.
pub const DAEMON_LIFETIME: Duration = Duration::from_secs(120);

fn spawn_watchdog(pid: u32, reaped: Arc<Mutex<bool>>) {
    std::thread::spawn(move || {
        let deadline = Instant::now() + DAEMON_LIFETIME;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            if *reaped.lock().unwrap_or_else(|e| e.into_inner()) {
                return;
            }
        }
        let reaped = reaped.lock().unwrap_or_else(|e| e.into_inner());
        if !*reaped {
            eprintln!(
                "watchdog: vublk (pid {pid}) still running after {DAEMON_LIFETIME:?}; killing it"
            );
            // SAFETY: kill(2) only sends a signal; the child is not reaped (checked under the
            // lock the reaping code holds), so `pid` is still our child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    });
}

/// Has the kernel SIGKILL the child when the thread that spawned it exits, so a test process
/// that dies without unwinding (abort, SIGKILL) leaves no daemons behind. Daemons never outlive
/// the test function (its thread) that starts them.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes `fd` (open in the parent) appear as `target` in the child, without FD_CLOEXEC.
pub fn pass_fd(cmd: &mut Command, fd: RawFd, target: RawFd) {
    // SAFETY: a pre_exec closure that only calls vmm-glue's async-signal-safe `place`; the
    // caller keeps `fd` open until the command is spawned.
    unsafe {
        cmd.pre_exec(move || vmm_glue::inherit::place(fd, target));
    }
}

/// Runs vublk to completion (for command-line tests) with a timeout.
pub fn run_vublk(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(vublk_bin());
    die_with_parent(&mut cmd);
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vublk");
    let deadline = Instant::now() + DAEMON_TIMEOUT;
    loop {
        if child.try_wait().expect("waitpid").is_some() {
            return child.wait_with_output().expect("collect output");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "vublk {args:?} did not exit within {DAEMON_TIMEOUT:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The counters of the first device `vublk status` reports on `control` once `ready` accepts
/// them (workers report once a second); panics after 10 s with the last answer.
#[allow(dead_code)]
pub fn device_totals(
    control: &Path,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = run_vublk(&[
            "status",
            "--json",
            "--control-socket",
            control.to_str().unwrap(),
        ]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let totals = status["vms"][0]["devices"][0].clone();
        if ready(&totals) {
            return totals;
        }
        assert!(
            Instant::now() < deadline,
            "status never got there: {status}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------------------------
// The libblkio client
// ---------------------------------------------------------------------------------------------

/// Connection options for [`Client`].
#[derive(Clone, Debug)]
pub struct ClientOpts {
    pub num_queues: i32,
    pub read_only: bool,
    pub queue_size: Option<i32>,
    /// Queues libblkio busy-polls, with device notifications suppressed; they come after the
    /// `num_queues` ordinary ones in [`Client::queues`].
    pub num_poll_queues: i32,
    /// Bytes of mapped buffer memory per queue.
    pub buf_per_queue: usize,
}

impl Default for ClientOpts {
    fn default() -> Self {
        ClientOpts {
            num_queues: 1,
            read_only: false,
            queue_size: None,
            num_poll_queues: 0,
            buf_per_queue: 8 * MIB as usize,
        }
    }
}

/// Where setting up a connection failed.
#[derive(Debug)]
pub struct ConnectError {
    pub stage: &'static str,
    pub err: blkio::Error,
}

impl ConnectError {
    pub fn errno(&self) -> Errno {
        self.err.errno()
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} ({:?})", self.stage, self.err, self.err.errno())
    }
}

fn stage<T>(stage: &'static str, r: blkio::Result<T>) -> Result<T, ConnectError> {
    r.map_err(|err| ConnectError { stage, err })
}

/// A started libblkio virtio-blk-vhost-user connection.
pub struct Client {
    /// The libblkio instance, for reading properties.
    pub blkio: Blkio,
    /// One per virtqueue, in queue order.
    pub queues: Vec<Queue>,
}

impl Client {
    /// Connects with `num_queues` queues, panicking on failure.
    pub fn connect(socket: &Path, num_queues: i32) -> Client {
        Client::connect_with(
            socket,
            ClientOpts {
                num_queues,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()))
    }

    /// Connects, retrying while the socket is not accepting yet (up to [`DAEMON_TIMEOUT`]).
    pub fn connect_with(socket: &Path, opts: ClientOpts) -> Result<Client, ConnectError> {
        let path = socket.to_str().expect("socket path is UTF-8");
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        let mut blkio = loop {
            let mut b = stage("blkio_new", Blkio::new("virtio-blk-vhost-user"))?;
            stage("set path", b.set_str("path", path))?;
            stage("set read-only", b.set_bool("read-only", opts.read_only))?;
            match b.connect() {
                Ok(()) => break b,
                Err(e)
                    if (e.errno() == Errno::CONNREFUSED || e.errno() == Errno::NOENT)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(err) => {
                    return Err(ConnectError {
                        stage: "connect",
                        err,
                    })
                }
            }
        };
        stage(
            "set num-queues",
            blkio.set_i32("num-queues", opts.num_queues),
        )?;
        stage(
            "set num-poll-queues",
            blkio.set_i32("num-poll-queues", opts.num_poll_queues),
        )?;
        if let Some(qs) = opts.queue_size {
            stage("set queue-size", blkio.set_i32("queue-size", qs))?;
        }
        let started = stage("start", blkio.start())?;
        let nq = started.queues.len() + started.poll_queues.len();
        assert_eq!(
            nq,
            (opts.num_queues + opts.num_poll_queues) as usize,
            "libblkio started a different number of queues"
        );

        let total = opts.buf_per_queue * nq.max(1);
        let region = stage("alloc_mem_region", blkio.alloc_mem_region(total))?;
        stage("map_mem_region", blkio.map_mem_region(&region))?;

        let queues = started
            .queues
            .into_iter()
            .chain(started.poll_queues)
            .enumerate()
            .map(|(i, q)| Queue {
                q,
                index: i,
                // The region is one contiguous shared mapping; each queue gets a disjoint slice.
                base: (region.addr + i * opts.buf_per_queue) as *mut u8,
                len: opts.buf_per_queue,
            })
            .collect();
        Ok(Client { blkio, queues })
    }

    /// Allocates and maps another memory region (ADD_MEM_REG).
    pub fn add_region(&mut self, len: usize) -> blkio::MemoryRegion {
        let region = self.blkio.alloc_mem_region(len).expect("alloc_mem_region");
        self.blkio.map_mem_region(&region).expect("map_mem_region");
        region
    }

    /// Unmaps a region from the device (REM_MEM_REG); the client's own mapping stays.
    pub fn unmap_region(&mut self, region: &blkio::MemoryRegion) {
        self.blkio.unmap_mem_region(region);
    }

    /// Disk size in bytes as the device reports it.
    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity property")
    }

    pub fn prop_i32(&self, name: &str) -> i32 {
        self.blkio
            .get_i32(name)
            .unwrap_or_else(|e| panic!("property {name}: {e}"))
    }

    pub fn prop_u64(&self, name: &str) -> u64 {
        self.blkio
            .get_u64(name)
            .unwrap_or_else(|e| panic!("property {name}: {e}"))
    }

    pub fn prop_bool(&self, name: &str) -> bool {
        self.blkio
            .get_bool(name)
            .unwrap_or_else(|e| panic!("property {name}: {e}"))
    }

    /// The data-path limits the device advertised.
    pub fn limits(&self) -> Limits {
        Limits {
            max_segments: self.prop_i32("max-segments").max(1) as usize,
            max_segment_len: match self.prop_i32("max-segment-len") {
                0 => usize::MAX,
                n => n as usize,
            },
        }
    }

    pub fn q(&mut self, i: usize) -> &mut Queue {
        &mut self.queues[i]
    }
}

/// Segment limits (SEG_MAX / SIZE_MAX) the device advertised.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_segments: usize,
    pub max_segment_len: usize,
}

/// A piece of a queue's buffer: `len` bytes at `buf_off`.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub buf_off: usize,
    pub len: usize,
}

/// One request of a batch.
#[derive(Clone, Debug)]
pub enum Req {
    Read {
        offset: u64,
        segs: Vec<Seg>,
    },
    Write {
        offset: u64,
        segs: Vec<Seg>,
        fua: bool,
    },
    /// Reads into memory outside the queue's buffer (e.g. a region since unmapped).
    ReadRaw {
        offset: u64,
        addr: usize,
        len: usize,
    },
    /// Writes from memory outside the queue's buffer.
    WriteRaw {
        offset: u64,
        addr: usize,
        len: usize,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        no_unmap: bool,
    },
}

impl Req {
    pub fn read(offset: u64, buf_off: usize, len: usize) -> Req {
        Req::Read {
            offset,
            segs: vec![Seg { buf_off, len }],
        }
    }
    pub fn write(offset: u64, buf_off: usize, len: usize) -> Req {
        Req::Write {
            offset,
            segs: vec![Seg { buf_off, len }],
            fua: false,
        }
    }
}

/// One virtqueue with a private buffer inside the client's mapped memory region.
pub struct Queue {
    q: Blkioq,
    pub index: usize,
    base: *mut u8,
    len: usize,
}

// SAFETY: `base..base+len` is memory no other `Queue` touches, and `Blkioq` is `Send`.
unsafe impl Send for Queue {}

impl Queue {
    /// This queue's buffer: where request data is taken from and read into.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the slice lies inside a region libblkio allocated and keeps mapped until the
        // `Blkio` and every `Blkioq` (including `self.q`) are dropped; no other queue uses this
        // part of it, and `&mut self` means no request of ours is in flight while it is borrowed
        // (`run` only returns once every request has completed).
        unsafe { std::slice::from_raw_parts_mut(self.base, self.len) }
    }

    pub fn buf_len(&self) -> usize {
        self.len
    }

    fn iovecs(&self, segs: &[Seg]) -> Vec<blkio::iovec> {
        segs.iter()
            .map(|s| {
                assert!(
                    s.buf_off
                        .checked_add(s.len)
                        .is_some_and(|end| end <= self.len),
                    "segment {s:?} outside the queue's {} byte buffer",
                    self.len
                );
                blkio::iovec {
                    // SAFETY: in bounds of this queue's buffer, checked above.
                    iov_base: unsafe { self.base.add(s.buf_off) }.cast(),
                    iov_len: s.len,
                }
            })
            .collect()
    }

    /// Submits every request of `reqs` before waiting, then waits for all completions. Returns
    /// each request's result (0 or a negative errno), in the order of `reqs`.
    pub fn run(&mut self, reqs: &[Req]) -> Vec<i32> {
        if reqs.is_empty() {
            return Vec::new();
        }
        // libblkio keeps pointers to these iovec arrays until each request reaches the ring,
        // which may be during do_io() if the ring is full, so they live until the end.
        let iovecs: Vec<Vec<blkio::iovec>> = reqs
            .iter()
            .map(|r| match r {
                Req::Read { segs, .. } | Req::Write { segs, .. } => self.iovecs(segs),
                Req::ReadRaw { addr, len, .. } | Req::WriteRaw { addr, len, .. } => {
                    vec![blkio::iovec {
                        iov_base: *addr as *mut libc::c_void,
                        iov_len: *len,
                    }]
                }
                _ => Vec::new(),
            })
            .collect();
        for (i, (r, iov)) in reqs.iter().zip(&iovecs).enumerate() {
            match r {
                Req::Read { offset, .. } | Req::ReadRaw { offset, .. } => self.q.readv(
                    *offset,
                    iov.as_ptr(),
                    iov.len() as u32,
                    i,
                    ReqFlags::empty(),
                ),
                Req::WriteRaw { offset, .. } => self.q.writev(
                    *offset,
                    iov.as_ptr(),
                    iov.len() as u32,
                    i,
                    ReqFlags::empty(),
                ),
                Req::Write { offset, fua, .. } => {
                    let flags = if *fua {
                        ReqFlags::FUA
                    } else {
                        ReqFlags::empty()
                    };
                    self.q
                        .writev(*offset, iov.as_ptr(), iov.len() as u32, i, flags)
                }
                Req::Flush => self.q.flush(i, ReqFlags::empty()),
                Req::Discard { offset, len } => self.q.discard(*offset, *len, i, ReqFlags::empty()),
                Req::WriteZeroes {
                    offset,
                    len,
                    no_unmap,
                } => {
                    let flags = if *no_unmap {
                        ReqFlags::NO_UNMAP
                    } else {
                        ReqFlags::empty()
                    };
                    self.q.write_zeroes(*offset, *len, i, flags)
                }
            }
        }
        self.wait_all(reqs.len())
    }

    fn wait_all(&mut self, n: usize) -> Vec<i32> {
        let mut results: Vec<Option<i32>> = vec![None; n];
        let mut done = 0;
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..n.min(1024)).map(|_| MaybeUninit::uninit()).collect();
        let deadline = Instant::now() + IO_TIMEOUT;
        while done < n {
            let mut timeout = deadline.saturating_duration_since(Instant::now());
            let got = self
                .q
                .do_io(&mut completions, 1, Some(&mut timeout), None)
                .unwrap_or_else(|e| {
                    panic!(
                        "queue {}: do_io failed ({e}, {:?}) with {done} of {n} requests completed",
                        self.index,
                        e.errno()
                    )
                });
            for c in &completions[..got] {
                // SAFETY: do_io() initialised the first `got` elements.
                let c = unsafe { c.assume_init_read() };
                let slot = results
                    .get_mut(c.user_data)
                    .unwrap_or_else(|| panic!("completion for unknown request {}", c.user_data));
                assert!(slot.is_none(), "request {} completed twice", c.user_data);
                *slot = Some(c.ret);
                done += 1;
            }
        }
        results.into_iter().map(Option::unwrap).collect()
    }

    /// Starts requests and returns without waiting for them (for disconnect-while-busy tests).
    /// The iovec arrays are leaked so they stay valid whatever happens to the queue.
    pub fn submit_and_abandon(&mut self, reqs: &[Req]) {
        for (i, r) in reqs.iter().enumerate() {
            match r {
                Req::Read { offset, segs } => {
                    let iov = Box::leak(self.iovecs(segs).into_boxed_slice());
                    self.q.readv(
                        *offset,
                        iov.as_ptr(),
                        iov.len() as u32,
                        i,
                        ReqFlags::empty(),
                    )
                }
                Req::Write { offset, segs, .. } => {
                    let iov = Box::leak(self.iovecs(segs).into_boxed_slice());
                    self.q.writev(
                        *offset,
                        iov.as_ptr(),
                        iov.len() as u32,
                        i,
                        ReqFlags::empty(),
                    )
                }
                Req::Flush => self.q.flush(i, ReqFlags::empty()),
                _ => unimplemented!("only reads, writes and flushes"),
            }
        }
        // do_io with min_completions 0 kicks the device without waiting.
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..reqs.len()).map(|_| MaybeUninit::uninit()).collect();
        let _ = self.q.do_io(&mut completions, 0, None, None);
    }

    /// Writes `data` at `offset` from the start of this queue's buffer.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> i32 {
        self.buf()[..data.len()].copy_from_slice(data);
        self.run(&[Req::write(offset, 0, data.len())])[0]
    }

    /// Reads `len` bytes at `offset`; `Err(ret)` if the request failed.
    pub fn read_at(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        match self.run(&[Req::read(offset, 0, len)])[0] {
            0 => Ok(self.buf()[..len].to_vec()),
            ret => Err(ret),
        }
    }

    pub fn flush(&mut self) -> i32 {
        self.run(&[Req::Flush])[0]
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> i32 {
        self.run(&[Req::Discard { offset, len }])[0]
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, no_unmap: bool) -> i32 {
        self.run(&[Req::WriteZeroes {
            offset,
            len,
            no_unmap,
        }])[0]
    }

    /// Reads `len` bytes at `offset` in 1 MiB requests, many in flight, panicking on errors.
    pub fn read_range(&mut self, offset: u64, len: u64) -> Vec<u8> {
        const CHUNK: u64 = MIB;
        let per_batch = (self.len as u64 / CHUNK).max(1);
        let mut out = Vec::with_capacity(len as usize);
        let mut pos = offset;
        while pos < offset + len {
            let mut reqs = Vec::new();
            let mut sizes = Vec::new();
            while reqs.len() < per_batch as usize && pos < offset + len {
                let n = CHUNK.min(offset + len - pos).min(self.len as u64);
                reqs.push(Req::read(pos, reqs.len() * CHUNK as usize, n as usize));
                sizes.push(n as usize);
                pos += n;
            }
            let results = self.run(&reqs);
            for (i, (ret, r)) in results.iter().zip(&reqs).enumerate() {
                assert_eq!(*ret, 0, "read_range: request {i} ({r:?}) failed with {ret}");
            }
            for (i, n) in sizes.iter().enumerate() {
                let start = i * CHUNK as usize;
                out.extend_from_slice(&self.buf()[start..start + n]);
            }
        }
        out
    }
}

/// Splits `len` bytes at `buf_off` into 1..=max segments, some of them at byte (not sector)
/// boundaries if `unaligned`, none longer than `limits.max_segment_len`.
pub fn split_segments(
    rng: &mut Rng,
    buf_off: usize,
    len: usize,
    want: usize,
    limits: Limits,
    unaligned: bool,
) -> Vec<Seg> {
    let want = want.clamp(1, limits.max_segments);
    let mut cuts: Vec<usize> = (1..want)
        .map(|_| {
            let c = rng.below(len as u64) as usize;
            if unaligned {
                c
            } else {
                c & !4095
            }
        })
        .filter(|&c| c > 0 && c < len)
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut segs = Vec::new();
    let mut prev = 0;
    for c in cuts.into_iter().chain(std::iter::once(len)) {
        let mut start = prev;
        while start < c {
            let n = (c - start).min(limits.max_segment_len);
            segs.push(Seg {
                buf_off: buf_off + start,
                len: n,
            });
            start += n;
        }
        prev = c;
    }
    assert!(
        segs.len() <= limits.max_segments,
        "cannot split {len} bytes into at most {} segments of at most {} bytes",
        limits.max_segments,
        limits.max_segment_len
    );
    segs
}

/// Errno helper for comparing request results.
pub fn neg(e: Errno) -> i32 {
    -e.raw_os_error()
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
