//! Per-VM workers, end to end: each VMM is served by a worker process that carries the VMM's
//! identity (uid, gid, groups, every rlimit, every cgroup, affinity, nice, io priority), so
//! what a VM's I/O costs is charged to that VM and bounded by its limits.
//!
//! The VMM is played by a separate process, so it can be placed like a real one: this very test
//! binary, re-run with `--exact frontend_process --ignored` and a job in [`JOB_ENV`]. While
//! still root, that process joins fresh cgroups (cpu, cpuacct, memory, pids, blkio and the v2
//! hierarchy), lowers its rlimits, sets nice/affinity/io priority, and becomes another user;
//! then it connects with libblkio (the harness [`Client`]), does I/O, and answers commands on
//! its stdin (see [`frontend`]). The tests then compare /proc of the worker with /proc of the
//! frontend.
//!
//! These tests need root (CI runs as root); elsewhere they say so and pass without running.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// The environment variable carrying a frontend process's job.
const JOB_ENV: &str = "VUBLK_WORKERS_FRONTEND_JOB";
/// Every line the frontend process means for the test starts with this.
const LINE_PREFIX: &str = "FRONTEND ";
/// How long a frontend may take to answer a command.
const FRONTEND_TIMEOUT: Duration = Duration::from_secs(20);

const NOBODY: u32 = 65534;
const USERS_GID: u32 = 100;

/// The v1 controllers a frontend gets fresh cgroups in (each is its own hierarchy here).
const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "blkio"];

/// One byte range of a device that one frontend owns, for data checks.
const REGION_LEN: usize = 256 * KIB as usize;

// =============================================================================================
// The frontend process
// =============================================================================================

/// Not a test: the frontend process the other tests start (see the module docs). Without a job
/// in the environment it does nothing.
#[test]
#[ignore = "the frontend process the tests in this file start; does nothing on its own"]
fn frontend_process() {
    let Ok(job) = std::env::var(JOB_ENV) else {
        return;
    };
    frontend::run(Job::decode(&job));
}

/// What a frontend process does: where it places itself, who it becomes, what it connects to.
#[derive(Clone, Debug, Default)]
struct Job {
    sockets: Vec<PathBuf>,
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    /// Cgroup directories to join (v1 and v2 alike: `0` is written to their cgroup.procs).
    cgroups: Vec<PathBuf>,
    nofile: Option<(u64, u64)>,
    /// RLIMIT_NPROC as (soft, hard).
    nproc: Option<(u64, u64)>,
    /// RLIMIT_NPROC = this process's own thread count plus this many (soft and hard), so that
    /// exactly that many more tasks of the uid fit (the uid must have no other processes).
    nproc_headroom: Option<u64>,
    nice: Option<i32>,
    /// CPUs to run on.
    affinity: Option<Vec<usize>>,
    /// Raw io priority (class << 13 | data).
    ioprio: Option<i32>,
    num_queues: i32,
    /// Pattern seed of this frontend's writes.
    seed: u64,
    /// Byte offset of this frontend's region on every device.
    region: u64,
    /// Print PLACED and wait for `connect` before connecting (so the test can set limits).
    wait_before_connect: bool,
    /// The connection is expected to fail: report CONNECT-FAILED instead of panicking.
    expect_failure: bool,
}

impl Job {
    fn new(sockets: &[&Path], uid: u32, gid: u32, groups: &[u32]) -> Job {
        Job {
            sockets: sockets.iter().map(|p| p.to_path_buf()).collect(),
            uid,
            gid,
            groups: groups.to_vec(),
            num_queues: 1,
            seed: 1,
            ..Job::default()
        }
    }

    fn encode(&self) -> String {
        fn list<T: ToString>(v: &[T]) -> String {
            v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
        }
        fn paths(v: &[PathBuf]) -> String {
            v.iter()
                .map(|p| p.to_str().expect("UTF-8 path").to_string())
                .collect::<Vec<_>>()
                .join(",")
        }
        let mut kv = vec![
            format!("sockets={}", paths(&self.sockets)),
            format!("uid={}", self.uid),
            format!("gid={}", self.gid),
            format!("groups={}", list(&self.groups)),
            format!("cgroups={}", paths(&self.cgroups)),
            format!("num_queues={}", self.num_queues),
            format!("seed={}", self.seed),
            format!("region={}", self.region),
            format!("wait_before_connect={}", self.wait_before_connect),
            format!("expect_failure={}", self.expect_failure),
        ];
        if let Some((s, h)) = self.nofile {
            kv.push(format!("nofile={s}:{h}"));
        }
        if let Some((s, h)) = self.nproc {
            kv.push(format!("nproc={s}:{h}"));
        }
        if let Some(n) = self.nproc_headroom {
            kv.push(format!("nproc_headroom={n}"));
        }
        if let Some(n) = self.nice {
            kv.push(format!("nice={n}"));
        }
        if let Some(cpus) = &self.affinity {
            kv.push(format!("affinity={}", list(cpus)));
        }
        if let Some(p) = self.ioprio {
            kv.push(format!("ioprio={p}"));
        }
        kv.join(";")
    }

    fn decode(s: &str) -> Job {
        fn list<T: std::str::FromStr>(v: &str) -> Vec<T>
        where
            T::Err: std::fmt::Debug,
        {
            v.split(',')
                .filter(|x| !x.is_empty())
                .map(|x| x.parse().expect("job list item"))
                .collect()
        }
        fn pair(v: &str) -> (u64, u64) {
            let (s, h) = v.split_once(':').expect("soft:hard");
            (s.parse().expect("soft"), h.parse().expect("hard"))
        }
        let mut job = Job::default();
        for kv in s.split(';') {
            let (k, v) = kv.split_once('=').expect("key=value");
            match k {
                "sockets" => {
                    job.sockets = v
                        .split(',')
                        .filter(|x| !x.is_empty())
                        .map(PathBuf::from)
                        .collect()
                }
                "uid" => job.uid = v.parse().expect("uid"),
                "gid" => job.gid = v.parse().expect("gid"),
                "groups" => job.groups = list(v),
                "cgroups" => {
                    job.cgroups = v
                        .split(',')
                        .filter(|x| !x.is_empty())
                        .map(PathBuf::from)
                        .collect()
                }
                "num_queues" => job.num_queues = v.parse().expect("num_queues"),
                "seed" => job.seed = v.parse().expect("seed"),
                "region" => job.region = v.parse().expect("region"),
                "wait_before_connect" => job.wait_before_connect = v == "true",
                "expect_failure" => job.expect_failure = v == "true",
                "nofile" => job.nofile = Some(pair(v)),
                "nproc" => job.nproc = Some(pair(v)),
                "nproc_headroom" => job.nproc_headroom = Some(v.parse().expect("nproc_headroom")),
                "nice" => job.nice = Some(v.parse().expect("nice")),
                "affinity" => job.affinity = Some(list(v)),
                "ioprio" => job.ioprio = Some(v.parse().expect("ioprio")),
                _ => panic!("unknown job key {k}"),
            }
        }
        job
    }
}

/// The frontend process's side. It prints `FRONTEND <WORD> ...` lines on stdout and reads one
/// command per line on stdin:
/// - (with `wait_before_connect`) `PLACED`, then waits for `connect`;
/// - `READY` once connected to every socket, with its region written and read back;
/// - `io N` → N rounds of writes and verified reads on every device, then `IO-DONE`;
/// - `busy` → `BUSY`, then I/O without end (until killed);
/// - `reconnect` → drops its connections, connects again, checks its region survived, `READY`;
/// - end of stdin → exits.
///
/// If a connection fails and the job expects it, it prints `CONNECT-FAILED <error>` and exits.
mod frontend {
    use super::*;

    fn say(line: &str) {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{LINE_PREFIX}{line}").expect("stdout");
        out.flush().expect("stdout");
    }

    fn rlimit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) {
        let rl = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the local.
        let ret = unsafe { libc::setrlimit(resource, &rl) };
        assert_eq!(
            ret,
            0,
            "setrlimit {resource} {soft}:{hard}: {}",
            std::io::Error::last_os_error()
        );
    }

    fn threads_of_self() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .expect("Threads line")
            .trim()
            .parse()
            .expect("thread count")
    }

    /// Puts this process where the job says and becomes its user, while still root.
    fn place(job: &Job) {
        for dir in &job.cgroups {
            let procs = dir.join("cgroup.procs");
            std::fs::write(&procs, "0")
                .unwrap_or_else(|e| panic!("joining {}: {e}", procs.display()));
        }
        // Affinity, nice and io priority belong to each thread: set them on every thread of
        // this process (libtest runs us on a thread of its own; the main thread is what others
        // see as "the process").
        let threads: Vec<libc::pid_t> = std::fs::read_dir("/proc/self/task")
            .expect("/proc/self/task")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        for tid in threads {
            if let Some(cpus) = &job.affinity {
                // SAFETY: an all-zero cpu_set_t is a valid empty set.
                let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
                for &cpu in cpus {
                    // SAFETY: cpu < CPU_SETSIZE, a small index the test chose.
                    unsafe { libc::CPU_SET(cpu, &mut set) };
                }
                // SAFETY: reads the local set.
                let ret = unsafe {
                    libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
                };
                assert_eq!(
                    ret,
                    0,
                    "sched_setaffinity: {}",
                    std::io::Error::last_os_error()
                );
            }
            if let Some(nice) = job.nice {
                // SAFETY: scalar arguments only.
                let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
                assert_eq!(ret, 0, "setpriority: {}", std::io::Error::last_os_error());
            }
            if let Some(prio) = job.ioprio {
                // SAFETY: scalar arguments only (IOPRIO_WHO_PROCESS = 1).
                let ret = unsafe {
                    libc::syscall(
                        libc::SYS_ioprio_set,
                        1 as libc::c_long,
                        tid as libc::c_long,
                        prio as libc::c_long,
                    )
                };
                assert_eq!(ret, 0, "ioprio_set: {}", std::io::Error::last_os_error());
            }
        }
        if let Some((soft, hard)) = job.nofile {
            rlimit(libc::RLIMIT_NOFILE, soft, hard);
        }
        if let Some((soft, hard)) = job.nproc {
            rlimit(libc::RLIMIT_NPROC, soft, hard);
        }
        if let Some(headroom) = job.nproc_headroom {
            let n = threads_of_self() + headroom;
            rlimit(libc::RLIMIT_NPROC, n, n);
        }
        let groups: Vec<libc::gid_t> = job.groups.clone();
        // SAFETY: setgroups reads `groups.len()` entries of the vector; glibc applies it (and
        // the id changes below) to every thread of the process.
        let ret = unsafe { libc::setgroups(groups.len(), groups.as_ptr()) };
        assert_eq!(ret, 0, "setgroups: {}", std::io::Error::last_os_error());
        // SAFETY: scalar arguments only.
        let ret = unsafe { libc::setresgid(job.gid, job.gid, job.gid) };
        assert_eq!(ret, 0, "setresgid: {}", std::io::Error::last_os_error());
        // SAFETY: scalar arguments only.
        let ret = unsafe { libc::setresuid(job.uid, job.uid, job.uid) };
        assert_eq!(ret, 0, "setresuid: {}", std::io::Error::last_os_error());
        // The uid change cleared the parent-death signal the test armed: arm it again, so a
        // test that dies takes its frontends with it.
        // SAFETY: prctl with scalar arguments.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    }

    fn connect_all(job: &Job) -> Result<Vec<Client>, String> {
        let mut clients = Vec::new();
        for socket in &job.sockets {
            let opts = ClientOpts {
                num_queues: job.num_queues,
                buf_per_queue: REGION_LEN,
                ..Default::default()
            };
            let client = Client::connect_with(socket, opts)
                .map_err(|e| format!("{}: {e}", socket.display()))?;
            clients.push(client);
        }
        Ok(clients)
    }

    /// Writes this frontend's pattern over its region on every queue of every device, in 4 KiB
    /// requests (many small requests: CPU work for the worker), and reads it back.
    fn round(job: &Job, clients: &mut [Client]) {
        const REQ: usize = 4096;
        for (d, client) in clients.iter_mut().enumerate() {
            let nq = client.queues.len();
            for (qi, q) in client.queues.iter_mut().enumerate() {
                let part = REGION_LEN / nq;
                let start = job.region + (qi * part) as u64;
                let want = pattern(job.seed + d as u64, start, part);
                q.buf()[..part].copy_from_slice(&want);
                let writes: Vec<Req> = (0..part / REQ)
                    .map(|i| Req::write(start + (i * REQ) as u64, i * REQ, REQ))
                    .collect();
                let results = q.run(&writes);
                assert!(
                    results.iter().all(|r| *r == 0),
                    "device {d} queue {qi}: writes failed: {results:?}"
                );
                q.buf()[..part].fill(0);
                let reads: Vec<Req> = (0..part / REQ)
                    .map(|i| Req::read(start + (i * REQ) as u64, i * REQ, REQ))
                    .collect();
                let results = q.run(&reads);
                assert!(
                    results.iter().all(|r| *r == 0),
                    "device {d} queue {qi}: reads failed: {results:?}"
                );
                let got = q.buf()[..part].to_vec();
                assert_same(&got, &want, &format!("device {d} queue {qi} read back"));
            }
            assert_eq!(client.queues[0].flush(), 0, "device {d}: flush failed");
        }
    }

    /// Reads the region back on every device and checks the pattern is there.
    fn verify(job: &Job, clients: &mut [Client]) {
        for (d, client) in clients.iter_mut().enumerate() {
            let got = client.queues[0].read_range(job.region, REGION_LEN as u64);
            assert_same(
                &got,
                &pattern(job.seed + d as u64, job.region, REGION_LEN),
                &format!("device {d} after reconnecting"),
            );
        }
    }

    pub fn run(job: Job) {
        place(&job);
        let mut lines = std::io::stdin().lock().lines();
        if job.wait_before_connect {
            say("PLACED");
            match lines.next() {
                Some(Ok(l)) if l == "connect" => {}
                _ => std::process::exit(0),
            }
        }
        let mut clients = match connect_all(&job) {
            Ok(c) => c,
            Err(e) if job.expect_failure => {
                say(&format!("CONNECT-FAILED {e}"));
                std::process::exit(0);
            }
            Err(e) => panic!("connecting: {e}"),
        };
        round(&job, &mut clients);
        say("READY");
        for line in lines {
            let line = line.expect("stdin");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("io") => {
                    let n: usize = words.next().map_or(1, |n| n.parse().expect("io count"));
                    for _ in 0..n {
                        round(&job, &mut clients);
                    }
                    say("IO-DONE");
                }
                Some("busy") => {
                    say("BUSY");
                    loop {
                        round(&job, &mut clients);
                    }
                }
                Some("reconnect") => {
                    drop(std::mem::take(&mut clients));
                    clients = connect_all(&job).unwrap_or_else(|e| panic!("reconnecting: {e}"));
                    verify(&job, &mut clients);
                    round(&job, &mut clients);
                    say("READY");
                }
                other => panic!("unknown command {other:?}"),
            }
        }
        drop(clients);
        std::process::exit(0);
    }
}

// =============================================================================================
// The test's side: frontends, cgroups, /proc
// =============================================================================================

/// A running frontend process.
struct Frontend {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    log: PathBuf,
}

impl Frontend {
    fn start(dir: &Path, name: &str, job: &Job) -> Frontend {
        let log = dir.join(format!("frontend-{name}.log"));
        let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
        cmd.args([
            "--exact",
            "frontend_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env(JOB_ENV, job.encode())
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("frontend log"));
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("spawn the frontend process");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(l) = line.strip_prefix(LINE_PREFIX) {
                    if tx.send(l.to_string()).is_err() {
                        return;
                    }
                }
            }
        });
        let stdin = child.stdin.take();
        Frontend {
            name: name.to_string(),
            child,
            stdin,
            lines,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the next line; panics (with the frontend's stderr) if it does not start with
    /// `word`. Returns the rest of the line.
    #[track_caller]
    fn expect(&mut self, word: &str, daemon: &Daemon) -> String {
        match self.lines.recv_timeout(FRONTEND_TIMEOUT) {
            Ok(line) if line.split_whitespace().next() == Some(word) => line[word.len()..].trim().to_string(),
            other => panic!(
                "frontend {} (pid {}): expected {word}, got {other:?}\n--- frontend stderr ---\n{}\n--- vublk log ---\n{}",
                self.name,
                self.pid(),
                self.log(),
                daemon.log()
            ),
        }
    }

    fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{command}").expect("write to the frontend");
        stdin.flush().expect("flush to the frontend");
    }

    /// Closes its stdin and waits for it to exit successfully.
    #[track_caller]
    fn finish(&mut self) {
        self.stdin = None;
        let deadline = Instant::now() + FRONTEND_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("waitpid") {
                assert!(
                    status.success(),
                    "frontend {} exited with {status}\n{}",
                    self.name,
                    self.log()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "frontend {} did not exit\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, and reaps it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Frontend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether this machine can run these tests; says why not.
fn can_run() -> bool {
    if !is_root() {
        eprintln!("skipped: per-VM worker tests need root");
        return false;
    }
    true
}

/// A test's temp dir, searchable by the frontends' users.
fn shared_dir() -> tempfile::TempDir {
    let dir = test_dir();
    set_mode(dir.path(), 0o755);
    dir
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// An image holding `pattern(seed)` that only `uid` may open (mode 0600).
fn private_image(path: &Path, size: u64, seed: u64, uid: u32, gid: u32) {
    create_image(path, size, seed);
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown image");
    set_mode(path, 0o600);
}

/// The daemon creates its sockets with its umask (0755 as root): let other users connect.
fn open_socket(path: &Path) {
    set_mode(path, 0o777);
}

/// Waits until the daemon's log contains `needle`.
#[track_caller]
fn wait_for_log(daemon: &Daemon, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !daemon.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "vublk never logged {needle:?}; log:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A worker of `daemon` whose /proc/PID/status says `Uid: uid ...`.
#[track_caller]
fn worker_with_uid(daemon: &Daemon, uid: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found: Vec<u32> = workers_of(daemon.pid())
            .into_iter()
            .filter(|w| status_ids(*w).0 == uid)
            .collect();
        match found.as_slice() {
            [one] => return *one,
            [] if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => panic!(
                "workers of {} with uid {uid}: {found:?}; log:\n{}",
                daemon.pid(),
                daemon.log()
            ),
        }
    }
}

fn proc_file(pid: u32, file: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/{file}: {e}"))
}

/// `name:\tvalue` lines of /proc/PID/status.
fn status(pid: u32) -> BTreeMap<String, String> {
    proc_file(pid, "status")
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// (real uid, real gid) of a process.
fn status_ids(pid: u32) -> (u32, u32) {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return (u32::MAX, u32::MAX);
    };
    let first = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(u32::MAX)
    };
    (first("Uid:"), first("Gid:"))
}

/// User plus system CPU time of a whole process (every thread, live or exited), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = proc_file(pid, "stat");
    let rest = &stat[stat.rfind(')').expect("stat") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

fn ticks_to_ns(ticks: u64) -> u64 {
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    ticks * 1_000_000_000 / hz
}

fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Exited: gone, or a zombie nobody reaped yet.
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[track_caller]
fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

/// What each open fd of a process is (`socket:[…]`, `anon_inode:[pidfd]`, a path), sorted.
fn fd_targets(pid: u32) -> Vec<String> {
    let mut targets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read fd dir")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .collect();
    targets.sort();
    targets
}

/// The (soft, hard) limit of one /proc/PID/limits line, `None` for unlimited.
fn parse_limit_line(line: &str) -> Option<(String, Option<u64>, Option<u64>)> {
    // Columns: a name up to column 26, then soft, hard, units.
    let (name, rest) = line.split_at(line.len().min(26));
    let mut f = rest.split_whitespace();
    let value = |v: &str| {
        if v == "unlimited" {
            None
        } else {
            v.parse().ok()
        }
    };
    let soft = value(f.next()?);
    let hard = value(f.next()?);
    Some((name.trim().to_string(), soft, hard))
}

/// Asserts every line of the worker's /proc/PID/limits equals the frontend's, except where the
/// supervisor's own hard limit is lower (it cannot raise it): there the worker must carry the
/// lower limits.
#[track_caller]
fn assert_same_limits(worker: u32, frontend: u32, supervisor: u32) {
    let w = proc_file(worker, "limits");
    let f = proc_file(frontend, "limits");
    let s = proc_file(supervisor, "limits");
    let (w, f, s): (Vec<&str>, Vec<&str>, Vec<&str>) = (
        w.lines().collect(),
        f.lines().collect(),
        s.lines().collect(),
    );
    assert_eq!(
        w.len(),
        f.len(),
        "limits line count differs:\nworker:\n{}\nfrontend:\n{}",
        w.join("\n"),
        f.join("\n")
    );
    for ((wl, fl), sl) in w.iter().zip(&f).zip(&s) {
        if wl == fl {
            continue;
        }
        let (name, fsoft, fhard) = parse_limit_line(fl).expect("frontend limit line");
        let (_, wsoft, whard) = parse_limit_line(wl).expect("worker limit line");
        let (_, _, shard) = parse_limit_line(sl).expect("supervisor limit line");
        let lower = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (None, x) | (x, None) => x,
            (Some(a), Some(b)) => Some(a.min(b)),
        };
        let supervisor_lower = shard.is_some() && lower(fhard, shard) != fhard;
        assert!(
            supervisor_lower && whard == lower(fhard, shard) && wsoft == lower(fsoft, whard),
            "{name}: the worker has\n  {wl}\nthe frontend has\n  {fl}\n(the supervisor has {sl})"
        );
    }
}

/// SIGKILLs a process (through a pidfd, so never a recycled pid) when dropped: a test that
/// fails must not leave a stopped worker behind.
struct KillOnDrop(Option<std::os::fd::OwnedFd>);

impl KillOnDrop {
    fn new(pid: u32) -> KillOnDrop {
        // SAFETY: pidfd_open takes scalars and returns a new fd or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0 as libc::c_long) };
        // SAFETY: a new fd nothing else owns (when non-negative).
        KillOnDrop((fd >= 0).then(|| unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32)
        }))
    }

    /// Lets the process live.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(fd) = &self.0 {
            // SAFETY: pidfd_send_signal with a pidfd we own and no siginfo.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    std::os::fd::AsRawFd::as_raw_fd(fd),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cgroups
// ---------------------------------------------------------------------------------------------

/// Fresh cgroups for one frontend: one per v1 controller of [`V1_CONTROLLERS`] and one in the
/// v2 hierarchy, each created below the test process's own cgroup, removed on drop.
struct Cgroups {
    /// Controller ("" for v2) → directory.
    dirs: Vec<(String, PathBuf)>,
}

static CGROUP_SEQ: AtomicU32 = AtomicU32::new(0);

/// Mount points of cgroup hierarchies: controller ("" for v2) → (mount point, mount root).
fn cgroup_mounts() -> Vec<(String, PathBuf, String)> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mut mounts = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (root, point) = (left[3].to_string(), PathBuf::from(left[4]));
        match right[0] {
            "cgroup2" => mounts.push((String::new(), point, root)),
            "cgroup" => {
                for option in right.get(2).unwrap_or(&"").split(',') {
                    if V1_CONTROLLERS.contains(&option) {
                        mounts.push((option.to_string(), point.clone(), root.clone()));
                    }
                }
            }
            _ => {}
        }
    }
    mounts
}

impl Cgroups {
    fn create(tag: &str) -> Cgroups {
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
        let mut dirs = Vec::new();
        let name = format!(
            "vublk-test-{}-{}-{tag}",
            std::process::id(),
            CGROUP_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        for (controller, point, root) in cgroup_mounts() {
            let ours = own.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                let matches = if controller.is_empty() {
                    controllers.is_empty()
                } else {
                    controllers.split(',').any(|c| c == controller)
                };
                matches.then(|| path.to_string())
            });
            let Some(ours) = ours else { continue };
            let below = ours
                .strip_prefix(root.trim_end_matches('/'))
                .unwrap_or(&ours)
                .trim_start_matches('/');
            let dir = point.join(below).join(&name);
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            dirs.push((controller, dir));
        }
        for c in V1_CONTROLLERS {
            assert!(
                dirs.iter().any(|(k, _)| k == c),
                "no {c} cgroup hierarchy mounted"
            );
        }
        Cgroups { dirs }
    }

    fn all(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, d)| d.clone()).collect()
    }

    fn dir(&self, controller: &str) -> &Path {
        &self
            .dirs
            .iter()
            .find(|(c, _)| c == controller)
            .unwrap_or_else(|| panic!("no {controller} cgroup"))
            .1
    }

    fn read(&self, controller: &str, file: &str) -> String {
        let path = self.dir(controller).join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn write(&self, controller: &str, file: &str, value: &str) {
        let path = self.dir(controller).join(file);
        std::fs::write(&path, value)
            .unwrap_or_else(|e| panic!("{} <- {value}: {e}", path.display()));
    }

    /// Thread ids in the cgroup of `controller` (v1 `tasks`).
    fn tasks(&self, controller: &str) -> Vec<u32> {
        self.read(controller, "tasks")
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        // Processes may still be leaving (a worker exits after its frontend): wait a while. A
        // worker that stays (a failed test) is killed: only this test's processes are in here.
        for (_, dir) in self.dirs.iter().rev() {
            let start = Instant::now();
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if start.elapsed() >= Duration::from_secs(4) => {
                        eprintln!("cannot remove cgroup {}: {e}", dir.display());
                        break;
                    }
                    Err(_) if start.elapsed() >= Duration::from_secs(1) => {
                        let procs =
                            std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                            let stray = KillOnDrop::new(pid);
                            // The pid is pinned now: make sure it is still the one in here.
                            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                                .unwrap_or_default();
                            if !cgroup.contains(dir.file_name().unwrap().to_str().unwrap()) {
                                stray.disarm();
                            }
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

/// A test VMM: a frontend process in its own cgroups. The frontend goes first on drop, so the
/// cgroups are empty (once its worker followed) when they are removed.
struct Vmm {
    frontend: Frontend,
    cgroups: Cgroups,
}

impl std::ops::Deref for Vmm {
    type Target = Frontend;
    fn deref(&self) -> &Frontend {
        &self.frontend
    }
}

impl std::ops::DerefMut for Vmm {
    fn deref_mut(&mut self) -> &mut Frontend {
        &mut self.frontend
    }
}

/// Starts a frontend running `job` in fresh cgroups; waits for READY unless the job waits
/// before connecting or expects to fail.
fn vmm(dir: &Path, name: &str, mut job: Job, daemon: &Daemon) -> Vmm {
    let cgroups = Cgroups::create(name);
    job.cgroups = cgroups.all();
    let mut frontend = Frontend::start(dir, name, &job);
    if !job.wait_before_connect && !job.expect_failure {
        frontend.expect("READY", daemon);
    }
    Vmm { frontend, cgroups }
}

// =============================================================================================
// The tests
// =============================================================================================

/// A frontend running as nobody, in fresh cgroups, with lowered limits, another nice value,
/// affinity and io priority: its worker carries all of it, has no privileges left, and the CPU
/// it spends on the frontend's I/O is charged to the frontend's cgroup.
#[test]
fn worker_carries_the_vmm_identity() {
    if !can_run() {
        return;
    }
    let dir = shared_dir();
    let img = dir.path().join("nobody.img");
    private_image(&img, 8 * MIB, 7, NOBODY, NOBODY);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap(), "--num-queues", "2"],
    );
    open_socket(daemon.socket());

    let mut job = Job::new(&[daemon.socket()], NOBODY, NOBODY, &[NOBODY, USERS_GID]);
    job.nofile = Some((512, 1024));
    job.nproc = Some((200, 300));
    job.nice = Some(5);
    job.affinity = Some(vec![0]);
    job.ioprio = Some((2 << 13) | 6); // best effort, level 6
    job.num_queues = 2;
    job.seed = 11;
    job.region = MIB;
    let mut frontend = vmm(dir.path(), "identity", job, &daemon);
    let worker = daemon.serving_pid();
    let fpid = frontend.pid();
    assert_eq!(
        workers_of(daemon.pid()),
        vec![worker],
        "one worker for one VM"
    );

    // Ids, and nothing privileged left.
    let (ws, fs) = (status(worker), status(fpid));
    for key in ["Uid", "Gid", "Groups", "Cpus_allowed_list"] {
        assert_eq!(
            ws.get(key),
            fs.get(key),
            "{key}: worker {worker} vs frontend {fpid}"
        );
    }
    assert_eq!(
        fs["Uid"], "65534\t65534\t65534\t65534",
        "the frontend did not become nobody"
    );
    assert_eq!(fs["Groups"], "100 65534", "the frontend's groups");
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(ws[key], "0000000000000000", "worker {key}");
    }
    assert_eq!(ws["NoNewPrivs"], "1", "worker NoNewPrivs");

    // Scheduling: nice and io priority.
    let prio = |pid: u32| {
        // SAFETY: getpriority only reads its arguments (errno is not needed: values are 0..19).
        unsafe { libc::getpriority(libc::PRIO_PROCESS, pid) }
    };
    let ioprio = |pid: u32| {
        // SAFETY: ioprio_get only reads its scalar arguments.
        unsafe { libc::syscall(libc::SYS_ioprio_get, 1 as libc::c_long, pid as libc::c_long) }
    };
    assert_eq!(prio(fpid), 5);
    assert_eq!(prio(worker), prio(fpid), "worker nice");
    assert_eq!(ioprio(worker), ioprio(fpid), "worker io priority");

    // Every rlimit and every cgroup.
    let limits = proc_file(fpid, "limits");
    assert!(
        limits.lines().any(|l| l.starts_with("Max open files")
            && l.contains(" 512 ")
            && l.contains(" 1024 ")),
        "{limits}"
    );
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max processes") && l.contains(" 200 ") && l.contains(" 300 ")),
        "{limits}"
    );
    assert_same_limits(worker, fpid, daemon.pid());
    let (wc, fc) = (proc_file(worker, "cgroup"), proc_file(fpid, "cgroup"));
    for (c, dir) in &frontend.cgroups.dirs {
        let name = dir.file_name().unwrap().to_str().unwrap();
        assert!(
            fc.lines().any(|l| l.ends_with(name)
                && (c.is_empty() || l.split(':').nth(1).unwrap().split(',').any(|x| x == c))),
            "frontend not in {}:\n{fc}",
            dir.display()
        );
    }
    assert_eq!(
        wc.lines().collect::<Vec<_>>(),
        fc.lines().collect::<Vec<_>>(),
        "worker {worker} vs frontend {fpid} /proc/PID/cgroup"
    );

    // CPU: the worker's threads are in the frontend's cpuacct cgroup, and the cgroup's usage
    // grows by what the frontend spent plus what the worker spent.
    let worker_tasks: Vec<u32> = std::fs::read_dir(format!("/proc/{worker}/task"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    assert!(
        worker_tasks.len() >= 3,
        "worker threads (main, connection, 2 queues): {worker_tasks:?}"
    );
    let in_cgroup = frontend.cgroups.tasks("cpuacct");
    assert!(
        worker_tasks.iter().all(|t| in_cgroup.contains(t)),
        "worker threads {worker_tasks:?} not all in the cpuacct cgroup {in_cgroup:?}"
    );
    let cpuacct = frontend.cgroups.dir("cpuacct").join("cpuacct.usage");
    let usage = || {
        std::fs::read_to_string(&cpuacct)
            .unwrap()
            .trim()
            .parse::<u64>()
            .expect("cpuacct.usage")
    };
    let (u0, f0, w0) = (usage(), cpu_ticks(fpid), cpu_ticks(worker));
    frontend.send("io 60");
    frontend.expect("IO-DONE", &daemon);
    let (u1, f1, w1) = (usage(), cpu_ticks(fpid), cpu_ticks(worker));
    let (cgroup_ns, frontend_ns, worker_ns) = (u1 - u0, ticks_to_ns(f1 - f0), ticks_to_ns(w1 - w0));
    eprintln!("cpuacct.usage +{cgroup_ns} ns; frontend +{frontend_ns} ns, worker +{worker_ns} ns");
    assert!(
        worker_ns >= 50_000_000,
        "the worker used too little CPU ({worker_ns} ns) for the check to mean anything"
    );
    assert!(
        cgroup_ns > frontend_ns + worker_ns / 2,
        "the worker's CPU is not charged to the frontend's cgroup: cpuacct.usage grew {cgroup_ns} ns, \
         the frontend used {frontend_ns} ns and the worker {worker_ns} ns"
    );

    // The frontend's writes are on the image.
    frontend.finish();
    let data = std::fs::read(&img).unwrap();
    let region = MIB as usize..MIB as usize + REGION_LEN;
    assert_same(
        &data[region.clone()],
        &pattern(11, MIB, REGION_LEN),
        "image region written by the frontend",
    );
    assert_same(
        &data[..MIB as usize],
        &pattern(7, 0, MIB as usize),
        "image outside the frontend's region",
    );
    wait_until(
        "the worker exits after its VMM",
        Duration::from_secs(5),
        || gone(worker),
    );
    daemon.stop();
}

/// Two VMMs under different uids get two workers with their own uids; a 0600 image of one
/// uid is refused to a VMM of another, with a log line that says so, and the owner's VM keeps
/// working.
#[test]
fn workers_per_uid_and_image_permissions() {
    if !can_run() {
        return;
    }
    const OTHER: u32 = 1234;
    let dir = shared_dir();
    let (img_a, img_b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    private_image(&img_a, 4 * MIB, 21, NOBODY, NOBODY);
    private_image(&img_b, 4 * MIB, 22, OTHER, OTHER);
    let sock_b = dir.path().join("b.sock");
    let export_b = format!(
        "socket-path={},blk-file={}",
        sock_b.display(),
        img_b.display()
    );
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img_a.to_str().unwrap(), "--export", &export_b],
    );
    wait_until("second socket", DAEMON_TIMEOUT, || sock_b.exists());
    open_socket(daemon.socket());
    open_socket(&sock_b);

    let mut job_a = Job::new(&[daemon.socket()], NOBODY, NOBODY, &[NOBODY]);
    job_a.seed = 31;
    let mut a = vmm(dir.path(), "a", job_a, &daemon);
    let mut job_b = Job::new(&[&sock_b], OTHER, OTHER, &[OTHER]);
    job_b.seed = 32;
    let mut b = vmm(dir.path(), "b", job_b, &daemon);

    let wa = worker_with_uid(&daemon, NOBODY);
    let wb = worker_with_uid(&daemon, OTHER);
    assert_ne!(wa, wb);
    let mut workers = workers_of(daemon.pid());
    workers.sort();
    assert_eq!(
        workers,
        {
            let mut v = vec![wa, wb];
            v.sort();
            v
        },
        "exactly one worker per VM"
    );
    for (w, f) in [(wa, a.pid()), (wb, b.pid())] {
        let (ws, fs) = (status(w), status(f));
        for key in ["Uid", "Gid", "Groups"] {
            assert_eq!(ws[key], fs[key], "{key} of worker {w} vs its frontend {f}");
        }
    }

    // uid 1234 asks for nobody's image: refused, clearly.
    let mut job_c = Job::new(&[daemon.socket()], OTHER, OTHER, &[OTHER]);
    job_c.expect_failure = true;
    let mut c = vmm(dir.path(), "c", job_c, &daemon);
    let failure = c.expect("CONNECT-FAILED", &daemon);
    eprintln!("the intruder's connection failed: {failure}");
    let cpid = c.pid();
    c.finish();
    wait_for_log(&daemon, "Permission denied", Duration::from_secs(5));
    let log = daemon.log();
    let refusal = log
        .lines()
        .find(|l| l.contains("refus") && l.contains("Permission denied"))
        .unwrap_or_else(|| panic!("no refusal naming the permission problem in the log:\n{log}"));
    assert!(
        refusal.contains(img_a.to_str().unwrap())
            || refusal.contains(daemon.socket().to_str().unwrap()),
        "the refusal names neither the image nor the export: {refusal}"
    );
    assert!(
        log.contains(&format!("VMM pid {cpid}")),
        "the log does not name the refused VMM pid {cpid}:\n{log}"
    );

    // The owner's VM and the other VM carry on; the refused VM's worker is gone.
    a.send("io 2");
    a.expect("IO-DONE", &daemon);
    b.send("io 2");
    b.expect("IO-DONE", &daemon);
    wait_until(
        "only the two VMs' workers left",
        Duration::from_secs(5),
        || workers_of(daemon.pid()).len() == 2,
    );
    a.finish();
    b.finish();
    let data_a = std::fs::read(&img_a).unwrap();
    assert_same(&data_a[..REGION_LEN], &pattern(31, 0, REGION_LEN), "a.img");
    let data_b = std::fs::read(&img_b).unwrap();
    assert_same(&data_b[..REGION_LEN], &pattern(32, 0, REGION_LEN), "b.img");
    wait_until(
        "workers exit after their VMMs",
        Duration::from_secs(5),
        || workers_of(daemon.pid()).is_empty(),
    );
    daemon.stop();
}

/// A 4-queue device whose VMM may only create two more threads (pids.max, then RLIMIT_NPROC)
/// fails cleanly: the frontend sees the failure, the log names the limit, and the supervisor
/// and another VM carry on.
#[test]
fn thread_limits_fail_the_device_not_the_daemon() {
    if !can_run() {
        return;
    }
    let dir = shared_dir();
    // An image every uid of the test may use (the null backing would not keep data).
    let img = dir.path().join("shared.img");
    create_image(&img, 4 * MIB, 40);
    set_mode(&img, 0o666);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap(), "--num-queues", "4"],
    );
    open_socket(daemon.socket());

    let mut other_job = Job::new(&[daemon.socket()], NOBODY, NOBODY, &[NOBODY]);
    other_job.seed = 41;
    let mut other = vmm(dir.path(), "other", other_job, &daemon);
    let other_worker = daemon.serving_pid();

    // pids.max: the frontend's own tasks, the worker, its connection thread and two queues.
    let mut job = Job::new(&[daemon.socket()], 1235, 1235, &[1235]);
    job.num_queues = 4;
    job.wait_before_connect = true;
    job.expect_failure = true;
    let mut limited = vmm(dir.path(), "pids", job.clone(), &daemon);
    limited.expect("PLACED", &daemon);
    let current: u64 = limited
        .cgroups
        .read("pids", "pids.current")
        .trim()
        .parse()
        .unwrap();
    limited
        .cgroups
        .write("pids", "pids.max", &(current + 4).to_string());
    limited.send("connect");
    check_limited(&mut limited.frontend, &daemon, "pids.max");
    let events = limited.cgroups.read("pids", "pids.events");
    assert!(
        events
            .lines()
            .any(|l| l.starts_with("max ") && l != "max 0"),
        "pids.max was never hit: {events}"
    );

    // RLIMIT_NPROC: uid 1236 has no other process; the same headroom.
    let mut job = Job::new(&[daemon.socket()], 1236, 1236, &[1236]);
    job.num_queues = 4;
    job.nproc_headroom = Some(4);
    job.expect_failure = true;
    let mut limited = vmm(dir.path(), "nproc", job, &daemon);
    check_limited(&mut limited.frontend, &daemon, "RLIMIT_NPROC");

    // RLIMIT_NPROC with room for the worker alone: not even the connection's thread fits, and
    // the connection is refused with a line naming the limit.
    let mut job = Job::new(&[daemon.socket()], 1237, 1237, &[1237]);
    job.nproc_headroom = Some(1);
    job.expect_failure = true;
    let mut starved = vmm(dir.path(), "starved", job, &daemon);
    starved.expect("CONNECT-FAILED", &daemon);
    let pid = starved.pid();
    starved.finish();
    wait_for_log(&daemon, "refused connection", Duration::from_secs(5));
    let log = daemon.log();
    let handed = format!(" from VMM pid {pid} (uid 1237) handed to worker pid ");
    let worker = log
        .lines()
        .find_map(|l| l.split_once(&handed).map(|(_, w)| w.trim().to_string()))
        .unwrap_or_else(|| {
            panic!("the starved VMM's connection was not handed to a worker:\n{log}")
        });
    assert!(
        log.lines().any(
            |l| l.contains(&format!("worker pid {worker} refused connection"))
                && l.contains("thread limit")
                && l.contains("RLIMIT_NPROC")
        ),
        "no refusal naming the thread limit for worker {worker}:\n{log}"
    );

    // The daemon and the other VM carry on, and the failed VMs left no worker behind.
    daemon.assert_running();
    other.send("io 2");
    other.expect("IO-DONE", &daemon);
    wait_until(
        "only the other VM's worker left",
        Duration::from_secs(5),
        || workers_of(daemon.pid()) == vec![other_worker],
    );
    other.finish();
    daemon.stop();
}

/// The limited frontend's device must fail to start, after some of its queues started (only
/// some threads fit), and the log must name the limit.
#[track_caller]
fn check_limited(limited: &mut Frontend, daemon: &Daemon, limit: &str) {
    let line = match limited.lines.recv_timeout(FRONTEND_TIMEOUT) {
        Ok(line) => line,
        Err(e) => panic!(
            "the {limit}-limited frontend said nothing ({e}):\n{}\nvublk log:\n{}",
            limited.log(),
            daemon.log()
        ),
    };
    assert!(
        line.starts_with("CONNECT-FAILED"),
        "the {limit}-limited 4-queue device worked: {line}\nvublk log:\n{}",
        daemon.log()
    );
    eprintln!("{limit}: {line}");
    let pid = limited.pid();
    limited.finish();
    // The supervisor numbers the connection; the worker's lines carry that number.
    let needle = format!(" from VMM pid {pid} ");
    wait_for_log(daemon, &needle, Duration::from_secs(5));
    let connection: u64 = daemon
        .log()
        .lines()
        .find(|l| l.contains(&needle))
        .and_then(|l| {
            l.split("connection ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no connection from VMM pid {pid} in the log"));
    // The worker's lines reach the log through the supervisor: wait for this connection's.
    let conn = format!("conn{{id={connection} ");
    wait_until(
        "the worker's line naming the thread limit",
        Duration::from_secs(5),
        || {
            daemon
                .log()
                .lines()
                .any(|l| l.contains(&conn) && l.contains("thread limit"))
        },
    );
    let log = daemon.log();
    let ours: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("conn{{id={connection} ")))
        .collect();
    assert!(
        ours.iter().any(|l| l.contains("queue 0 started")),
        "no queue of the {limit}-limited device started (the limit leaves room for two):\n{log}"
    );
    let failure = ours
        .iter()
        .find(|l| l.contains("thread limit"))
        .unwrap_or_else(|| {
            panic!(
                "no log line of connection {connection} names the thread limit ({limit}):\n{log}"
            )
        });
    assert!(
        failure.contains(limit),
        "the log line does not name {limit}: {failure}"
    );
    assert!(
        !failure.contains("queue 0"),
        "the first queue should have fit: {failure}"
    );
}

/// kill -9 of a VMM in the middle of its I/O: its worker is gone (reaped) within a second and
/// the supervisor holds no fd or socket for it any more.
#[test]
fn killed_vmm_leaves_nothing_behind() {
    if !can_run() {
        return;
    }
    let dir = shared_dir();
    let img = dir.path().join("busy.img");
    private_image(&img, 8 * MIB, 51, NOBODY, NOBODY);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap(), "--num-queues", "2"],
    );
    open_socket(daemon.socket());
    wait_for_log(&daemon, "listening", DAEMON_TIMEOUT);
    let sup = daemon.pid();
    let fds_before = fd_targets(sup);

    for round in 0..2 {
        let mut job = Job::new(&[daemon.socket()], NOBODY, NOBODY, &[NOBODY]);
        job.num_queues = 2;
        job.seed = 52 + round;
        let mut frontend = vmm(dir.path(), &format!("killed{round}"), job, &daemon);
        let worker = daemon.serving_pid();
        assert_ne!(
            fd_targets(sup),
            fds_before,
            "the supervisor holds nothing for a connected VM?"
        );
        frontend.send("busy");
        frontend.expect("BUSY", &daemon);
        std::thread::sleep(Duration::from_millis(200));
        frontend.kill();
        let took = wait_until(
            "the worker of the killed VMM is gone (reaped)",
            Duration::from_secs(1),
            || gone(worker),
        );
        eprintln!("round {round}: worker {worker} gone {took:?} after the kill");
        assert!(
            workers_of(sup).is_empty(),
            "workers left: {:?}",
            workers_of(sup)
        );
        let deadline = Instant::now() + Duration::from_secs(1);
        while fd_targets(sup) != fds_before {
            assert!(
                Instant::now() < deadline,
                "round {round}: the supervisor's fds are not back to what they were\nbefore: {fds_before:?}\nnow:    {:?}\nlog:\n{}",
                fd_targets(sup),
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        daemon.assert_running();
    }
    assert!(
        daemon.log().contains("exited"),
        "the supervisor did not log the worker's exit:\n{}",
        daemon.log()
    );
    daemon.stop();
}

/// kill -9 of the supervisor: its workers die with it; a new supervisor on the same socket
/// path replaces the stale socket and serves the VMM when it reconnects.
#[test]
fn killed_supervisor_takes_its_workers_and_a_new_one_serves() {
    if !can_run() {
        return;
    }
    let dir = shared_dir();
    let img = dir.path().join("survivor.img");
    private_image(&img, 8 * MIB, 61, NOBODY, NOBODY);
    let args = ["--blk-file", img.to_str().unwrap()];
    let mut first = Daemon::start(vublk_bin(), dir.path(), &args);
    open_socket(first.socket());
    let mut job = Job::new(&[first.socket()], NOBODY, NOBODY, &[NOBODY]);
    job.seed = 62;
    let mut frontend = vmm(dir.path(), "survivor", job, &first);
    let worker = first.serving_pid();

    let _reaper = KillOnDrop::new(worker);
    // Stop the worker first: a stopped worker cannot notice that its control socket closed,
    // so only the parent-death signal (SIGKILL) can end it.
    // SAFETY: kill(2) only sends signals; the worker is alive (it serves the frontend), and
    // `first` is our unreaped child.
    unsafe { libc::kill(worker as libc::pid_t, libc::SIGSTOP) };
    wait_until("the worker stops", Duration::from_secs(1), || {
        proc_file(worker, "stat")
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('T'))
    });
    // SAFETY: as above.
    unsafe { libc::kill(first.pid() as libc::pid_t, libc::SIGKILL) };
    let exit = first
        .wait_exit(DAEMON_TIMEOUT)
        .expect("the supervisor did not die");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&exit),
        Some(libc::SIGKILL)
    );
    wait_until(
        "the (stopped) worker is killed with its supervisor",
        Duration::from_secs(1),
        || exited(worker),
    );
    assert!(
        first.socket().exists(),
        "the dead supervisor's socket should still be there (stale)"
    );

    let mut second = Daemon::start(vublk_bin(), dir.path(), &args);
    wait_for_log(&second, "listening", DAEMON_TIMEOUT);
    assert!(
        second.log().contains("stale"),
        "the new supervisor did not say it replaced the stale socket:\n{}",
        second.log()
    );
    open_socket(second.socket());
    frontend.send("reconnect");
    frontend.expect("READY", &second);
    let new_worker = worker_with_uid(&second, NOBODY);
    assert_ne!(new_worker, worker);
    assert!(exited(worker));
    assert_eq!(status(new_worker)["Uid"], status(frontend.pid())["Uid"]);
    frontend.send("io 1");
    frontend.expect("IO-DONE", &second);
    frontend.finish();
    let data = std::fs::read(&img).unwrap();
    assert_same(
        &data[..REGION_LEN],
        &pattern(62, 0, REGION_LEN),
        "image after the restart",
    );
    second.stop();
}

/// One VMM with two disks (two exports of one daemon): one worker serves both.
#[test]
fn one_worker_serves_all_disks_of_a_vm() {
    if !can_run() {
        return;
    }
    let dir = shared_dir();
    let (img1, img2) = (dir.path().join("disk1.img"), dir.path().join("disk2.img"));
    private_image(&img1, 4 * MIB, 71, NOBODY, NOBODY);
    private_image(&img2, 4 * MIB, 72, NOBODY, NOBODY);
    let sock2 = dir.path().join("disk2.sock");
    let export2 = format!(
        "socket-path={},blk-file={},num-queues=2",
        sock2.display(),
        img2.display()
    );
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img1.to_str().unwrap(), "--export", &export2],
    );
    wait_until("second socket", DAEMON_TIMEOUT, || sock2.exists());
    open_socket(daemon.socket());
    open_socket(&sock2);

    let mut job = Job::new(&[daemon.socket(), &sock2], NOBODY, NOBODY, &[NOBODY]);
    job.seed = 80;
    let mut frontend = vmm(dir.path(), "twodisks", job, &daemon);
    let workers = workers_of(daemon.pid());
    assert_eq!(
        workers.len(),
        1,
        "one VM, one worker: {workers:?}\n{}",
        daemon.log()
    );
    let worker = workers[0];
    let log = daemon.log();
    let handed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("handed to worker pid"))
        .collect();
    assert_eq!(handed.len(), 2, "two connections handed over:\n{log}");
    assert!(
        handed
            .iter()
            .all(|l| l.ends_with(&format!("worker pid {worker}"))),
        "{handed:#?}"
    );
    let open = fd_targets(worker);
    for img in [&img1, &img2] {
        assert!(
            open.iter().any(|t| t == img.to_str().unwrap()),
            "worker {worker} does not hold {} open: {open:?}",
            img.display()
        );
    }
    frontend.send("io 1");
    frontend.expect("IO-DONE", &daemon);
    frontend.finish();
    assert_same(
        &std::fs::read(&img1).unwrap()[..REGION_LEN],
        &pattern(80, 0, REGION_LEN),
        "disk1",
    );
    assert_same(
        &std::fs::read(&img2).unwrap()[..REGION_LEN],
        &pattern(81, 0, REGION_LEN),
        "disk2",
    );
    wait_until(
        "the worker exits after its VMM",
        Duration::from_secs(5),
        || gone(worker),
    );
    daemon.stop();
}

/// Writes `path`, readable by everyone: the configuration of `cluster` with `keyring` as its
/// keyring; librados' run directory of the cluster (root's) left out.
fn conf_with_keyring(cluster: &vublk_test_support::ceph::Cluster, keyring: &Path, path: &Path) {
    let conf: String = std::fs::read_to_string(cluster.conf())
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("keyring") && !l.starts_with("run dir"))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .replacen(
            "[global]\n",
            &format!("[global]\nkeyring = {}\n", keyring.display()),
            1,
        );
    std::fs::write(path, conf).unwrap();
    set_mode(path, 0o644);
}

/// An RBD export: the worker connects to the cluster as the VMM's user, with the keyring the
/// configuration names. nobody's VM is refused, naming the keyring, when only root may read
/// it; with a configuration naming a keyring nobody may read, nobody's VM is served (its worker
/// is nobody) and its data reaches the image.
#[test]
fn an_rbd_worker_connects_with_the_vmm_users_keyring() {
    if !can_run() {
        return;
    }
    use vublk_test_support::ceph;
    let Some(cluster) =
        ceph::cluster(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ceph-workers"))
    else {
        eprintln!("skipping: {}", ceph::NOT_INSTALLED);
        return;
    };
    let dir = shared_dir();
    let image = cluster.create_image("identity", 8 * MIB);

    // nobody's own configuration and keyring (a copy of the cluster's, readable by nobody
    // only); librados' run directory of the cluster stays root's.
    let keyring = dir.path().join("nobody.keyring");
    std::fs::copy(cluster.dir.join("keyring"), &keyring).unwrap();
    std::os::unix::fs::chown(&keyring, Some(NOBODY), Some(NOBODY)).unwrap();
    set_mode(&keyring, 0o400);
    let nobody_conf = dir.path().join("nobody.conf");
    conf_with_keyring(cluster, &keyring, &nobody_conf);

    let root_conf = cluster.conf();
    let served_socket = dir.path().join("served.sock");
    let export = format!(
        "socket-path={},blk-file={image},ceph-conf={}",
        served_socket.display(),
        nobody_conf.display()
    );
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &[
            "--blk-file",
            &image,
            "--ceph-conf",
            root_conf.to_str().unwrap(),
            "--ceph-timeout",
            "10",
            "--export",
            &export,
        ],
    );
    daemon.wait_for(&served_socket);
    open_socket(daemon.socket());
    open_socket(&served_socket);

    // Root's keyring: nobody's worker cannot read it.
    let mut job = Job::new(&[daemon.socket()], NOBODY, NOBODY, &[NOBODY]);
    job.expect_failure = true;
    let mut refused = vmm(dir.path(), "rbd-refused", job, &daemon);
    refused.expect("CONNECT-FAILED", &daemon);
    refused.finish();
    wait_for_log(
        &daemon,
        "(is the keyring readable by this user?)",
        Duration::from_secs(20),
    );

    // nobody's keyring: served by a worker that is nobody.
    let mut job = Job::new(&[&served_socket], NOBODY, NOBODY, &[NOBODY]);
    job.seed = 41;
    let mut served = vmm(dir.path(), "rbd-served", job, &daemon);
    let worker = daemon.serving_pid();
    assert_eq!(
        status(worker)["Uid"],
        "65534\t65534\t65534\t65534",
        "the RBD export's worker is not nobody"
    );
    served.finish();
    let data = cluster.export("identity", dir.path());
    assert_same(
        &data[..REGION_LEN],
        &pattern(41, 0, REGION_LEN),
        "the image",
    );
}

/// The sandbox profile is decided per worker: in one daemon, root's VM, allowed on an `rbd:`
/// export, gets a worker in the host's network namespace (librados connects to the cluster)
/// that reports `network: host (rbd)`, while nobody's VM, allowed only on a file export, gets
/// a worker in an empty network namespace of its own, with the files-only seccomp list. Both
/// serve their I/O at the same time. The configuration, in the test's directory, names the
/// cluster's keyring in another directory by its absolute path (landlock lets the worker read
/// it: without that, "is the keyring readable by this user?"), and asks librados for an admin
/// socket (a unix socket): the rbd worker is refused one and serves without it.
#[test]
fn only_an_rbd_worker_keeps_the_host_network() {
    if !can_run() {
        return;
    }
    use vublk_test_support::ceph;
    let Some(cluster) =
        ceph::cluster(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ceph-workers"))
    else {
        eprintln!("skipping: {}", ceph::NOT_INSTALLED);
        return;
    };
    let dir = shared_dir();
    let image = cluster.create_image("profiles", 8 * MIB);
    let file = dir.path().join("nobody.img");
    private_image(&file, 8 * MIB, 5, NOBODY, NOBODY);
    let file_socket = dir.path().join("file.sock");
    let control = dir.path().join("control.sock");
    let export = format!(
        "socket-path={},blk-file={},allow-uids={NOBODY}",
        file_socket.display(),
        file.display()
    );
    let conf = dir.path().join("ceph.conf");
    let mut text = std::fs::read_to_string(cluster.conf()).unwrap();
    text.push_str(&format!(
        "[client]\nadmin socket = {}/$name.$pid.asok\n",
        dir.path().display()
    ));
    std::fs::write(&conf, text).unwrap();
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &[
            "--blk-file",
            &image,
            "--ceph-conf",
            conf.to_str().unwrap(),
            "--allow-uids",
            "0",
            "--export",
            &export,
            "--control-socket",
            control.to_str().unwrap(),
        ],
    );
    daemon.wait_for(&file_socket);
    daemon.wait_for(&control);
    open_socket(&file_socket);

    let mut job = Job::new(&[daemon.socket()], 0, 0, &[0]);
    job.seed = 43;
    let mut rbd_vmm = vmm(dir.path(), "rbd-profile", job, &daemon);
    let mut job = Job::new(&[&file_socket], NOBODY, NOBODY, &[NOBODY]);
    job.seed = 44;
    let mut file_vmm = vmm(dir.path(), "file-profile", job, &daemon);

    // Each VM's entry in `vublk status --json`, once its worker reported its sandbox.
    let sandbox_of = |vmm_pid: u32| -> (u32, serde_json::Value) {
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        loop {
            let status = daemon.status(&control).expect("vublk status");
            if let Some(vm) = status["vms"]
                .as_array()
                .and_then(|vms| vms.iter().find(|vm| vm["vmm_pid"] == vmm_pid))
                .filter(|vm| !vm["sandbox"].is_null())
            {
                return (
                    vm["worker_pid"].as_u64().unwrap() as u32,
                    vm["sandbox"].clone(),
                );
            }
            assert!(
                Instant::now() < deadline,
                "no sandbox for VMM {vmm_pid}: {status}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let net_of = |pid: u32| {
        std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .unwrap_or_else(|e| panic!("/proc/{pid}/ns/net: {e}"))
    };
    let host_net = net_of(std::process::id());
    let seccomp_calls = |sandbox: &serde_json::Value| -> u32 {
        let text = sandbox["seccomp"].as_str().unwrap();
        text.trim_start_matches("filter (")
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("seccomp: {text}"))
    };

    let (rbd_worker, rbd_sandbox) = sandbox_of(rbd_vmm.pid());
    assert_eq!(rbd_sandbox["network"], "host (rbd)", "{rbd_sandbox}");
    assert_eq!(rbd_sandbox["namespaces"], serde_json::json!(["ipc"]));
    assert_eq!(
        net_of(rbd_worker),
        host_net,
        "the rbd worker left the host's network"
    );

    let (file_worker, file_sandbox) = sandbox_of(file_vmm.pid());
    assert_ne!(file_worker, rbd_worker);
    assert_eq!(file_sandbox["network"], "empty namespace", "{file_sandbox}");
    assert_eq!(
        file_sandbox["namespaces"],
        serde_json::json!(["net", "ipc"])
    );
    assert_ne!(
        net_of(file_worker),
        host_net,
        "the file worker shares the host's network"
    );
    assert!(
        seccomp_calls(&file_sandbox) < seccomp_calls(&rbd_sandbox),
        "the file worker's filter allows as much as the rbd worker's: {file_sandbox} {rbd_sandbox}"
    );

    // `vublk status` prints the network for people too.
    let out = Command::new(vublk_bin())
        .args(["status", "--control-socket", control.to_str().unwrap()])
        .output()
        .expect("vublk status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("network: host (rbd)"), "{text}");
    assert!(text.contains("network: empty namespace"), "{text}");

    rbd_vmm.finish();
    file_vmm.finish();
    let data = cluster.export("profiles", dir.path());
    assert_same(
        &data[..REGION_LEN],
        &pattern(43, 0, REGION_LEN),
        "the rbd image",
    );
}

/// A tenant's own Ceph id with restricted caps, as docs/deploy.md tells: client.tenant-a has
/// `profile rbd` on the pool `tenant-a` only, and its keyring only nobody (the tenant's VMM
/// user) may read. nobody's VM on an export of `rbd:tenant-a/disk` with `ceph-id=tenant-a` is
/// served by a worker that is nobody, and its data reaches the image. An export of an image in
/// the pool `tenant-b` with the same id is refused at connect, the log saying which image and
/// why, and the daemon goes on serving the tenant's own export.
#[test]
fn a_tenant_id_with_restricted_caps_serves_its_own_pool_only() {
    if !can_run() {
        return;
    }
    use vublk_test_support::ceph;
    let Some(cluster) =
        ceph::cluster(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ceph-workers"))
    else {
        eprintln!("skipping: {}", ceph::NOT_INSTALLED);
        return;
    };
    let dir = shared_dir();
    cluster.create_pool("tenant-a");
    cluster.create_pool("tenant-b");
    let own = cluster.create_image_in("tenant-a", "disk", 8 * MIB);
    let other = cluster.create_image_in("tenant-b", "disk", 8 * MIB);

    let keyring = dir.path().join("tenant-a.keyring");
    cluster.create_client(
        "tenant-a",
        &["mon", "profile rbd", "osd", "profile rbd pool=tenant-a"],
        &keyring,
    );
    std::os::unix::fs::chown(&keyring, Some(NOBODY), Some(NOBODY)).unwrap();
    set_mode(&keyring, 0o400);
    let conf = dir.path().join("tenant-a.conf");
    conf_with_keyring(cluster, &keyring, &conf);

    let other_socket = dir.path().join("other.sock");
    let export = format!(
        "socket-path={},blk-file={other},ceph-conf={},ceph-id=tenant-a",
        other_socket.display(),
        conf.display()
    );
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &[
            "--blk-file",
            &own,
            "--ceph-conf",
            conf.to_str().unwrap(),
            "--ceph-id",
            "tenant-a",
            "--ceph-timeout",
            "10",
            "--allow-uids",
            &NOBODY.to_string(),
            "--export",
            &export,
        ],
    );
    daemon.wait_for(&other_socket);
    open_socket(daemon.socket());
    open_socket(&other_socket);

    // The tenant's own pool: served by a worker that is nobody, connected as client.tenant-a.
    let mut job = Job::new(&[daemon.socket()], NOBODY, NOBODY, &[NOBODY]);
    job.seed = 47;
    let mut served = vmm(dir.path(), "tenant-own", job, &daemon);
    let worker = daemon.serving_pid();
    assert_eq!(
        status(worker)["Uid"],
        "65534\t65534\t65534\t65534",
        "the tenant's worker is not nobody"
    );

    // Another pool with the same id: refused at connect, saying why.
    let mut job = Job::new(&[&other_socket], NOBODY, NOBODY, &[NOBODY]);
    job.expect_failure = true;
    let mut refused = vmm(dir.path(), "tenant-other", job, &daemon);
    refused.expect("CONNECT-FAILED", &daemon);
    refused.finish();
    wait_for_log(
        &daemon,
        &format!(
            "cannot open {other} as client.tenant-a (do client.tenant-a's osd caps allow the \
             pool tenant-b?): Operation not permitted"
        ),
        Duration::from_secs(20),
    );

    // The tenant's VM is still served.
    served.send("io 1");
    served.expect("IO-DONE", &daemon);
    served.finish();
    let data = cluster.export_from("tenant-a", "disk", dir.path());
    assert_same(
        &data[..REGION_LEN],
        &pattern(47, 0, REGION_LEN),
        "the tenant's image",
    );
    assert!(
        cluster.export_from("tenant-b", "disk", dir.path())[..REGION_LEN]
            .iter()
            .all(|&b| b == 0),
        "the other tenant's image was written"
    );
    daemon.assert_running();
}
