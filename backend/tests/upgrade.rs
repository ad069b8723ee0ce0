//! `vublk upgrade`: the running daemon starts a new binary on its own listening sockets and
//! hands its VMs over, without the socket ever refusing a connection or disappearing; a new
//! binary that fails leaves the old daemon serving. Here the test process is the VMM (a
//! protocol-level frontend), vublk runs as the supervisor with per-VM workers.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vublk_test_support::daemon::workers_of;
use vublk_test_support::frontend::session::BLK_CONFIG_LEN;
use vublk_test_support::frontend::{BlkConfig, Fixture, Session, SessionConfig, Step};

const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");
const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(10);

fn steps() -> Vec<Step> {
    let mut steps = Step::negotiate();
    steps.push(Step::SetFeatures);
    steps
}

fn writeback(s: &mut Session) -> u8 {
    let raw = s
        .get_config(0, BLK_CONFIG_LEN, VhostUserConfigFlags::empty())
        .unwrap();
    BlkConfig::parse(&raw).writeback
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
    let mut s = fx.session_with(SessionConfig::default(), &steps());
    s.frontend()
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();
    assert_eq!(writeback(&mut s), 0);
    let state = fx.dir.path().join("vublk-state");
    let deadline = Instant::now() + WAIT;
    while std::fs::read_dir(&state).map_or(0, |d| d.count()) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }

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
    let mut s = Session::connect(stream, SessionConfig::default(), &steps())
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
