//! The command-line contract, checked against the built binary: capabilities JSON, exit codes
//! and one-line errors, and clean shutdown on signals.

mod common;

use common::*;

#[test]
fn print_capabilities_prints_the_vhost_user_json() {
    let out = run_vublk(&["--print-capabilities"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 stdout");
    assert_eq!(
        stdout.trim_end(),
        r#"{"type":"block","features":["read-only","blk-file"]}"#
    );
    assert!(stdout.ends_with('\n'), "no trailing newline: {stdout:?}");
}

/// What is wrong with how vublk failed, if anything: exit code, panic, or not one line.
fn error_problems(out: &std::process::Output, code: i32) -> Vec<String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut problems = Vec::new();
    if out.status.code() != Some(code) {
        problems.push(format!("exited with {} instead of code {code}", out.status));
    }
    if stderr.contains("panicked") {
        problems.push("panicked".into());
    }
    let text = stderr.trim_end();
    if text.is_empty() {
        problems.push("printed no error message".into());
    } else if text.contains('\n') {
        problems.push(format!("printed {} lines, not one", text.lines().count()));
    }
    problems
}

#[track_caller]
fn assert_one_line_error(out: &std::process::Output, code: i32, what: &str) -> String {
    let problems = error_problems(out, code);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        problems.is_empty(),
        "{what}: {}; stderr:\n{stderr}",
        problems.join(", ")
    );
    stderr.trim_end().to_string()
}

#[test]
fn bad_arguments_exit_2_with_one_line() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    create_image(&img, MIB, 30);
    let img = img.to_str().unwrap();
    let sock_path = dir.path().join("never.sock");
    let sock = sock_path.to_str().unwrap();
    let cases: &[&[&str]] = &[
        &["--bogus"],
        &["--socket-path", sock, "--blk-file", img, "--bogus"],
        &["--socket-path", sock, "--fd", "3", "--blk-file", img],
        &["--blk-file", img],
        &["--socket-path", sock],
        &[
            "--socket-path",
            sock,
            "--blk-file",
            img,
            "--blk-size",
            "1000",
        ],
        &["--socket-path", sock, "--blk-file", img, "--blk-size", "0"],
        &["--socket-path", sock, "--null", "1Q"],
        &["--socket-path", sock, "--null", "-1"],
        &[
            "--socket-path",
            sock,
            "--blk-file",
            img,
            "--num-queues",
            "zero",
        ],
        &[
            "--socket-path",
            sock,
            "--blk-file",
            img,
            "--num-queues",
            "0",
        ],
        &[
            "--socket-path",
            sock,
            "--blk-file",
            img,
            "--write-cache",
            "maybe",
        ],
        &[
            "--socket-path",
            sock,
            "--blk-file",
            img,
            "--queue-size",
            "0",
        ],
    ];
    let mut failures = Vec::new();
    for args in cases {
        let out = run_vublk(args);
        let mut problems = error_problems(&out, 2);
        if sock_path.exists() {
            problems.push("left a socket behind".into());
            let _ = std::fs::remove_file(&sock_path);
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{args:?}: {}; stderr:\n{}",
                problems.join(", "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "usage errors:\n{}",
        failures.join("\n")
    );
}

#[test]
fn missing_image_exits_1_naming_the_path() {
    let dir = test_dir();
    let missing = dir.path().join("no-such-disk.img");
    let sock_path = dir.path().join("vublk.sock");
    let out = run_vublk(&[
        "--socket-path",
        sock_path.to_str().unwrap(),
        "--blk-file",
        missing.to_str().unwrap(),
    ]);
    let msg = assert_one_line_error(&out, 1, "missing image");
    assert!(
        msg.contains(missing.to_str().unwrap()),
        "error does not name the image: {msg}"
    );
    assert!(!sock_path.exists(), "a failed start left its socket behind");
}

#[test]
fn sigint_when_idle_exits_0_and_removes_the_socket() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    create_image(&img, MIB, 31);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap()],
    );
    let status = daemon.signal_and_wait(libc::SIGINT);
    daemon.check_clean_exit(status, "after SIGINT");
}

#[test]
fn sigterm_with_a_client_connected_exits_0() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    create_image(&img, 4 * MIB, 32);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap(), "--num-queues", "2"],
    );
    let mut client = Client::connect(daemon.socket(), 2);
    let data = pattern(900, 0, 64 * KIB as usize);
    assert_eq!(client.q(1).write_at(0, &data), 0);
    assert_eq!(client.q(1).flush(), 0);
    let status = daemon.signal_and_wait(libc::SIGTERM);
    daemon.check_clean_exit(status, "after SIGTERM with a client connected");
    drop(client);
    assert_eq!(
        &std::fs::read(&img).unwrap()[..data.len()],
        &data[..],
        "flushed data on disk"
    );
}

/// SIGTERM while a frontend has many large writes in flight: vublk must still stop cleanly
/// (finishing or abandoning the I/O without crashing) within the timeout.
#[test]
fn sigterm_with_io_in_flight_exits_0() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 64 * MIB;
    create_image(&img, size, 33);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap()],
    );
    let mut client = Client::connect_with(
        daemon.socket(),
        ClientOpts {
            buf_per_queue: 64 * MIB as usize,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("connect: {e}"));
    let q = client.q(0);
    let reqs: Vec<Req> = (0..64u64)
        .map(|i| Req::write(i * MIB, (i * MIB) as usize, MIB as usize))
        .collect();
    q.submit_and_abandon(&reqs);
    let status = daemon.signal_and_wait(libc::SIGTERM);
    daemon.check_clean_exit(status, "after SIGTERM with I/O in flight");
    drop(client);
}

/// --socket-mode and --socket-group set who may connect (a VMM running as another user needs
/// write permission on the socket); the status socket stays owner-only. The status socket is
/// created last (it says vublk is ready), so the test waits for it.
#[test]
fn socket_mode_and_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = test_dir();
    let control = dir.path().join("control.sock");
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &[
            "--null",
            "1M",
            "--socket-mode",
            "0660",
            "--socket-group",
            "100",
            "--control-socket",
            control.to_str().unwrap(),
        ],
    );
    daemon.wait_for(&control);
    let meta = std::fs::metadata(daemon.socket()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    assert_eq!(meta.gid(), 100);
    assert_eq!(
        std::fs::metadata(&control).unwrap().permissions().mode() & 0o777,
        0o600
    );
    daemon.stop();
}

/// A start that fails on a later socket (here the second export's path is a regular file) exits 1
/// and removes the sockets it had already created.
#[test]
fn a_failed_bind_leaves_no_socket_behind() {
    let dir = test_dir();
    let first = dir.path().join("first.sock");
    let control = dir.path().join("control.sock");
    let taken = dir.path().join("not-a-socket");
    std::fs::write(&taken, b"keep me").unwrap();
    let out = run_vublk(&[
        "--socket-path",
        first.to_str().unwrap(),
        "--null",
        "1M",
        "--export",
        &format!("socket-path={},null=1M", taken.display()),
        "--control-socket",
        control.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit status; stderr:\n{stderr}");
    let msg = stderr.lines().last().unwrap_or_default();
    assert!(
        msg.contains(taken.to_str().unwrap()) && msg.contains("not a socket"),
        "the error does not name the path and the problem: {msg}"
    );
    assert!(!first.exists(), "the first export's socket was left behind");
    assert!(!control.exists(), "the status socket was left behind");
    assert_eq!(
        std::fs::read(&taken).unwrap(),
        b"keep me",
        "the file in the way was touched"
    );
}

/// An `--export` without its own socket-mode or socket-group takes the daemon-wide ones; one
/// with its own keeps them.
#[test]
fn exports_take_the_daemon_wide_socket_mode_and_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = test_dir();
    let control = dir.path().join("control.sock");
    let inherits = dir.path().join("inherits.sock");
    let own = dir.path().join("own.sock");
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &[
            "--null",
            "1M",
            "--socket-mode",
            "0660",
            "--socket-group",
            "100",
            "--export",
            &format!("socket-path={},null=1M", inherits.display()),
            "--export",
            &format!(
                "socket-path={},null=1M,socket-mode=0600,socket-group=0",
                own.display()
            ),
            "--control-socket",
            control.to_str().unwrap(),
        ],
    );
    daemon.wait_for(&control);
    let access = |path: &std::path::Path| {
        let meta = std::fs::symlink_metadata(path).unwrap();
        (meta.permissions().mode() & 0o7777, meta.gid())
    };
    assert_eq!(access(daemon.socket()), (0o660, 100));
    assert_eq!(access(&inherits), (0o660, 100));
    assert_eq!(access(&own), (0o600, 0));
    daemon.stop();
}

/// `open-as=daemon` has the supervisor open the image with its own rights for whoever connects:
/// it needs an allow-list (exit 2 otherwise, saying why), and follows no symbolic link (exit 1
/// at start-up, naming the path).
#[test]
fn open_as_daemon_needs_an_allow_list_and_follows_no_link() {
    let dir = test_dir();
    let base = dir.path().canonicalize().unwrap();
    let img = base.join("disk.img");
    create_image(&img, MIB, 31);
    let sock = base.join("never.sock");
    let (img_s, sock_s) = (img.to_str().unwrap(), sock.to_str().unwrap());

    let out = run_vublk(&[
        "--socket-path",
        sock_s,
        "--blk-file",
        img_s,
        "--open-as",
        "daemon",
    ]);
    let line = assert_one_line_error(&out, 2, "--open-as daemon without an allow-list");
    assert!(
        line.contains("--open-as daemon needs --allow-uids or --allow-gids"),
        "{line}"
    );
    let export = format!("socket-path={sock_s},blk-file={img_s},open-as=daemon");
    let out = run_vublk(&["--export", &export]);
    let line = assert_one_line_error(&out, 2, "open-as=daemon without an allow-list");
    assert!(
        line.contains("open-as=daemon needs allow-uids= or allow-gids="),
        "{line}"
    );

    let link = base.join("link.img");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    std::os::unix::fs::symlink(&base, base.join("dir-link")).unwrap();
    for path in [link, base.join("dir-link/disk.img")] {
        let export = format!(
            "socket-path={sock_s},blk-file={},open-as=daemon,allow-uids=0",
            path.display()
        );
        let out = run_vublk(&["--export", &export]);
        let line = assert_one_line_error(&out, 1, "a symbolic link with open-as=daemon");
        assert!(
            line.contains(&format!(
                "{} is a symbolic link, or a directory on its way is",
                path.display()
            )),
            "{line}"
        );
        assert!(!sock.exists(), "left a socket behind");
    }
}

/// The supervisor opens an `open-as=daemon` image again for each connection, and only the
/// file it found at start-up: one put in its place later is refused, and the connection closed.
#[test]
fn open_as_daemon_refuses_a_replaced_image() {
    use std::os::unix::fs::MetadataExt;
    let dir = test_dir();
    let base = dir.path().canonicalize().unwrap();
    let img = base.join("disk.img");
    create_image(&img, MIB, 32);
    let uid = std::fs::metadata("/proc/self").unwrap().uid().to_string();
    let mut daemon = Daemon::start(
        vublk_bin(),
        &base,
        &[
            "--blk-file",
            img.to_str().unwrap(),
            "--open-as",
            "daemon",
            "--allow-uids",
            &uid,
        ],
    );
    let client = Client::connect(daemon.socket(), 1);
    assert_eq!(client.capacity(), MIB);
    drop(client);

    let replacement = base.join("new.img");
    create_image(&replacement, 2 * MIB, 33);
    std::fs::rename(&replacement, &img).unwrap();
    let refused = Client::connect_with(daemon.socket(), ClientOpts::default());
    assert!(refused.is_err(), "served a replaced image");
    let expected = format!(
        "{} is no longer the file vublk started with (device and inode changed)",
        img.display()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !daemon.log().contains(&expected) {
        assert!(
            std::time::Instant::now() < deadline,
            "no '{expected}' in the log:\n{}",
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    daemon.assert_running();
    daemon.stop();
}
