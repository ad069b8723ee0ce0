//! `vublk top`, end to end: the batch tables show a busy export with its IOPS and an idle one
//! with none, a stopped worker's row goes stale without holding top, the counters are
//! refused to anyone but the control socket's owner, and top on a terminal puts it back when
//! a signal ends it.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// The daemon: the main export (a 64 MiB null disk) and `idle.sock` (a 1 MiB one), with a
/// control socket; returns it, the control socket and the idle export's socket.
fn start(dir: &Path) -> (Daemon, std::path::PathBuf, std::path::PathBuf) {
    let control = dir.join("control.sock");
    let idle = dir.join("idle.sock");
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir,
        &[
            "--null",
            "64M",
            "--export",
            &format!("socket-path={},null=1M", idle.display()),
            "--control-socket",
            control.to_str().unwrap(),
        ],
    );
    daemon.wait_for(&control);
    (daemon, control, idle)
}

/// `vublk top --batch` with `args`, run to its end (at most 30 s).
fn top(control: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(vublk_bin());
    cmd.args(["top", "--batch", "--control-socket"])
        .arg(control)
        .args(args);
    vublk_test_support::process::run(cmd, Duration::from_secs(30)).expect("vublk top")
}

/// The rows of the last table in top's output, as words.
fn last_table(out: &Output) -> Vec<Vec<String>> {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "vublk top failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = text.rsplit("vublk top - ").next().unwrap_or_default();
    table
        .lines()
        .skip(2)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// The row whose export ends with `socket`'s file name.
fn row<'a>(rows: &'a [Vec<String>], socket: &Path) -> &'a [String] {
    let name = socket.file_name().unwrap().to_str().unwrap();
    rows.iter()
        .find(|r| r.get(2).is_some_and(|e| e.ends_with(name)))
        .unwrap_or_else(|| panic!("no row for {name} in {rows:?}"))
}

/// Columns of a row: VMM-PID UID EXPORT READ/s WRITE/s ...
const READS: usize = 3;
const WRITES: usize = 4;

/// Waits until `vublk status` shows `n` devices of our VM (workers report once a second).
fn wait_for_devices(daemon: &Daemon, control: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = daemon.status(control).expect("vublk status");
        let devices = status["vms"][0]["devices"].as_array().map_or(0, Vec::len);
        if devices == n {
            return;
        }
        assert!(Instant::now() < deadline, "never {n} devices: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A VM reading from the main export and connected, idle, to the other: top shows the busy
/// export with its reads per second and the idle one with none, both under our pid.
#[test]
fn top_shows_the_busy_export_with_its_iops_and_the_idle_one_with_none() {
    let dir = test_dir();
    let (mut daemon, control, idle_socket) = start(dir.path());
    let busy_socket = daemon.socket().to_path_buf();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, socket) = (stop.clone(), busy_socket.clone());
        std::thread::spawn(move || {
            let mut client = Client::connect(&socket, 1);
            let q = client.q(0);
            let reads: Vec<Req> = (0..8)
                .map(|i| Req::read(i * 4096, i as usize * 4096, 4096))
                .collect();
            let mut done = 0u64;
            while !stop.load(Ordering::Relaxed) {
                assert!(q.run(&reads).iter().all(|&r| r == 0));
                done += reads.len() as u64;
            }
            done
        })
    };
    let idle = Client::connect(&idle_socket, 1);
    wait_for_devices(&daemon, &control, 2);

    // Two tables at least: rates need two reports of the worker, one a second.
    let out = top(&control, &["--iterations", "3"]);
    stop.store(true, Ordering::Relaxed);
    let done = reader.join().unwrap();
    let rows = last_table(&out);
    let ours = std::process::id().to_string();
    let busy = row(&rows, &busy_socket);
    let reads: f64 = busy[READS].parse().expect("reads per second");
    assert!(reads > 0.0, "no reads on the busy export: {rows:?}");
    assert!(busy[0] == ours, "{busy:?}");
    let quiet = row(&rows, &idle_socket);
    assert_eq!(quiet[0], ours, "{quiet:?}");
    assert_eq!(
        (quiet[READS].as_str(), quiet[WRITES].as_str()),
        ("0", "0"),
        "{quiet:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("vublk top - ")
            .count(),
        3,
        "three tables"
    );
    assert!(done > 0);
    drop(idle);
    daemon.stop();
}

/// A stopped worker cannot hold top: top prints its table, with the worker's row stale.
#[test]
fn a_stopped_worker_does_not_block_top() {
    let dir = test_dir();
    let (mut daemon, control, _) = start(dir.path());
    let mut client = Client::connect(daemon.socket(), 1);
    assert_eq!(client.q(0).flush(), 0);
    wait_for_devices(&daemon, &control, 1);
    let workers = workers_of(daemon.pid());
    assert_eq!(workers.len(), 1, "{workers:?}");
    let worker = workers[0] as i32;
    // SAFETY: signals our daemon's worker.
    assert_eq!(unsafe { libc::kill(worker, libc::SIGSTOP) }, 0);
    // Past the 3 s after which a report is stale.
    std::thread::sleep(Duration::from_millis(3500));
    let out = top(&control, &["--iterations", "1", "--delay", "0.2"]);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(worker, libc::SIGCONT) }, 0);
    let rows = last_table(&out);
    let stopped = row(&rows, daemon.socket());
    assert_eq!(stopped[0], std::process::id().to_string());
    assert_eq!(
        stopped[READS], "-",
        "a stale row shows no rates: {stopped:?}"
    );
    assert!(
        stopped.iter().any(|w| w == "stale"),
        "the row is not marked stale: {stopped:?}"
    );
    drop(client);
    daemon.stop();
}

/// A stopped daemon cannot hang top either: it gives up after 5 s with one line.
#[test]
fn a_stopped_daemon_does_not_hang_top() {
    let dir = test_dir();
    let (mut daemon, control, _) = start(dir.path());
    daemon.signal(libc::SIGSTOP).unwrap();
    let out = top(&control, &["--iterations", "1"]);
    daemon.signal(libc::SIGCONT).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("did not answer within 5 s"), "{stderr}");
    daemon.stop();
}

/// The counters carry every VM's identity: like the rest of the control socket, they are
/// the daemon's user's only.
#[test]
fn top_is_refused_to_other_users() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run top as another user");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = test_dir();
    // Anyone may reach the sockets' directory: only the control socket's own mode refuses.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (mut daemon, control, _) = start(dir.path());
    // A copy nobody may run, wherever the build tree is.
    let binary = dir.path().join("vublk");
    std::fs::copy(vublk_bin(), &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = Command::new(&binary);
    cmd.args(["top", "--batch", "--iterations", "1", "--control-socket"])
        .arg(&control);
    // SAFETY: setresuid is async-signal-safe; the child only execs afterwards.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(65534, 65534, 65534) != 0
                || libc::setresuid(65534, 65534, 65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = vublk_test_support::process::run(cmd, Duration::from_secs(30)).expect("vublk top");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Permission denied"),
        "not refused for permission: {stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The owner is answered.
    assert!(top(&control, &["--iterations", "1", "--delay", "0.1"])
        .status
        .success());
    daemon.stop();
}

/// A pseudo-terminal: the test keeps the master and a descriptor of the slave.
struct Pty {
    master: std::os::fd::OwnedFd,
    slave: std::os::fd::OwnedFd,
}

impl Pty {
    fn open() -> Pty {
        use std::os::fd::FromRawFd;
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty writes the two descriptors it creates into the locals; the name, the
        // termios and the window size are not asked for.
        let opened = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty succeeded: both are new descriptors nothing else owns.
        let pty = unsafe {
            Pty {
                master: std::os::fd::OwnedFd::from_raw_fd(master),
                slave: std::os::fd::OwnedFd::from_raw_fd(slave),
            }
        };
        rustix::io::ioctl_fionbio(&pty.master, true).unwrap();
        pty
    }

    /// What top wrote to the terminal since the last call.
    fn output(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = rustix::io::read(&self.master, &mut chunk) {
            out.extend_from_slice(&chunk[..n]);
        }
        out
    }

    fn modes(&self) -> rustix::termios::LocalModes {
        rustix::termios::tcgetattr(&self.slave).unwrap().local_modes
    }
}

/// Interactive top (on a terminal) ended by SIGTERM, SIGHUP or SIGINT puts the terminal back
/// as `q` does: echo and line editing on, the normal screen back.
#[test]
fn a_signal_to_interactive_top_puts_the_terminal_back() {
    use rustix::termios::LocalModes;
    let dir = test_dir();
    let (mut daemon, control, _) = start(dir.path());
    for signal in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        let pty = Pty::open();
        let cooked = LocalModes::ECHO | LocalModes::ICANON | LocalModes::ISIG;
        assert!(pty.modes().contains(cooked), "{:?}", pty.modes());
        let mut cmd = Command::new(vublk_bin());
        cmd.args(["top", "--control-socket"])
            .arg(&control)
            .stdin(pty.slave.try_clone().unwrap())
            .stdout(pty.slave.try_clone().unwrap())
            .stderr(std::process::Stdio::piped());
        vublk_test_support::process::die_with_parent(&mut cmd);
        let mut top = cmd.spawn().expect("vublk top");
        // Until top has the terminal: echo off, the alternate screen.
        let mut shown = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while pty.modes().contains(LocalModes::ECHO) {
            shown.extend(pty.output());
            assert!(
                top.try_wait().unwrap().is_none() && Instant::now() < deadline,
                "top did not take the terminal: {}",
                String::from_utf8_lossy(&shown)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: signals our own child, not reaped yet.
        assert_eq!(unsafe { libc::kill(top.id() as i32, signal) }, 0);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = top.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = top.kill();
                panic!("top did not end on signal {signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        shown.extend(pty.output());
        let shown = String::from_utf8_lossy(&shown);
        assert!(
            pty.modes().contains(cooked),
            "signal {signal} ({status}) left the terminal in {:?}",
            pty.modes()
        );
        assert!(
            shown.ends_with("\x1b[?25h\x1b[?1049l"),
            "signal {signal} ({status}) left the alternate screen on: {shown:?}"
        );
        assert!(status.success(), "signal {signal}: {status}");
    }
    daemon.stop();
}
