//! Exports at run time (`vublk export add|remove|list` on the control socket), end to end with
//! libblkio as the frontend: an added export serves I/O, the list shows it, removing one a VM
//! uses is refused unless forced, a forced removal lets requests in flight complete before the
//! connection closes, a bad request changes nothing, the other exports are served
//! throughout, and a stopped daemon cannot hang `vublk status` or `vublk export`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use vublk_test_support::io_gate::IoGate;

/// Waits until the daemon listens on `control`: the file exists from `bind` on, a moment
/// before `listen`, when a connection is refused.
fn wait_listening(daemon: &mut Daemon, control: &Path) {
    daemon.wait_for(control);
    // (With a RUST_LOG of the caller's the line may not be logged; Daemon::start does the same.)
    if std::env::var_os("RUST_LOG").is_some() {
        return;
    }
    if let Err(e) = daemon.try_wait_for_log(&format!("listening on {}", control.display())) {
        panic!("{e}");
    }
}

/// A daemon serving a 4 MiB null disk, with a control socket in `dir` it listens on.
fn null_daemon_with_control(dir: &Path) -> (Daemon, PathBuf) {
    let control = dir.join("control.sock");
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir,
        &[
            "--null",
            "4M",
            "--control-socket",
            control.to_str().unwrap(),
        ],
    );
    wait_listening(&mut daemon, &control);
    (daemon, control)
}

/// `vublk ARGS...`: exit code, stdout, stderr.
fn vublk(args: &[&str]) -> (Option<i32>, String, String) {
    let out = run_vublk(args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn add(control: &Path, spec: &str) -> (Option<i32>, String, String) {
    vublk(&[
        "export",
        "add",
        "--control-socket",
        control.to_str().unwrap(),
        spec,
    ])
}

fn remove(control: &Path, socket: &Path, force: bool) -> (Option<i32>, String, String) {
    let mut args = vec![
        "export",
        "remove",
        "--control-socket",
        control.to_str().unwrap(),
        socket.to_str().unwrap(),
    ];
    if force {
        args.push("--force");
    }
    vublk(&args)
}

/// `vublk export list --json`, parsed.
fn list(control: &Path) -> Vec<serde_json::Value> {
    let (code, out, err) = vublk(&[
        "export",
        "list",
        "--control-socket",
        control.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, Some(0), "export list failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("export list --json: {e}: {out}"))
}

fn sockets(list: &[serde_json::Value]) -> Vec<String> {
    list.iter()
        .map(|e| e["socket"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Waits (up to 10 s) until `ready` accepts what `vublk status --json` says.
fn wait_status(
    daemon: &Daemon,
    control: &Path,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = daemon.status(control).expect("vublk status");
        if ready(&status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never happened; status:\n{status:#}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The devices `status` reports for the export on `socket`.
fn devices_of(status: &serde_json::Value, socket: &Path) -> Vec<serde_json::Value> {
    let name = socket.to_str().unwrap();
    status["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|vm| vm["devices"].as_array().cloned().unwrap_or_default())
        .filter(|d| d["export"] == name)
        .collect()
}

/// An export added at run time serves I/O and is listed; removing it is refused while a VM is
/// connected; bad requests change nothing; once the VM is gone it is removed with its socket;
/// the export given at start-up serves all along.
#[test]
fn exports_are_added_listed_and_removed_at_run_time() {
    let dir = test_dir();
    let control = dir.path().join("control.sock");
    let a_img = dir.path().join("a.img");
    let b_img = dir.path().join("b.img");
    let b_sock = dir.path().join("b.sock");
    let c_sock = dir.path().join("c.sock");
    let size = 4 * MIB;
    let mut a_model = create_image(&a_img, size, 1);
    create_image(&b_img, size, 2);
    // The test's connections share one worker, started before b.img was an export: its
    // sandbox must let it open b.img.
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &[
            "--blk-file",
            a_img.to_str().unwrap(),
            "--control-socket",
            control.to_str().unwrap(),
            "--worker-allow",
            dir.path().to_str().unwrap(),
        ],
    );
    wait_listening(&mut daemon, &control);
    let mut a = Client::connect(daemon.socket(), 1);
    let data = pattern(10, 0, 64 * 1024);
    assert_eq!(a.q(0).write_at(0, &data), 0);
    a_model[..data.len()].copy_from_slice(&data);

    let (code, _, err) = add(
        &control,
        &format!(
            "socket-path={},blk-file={},num-queues=2",
            b_sock.display(),
            b_img.display()
        ),
    );
    assert_eq!(code, Some(0), "export add failed: {err}");
    let listed = list(&control);
    assert_eq!(
        sockets(&listed),
        [daemon.socket().to_str().unwrap(), b_sock.to_str().unwrap()]
    );
    assert_eq!(listed[1]["disk"], b_img.to_str().unwrap());
    assert_eq!(listed[1]["num_queues"], 2);
    let (code, text, _) = vublk(&[
        "export",
        "list",
        "--control-socket",
        control.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0));
    assert!(
        text.lines()
            .any(|l| l.starts_with(b_sock.to_str().unwrap()) && l.contains("2 queue(s)")),
        "the text list does not show the new export: {text}"
    );

    // The new export serves, on both of its queues.
    let mut b = Client::connect(&b_sock, 2);
    assert_eq!(b.capacity(), size);
    let b_data = pattern(20, MIB, 128 * 1024);
    assert_eq!(b.q(1).write_at(MIB, &b_data), 0);
    assert_eq!(b.q(0).flush(), 0);
    assert_same(
        &b.q(0).read_range(MIB, b_data.len() as u64),
        &b_data,
        "read back from the added export",
    );

    // Refused while connected: the export stays, socket and all.
    let (code, _, err) = remove(&control, &b_sock, false);
    assert_eq!(code, Some(1), "removing a connected export succeeded");
    assert!(
        err.contains("--force"),
        "the refusal does not say how: {err}"
    );
    assert!(b_sock.exists());
    assert_eq!(sockets(&list(&control)).len(), 2);
    assert_eq!(list(&control)[1]["connections"], 1);

    // Bad requests change nothing.
    for (spec, says) in [
        (
            format!(
                "socket-path={},blk-file={}/missing.img",
                c_sock.display(),
                dir.path().display()
            ),
            "missing.img",
        ),
        (
            format!("socket-path={},null=1M,bogus=1", c_sock.display()),
            "bogus",
        ),
        (
            format!("socket-path={},null=1M", b_sock.display()),
            "already",
        ),
        (format!("blk-file={}", b_img.display()), "socket-path"),
    ] {
        let (code, _, err) = add(&control, &spec);
        assert_eq!(code, Some(1), "export add {spec} succeeded");
        assert!(
            err.contains(says),
            "export add {spec}: the error does not say what is wrong: {err}"
        );
        assert!(!c_sock.exists(), "export add {spec} left a socket");
    }
    let (code, _, err) = remove(&control, &c_sock, false);
    assert_eq!(code, Some(1));
    assert!(err.contains("not an export"), "{err}");
    assert_eq!(
        sockets(&list(&control)),
        [daemon.socket().to_str().unwrap(), b_sock.to_str().unwrap()]
    );

    // Gone once the VM is: the socket with it.
    drop(b);
    wait_status(
        &daemon,
        &control,
        "the added export's connection ending",
        |s| devices_of(s, &b_sock).is_empty(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while list(&control)[1]["connections"] != 0 {
        assert!(Instant::now() < deadline, "the connection never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _, err) = remove(&control, &b_sock, false);
    assert_eq!(code, Some(0), "export remove failed: {err}");
    assert!(
        !b_sock.exists(),
        "the removed export's socket is still there"
    );
    assert_eq!(
        sockets(&list(&control)),
        [daemon.socket().to_str().unwrap()]
    );
    let mut image = std::fs::read(&b_img).unwrap();
    image.truncate(MIB as usize + b_data.len());
    assert_same(&image[MIB as usize..], &b_data, "the added export's image");

    // The first export served all along, on the same connection.
    assert_same(&a.q(0).read_range(0, size), &a_model, "the first export");
    drop(a);
    daemon.assert_running();
    daemon.stop();
}

/// `export remove --force` on an export a VM uses: a request in flight completes (its data is
/// on the image), then the connection closes and the socket is gone; the other export keeps
/// serving.
#[test]
fn a_forced_removal_completes_requests_in_flight_then_closes() {
    let dir = test_dir();
    let control = dir.path().join("control.sock");
    let a_img = dir.path().join("a.img");
    let b_img = dir.path().join("b.img");
    let b_sock = dir.path().join("b.sock");
    let size = 4 * MIB;
    let held_at = 2 * MIB;
    let mut a_model = create_image(&a_img, size, 3);
    create_image(&b_img, size, 4);
    // In the directory the worker may open files in.
    let gate = IoGate::in_dir(dir.path());
    let held = held_at.to_string();
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &[
            "--blk-file",
            a_img.to_str().unwrap(),
            "--control-socket",
            control.to_str().unwrap(),
            "--worker-allow",
            dir.path().to_str().unwrap(),
            // Only requests at `held_at` wait for a byte from the gate.
            "--test-io-gate",
            gate.arg(),
            "--test-io-gate-offset",
            &held,
        ],
    );
    wait_listening(&mut daemon, &control);
    let (code, _, err) = add(
        &control,
        &format!(
            "socket-path={},blk-file={}",
            b_sock.display(),
            b_img.display()
        ),
    );
    assert_eq!(code, Some(0), "export add failed: {err}");
    let mut a = Client::connect(daemon.socket(), 1);
    let mut b = Client::connect(&b_sock, 1);
    let before = pattern(30, 0, 64 * 1024);
    assert_eq!(b.q(0).write_at(0, &before), 0);
    let in_flight = pattern(31, held_at, 64 * 1024);
    b.q(0).buf()[..in_flight.len()].copy_from_slice(&in_flight);
    b.q(0)
        .submit_and_abandon(&[Req::write(held_at, 0, in_flight.len())]);
    wait_status(&daemon, &control, "the write held in flight", |s| {
        devices_of(s, &b_sock)
            .iter()
            .any(|d| d["in_flight"].as_u64() >= Some(1))
    });

    let (code, _, err) = remove(&control, &b_sock, true);
    assert_eq!(code, Some(0), "export remove --force failed: {err}");
    assert!(
        !b_sock.exists(),
        "the removed export's socket is still there"
    );
    assert_eq!(
        sockets(&list(&control)),
        [daemon.socket().to_str().unwrap()]
    );
    // The held write goes through, then the connection ends.
    gate.release(1);
    wait_status(&daemon, &control, "the forced connection ending", |s| {
        devices_of(s, &b_sock).is_empty()
    });
    let image = std::fs::read(&b_img).unwrap();
    assert_same(
        &image[..before.len()],
        &before,
        "written before the removal",
    );
    let at = held_at as usize;
    assert_same(
        &image[at..at + in_flight.len()],
        &in_flight,
        "written by the request in flight at the removal",
    );
    drop(b);

    // The first export still serves.
    let data = pattern(32, 0, 64 * 1024);
    assert_eq!(a.q(0).write_at(0, &data), 0);
    a_model[..data.len()].copy_from_slice(&data);
    assert_same(
        &a.q(0).read_range(0, MIB),
        &a_model[..MIB as usize],
        "the first export",
    );
    drop(a);
    daemon.assert_running();
    daemon.stop();
}

/// A control client that sends half a request and waits, or one that sends too much, does not
/// hold the supervisor: other clients are answered and VMs served meanwhile; the oversized
/// one is closed unanswered.
#[test]
fn a_stuck_or_oversized_control_client_does_not_hold_the_daemon() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let dir = test_dir();
    let (mut daemon, control) = null_daemon_with_control(dir.path());
    let mut stuck = UnixStream::connect(&control).unwrap();
    stuck
        .write_all(b"{\"ExportAdd\":{\"spec\":\"socket-pa")
        .unwrap();
    let mut big = UnixStream::connect(&control).unwrap();
    // More than the supervisor reads (64 KiB); it stops reading and closes.
    let chunk = vec![b' '; 16 * 1024];
    let mut sent = 0;
    big.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    while sent < 1024 * 1024 {
        match big.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    assert!(
        sent < 1024 * 1024,
        "the supervisor read 1 MiB of one request"
    );
    let _ = big.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = big.read_to_end(&mut answer);
    assert!(
        answer.is_empty(),
        "an oversized request was answered: {answer:?}"
    );

    assert_eq!(
        sockets(&list(&control)),
        [daemon.socket().to_str().unwrap()]
    );
    let mut vm = Client::connect(daemon.socket(), 1);
    assert_eq!(vm.q(0).write_at(0, &[1; 4096]), 0);
    drop(vm);
    drop(stuck);
    daemon.assert_running();
    daemon.stop();
}

/// A stopped (or wedged) daemon cannot hang `vublk status` or `vublk export`: each gives up
/// after 5 s with one line naming the control socket, and exits 1.
#[test]
fn a_stopped_daemon_does_not_hang_status_or_export() {
    let dir = test_dir();
    let added = dir.path().join("added.sock");
    let (mut daemon, control) = null_daemon_with_control(dir.path());
    let control_arg = control.to_str().unwrap();
    let spec = format!("socket-path={},null=1M", added.display());
    let commands: [&[&str]; 2] = [
        &["status", "--control-socket", control_arg],
        &["export", "add", "--control-socket", control_arg, &spec],
    ];
    daemon.signal(libc::SIGSTOP).unwrap();
    let outs: Vec<_> = commands
        .iter()
        .map(|args| {
            let mut cmd = std::process::Command::new(vublk_bin());
            cmd.args(*args);
            // Far past the 5 s, so that a hang fails the test rather than holding it.
            (
                args,
                vublk_test_support::process::run(cmd, Duration::from_secs(60)),
            )
        })
        .collect();
    daemon.signal(libc::SIGCONT).unwrap();
    for (args, out) in outs {
        let out = out.unwrap_or_else(|e| panic!("vublk {args:?} hung: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "vublk {args:?}: {stderr}");
        assert_eq!(
            stderr.trim(),
            format!(
                "vublk: the daemon on {} did not answer within 5 s",
                control.display()
            ),
            "vublk {args:?}"
        );
    }
    daemon.assert_running();
    daemon.stop();
}
