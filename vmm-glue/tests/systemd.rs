//! The systemd unit pair in docs/systemd/: the units parse, and the fd handover they describe
//! serves I/O.
//!
//! systemd is not PID 1 in the test environment, so the units cannot be started for real.
//! Instead:
//! - `systemd-analyze verify` loads both (unknown keys, bad values, a missing `ExecStart=`
//!   binary are reported), with `ExecStart=`'s binary pointed at the vublk under test;
//! - `systemd-socket-activate` plays the socket unit: it binds and listens on the unit's
//!   `ListenStream=` (moved into a temp dir) and, on the first connection, execs the unit's
//!   `ExecStart=` command line with the listening socket as fd 3 and `LISTEN_FDS=1`, as
//!   systemd does. A scripted QEMU handshake then reads data through it; SIGTERM stops vublk
//!   with exit 0 and leaves the socket, which belongs to systemd, in place.
//!
//! `SocketMode=`, `SocketGroup=` and `RemoveOnStop=` are only checked by `verify`. Each test is
//! skipped (with a message) when its systemd tool is missing.

mod common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{vublk, which, workspace};
use vublk_test_support::daemon::{Daemon, Options};
use vublk_test_support::frontend::fixture::{image_pattern, IMAGE_SEED};
use vublk_test_support::frontend::{Session, SessionConfig, Step};
use vublk_test_support::pattern::{assert_same, create_image};

fn unit(name: &str) -> String {
    let path = workspace().join("docs/systemd").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The value of the first `key=` line.
fn setting(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in\n{text}"))
        .trim()
        .to_string()
}

/// Both units in `dir`, with ExecStart='s binary replaced by `binary`.
fn write_units(dir: &Path, binary: &Path) -> Vec<PathBuf> {
    let service = unit("vublk.service");
    let exec = setting(&service, "ExecStart");
    let shipped = exec.split_whitespace().next().unwrap();
    let service = service.replace(shipped, binary.to_str().unwrap());
    let mut paths = Vec::new();
    for (name, text) in [
        ("vublk.socket", unit("vublk.socket")),
        ("vublk.service", service),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        paths.push(p);
    }
    paths
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let Some(analyze) = which("systemd-analyze") else {
        eprintln!("skipped: systemd-analyze is not installed (Debian package systemd)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let units = write_units(dir.path(), &vublk());
    let out = Command::new(analyze)
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    // Unknown keys and ignored values are warnings with exit 0: none allowed either.
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze verify warned:\n{stderr}"
    );

    let socket = unit("vublk.socket");
    assert_eq!(setting(&socket, "SocketMode"), "0660");
    let exec = setting(&unit("vublk.service"), "ExecStart");
    assert!(
        exec.contains(" --fd 3 "),
        "ExecStart must serve fd 3: {exec}"
    );
}

/// `verify` does catch mistakes: the same check fails on a unit with a misspelt key.
#[test]
fn verify_would_catch_a_misspelt_key() {
    let Some(analyze) = which("systemd-analyze") else {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let units = write_units(dir.path(), &vublk());
    let text = std::fs::read_to_string(&units[0]).unwrap();
    std::fs::write(&units[0], text.replace("SocketMode=", "SocketMod=")).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unknown key 'SocketMod'"),
        "{out:?}"
    );
}

#[test]
fn socket_activation_hands_vublk_the_listening_fd() {
    let Some(activate) = which("systemd-socket-activate") else {
        eprintln!("skipped: systemd-socket-activate is not installed (Debian package systemd)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    create_image(&image, 1 << 20, IMAGE_SEED);

    // The unit's socket, moved into the temp dir, and its command line with the test's binary
    // and image.
    let listen = setting(&unit("vublk.socket"), "ListenStream");
    let sock = dir.path().join(
        Path::new(&listen)
            .file_name()
            .expect("ListenStream is a path"),
    );
    let exec = setting(&unit("vublk.service"), "ExecStart");
    let mut words: Vec<String> = exec.split_whitespace().map(String::from).collect();
    words[0] = vublk().display().to_string();
    let at = words
        .iter()
        .position(|w| w == "--blk-file")
        .expect("--blk-file")
        + 1;
    words[at] = image.display().to_string();

    let mut args = vec!["-l".to_string(), sock.display().to_string()];
    args.extend(words);
    let mut cmd = Command::new(&activate);
    cmd.args(&args);
    let d = activate_and_read(cmd, &sock);
    let log = d.log();
    assert!(
        log.contains("--fd 3"),
        "systemd-socket-activate exec'd the unit's command: {log}"
    );
    stop_leaving_the_socket(d, &sock);
}

/// Spawns `cmd` (systemd-socket-activate running vublk on `sock`), connects to `sock` as QEMU
/// does, and reads through it: the image's data must come back. Returns the running process.
fn activate_and_read(cmd: Command, sock: &Path) -> Daemon {
    let mut d = Options::default()
        .spawn(cmd)
        .expect("spawn systemd-socket-activate");
    let start = Instant::now();
    let stream = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) => {
                assert!(d.try_wait().is_none(), "exited: {}", d.log());
                assert!(start.elapsed() < Duration::from_secs(10), "connect: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let config = SessionConfig::default();
    let steps = Step::qemu(config.num_queues);
    let mut s = Session::connect(stream, config, &steps)
        .unwrap_or_else(|e| panic!("handshake: {e}\n{}", d.log()));
    let c = s.blk(0).read(8, 4096).unwrap();
    assert_eq!(c.status(), 0, "{}", d.log());
    assert_same(
        &c.data,
        &image_pattern(8 * 512, 4096),
        "read through the passed socket",
    );
    d
}

/// SIGTERM stops vublk with exit 0, and the socket, which systemd passed it, stays.
fn stop_leaving_the_socket(mut d: Daemon, sock: &Path) {
    d.signal(libc::SIGTERM).unwrap();
    let st = d
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("vublk did not stop on SIGTERM: {}", d.log()));
    assert!(st.success(), "vublk exit {st}: {}", d.log());
    assert!(
        sock.exists(),
        "vublk must not remove a socket systemd passed"
    );
}

/// A socket unit with `vublk --socket-path` (the same path as `ListenStream=`) instead of
/// `--fd 3`: vublk finds the socket systemd passed (LISTEN_PID, LISTEN_FDS), bound to its path,
/// and serves it instead of binding a new one, and leaves it in place on exit. The same path
/// takes the sockets a daemon hands over in `vublk upgrade`.
#[test]
fn socket_activation_is_found_by_the_socket_path() {
    found_by_the_socket_path(&[]);
}

#[test]
fn socket_activation_is_found_by_the_socket_path_in_a_single_process() {
    found_by_the_socket_path(&["--single-process"]);
}

fn found_by_the_socket_path(extra: &[&str]) {
    let Some(activate) = which("systemd-socket-activate") else {
        eprintln!("skipped: systemd-socket-activate is not installed (Debian package systemd)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    create_image(&image, 1 << 20, IMAGE_SEED);
    let sock = dir.path().join("vublk.sock");
    let mut cmd = Command::new(&activate);
    cmd.arg("-l")
        .arg(&sock)
        .arg(vublk())
        .arg("--socket-path")
        .arg(&sock)
        .arg("--blk-file")
        .arg(&image)
        .args(extra);
    let d = activate_and_read(cmd, &sock);
    let log = d.log();
    assert!(
        log.contains(&format!("listening on {} (inherited fd 3)", sock.display())),
        "vublk did not serve the socket systemd passed: {log}"
    );
    stop_leaving_the_socket(d, &sock);
}
