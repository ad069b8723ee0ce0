//! Device state that outlives a worker: the write cache the guest chose.
//!
//! The guest sets it once (the `writeback` config field, VIRTIO_BLK_F_CONFIG_WCE) and VMMs do
//! not send it again after a reconnect. The worker reports it to the supervisor, which hands it
//! to the VMM's next worker: a guest that chose write-through keeps it after its worker was
//! killed. Here the test process is the VMM (its pid and start time key the VM), and vublk runs
//! as the supervisor with per-VM workers.

use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vublk_test_support::daemon::workers_of;
use vublk_test_support::frontend::{Fixture, Session, SessionConfig, Step};

const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");
const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(10);

fn writeback(s: &mut Session) -> u8 {
    s.blk_config().unwrap().writeback
}

/// The one worker of the daemon.
fn worker(fx: &Fixture) -> u32 {
    let deadline = Instant::now() + WAIT;
    loop {
        if let [pid] = workers_of(fx.daemon.pid())[..] {
            return pid;
        }
        assert!(Instant::now() < deadline, "no single worker");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects again until a new worker serves the session (the supervisor may not have reaped
/// the old one yet, and drops a connection that arrives before).
fn reconnect(fx: &mut Fixture) -> Session {
    let deadline = Instant::now() + WAIT;
    loop {
        let stream = fx.stream();
        match Session::connect(
            stream,
            SessionConfig::default(),
            &Step::negotiate_features(),
        ) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("reconnect: {e}\nlog:\n{}", fx.daemon.log()),
        }
    }
}

fn kill_worker(fx: &Fixture, s: &Session) {
    let pid = worker(fx);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    assert!(
        s.wait_hangup(WAIT).unwrap(),
        "the connection outlived its worker"
    );
    let deadline = Instant::now() + WAIT;
    while workers_of(fx.daemon.pid()).contains(&pid) {
        assert!(Instant::now() < deadline, "worker {pid} was not reaped");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_guests_write_cache_choice_survives_its_worker() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &["--write-cache", "on"]);
    let mut s = fx.session_with(SessionConfig::default(), &Step::negotiate_features());
    assert_eq!(writeback(&mut s), 1);
    s.frontend()
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();
    assert_eq!(writeback(&mut s), 0);

    kill_worker(&fx, &s);
    let mut s = reconnect(&mut fx);
    assert_eq!(
        writeback(&mut s),
        0,
        "the new worker serves write-back to a guest that chose write-through\nlog:\n{}",
        fx.daemon.log()
    );

    // And back: the guest's latest choice is the one that counts.
    s.frontend()
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[1])
        .unwrap();
    kill_worker(&fx, &s);
    let mut s = reconnect(&mut fx);
    assert_eq!(writeback(&mut s), 1, "log:\n{}", fx.daemon.log());
}

/// A new daemon on the same socket (the old one killed: a crash, or an upgrade) serves the
/// guest's choice too: the supervisor keeps it in its state directory (`vublk-state` beside
/// the socket), keyed by the VMM's pid and start time.
#[test]
fn the_guests_write_cache_choice_survives_a_daemon_restart() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &["--write-cache", "on"]);
    let mut s = fx.session_with(SessionConfig::default(), &Step::negotiate_features());
    s.frontend()
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();
    assert_eq!(writeback(&mut s), 0);
    // The worker reports the choice to the supervisor on its own time: wait for it to be
    // kept (a file in its state directory) before the daemon dies; a daemon that keeps no
    // file fails below.
    fx.wait_for_kept_state(WAIT);

    let old_log = fx.daemon.log();
    fx.daemon.signal_and_wait(libc::SIGKILL);
    assert!(
        s.wait_hangup(WAIT).unwrap(),
        "the connection outlived the daemon"
    );
    let args = [
        "--blk-file".to_string(),
        fx.image.display().to_string(),
        "--write-cache".into(),
        "on".into(),
    ];
    fx.daemon =
        vublk_test_support::daemon::Daemon::listen(VUBLK.as_ref(), &fx.socket, &args).unwrap();
    let mut s = reconnect(&mut fx);
    assert_eq!(
        writeback(&mut s),
        0,
        "the new daemon serves write-back to a guest that chose write-through\nold log:\n{old_log}\nlog:\n{}",
        fx.daemon.log()
    );
}
