//! The worker sandbox, layer by layer (docs/security.md): each test proves one layer is on in a
//! real worker serving a real frontend (libblkio in this test process, so the worker runs as
//! this test's user). A worker that breaks out of a layer on purpose is made with the hidden
//! `--test-worker-arg`; what a forbidden system call or forged reports do to other VMs is in
//! tenants.rs, which has tenants of different users.
//!
//! The namespace checks need root (the supervisor creates them while privileged); the others
//! run as any user.

mod common;

use std::path::Path;

use common::*;

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn proc_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"))
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

fn link(path: impl AsRef<Path>) -> String {
    std::fs::read_link(path.as_ref())
        .unwrap_or_else(|e| panic!("{}: {e}", path.as_ref().display()))
        .to_string_lossy()
        .into_owned()
}

/// The worker's entry in `vublk status --json` once it has reported its sandbox.
fn sandbox_status(daemon: &Daemon, control: &Path, worker: u32) -> serde_json::Value {
    let deadline = std::time::Instant::now() + DAEMON_TIMEOUT;
    loop {
        let status = daemon.status(control).expect("vublk status");
        if let Some(vm) = status["vms"]
            .as_array()
            .and_then(|vms| vms.iter().find(|vm| vm["worker_pid"] == worker))
            .filter(|vm| !vm["sandbox"].is_null())
        {
            return vm.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "worker {worker} never reported its sandbox: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Every layer, as the kernel and `vublk status` see it: not dumpable, stdio on /dev/null and a
/// pipe, the seccomp filter on (with no_new_privs), landlock enforced where the kernel has it,
/// and (as root) network and IPC namespaces of its own.
#[test]
fn every_layer_is_on_in_a_serving_worker() {
    let dir = test_dir();
    let control = dir.path().join("control.sock");
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &[
            "--null",
            "64M",
            "--control-socket",
            control.to_str().unwrap(),
        ],
    );
    daemon.wait_for(&control);
    let _client = Client::connect(daemon.socket(), 1);
    let worker = daemon.serving_pid();
    let vm = sandbox_status(&daemon, &control, worker);
    let sandbox = &vm["sandbox"];
    eprintln!("MEASURED sandbox of worker {worker}: {vm}");

    // `vublk status` prints it for people too.
    let out = run_vublk(&["status", "--control-socket", control.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("sandbox:"))
        .unwrap_or_else(|| panic!("no sandbox line in vublk status:\n{text}"));
    assert!(
        line.contains("seccomp filter (filter (") && line.contains("not dumpable"),
        "{line}"
    );

    // Not dumpable: its tenant can neither ptrace it nor take its fds (tenants.rs has a tenant
    // try).
    assert_eq!(sandbox["dumpable"], false, "{vm}");

    // seccomp, in the kernel's words.
    let status = proc_status(worker);
    assert_eq!(
        field(&status, "Seccomp:"),
        "2",
        "no seccomp filter:\n{status}"
    );
    assert_eq!(field(&status, "NoNewPrivs:"), "1", "{status}");
    assert_eq!(vm["seccomp"], "filter", "{vm}");
    assert!(
        sandbox["seccomp"].as_str().unwrap().starts_with("filter ("),
        "{vm}"
    );

    // landlock: enforced, or the kernel lacks it and the status says so.
    let landlock = sandbox["landlock"].as_str().unwrap();
    assert!(
        landlock.starts_with("ABI ") || landlock == "unsupported",
        "landlock: {landlock}"
    );

    // Clean descriptors: stdin and stdout on /dev/null, stderr a pipe (the supervisor's), and
    // not the daemon's log file.
    assert_eq!(link(format!("/proc/{worker}/fd/0")), "/dev/null");
    assert_eq!(link(format!("/proc/{worker}/fd/1")), "/dev/null");
    assert!(link(format!("/proc/{worker}/fd/2")).starts_with("pipe:"));
    let daemon_log = link(format!("/proc/{}/fd/2", daemon.pid()));
    for entry in std::fs::read_dir(format!("/proc/{worker}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        assert_ne!(
            target.to_string_lossy(),
            daemon_log,
            "the worker holds the daemon's stderr at fd {:?}",
            entry.file_name()
        );
    }

    // Namespaces: created while the supervisor is privileged.
    if is_root() {
        for ns in ["net", "ipc"] {
            assert_ne!(
                link(format!("/proc/{worker}/ns/{ns}")),
                link(format!("/proc/self/ns/{ns}")),
                "the worker shares the host's {ns} namespace"
            );
        }
        assert_eq!(sandbox["namespaces"], serde_json::json!(["net", "ipc"]));
        assert_eq!(sandbox["network"], "empty namespace", "{vm}");
        assert!(line.contains("network: empty namespace"), "{line}");
    }
    drop(_client);
    daemon.stop();
}

/// landlock: a worker may open its export's image and what `--worker-allow` names, and nothing
/// else, even a file its user may read.
#[test]
fn landlock_refuses_paths_outside_the_exports() {
    let dir = test_dir();
    let image = dir.path().join("disk.img");
    create_image(&image, 8 * MIB, 3);
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"not for workers").unwrap();
    let allowed = dir.path().join("allowed");
    std::fs::create_dir(&allowed).unwrap();
    std::fs::write(allowed.join("ok"), b"for workers").unwrap();
    let control = dir.path().join("control.sock");
    let open = |p: &Path| format!("open:{}", p.display());
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &[
            "--blk-file",
            image.to_str().unwrap(),
            "--control-socket",
            control.to_str().unwrap(),
            "--worker-allow",
            allowed.to_str().unwrap(),
            "--test-worker-arg",
            &open(&secret),
            "--test-worker-arg",
            &open(&allowed.join("ok")),
            "--test-worker-arg",
            &open(&image),
        ],
    );
    daemon.wait_for(&control);
    let _client = Client::connect(daemon.socket(), 1);
    let worker = daemon.serving_pid();
    let vm = sandbox_status(&daemon, &control, worker);
    if vm["sandbox"]["landlock"] == "unsupported" {
        eprintln!("skipped: the kernel has no landlock");
        return;
    }
    let prefix = format!("worker pid {worker} (VMM pid {}): ", std::process::id());
    for (path, outcome) in [
        (
            &secret,
            format!("cannot open {}: Permission denied", secret.display()),
        ),
        (
            &allowed.join("ok"),
            format!("opened {}", allowed.join("ok").display()),
        ),
        (&image, format!("opened {}", image.display())),
    ] {
        daemon
            .try_wait_for_log(&outcome)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let log = daemon.log();
        let line = log.lines().find(|l| l.contains(&outcome)).unwrap();
        assert!(
            line.contains(&prefix),
            "not prefixed with {prefix:?}: {line}"
        );
    }
    drop(_client);
    daemon.stop();
}
