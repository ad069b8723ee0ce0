//! `vmm-glue launch`: vublk and a VMM started on a socket vmm-glue creates, and stopped together.
//!
//! With the QEMU installed here (10.0, TCG, paused with `-S`, no guest kernel; the HMP monitor on
//! a unix socket): vublk gets the listening socket as fd 3, QEMU connects through it (vublk logs
//! the connection from QEMU's pid; `info qtree` shows the device), and the pair ends together
//! whichever way it ends. Where QEMU cannot show something (an exit code of our choosing, a VMM
//! that ignores SIGTERM) and for cloud-hypervisor, which needs KVM, a stand-in VMM does: a small
//! Python script that records its arguments, connects to the export named in them, reads the
//! virtio features vublk offers, and then waits, exits or ignores SIGTERM as told.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{vmm_glue, vublk, which, VMM_GLUE};

/// vmm-glue running `launch`, its stderr collected.
struct Launch {
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    reader: Option<thread::JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Launch {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(VMM_GLUE);
        cmd.arg("launch")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("run vmm-glue launch");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut pipe = child.stderr.take().unwrap();
        let into = stderr.clone();
        let reader = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                into.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self {
            child,
            stderr,
            reader: Some(reader),
            status: None,
        }
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits until stderr contains `text`.
    fn wait_for(&mut self, text: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let err = self.stderr();
            if err.contains(text) {
                return err;
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                self.status = Some(st);
                panic!("vmm-glue exited ({st}) before printing {text:?}:\n{err}");
            }
            assert!(
                start.elapsed() < timeout,
                "no {text:?} after {timeout:?}:\n{err}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The pid vmm-glue reported for `what` ("vublk", "qemu-system-x86_64", ...).
    fn pid_of(&mut self, what: &str) -> u32 {
        let marker = format!("started {what} (pid ");
        let err = self.wait_for(&marker, Duration::from_secs(30));
        let rest = &err[err.find(&marker).unwrap() + marker.len()..];
        rest[..rest.find(')').unwrap()].parse().unwrap()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill() on our own child, not yet reaped (status is taken only in `wait`).
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Waits for vmm-glue to exit; returns its exit code and everything it printed.
    fn wait(&mut self, timeout: Duration) -> (i32, String) {
        let start = Instant::now();
        let st = loop {
            if let Some(st) = self.status.or(self.child.try_wait().unwrap()) {
                break st;
            }
            assert!(
                start.elapsed() < timeout,
                "vmm-glue still running after {timeout:?}:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        };
        self.status = Some(st);
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        (st.code().unwrap_or(-1), self.stderr())
    }
}

impl Drop for Launch {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!("--- vmm-glue launch stderr ---\n{}", self.stderr());
        }
    }
}

fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits until process `pid` no longer exists.
fn wait_gone(pid: u32, timeout: Duration) {
    let start = Instant::now();
    while !gone(pid) {
        assert!(start.elapsed() < timeout, "pid {pid} still exists");
        thread::sleep(Duration::from_millis(10));
    }
}

/// The sockfs inode of the unix socket listening at `path` (from /proc/net/unix).
fn listening_inode(path: &Path) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    let want = path.to_str()?;
    table.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 = listening.
        (f.len() == 8 && f[7] == want && f[3] == "00010000").then(|| f[6].to_string())
    })
}

/// A patterned disk image in `dir`.
fn image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.img");
    std::fs::write(&p, vec![0x5au8; 4 << 20]).unwrap();
    p
}

/// The stand-in VMM (see the module docs), as `dir/name`. It logs to `$FAKE_VMM_LOG`; its
/// behaviour after the handshake is `$FAKE_VMM_MODE`: `wait` (until SIGTERM), `exit:N`, or
/// `ignore-term`.
fn stand_in(dir: &Path, name: &str) -> PathBuf {
    let python = if Path::new("/usr/bin/python3").exists() {
        PathBuf::from("/usr/bin/python3")
    } else {
        which("python3").expect("python3 for the stand-in VMM")
    };
    let script = format!(
        r#"#!{python}
import json, os, signal, socket, struct, sys, time
log = open(os.environ["FAKE_VMM_LOG"], "a")
def say(*a):
    print(*a, file=log, flush=True)
mode = os.environ.get("FAKE_VMM_MODE", "wait")
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    def term(sig, frame):
        say("SIGTERM")
        sys.exit(0)
    signal.signal(signal.SIGTERM, term)
say("argv", json.dumps(sys.argv[1:]))
say("pid", os.getpid())
path = None
for arg in sys.argv[1:]:
    for part in arg.split(","):
        for key in ("socket=", "path="):
            if part.startswith(key):
                path = part[len(key):]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
# VHOST_USER_GET_FEATURES (1), version 1, no payload; the reply is a header and a u64.
s.sendall(struct.pack("<III", 1, 1, 0))
reply = b""
while len(reply) < 20:
    chunk = s.recv(20 - len(reply))
    if not chunk:
        break
    reply += chunk
req, flags, size = struct.unpack("<III", reply[:12])
say("reply", req, hex(flags), size)
say("features", hex(struct.unpack("<Q", reply[12:20])[0]))
if mode.startswith("exit:"):
    sys.exit(int(mode[5:]))
while True:
    time.sleep(1)
"#,
        python = python.display()
    );
    let p = dir.join(name);
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Waits for the stand-in's log to contain `line_start`; returns that line's rest.
fn fake_log(log: &Path, line_start: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.starts_with(line_start)) {
            return l[line_start.len()..].trim().to_string();
        }
        assert!(
            start.elapsed() < timeout,
            "the stand-in VMM did not log {line_start:?}:\n{text}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// A test bed: temp dir, image, socket path, and the stand-in VMM as `cloud-hypervisor` on a
/// PATH of its own.
struct Bed {
    dir: tempfile::TempDir,
    image: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    path_env: String,
}

impl Bed {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmm-glue-launch-test-")
            .tempdir()
            .unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        stand_in(&bin, "cloud-hypervisor");
        let path_env = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Self {
            image: image(dir.path()),
            socket: dir.path().join("disk.sock"),
            log: dir.path().join("vmm.log"),
            path_env,
            dir,
        }
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    /// `vmm-glue launch cloud-hypervisor` with the stand-in and `more` arguments.
    fn launch_ch(&self, mode: &str, more: &[&str]) -> Launch {
        let vublk = vublk();
        let mut args = vec![
            "cloud-hypervisor",
            "--socket",
            Self::s(&self.socket),
            "--queues",
            "1",
            "--queue-size",
            "128",
            "--mem",
            "512M",
            "--blk-file",
            Self::s(&self.image),
            "--vublk",
            Self::s(&vublk),
        ];
        args.extend_from_slice(more);
        Launch::start(
            &args,
            &[
                ("PATH", &self.path_env),
                ("FAKE_VMM_LOG", Self::s(&self.log)),
                ("FAKE_VMM_MODE", mode),
            ],
        )
    }
}

/// The features vublk offers have VERSION_1 (bit 32) and vhost-user's PROTOCOL_FEATURES (30).
fn check_features(hex: &str) {
    let f = u64::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap();
    assert_ne!(f & (1 << 32), 0, "VERSION_1 missing from {hex}");
    assert_ne!(f & (1 << 30), 0, "PROTOCOL_FEATURES missing from {hex}");
}

#[test]
fn cloud_hypervisor_with_a_stand_in_gets_the_printed_options_and_a_live_export() {
    let bed = Bed::new();
    let mut l = bed.launch_ch(
        "wait",
        &[
            "--",
            "--kernel",
            "/boot/vmlinux",
            "--cmdline",
            "console=hvc0",
        ],
    );
    let vublk_pid = l.pid_of("vublk");
    let vmm_pid = l.pid_of("cloud-hypervisor");

    // The arguments are what `vmm-glue cloud-hypervisor` prints for the same export, then ours.
    let (code, printed, err) = vmm_glue(&[
        "cloud-hypervisor",
        "--socket",
        Bed::s(&bed.socket),
        "--queues",
        "1",
        "--queue-size",
        "128",
        "--mem",
        "512M",
        "--json",
        "--",
        "--kernel",
        "/boot/vmlinux",
        "--cmdline",
        "console=hvc0",
    ]);
    assert_eq!(code, 0, "{err}");
    let argv: Vec<String> =
        serde_json::from_str(&fake_log(&bed.log, "argv", Duration::from_secs(10))).unwrap();
    let want: Vec<String> = serde_json::from_str(&printed).unwrap();
    assert_eq!(argv, want);

    // It reached vublk through the socket vmm-glue created: vublk answered GET_FEATURES and
    // logged the connection from the stand-in's pid.
    check_features(&fake_log(&bed.log, "features", Duration::from_secs(10)));
    assert_eq!(
        fake_log(&bed.log, "pid", Duration::from_secs(1)),
        vmm_pid.to_string()
    );
    l.wait_for(&format!("from VMM pid {vmm_pid}"), Duration::from_secs(10));

    // SIGTERM to vmm-glue: the VMM gets SIGTERM, then vublk; the socket goes.
    let start = Instant::now();
    l.signal(libc::SIGTERM);
    let (code, err) = l.wait(Duration::from_secs(30));
    assert_eq!(code, 0, "the stand-in exits 0 on SIGTERM:\n{err}");
    assert!(
        err.contains("SIGTERM: stopping cloud-hypervisor and vublk"),
        "{err}"
    );
    assert_eq!(fake_log(&bed.log, "SIGTERM", Duration::from_secs(1)), "");
    assert!(gone(vmm_pid) && gone(vublk_pid));
    assert!(!bed.socket.exists(), "socket left behind");
    eprintln!("stopped both in {:?}", start.elapsed());
}

#[test]
fn the_vmm_exit_status_is_the_launch_status_and_vublk_stops_with_it() {
    let bed = Bed::new();
    let mut l = bed.launch_ch("exit:3", &[]);
    let vublk_pid = l.pid_of("vublk");
    let (code, err) = l.wait(Duration::from_secs(30));
    assert_eq!(code, 3, "{err}");
    check_features(&fake_log(&bed.log, "features", Duration::from_secs(1)));
    assert!(
        err.contains("cloud-hypervisor exited with status 3; stopping vublk"),
        "{err}"
    );
    assert!(
        err.contains("SIGTERM received, stopping"),
        "vublk was not stopped by SIGTERM:\n{err}"
    );
    assert!(gone(vublk_pid));
    assert!(!bed.socket.exists());
}

#[test]
fn a_vmm_that_ignores_sigterm_is_killed_after_the_stop_timeout() {
    let bed = Bed::new();
    let mut l = bed.launch_ch("ignore-term", &["--stop-timeout", "1"]);
    let vmm_pid = l.pid_of("cloud-hypervisor");
    fake_log(&bed.log, "features", Duration::from_secs(10));
    let start = Instant::now();
    l.signal(libc::SIGINT);
    let (code, err) = l.wait(Duration::from_secs(30));
    let took = start.elapsed();
    assert_eq!(code, 128 + libc::SIGKILL, "{err}");
    assert!(
        err.contains("cloud-hypervisor did not stop within 1s of SIGTERM: killed it"),
        "{err}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert!(gone(vmm_pid));
    assert!(!bed.socket.exists());
}

#[test]
fn vublk_dying_stops_the_vmm() {
    let bed = Bed::new();
    let mut l = bed.launch_ch("wait", &[]);
    let vublk_pid = l.pid_of("vublk");
    let vmm_pid = l.pid_of("cloud-hypervisor");
    fake_log(&bed.log, "features", Duration::from_secs(10));
    // SAFETY: kill() on vublk, a child of vmm-glue that vmm-glue has not reaped yet.
    assert_eq!(unsafe { libc::kill(vublk_pid as i32, libc::SIGKILL) }, 0);
    let (code, err) = l.wait(Duration::from_secs(30));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "vublk killed by SIGKILL while cloud-hypervisor was running; stopping cloud-hypervisor"
        ),
        "{err}"
    );
    assert_eq!(fake_log(&bed.log, "SIGTERM", Duration::from_secs(1)), "");
    assert!(gone(vmm_pid));
    assert!(!bed.socket.exists());
}

#[test]
fn a_vublk_that_cannot_start_fails_the_launch_before_any_vmm_runs() {
    let bed = Bed::new();
    std::fs::remove_file(&bed.image).unwrap();
    let mut l = bed.launch_ch("wait", &[]);
    let (code, err) = l.wait(Duration::from_secs(30));
    assert_eq!(code, 1, "{err}");
    // vublk's own message (its pieces may interleave with vmm-glue's lines).
    assert!(err.contains("cannot open"), "{err}");
    assert!(
        err.contains(
            "vmm-glue: vublk exited with status 1 before it was ready (its own message is above); \
             the VMM was not started"
        ),
        "{err}"
    );
    assert!(!err.contains("started cloud-hypervisor"), "{err}");
    assert!(!bed.log.exists(), "the VMM ran");
    assert!(!bed.socket.exists());
}

#[test]
fn usage_errors_and_a_socket_in_use() {
    let bed = Bed::new();
    // vublk options vmm-glue sets itself are refused (exit 2) before anything starts.
    let mut l = bed.launch_ch("wait", &["--vublk-arg=--num-queues=4"]);
    let (code, err) = l.wait(Duration::from_secs(10));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("vublk --num-queues=4: vmm-glue sets it from --backend-queues"),
        "{err}"
    );
    let mut l = bed.launch_ch("wait", &["--backend-queues", "1", "--queues", "2"]);
    let (code, err) = l.wait(Duration::from_secs(10));
    assert_eq!(code, 2, "{err}");

    // Somebody listens on the socket already: it is not taken over.
    let other = std::os::unix::net::UnixListener::bind(&bed.socket).unwrap();
    let mut l = bed.launch_ch("wait", &[]);
    let (code, err) = l.wait(Duration::from_secs(10));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is in use: something listens on it"), "{err}");
    assert!(bed.socket.exists());
    drop(other);
}

// ---- QEMU ----

/// One HMP command over the monitor socket; returns what QEMU printed before the next prompt.
fn hmp(path: &Path, command: &str) -> String {
    let start = Instant::now();
    let mut s = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) => {
                assert!(start.elapsed() < Duration::from_secs(30), "monitor: {e}");
                thread::sleep(Duration::from_millis(20));
            }
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let read_prompt = |s: &mut UnixStream| {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&out).contains("(qemu) ") {
            let n = s.read(&mut buf).expect("monitor read");
            assert!(n > 0, "monitor closed: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    read_prompt(&mut s);
    s.write_all(format!("{command}\n").as_bytes()).unwrap();
    if command == "quit" {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        return String::from_utf8_lossy(&rest).into_owned();
    }
    read_prompt(&mut s)
}

/// `vmm-glue launch qemu`: paused TCG QEMU, HMP on `monitor`.
fn launch_qemu(qemu: &Path, bed: &Bed, monitor: &Path, blk_file: &str) -> Launch {
    let vublk = vublk();
    let mon = format!("unix:{},server=on,wait=off", monitor.display());
    Launch::start(
        &[
            "qemu",
            "--socket",
            Bed::s(&bed.socket),
            "--queues",
            "2",
            "--mem",
            "256M",
            "--qemu",
            qemu.to_str().unwrap(),
            "--blk-file",
            blk_file,
            "--vublk",
            Bed::s(&vublk),
            "--",
            "-machine",
            "q35,accel=tcg",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-monitor",
            &mon,
        ],
        &[],
    )
}

/// QEMU is up and attached: vublk listens on fd 3, which is the socket at the export's path,
/// QEMU's connection reached it, and QEMU shows the device. Returns (vublk pid, QEMU pid).
fn attached(l: &mut Launch, bed: &Bed, monitor: &Path) -> (u32, u32) {
    let vublk_pid = l.pid_of("vublk");
    let qemu_pid = l.pid_of("qemu-system-x86_64");
    let err = l.stderr();
    assert!(err.contains(" --fd 3 "), "{err}");
    assert!(err.contains("listening on inherited fd 3"), "{err}");
    let fd3 = std::fs::read_link(format!("/proc/{vublk_pid}/fd/3")).unwrap();
    let inode = listening_inode(&bed.socket).expect("nothing listens at the socket path");
    assert_eq!(fd3.to_str().unwrap(), format!("socket:[{inode}]"));
    // Realizing vhost-user-blk-pci connects and negotiates, so the device in the tree has
    // talked to vublk.
    let qtree = hmp(monitor, "info qtree");
    assert!(qtree.contains("dev: vhost-user-blk-pci"), "{qtree}");
    assert!(qtree.contains("num-queues = 2 (0x2)"), "{qtree}");
    l.wait_for(&format!("from VMM pid {qemu_pid}"), Duration::from_secs(10));
    (vublk_pid, qemu_pid)
}

macro_rules! need_qemu {
    () => {
        match which("qemu-system-x86_64") {
            Some(q) => q,
            None => {
                eprintln!("skipped: qemu-system-x86_64 is not installed");
                return;
            }
        }
    };
}

#[test]
fn qemu_attaches_through_the_fd_and_quitting_it_stops_vublk() {
    let qemu = need_qemu!();
    let bed = Bed::new();
    let monitor = bed.dir.path().join("hmp.sock");
    let mut l = launch_qemu(&qemu, &bed, &monitor, Bed::s(&bed.image));
    let (vublk_pid, qemu_pid) = attached(&mut l, &bed, &monitor);
    let start = Instant::now();
    hmp(&monitor, "quit");
    let (code, err) = l.wait(Duration::from_secs(60));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("qemu-system-x86_64 exited with status 0; stopping vublk"),
        "{err}"
    );
    assert!(gone(qemu_pid) && gone(vublk_pid));
    assert!(!bed.socket.exists());
    eprintln!("quit to both gone: {:?}", start.elapsed());
}

#[test]
fn killing_qemu_stops_vublk() {
    let qemu = need_qemu!();
    let bed = Bed::new();
    let monitor = bed.dir.path().join("hmp.sock");
    let mut l = launch_qemu(&qemu, &bed, &monitor, Bed::s(&bed.image));
    let (vublk_pid, qemu_pid) = attached(&mut l, &bed, &monitor);
    // SAFETY: kill() on QEMU, a child of vmm-glue that vmm-glue has not reaped yet.
    assert_eq!(unsafe { libc::kill(qemu_pid as i32, libc::SIGKILL) }, 0);
    let (code, err) = l.wait(Duration::from_secs(60));
    assert_eq!(code, 128 + libc::SIGKILL, "{err}");
    assert!(
        err.contains("qemu-system-x86_64 killed by SIGKILL; stopping vublk"),
        "{err}"
    );
    wait_gone(vublk_pid, Duration::from_secs(5));
    assert!(!bed.socket.exists());
}

#[test]
fn sigterm_to_vmm_glue_stops_qemu_and_vublk_and_removes_the_socket() {
    let qemu = need_qemu!();
    let bed = Bed::new();
    let monitor = bed.dir.path().join("hmp.sock");
    let mut l = launch_qemu(&qemu, &bed, &monitor, Bed::s(&bed.image));
    let (vublk_pid, qemu_pid) = attached(&mut l, &bed, &monitor);
    let start = Instant::now();
    l.signal(libc::SIGTERM);
    let (code, err) = l.wait(Duration::from_secs(60));
    // QEMU exits 0 on SIGTERM ("terminating on signal 15").
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("terminating on signal 15"), "{err}");
    assert!(
        err.contains("vublk::supervisor: SIGTERM received, stopping"),
        "{err}"
    );
    assert!(gone(qemu_pid) && gone(vublk_pid));
    assert!(!bed.socket.exists());
    // vublk's status socket lived in a private directory, gone too.
    let control = err
        .split("--control-socket ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("control socket in the vublk command line");
    assert!(!Path::new(control).parent().unwrap().exists(), "{control}");
    eprintln!("SIGTERM to both gone: {:?}", start.elapsed());
}

#[test]
fn a_bad_image_fails_the_qemu_launch_and_leaves_no_qemu() {
    let qemu = need_qemu!();
    let bed = Bed::new();
    let monitor = bed.dir.path().join("hmp.sock");
    let missing = bed.dir.path().join("missing.img");
    let mut l = launch_qemu(&qemu, &bed, &monitor, Bed::s(&missing));
    let (code, err) = l.wait(Duration::from_secs(30));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("cannot open {}", missing.display())),
        "{err}"
    );
    assert!(err.contains("the VMM was not started"), "{err}");
    assert!(!err.contains("started qemu"), "{err}");
    // No QEMU anywhere with this launch's socket on its command line.
    let socket = Bed::s(&bed.socket);
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline);
            assert!(
                !(text.contains("qemu-system") && text.contains(socket)),
                "a QEMU for this launch runs: {text}"
            );
        }
    }
    assert!(!bed.socket.exists());
    assert!(!monitor.exists());
}
