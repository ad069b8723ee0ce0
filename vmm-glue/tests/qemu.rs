//! The QEMU installed here takes what `vmm-glue qemu` prints and attaches a running vublk.
//!
//! QEMU runs paused (`-S`, no guest, TCG) with the monitor on stdin: realizing
//! vhost-user-blk-pci already connects to the export and runs the vhost-user handshake
//! (features, GET_QUEUE_NUM, config), so a QEMU that gets as far as `info qtree` has accepted
//! every option and the export. Skipped (with a message) when qemu-system-x86_64 is missing.
//! scripts/prereqs.sh installs QEMU 10.0 (bookworm-backports on Debian 12), so `--reconnect` is
//! spelled `reconnect-ms` here; the 7.2 spelling is checked as text in `cli.rs` and the cmdline
//! unit tests.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{vmm_glue, vublk, which};
use vmm_glue::cmdline::qemu::QemuVersion;
use vublk_test_support::Daemon;

/// vublk serving a null disk with `queues` queues on `sock`, once the socket exists.
fn start_vublk(sock: &Path, queues: &str) -> Daemon {
    let mut d = Daemon::listen(
        &vublk(),
        sock,
        &["--null", "64M", "--num-queues", queues].map(String::from),
    )
    .expect("spawn vublk");
    d.wait_for(sock);
    d
}

/// Runs paused QEMU with `args`, asks for `info qtree` and quits; (success, all output).
fn qemu_qtree(qemu: &Path, args: &[String]) -> (bool, String) {
    let mut child = Command::new("timeout")
        .arg("120")
        .arg(qemu)
        .args([
            "-machine",
            "q35,accel=tcg",
            "-nodefaults",
            "-display",
            "none",
            "-S",
        ])
        .args(["-monitor", "stdio"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qemu");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"info qtree\nquit\n")
        .ok();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn json_args(args: &[&str]) -> Vec<String> {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = vmm_glue(&all);
    assert_eq!(code, 0, "vmm-glue {args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn qemu_attaches_the_export_with_the_printed_options() {
    let Some(qemu) = which("qemu-system-x86_64") else {
        eprintln!("skipped: qemu-system-x86_64 is not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("disk.sock");
    let s = sock.to_str().unwrap();
    let mut d = start_vublk(&sock, "2");
    let version = QemuVersion::probe(&qemu).unwrap();
    eprintln!("QEMU {version}");

    // Plain, and with reconnect (its spelling asked from this QEMU's --version).
    for extra in [&[][..], &["--reconnect", "1", "--queue-size", "256"]] {
        let mut a = vec!["qemu", "--socket", s, "--queues", "2", "--mem", "256M"];
        a.extend_from_slice(extra);
        let args = json_args(&a);
        if !extra.is_empty() {
            let spelling = if version >= QemuVersion::RECONNECT_MS {
                ",reconnect-ms=1000"
            } else {
                ",reconnect=1"
            };
            assert!(
                args.iter().any(|a| a.ends_with(spelling)),
                "QEMU {version} wants {spelling}: {args:?}"
            );
        }
        let (ok, out) = qemu_qtree(&qemu, &args);
        assert!(ok, "QEMU refused {args:?}:\n{out}");
        assert!(out.contains("dev: vhost-user-blk-pci"), "{out}");
        assert!(out.contains("num-queues = 2 (0x2)"), "{out}");
        if !extra.is_empty() {
            assert!(out.contains("queue-size = 256 (0x100)"), "{out}");
        }
    }
    assert!(d.try_wait().is_none(), "vublk died: {}", d.log());
}

/// What `--backend-queues` refuses is what QEMU itself refuses once it meets the export.
#[test]
fn more_queues_than_the_export_offers_fails_in_qemu_too() {
    let Some(qemu) = which("qemu-system-x86_64") else {
        eprintln!("skipped: qemu-system-x86_64 is not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("disk.sock");
    let s = sock.to_str().unwrap();
    let _d = start_vublk(&sock, "2");

    let (code, _, err) = vmm_glue(&[
        "qemu",
        "--socket",
        s,
        "--queues",
        "4",
        "--mem",
        "256M",
        "--backend-queues",
        "2",
    ]);
    assert_eq!(code, 2, "{err}");
    let args = json_args(&["qemu", "--socket", s, "--queues", "4", "--mem", "256M"]);
    let (ok, out) = qemu_qtree(&qemu, &args);
    assert!(!ok, "QEMU took 4 queues from a 2-queue export:\n{out}");
    assert!(
        out.contains("The maximum number of queues supported by the backend is 2"),
        "{out}"
    );
}
