//! vublk's container image (the top-level Dockerfile, built by scripts/container-image.sh) run
//! with podman, the VMM on the host, the way docs/deploy.md ("Containers") says to run it:
//!
//! - [`supervisor_serves_host_vmms`]: vublk in its default mode, the supervisor, in the host's
//!   pid and cgroup namespaces with the host's cgroup tree mounted. Two VMMs on the host
//!   connect with libblkio through the socket in the bind-mounted directory: this test process
//!   (root), and a copy of it running as nobody. Each gets its own worker carrying its uid, gid
//!   and cgroups; what each writes is read back through vublk and found in the image file on
//!   the host. `podman stop` ends vublk with exit 0 and its socket removed.
//! - [`supervisor_in_its_own_pid_namespace_refuses`]: with podman's defaults the supervisor
//!   cannot see who connected (SO_PEERCRED names no pid it can look up), so it closes the
//!   connection and keeps serving.
//! - [`single_process_needs_no_host_namespaces`]: `--single-process` serves from a container
//!   with podman's default namespaces.
//!
//! Every run needs, on this machine (podman 4.3, hybrid cgroup v1, no CAP_SYS_RESOURCE):
//! `--runtime runc`, explicit `--ulimit`s (podman's default nofile and nproc are above the hard
//! limits, which cannot be raised), and a seccomp profile allowing io_uring (podman's default
//! profile answers ENOSYS).
//!
//! The tests need root and podman with runc (scripts/prereqs.sh installs both); without them
//! they fail, saying what is missing. The image is built once per test process under a unique
//! tag from the release binary (`cargo build --release -p vublk` into this test's target
//! directory, which dominates a first run). The image, every container and the temp dirs are
//! removed when the tests end, failed or not. podman kills a container that outlives
//! [`CONTAINER_LIFETIME`] (`--timeout`, enforced by conmon, so even after this process died),
//! so a hung vublk cannot hang libblkio, and the test run, for longer. `VUBLK_BIN` puts that binary in the
//! image instead of the release build, as it replaces vublk for vmm-glue's other tests.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::mem::MaybeUninit;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use common::{which, workspace};
use vublk_test_support::frontend::fixture::{image_pattern, IMAGE_SEED};
use vublk_test_support::pattern::{assert_same, create_image};

const MIB: u64 = 1024 * 1024;
const IMAGE_SIZE: u64 = 16 * MIB;
/// Where the root VMM writes, and where the one running as nobody writes.
const ROOT_OFFSET: u64 = MIB;
const NOBODY_OFFSET: u64 = 8 * MIB;
const IO_LEN: usize = MIB as usize;
/// nobody and nogroup on Debian.
const NOBODY: u32 = 65534;

/// How long one podman command (other than the image build) may take.
const PODMAN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a container may live before podman kills it.
const CONTAINER_LIFETIME: Duration = Duration::from_secs(180);
/// How long vublk may take to create its socket, or a worker to appear.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a request may take.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The podman run options that let the supervisor's workers take the VMM's identity: the
/// host's pids (to find the VMM in /proc), the host's cgroup namespace and cgroup tree mounted
/// read-write (to join the VMM's cgroups by writing cgroup.procs), and CAP_SYS_NICE (for VMMs
/// at a lower nice value than vublk's).
const HOST_NAMESPACES: [&str; 5] = [
    "--pid=host",
    "--cgroupns=host",
    "--volume",
    "/sys/fs/cgroup:/sys/fs/cgroup",
    "--cap-add=SYS_NICE",
];

/// podman's default seccomp profile (containers-common), which the test's profile extends.
const DEFAULT_SECCOMP: &str = "/usr/share/containers/seccomp.json";
/// The environment variable that turns [`vmm_as_another_user`] into a VMM for that socket.
const CLIENT_SOCKET_ENV: &str = "VUBLK_CONTAINER_TEST_VMM_SOCKET";
/// What [`vmm_as_another_user`] prints once its I/O is done and checked.
const CLIENT_READY: &str = "vmm-as-another-user: ready";

// ---------------------------------------------------------------------------------------------
// podman
// ---------------------------------------------------------------------------------------------

/// A unique name for an image or a container of this test process.
fn unique(what: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "vublk-test-{what}-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `podman --runtime runc ARGS`, killed after `timeout`. runc because crun (podman's
/// first choice when installed) fails on this machine's hybrid cgroup v1 hierarchy.
fn podman(args: &[&str], timeout: Duration) -> Output {
    Command::new("timeout")
        .arg("--kill-after=5")
        .arg(timeout.as_secs().to_string())
        .args(["podman", "--runtime", "runc"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run timeout(1) podman")
}

/// [`podman`], panicking with its output unless it succeeds; returns stdout, trimmed.
#[track_caller]
fn podman_ok(args: &[&str]) -> String {
    let out = podman(args, PODMAN_TIMEOUT);
    assert!(
        out.status.success(),
        "podman {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Fails the test, saying what to install, unless it can run: rootful podman with runc.
fn require_podman() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the container tests need root: rootful podman, the host's pid namespace and cgroup \
         tree, and VMMs of other users (CI runs them as root)"
    );
    for tool in ["podman", "runc"] {
        assert!(
            which(tool).is_some(),
            "{tool} is not installed: the container tests need podman and runc \
             (apt-get install podman runc; scripts/prereqs.sh installs them)"
        );
    }
}

/// The `--ulimit` options for every container. podman's defaults (nofile and nproc 1048576)
/// are above this machine's hard limits, and without CAP_SYS_RESOURCE runc cannot set them;
/// podman itself ran with nproc 32768 here. Workers get the lower of these and the VMM's.
fn ulimits() -> [String; 4] {
    let hard = |resource| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the local.
        let ret = unsafe { libc::getrlimit(resource, &mut limit) };
        assert_eq!(ret, 0, "getrlimit: {}", std::io::Error::last_os_error());
        limit.rlim_max
    };
    let nofile = hard(libc::RLIMIT_NOFILE).min(16384);
    let nproc = hard(libc::RLIMIT_NPROC).min(4096);
    [
        "--ulimit".into(),
        format!("nofile={nofile}:{nofile}"),
        "--ulimit".into(),
        format!("nproc={nproc}:{nproc}"),
    ]
}

/// The vublk image, built for this test process, and the seccomp profile to run it with.
struct Image {
    tag: String,
    seccomp: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Image {
    fn drop(&mut self) {
        let out = podman(&["rmi", "--force", &self.tag], PODMAN_TIMEOUT);
        if !out.status.success() {
            eprintln!(
                "could not remove image {}: {}",
                self.tag,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The image, shared by the tests running at the same time; removed when the last one is done.
fn image() -> Arc<Image> {
    static SHARED: Mutex<Weak<Image>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(image) = shared.upgrade() {
        return image;
    }
    require_podman();
    let image = Arc::new(build_image());
    *shared = Arc::downgrade(&image);
    image
}

/// This test's target directory: it runs as `<target>/<profile>/deps/<name>-<hash>`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .nth(3)
        .expect("test executable in <target>/<profile>/deps")
        .to_path_buf()
}

fn build_image() -> Image {
    let dir = tempfile::Builder::new()
        .prefix("vublk-container-")
        .tempdir()
        .expect("temp dir");
    let seccomp = dir.path().join("seccomp.json");
    write_seccomp_profile(&seccomp);

    let tag = format!("localhost/{}", unique("image"));
    let started = Instant::now();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The image owns its tag from here on, so a failed build is cleaned up too.
    let image = Image {
        tag,
        seccomp,
        _dir: dir,
    };
    let out = Command::new("timeout")
        .args(["--kill-after=10", "900", "bash"])
        .arg(workspace().join("scripts/container-image.sh"))
        .arg(&image.tag)
        .env("CARGO", cargo)
        .env("CARGO_TARGET_DIR", target_dir())
        .current_dir(workspace())
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/container-image.sh");
    assert!(
        out.status.success(),
        "scripts/container-image.sh failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "built {} (release build included) in {:.1} s",
        image.tag,
        started.elapsed().as_secs_f64()
    );
    image
}

/// podman's default profile plus the three io_uring system calls vublk cannot serve without,
/// as docs/deploy.md tells people to make it (with jq there).
fn write_seccomp_profile(path: &Path) {
    let text = std::fs::read_to_string(DEFAULT_SECCOMP).unwrap_or_else(|e| {
        panic!("{DEFAULT_SECCOMP} (podman's default seccomp profile, from containers-common): {e}")
    });
    let mut profile: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DEFAULT_SECCOMP}: {e}"));
    profile["syscalls"]
        .as_array_mut()
        .unwrap_or_else(|| panic!("{DEFAULT_SECCOMP} has no syscalls array"))
        .push(serde_json::json!({
            "names": ["io_uring_setup", "io_uring_enter", "io_uring_register"],
            "action": "SCMP_ACT_ALLOW"
        }));
    std::fs::write(path, profile.to_string()).expect("write the seccomp profile");
}

/// A temp dir with the two directories the container mounts: `sock/` (the socket directory,
/// /run/vublk inside) and `images/` (/images) holding `disk.img`, filled with [`image_pattern`].
/// The directories are open to everyone, so that a VMM running as nobody reaches the socket.
struct Dirs {
    dir: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Dirs {
        let dir = tempfile::Builder::new()
            .prefix("vublk-container-")
            .tempdir()
            .expect("temp dir");
        for sub in ["sock", "images"] {
            std::fs::create_dir(dir.path().join(sub)).expect("create dir");
        }
        for d in [
            dir.path().to_path_buf(),
            dir.path().join("sock"),
            dir.path().join("images"),
        ] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let dirs = Dirs { dir };
        // Owner root, group nogroup, 0660: the root VMM's worker has no capabilities left, so
        // it opens the image as its owner, and nobody's as a member of its group.
        create_image(&dirs.image(), IMAGE_SIZE, IMAGE_SEED);
        std::os::unix::fs::chown(dirs.image(), Some(0), Some(NOBODY)).expect("chown image");
        std::fs::set_permissions(dirs.image(), std::fs::Permissions::from_mode(0o660))
            .expect("chmod image");
        dirs
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The socket as the host sees it.
    fn socket(&self) -> PathBuf {
        self.path().join("sock/vublk.sock")
    }

    fn image(&self) -> PathBuf {
        self.path().join("images/disk.img")
    }

    /// `len` bytes of the image file at `offset`, read on the host.
    fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let file = std::fs::File::open(self.image()).expect("open image");
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset).expect("read image");
        buf
    }
}

/// A container running the image; removed (with its anonymous volumes) when dropped.
struct Container {
    name: String,
}

impl Container {
    /// `podman run --detach` of `image` with `dirs` mounted and `options`; `args` replace the
    /// image's command line when not empty. Waits for vublk's socket.
    fn run(image: &Image, dirs: &Dirs, options: &[&str], args: &[&str]) -> Container {
        let container = Container {
            name: unique("vublk"),
        };
        let seccomp = format!("seccomp={}", image.seccomp.display());
        let sock = format!("{}:/run/vublk", dirs.path().join("sock").display());
        let images = format!("{}:/images", dirs.path().join("images").display());
        let ulimits = ulimits();
        let lifetime = CONTAINER_LIFETIME.as_secs().to_string();
        let mut argv = vec![
            "run",
            "--detach",
            "--timeout",
            &lifetime,
            "--name",
            &container.name,
            "--network",
            "none",
            "--security-opt",
            &seccomp,
            "--env",
            "RUST_LOG=debug",
            "--env",
            "NO_COLOR=1",
            "--volume",
            &sock,
            "--volume",
            &images,
        ];
        argv.extend(ulimits.iter().map(String::as_str));
        argv.extend(options);
        argv.push(&image.tag);
        argv.extend(args);
        podman_ok(&argv);
        container.wait_for_socket(&dirs.socket());
        container
    }

    /// A Go template of `podman inspect`, e.g. `{{.State.Pid}}`.
    fn inspect(&self, format: &str) -> String {
        podman_ok(&["inspect", "--format", format, &self.name])
    }

    fn running(&self) -> bool {
        self.inspect("{{.State.Running}}") == "true"
    }

    /// vublk's pid on the host.
    fn pid(&self) -> u32 {
        let pid = self.inspect("{{.State.Pid}}");
        pid.parse()
            .unwrap_or_else(|_| panic!("container pid {pid:?}; log:\n{}", self.logs()))
    }

    /// Everything vublk wrote (podman keeps stdout and stderr).
    fn logs(&self) -> String {
        let out = podman(&["logs", &self.name], PODMAN_TIMEOUT);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn wait_for_socket(&self, socket: &Path) {
        let deadline = Instant::now() + START_TIMEOUT;
        while !std::fs::metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
            assert!(
                self.running(),
                "vublk exited before creating {}; log:\n{}",
                socket.display(),
                self.logs()
            );
            assert!(
                Instant::now() < deadline,
                "vublk did not create {} within {START_TIMEOUT:?}; log:\n{}",
                socket.display(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The worker serving the VMM running as `uid`: a child of vublk running
    /// `--worker-control-fd`, seen from the host (the container shares its pid namespace).
    fn worker_of_uid(&self, uid: u32) -> u32 {
        let supervisor = self.pid();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let found = children(supervisor).into_iter().find(|&pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                cmdline
                    .split(|b| *b == 0)
                    .any(|a| a == b"--worker-control-fd")
                    && status_field(pid, "Uid").first() == Some(&uid.to_string())
            });
            if let Some(pid) = found {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "no worker with uid {uid} under vublk (pid {supervisor}); log:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `podman stop` (SIGTERM, SIGKILL after 15 s); returns the exit code.
    fn stop(&self) -> i32 {
        podman_ok(&["stop", "--time", "15", &self.name]);
        let code = self.inspect("{{.State.ExitCode}}");
        code.parse()
            .unwrap_or_else(|_| panic!("exit code {code:?}; log:\n{}", self.logs()))
    }

    /// Stops vublk and checks a clean stop: exit 0, the socket gone, no panic in the log.
    #[track_caller]
    fn stop_cleanly(&self, socket: &Path) {
        let code = self.stop();
        let log = self.logs();
        assert_eq!(
            code, 0,
            "vublk exited with {code} after podman stop; log:\n{log}"
        );
        assert!(
            !socket.exists(),
            "vublk left {} behind; log:\n{log}",
            socket.display()
        );
        assert!(!log.contains("panicked"), "vublk panicked; log:\n{log}");
        assert!(
            log.contains("SIGTERM received"),
            "vublk did not log the SIGTERM; log:\n{log}"
        );
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- container {} log -----\n{}", self.name, self.logs());
        }
        let out = podman(&["rm", "--force", "--volumes", &self.name], PODMAN_TIMEOUT);
        if !out.status.success() {
            eprintln!(
                "could not remove container {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn children(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            ppid == Some(parent)
        })
        .collect()
}

/// The values of `field:` in /proc/PID/status (e.g. Uid: real, effective, saved, fs).
fn status_field(pid: u32, field: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

fn cgroups(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/cgroup: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The VMM: libblkio's virtio-blk-vhost-user driver
// ---------------------------------------------------------------------------------------------

/// A libblkio connection with one queue and one mapped buffer.
struct Vmm {
    queue: Blkioq,
    region: MemoryRegion,
    _blkio: Blkio,
}

impl Vmm {
    fn connect(socket: &Path) -> Result<Vmm, String> {
        let path = socket.to_str().expect("socket path is UTF-8");
        let fail = |what: &str, e: blkio::Error| format!("{what}: {e} ({:?})", e.errno());
        let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(|e| fail("blkio_new", e))?;
        blkio
            .set_str("path", path)
            .map_err(|e| fail("set path", e))?;
        blkio.connect().map_err(|e| fail("connect", e))?;
        blkio
            .set_i32("num-queues", 1)
            .map_err(|e| fail("set num-queues", e))?;
        let mut started = blkio.start().map_err(|e| fail("start", e))?;
        let queue = started.queues.pop().ok_or("libblkio started no queue")?;
        let region = blkio
            .alloc_mem_region(2 * IO_LEN)
            .map_err(|e| fail("alloc_mem_region", e))?;
        blkio
            .map_mem_region(&region)
            .map_err(|e| fail("map_mem_region", e))?;
        let capacity = blkio.get_u64("capacity").map_err(|e| fail("capacity", e))?;
        if capacity != IMAGE_SIZE {
            return Err(format!("capacity {capacity}, expected {IMAGE_SIZE}"));
        }
        Ok(Vmm {
            queue,
            region,
            _blkio: blkio,
        })
    }

    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: libblkio allocated this region and keeps it mapped until the Blkio is
        // dropped, which is after `self` is done with it; `&mut self` means no request of ours
        // is in flight (each waits for its completion).
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Waits for the one request in flight; its result (0 or -errno).
    fn complete(&mut self, what: &str) -> i32 {
        let mut completions = [MaybeUninit::<Completion>::uninit()];
        let mut timeout = IO_TIMEOUT;
        let got = self
            .queue
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .unwrap_or_else(|e| panic!("{what}: do_io: {e}"));
        assert_eq!(got, 1, "{what}: no completion within {IO_TIMEOUT:?}");
        // SAFETY: do_io initialised the first `got` completions.
        unsafe { completions[0].assume_init_read() }.ret
    }

    #[track_caller]
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.buf()[..data.len()].copy_from_slice(data);
        let addr = self.region.addr as *const u8;
        self.queue
            .write(offset, addr, data.len(), 0, ReqFlags::empty());
        let ret = self.complete("write");
        assert_eq!(
            ret,
            0,
            "write of {} bytes at {offset} failed: {ret}",
            data.len()
        );
    }

    #[track_caller]
    fn read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let addr = self.region.addr as *mut u8;
        self.queue.read(offset, addr, len, 0, ReqFlags::empty());
        let ret = self.complete("read");
        assert_eq!(ret, 0, "read of {len} bytes at {offset} failed: {ret}");
        self.buf()[..len].to_vec()
    }

    #[track_caller]
    fn flush(&mut self) {
        self.queue.flush(0, ReqFlags::empty());
        let ret = self.complete("flush");
        assert_eq!(ret, 0, "flush failed: {ret}");
    }

    /// Writes new data at `offset`, flushes, and reads it back, and reads a range nobody
    /// wrote; returns what was written.
    #[track_caller]
    fn write_and_check(&mut self, offset: u64) -> Vec<u8> {
        let data = written(offset);
        self.write(offset, &data);
        self.flush();
        assert_same(
            &self.read(offset, IO_LEN),
            &data,
            "read back after the write",
        );
        let untouched = 12 * MIB;
        assert_same(
            &self.read(untouched, IO_LEN),
            &image_pattern(untouched, IO_LEN),
            "a range nobody wrote",
        );
        data
    }
}

/// What a VMM writes at `offset`: unlike the image's own [`image_pattern`] there.
fn written(offset: u64) -> Vec<u8> {
    image_pattern(offset + (1 << 40), IO_LEN)
}

/// A VMM running as nobody: this test binary again, copied where nobody can execute it, with
/// only [`vmm_as_another_user`] selected and the socket in its environment. It connects, does
/// its I/O, says [`CLIENT_READY`] and stays connected until told to go (a line on stdin).
struct OtherUserVmm {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Read to the end before waiting: libtest still prints its summary.
    stdout: BufReader<ChildStdout>,
}

impl OtherUserVmm {
    fn start(dirs: &Dirs) -> OtherUserVmm {
        let exe = dirs.path().join("vmm-as-another-user");
        std::fs::copy(std::env::current_exe().expect("current_exe"), &exe)
            .expect("copy test binary");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut child = Command::new(&exe)
            .args(["vmm_as_another_user", "--exact", "--ignored", "--nocapture"])
            .env(CLIENT_SOCKET_ENV, dirs.socket())
            .uid(NOBODY)
            .gid(NOBODY)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the VMM as nobody");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut vmm = OtherUserVmm {
            child,
            stdin,
            stdout,
        };
        // A hung vublk is killed by podman (`--timeout`), the VMM then fails, so this returns.
        let mut seen = String::new();
        loop {
            let start = seen.len();
            match vmm.stdout.read_line(&mut seen) {
                Ok(0) | Err(_) => break,
                Ok(_) if seen[start..].contains(CLIENT_READY) => return vmm,
                Ok(_) => {}
            }
        }
        let status = vmm.child.wait().expect("wait for the VMM");
        panic!("the VMM running as nobody ended ({status}) before its I/O was done:\n{seen}");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Tells it to disconnect and checks it succeeded.
    fn finish(mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let mut rest = String::new();
        let _ = self.stdout.read_to_string(&mut rest);
        let status = self.child.wait().expect("wait for the VMM");
        assert!(
            status.success(),
            "the VMM running as nobody failed ({status}):\n{rest}"
        );
    }
}

impl Drop for OtherUserVmm {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Not a test of its own: the VMM [`OtherUserVmm`] runs as another user. Does nothing when
/// run any other way.
#[test]
#[ignore = "a helper: supervisor_serves_host_vmms runs it as nobody"]
fn vmm_as_another_user() {
    let Some(socket) = std::env::var_os(CLIENT_SOCKET_ENV) else {
        eprintln!("{CLIENT_SOCKET_ENV} is not set: nothing to do");
        return;
    };
    let mut vmm = Vmm::connect(Path::new(&socket))
        .unwrap_or_else(|e| panic!("connecting to {socket:?}: {e}"));
    vmm.write_and_check(NOBODY_OFFSET);
    println!("{CLIENT_READY}");
    std::io::stdout().flush().ok();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

#[test]
fn supervisor_serves_host_vmms() {
    let image = image();
    let dirs = Dirs::new();
    let container = Container::run(
        &image,
        &dirs,
        &HOST_NAMESPACES,
        &[
            "--socket-path",
            "/run/vublk/vublk.sock",
            "--blk-file",
            "/images/disk.img",
            // A numeric group: the image has no /etc/group.
            "--socket-mode",
            "0660",
            "--socket-group",
            "65534",
        ],
    );
    let socket = dirs.socket();
    let meta = std::fs::metadata(&socket).expect("socket metadata");
    assert_eq!(
        (meta.mode() & 0o7777, meta.gid()),
        (0o660, NOBODY),
        "socket mode and group as seen on the host"
    );

    // This process, as root.
    let mut vmm = Vmm::connect(&socket).unwrap_or_else(|e| {
        panic!(
            "connecting to {}: {e}; log:\n{}",
            socket.display(),
            container.logs()
        )
    });
    let ours = vmm.write_and_check(ROOT_OFFSET);
    assert_same(
        &dirs.image_bytes(ROOT_OFFSET, IO_LEN),
        &ours,
        "the image file on the host, where the root VMM wrote",
    );
    let worker = container.worker_of_uid(0);
    assert_eq!(
        cgroups(worker),
        cgroups(std::process::id()),
        "the root VMM's worker (pid {worker}) is not in the VMM's cgroups"
    );

    // Another VMM, as nobody: its own worker, with its uid, gid and cgroups.
    let other = OtherUserVmm::start(&dirs);
    let other_worker = container.worker_of_uid(NOBODY);
    assert_ne!(other_worker, worker, "one worker per VM");
    let nobody = NOBODY.to_string();
    assert_eq!(
        status_field(other_worker, "Uid"),
        vec![nobody.clone(); 4],
        "worker uids"
    );
    assert_eq!(
        status_field(other_worker, "Gid"),
        vec![nobody; 4],
        "worker gids"
    );
    assert!(
        status_field(other_worker, "Groups").is_empty(),
        "worker supplementary groups: {:?}",
        status_field(other_worker, "Groups")
    );
    assert_eq!(
        status_field(other_worker, "CapEff"),
        vec!["0000000000000000"],
        "worker capabilities"
    );
    assert_eq!(
        cgroups(other_worker),
        cgroups(other.pid()),
        "nobody's worker (pid {other_worker}) is not in its VMM's cgroups"
    );
    other.finish();
    assert_same(
        &dirs.image_bytes(NOBODY_OFFSET, IO_LEN),
        &written(NOBODY_OFFSET),
        "the image file on the host, where nobody's VMM wrote",
    );

    drop(vmm);
    container.stop_cleanly(&socket);
}

#[test]
fn supervisor_in_its_own_pid_namespace_refuses() {
    let image = image();
    let dirs = Dirs::new();
    // podman's default namespaces and the image's own command line.
    let container = Container::run(&image, &dirs, &[], &[]);
    let socket = dirs.socket();
    if let Ok(_vmm) = Vmm::connect(&socket) {
        panic!(
            "a VMM outside the container's pid namespace was served; log:\n{}",
            container.logs()
        );
    }
    let log = container.logs();
    assert!(
        log.contains("cannot identify the frontend: the frontend is outside vublk's pid namespace"),
        "vublk did not say why it closed the connection; log:\n{log}"
    );
    assert!(
        container.running(),
        "vublk stopped after refusing; log:\n{log}"
    );
    container.stop_cleanly(&socket);
}

#[test]
fn single_process_needs_no_host_namespaces() {
    let image = image();
    let dirs = Dirs::new();
    let container = Container::run(
        &image,
        &dirs,
        &[],
        &[
            "--socket-path",
            "/run/vublk/vublk.sock",
            "--blk-file",
            "/images/disk.img",
            "--single-process",
        ],
    );
    let socket = dirs.socket();
    let mut vmm = Vmm::connect(&socket).unwrap_or_else(|e| {
        panic!(
            "connecting to {}: {e}; log:\n{}",
            socket.display(),
            container.logs()
        )
    });
    let data = vmm.write_and_check(ROOT_OFFSET);
    assert_same(
        &dirs.image_bytes(ROOT_OFFSET, IO_LEN),
        &data,
        "the image file on the host",
    );
    assert!(
        children(container.pid()).is_empty(),
        "--single-process started workers"
    );
    drop(vmm);
    container.stop_cleanly(&socket);
}
