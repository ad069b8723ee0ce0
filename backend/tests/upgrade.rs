//! `vublk upgrade`: the running daemon starts a new binary on its own listening sockets and
//! hands its VMs over, without the socket ever refusing a connection or disappearing; a new
//! binary that fails leaves the old daemon serving. Here the test process is the VMM (a
//! protocol-level frontend), vublk runs as the supervisor with per-VM workers.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vublk::supervisor::control::{Request, UpgradeReply};
use vublk_test_support::daemon::workers_of;
use vublk_test_support::frontend::{Fixture, Session, SessionConfig, Step};

const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");
const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(10);

fn writeback(s: &mut Session) -> u8 {
    s.blk_config().unwrap().writeback
}

/// `vublk upgrade --control-socket control [--binary binary]`: its exit success, stdout and
/// stderr.
fn upgrade(control: &Path, binary: Option<&str>) -> (bool, String, String) {
    let mut cmd = Command::new(VUBLK);
    cmd.arg("upgrade").arg("--control-socket").arg(control);
    if let Some(binary) = binary {
        cmd.args(["--binary", binary]);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Stops the daemon `pid` the test made the old one start (not the test's child): SIGTERM,
/// then waits for it to go.
fn terminate(pid: u32) {
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let deadline = Instant::now() + WAIT;
    while alive(pid) {
        assert!(Instant::now() < deadline, "daemon {pid} did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A new binary that never says it is ready, and ignores SIGTERM: a shell that writes its pid
/// to a file and execs `sleep` (which keeps the ignored SIGTERM and the pid). Killed at the
/// end of the test if the daemon left it running.
struct NeverReady {
    path: PathBuf,
    pid_file: PathBuf,
}

impl NeverReady {
    fn new(dir: &Path) -> NeverReady {
        let path = dir.join("never-ready");
        let pid_file = dir.join("never-ready.pid");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho $$ > {}\ntrap '' TERM\nexec sleep 60\n",
                pid_file.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        NeverReady { path, pid_file }
    }

    /// The pid of the last one started, if it got as far as writing it.
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }

    /// The last one started is gone: killed and reaped by the daemon.
    fn assert_gone(&self) {
        if let Some(pid) = self.pid() {
            assert!(!alive(pid), "the never-ready binary {pid} was left behind");
        }
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

impl Drop for NeverReady {
    fn drop(&mut self) {
        if let Some(pid) = self.pid().filter(|&pid| alive(pid)) {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid as i32).unwrap(),
                rustix::process::Signal::KILL,
            );
        }
    }
}

/// Asks for an upgrade to `binary` as a client that sends its request `late` after it
/// connected; the daemon's raw answer (empty if it closed without one).
fn upgrade_late(control: &Path, binary: &Path, late: Duration) -> Vec<u8> {
    let mut stream = UnixStream::connect(control).unwrap();
    std::thread::sleep(late);
    let request = Request::Upgrade {
        binary: Some(binary.to_path_buf()),
    };
    stream
        .write_all(&serde_json::to_vec(&request).unwrap())
        .unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    answer
}

/// A new binary that never gets ready is killed at its deadline; the client that asked hears
/// why, even one whose request came late in its connection's time (a slow client, or a busy
/// daemon between accepting it and reading it), and the old daemon goes on serving.
#[test]
fn a_new_binary_that_never_gets_ready_is_killed_and_the_client_hears_why() {
    let control_dir = tempfile::tempdir().unwrap();
    let control = control_dir.path().join("control.sock");
    let mut fx = Fixture::start(
        VUBLK,
        8 * MIB,
        &["--control-socket", control.to_str().unwrap()],
    );
    fx.daemon.wait_for(&control);
    let mut s = fx.session_with(SessionConfig::default(), &Step::negotiate_features());
    let cache = writeback(&mut s);
    let binary = NeverReady::new(control_dir.path());

    let (ok, _, stderr) = upgrade(&control, Some(binary.path.to_str().unwrap()));
    assert!(
        !ok,
        "an upgrade to a binary that never gets ready succeeded"
    );
    assert!(
        stderr.contains("it was not ready within 4 s") && stderr.contains("goes on serving"),
        "{stderr}\nlog:\n{}",
        fx.daemon.log()
    );
    binary.assert_gone();
    fx.daemon.assert_running();
    assert_eq!(writeback(&mut s), cache, "the session did not survive");

    // Connected 3 s before asking: past the 5 s any control client has, the daemon is still
    // waiting for the new binary, and must keep this client until it answers.
    let answer = upgrade_late(&control, &binary.path, Duration::from_secs(3));
    assert!(
        !answer.is_empty(),
        "the daemon closed the connection without an answer\nlog:\n{}",
        fx.daemon.log()
    );
    let reply: UpgradeReply = serde_json::from_slice(&answer).unwrap();
    let reason = reply.expect_err("an upgrade to a binary that never gets ready succeeded");
    assert!(
        reason.contains("it was not ready within 4 s") && reason.contains("goes on serving"),
        "{reason}"
    );
    binary.assert_gone();
    fx.daemon.assert_running();
    assert_eq!(writeback(&mut s), cache, "the session did not survive");
}

#[test]
fn an_upgrade_hands_the_vm_over_on_the_same_socket_with_its_write_cache() {
    let control_dir = tempfile::tempdir().unwrap();
    let control = control_dir.path().join("control.sock");
    let mut fx = Fixture::start(
        VUBLK,
        8 * MIB,
        &[
            "--write-cache",
            "on",
            "--control-socket",
            control.to_str().unwrap(),
        ],
    );
    fx.daemon.wait_for(&control);
    let mut s = fx.session_with(SessionConfig::default(), &Step::negotiate_features());
    s.frontend()
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();
    assert_eq!(writeback(&mut s), 0);
    fx.wait_for_kept_state(WAIT);

    // A new binary that cannot start: the old daemon says why and goes on serving.
    let (ok, _, stderr) = upgrade(&control, Some("/bin/false"));
    assert!(!ok, "an upgrade to /bin/false succeeded");
    assert!(
        stderr.contains("exited before it was ready") && stderr.contains("goes on serving"),
        "{stderr}"
    );
    let (ok, _, stderr) = upgrade(&control, Some("/nonexistent/vublk"));
    assert!(!ok && stderr.contains("cannot execute"), "{stderr}");
    fx.daemon.assert_running();
    assert_eq!(writeback(&mut s), 0, "the session did not survive");

    let old = fx.daemon.pid();
    let (ok, stdout, stderr) = upgrade(&control, None);
    assert!(ok, "upgrade failed: {stderr}\nlog:\n{}", fx.daemon.log());
    let new: u32 = stdout.parse().unwrap();
    assert_ne!(new, old);
    // The old daemon stops its worker (the session ends) and exits, leaving the socket.
    assert!(s.wait_hangup(WAIT).unwrap(), "the old worker kept the VM");
    let status = fx
        .daemon
        .wait_exit(WAIT)
        .expect("the old daemon did not exit");
    assert!(
        status.success(),
        "old daemon: {status}\n{}",
        fx.daemon.log()
    );
    assert!(
        fx.socket.exists() && control.exists(),
        "a socket file went away"
    );

    // The VMM reconnects to the same path: the new daemon serves it, with the guest's choice.
    let stream = std::os::unix::net::UnixStream::connect(&fx.socket).unwrap();
    let mut s = Session::connect(
        stream,
        SessionConfig::default(),
        &Step::negotiate_features(),
    )
    .unwrap_or_else(|e| panic!("reconnect: {e}\nlog:\n{}", fx.daemon.log()));
    assert_eq!(workers_of(new).len(), 1, "the new daemon has no worker");
    assert_eq!(
        writeback(&mut s),
        0,
        "the new daemon serves write-back to a guest that chose write-through\nlog:\n{}",
        fx.daemon.log()
    );
    drop(s);
    terminate(new);
    // The new daemon took over the old one's sockets, and removes them on exit as it would.
    assert!(!fx.socket.exists() && !control.exists());
    let log = fx.daemon.log();
    assert!(
        !log.contains("panicked") && !log.contains("ERROR vublk::supervisor: "),
        "{log}"
    );
}
