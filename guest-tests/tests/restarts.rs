//! The VM's backend restarts under a running guest, and the guest never notices: QEMU
//! reconnects (`reconnect-ms`), vublk's new worker (or new daemon) resubmits what was in flight
//! from the inflight region QEMU hands it (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), and fio's
//! crc32c verify finishes clean.
//!
//! - `held_request_survives_a_worker_kill`: one write is held in flight by the test I/O gate
//!   (`--test-io-gate-offset`) while eight later writes complete around it, the worker is
//!   killed, and the held write must complete on the new worker; a fio crc32c verify job runs
//!   after the restart. It runs on the installed QEMU (10.0, `reconnect-ms`) and on Debian 12's
//!   QEMU 7.2 (`reconnect`, in seconds), unpacked beside it by scripts/prereqs.sh. Without
//!   inflight tracking QEMU rewinds the ring to its used index, the new worker replays a request that had
//!   completed and never sees the held one: the guest hangs.
//! - `kills_and_upgrade_under_fio` (QEMU 10.0 and 7.2): the guest chooses write-through; SIGKILL
//!   of the VM's worker several times mid-I/O, then of the whole daemon and a fresh start on the
//!   same socket, then `vublk upgrade` (after one to a binary that fails); the device runs
//!   write-through after each; a probe in the guest measures how long its I/O stalled across
//!   each restart (printed, not asserted).
//! - `upgrade_on_a_held_listening_socket`: what systemd's socket unit does on `systemctl
//!   restart`: the test holds the socket, vublk is stopped and started again on it twice.
//! - `systemctl_restart_under_fio`: the same by systemd itself, PID 1 in a podman container
//!   with the shipped units.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use guest_tests::fio::WriteVerify;
use guest_tests::qemu::Qemu;
use guest_tests::{
    guest_test, sparse_image, start_vublk, start_vublk_inherited, start_vublk_on, Boot, Job, Vm,
    MIB,
};
use vublk_test_support::daemon::workers_of;
use vublk_test_support::io_gate::IoGate;

/// Lines the guest writes to its console for the host to act on: `@@STAGE@@ <name>`.
const STAGE: &str = "@@STAGE@@";

/// Where the held write goes: past fio's region.
const HOLD_OFFSET: u64 = 48 * MIB;

/// fio's region, and its pace: slow enough under TCG that the worker dies mid-job.
fn verify_job(size_mib: u64, iops: u32) -> WriteVerify {
    WriteVerify {
        rate_iops: Some(iops),
        backlog: 256,
        ..WriteVerify::new("restart-verify", size_mib * MIB)
    }
}

/// A step that tells the host it starts, then runs fio (its JSON report is the step's stdout).
fn fio_step(stage: &str) -> String {
    format!("echo '{STAGE} {stage}' >/dev/console\nfio --output-format=json /job/verify.fio\n")
}

/// Waits until the guest's console (`dir/<boot>.console`) shows stage `name`; stops waiting if
/// the boot (`running`) has ended.
fn wait_stage(
    dir: &Path,
    boot: &str,
    name: &str,
    running: &std::thread::JoinHandle<Result<Boot>>,
    timeout: Duration,
) -> Result<()> {
    let path = dir.join(format!("{boot}.console"));
    let line = format!("{STAGE} {name}");
    let start = Instant::now();
    while start.elapsed() < timeout && !running.is_finished() {
        let console = std::fs::read_to_string(&path).unwrap_or_default();
        if console.lines().any(|l| l.trim_end_matches('\r') == line) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "the guest did not reach stage {name} (waited {:?})",
        start.elapsed()
    )
}

/// The one worker of `daemon`, waiting for it to appear (and not to be `old`).
fn worker(daemon: u32, old: Option<u32>, timeout: Duration) -> Result<u32> {
    let start = Instant::now();
    loop {
        let workers = workers_of(daemon);
        match workers.as_slice() {
            [pid] if Some(*pid) != old => return Ok(*pid),
            _ if start.elapsed() > timeout => {
                bail!("no new worker of {daemon} within {timeout:?}: {workers:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn sigkill(pid: u32) -> Result<()> {
    // SAFETY: kill(2) only sends a signal; `pid` is a worker found a moment ago whose parent
    // (the daemon) has not reaped it, so it has not been recycled.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } < 0 {
        return Err(std::io::Error::last_os_error()).context("kill the worker");
    }
    Ok(())
}

/// Boots `vm` on a thread and returns its handle.
fn boot_in_background(
    vm: &Vm,
    dir: &Path,
    name: &'static str,
    job: Job,
) -> std::thread::JoinHandle<Result<Boot>> {
    let (vm, dir) = (vm.clone(), dir.to_path_buf());
    std::thread::spawn(move || vm.boot(&dir, name, &job))
}

/// The guest image, built (or found in the cache) before any boot's clock starts.
fn prepare() -> Result<()> {
    guest_tests::image::guest_image().map(drop)
}

#[test]
fn held_request_survives_a_worker_kill() {
    guest_test("inflight-held", |dir| held_request(dir, Qemu::Installed));
}

#[test]
fn held_request_survives_a_worker_kill_on_qemu_7_2() {
    guest_test("inflight-held-qemu-7.2", |dir| {
        held_request(dir, Qemu::Debian72)
    });
}

/// The held-request test on `qemu`.
fn held_request(dir: &Path, qemu: Qemu) -> Result<()> {
    {
        prepare()?;
        let img = dir.join("disk.img");
        sparse_image(&img, 64 * MIB)?;
        // Held open by the test, so a byte written stays until a worker reads it.
        let gate = IoGate::in_dir(dir);
        let mut vublk = start_vublk(
            dir,
            "vublk",
            &[
                "--blk-file",
                img.to_str().unwrap(),
                "--test-io-gate",
                gate.arg(),
                "--test-io-gate-offset",
                &HOLD_OFFSET.to_string(),
            ],
        )?;
        let vm = Vm::default()
            .disk(vublk.socket(), 1)
            .reconnect(500)
            .qemu(qemu)
            .timeout(Duration::from_secs(240));

        let block = HOLD_OFFSET / 4096;
        // Eight writes after the held one, each completed before the next is issued: the ring's
        // used index passes the held request's avail slot.
        let later = (HOLD_OFFSET - 8 * MIB) / 4096;
        let mut job = Job::new();
        job.file("verify.fio", verify_job(16, 1500).file())
            // The held write: a block of random data, its exit code kept for the last step.
            .sh(
                "hold",
                &format!(
                    "dd if=/dev/urandom of=/tmp/block bs=4096 count=1 2>/dev/null
(dd if=/tmp/block of=/dev/vda bs=4096 seek={block} count=1 oflag=direct conv=notrunc; \
 echo $? >/tmp/held.rc) >/dev/null 2>&1 &
sleep 3
dd if=/dev/urandom of=/dev/vda bs=4096 seek={later} count=8 oflag=direct 2>/dev/null
echo '{STAGE} held' >/dev/console
"
                ),
            )
            .sh("fio", &fio_step("fio"))
            .sh(
                "held",
                &format!(
                    "while [ ! -e /tmp/held.rc ]; do sleep 0.2; done
echo rc $(cat /tmp/held.rc)
dd if=/dev/vda of=/tmp/back bs=4096 skip={block} count=1 iflag=direct 2>/dev/null
cmp /tmp/block /tmp/back && echo same
"
                ),
            );
        let boot = boot_in_background(&vm, dir, "held", job);

        let daemon = vublk.pid();
        wait_stage(dir, "held", "held", &boot, Duration::from_secs(200))?;
        let first = worker(daemon, None, Duration::from_secs(5))?;
        sigkill(first)?;
        let second = worker(daemon, Some(first), Duration::from_secs(30))?;
        eprintln!("inflight-held: worker {first} killed, {second} serves the VM");
        // The resubmitted write waits at the gate again: let it through, and the guest's
        // read of it afterwards (at the same offset, so gated too).
        gate.release(2);

        let boot = boot
            .join()
            .map_err(|_| anyhow::anyhow!("the boot thread panicked"))??;
        let report = boot.fio("fio")?;
        ensure!(
            report.total(|j| j.write.io_bytes) == 16 * MIB,
            "fio wrote {} bytes",
            report.total(|j| j.write.io_bytes)
        );
        let held = boot.ok("held")?;
        ensure!(
            held.contains("rc 0") && held.contains("same"),
            "the held write did not complete with its data: {held}\n{}",
            boot.report()
        );
        boot.check_kernel(&[])?;
        vublk.try_terminate()?;
        Ok(())
    }
}

/// Worker kills, then the daemon's and an upgrade, during the restart test's fio job.
const WORKER_KILLS: usize = 3;
/// That job's size and rate: long enough under TCG to outlast the restarts, about 26 s of
/// writes, then its verify reads. The region stays below the probe's block (50 MiB). 40 MiB at
/// 800 IOPS (13 s) was not long enough: on QEMU 7.2, whose reconnect delay is a whole second,
/// the five restarts took 14.4 s in a loaded CI run, the guest finished fio and powered off,
/// and no VMM came back for the upgrade.
const KILLS_MIB: u64 = 40;
const KILLS_IOPS: u32 = 400;

/// The guest's I/O probe: one 4 KiB O_DIRECT read past fio's region after another, each
/// followed by the guest's uptime, until /tmp/stop exists. The longest gaps between two
/// stamps are the stalls; a stamp after the job ends shows the probe never stuck for good.
const PROBE: &str = "(while [ ! -e /tmp/stop ]; do
    dd if=/dev/vda of=/dev/null bs=4096 count=1 skip=12800 iflag=direct 2>/dev/null || echo fail
    cut -d' ' -f1 /proc/uptime
done >/tmp/probe) >/dev/null 2>&1 &
";

/// The probe's gaps, longest first: "gap <seconds> at <uptime>" lines.
const GAPS: &str = "touch /tmp/stop
sleep 1
grep -c fail /tmp/probe || true
awk 'NR > 1 && $1 != \"fail\" { printf \"gap %.3f at %s\\n\", $1 - prev, $1 } $1 != \"fail\" { prev = $1 }' /tmp/probe \\
    | sort -k2 -rn | head -8
";

#[test]
fn kills_and_upgrade_under_fio() {
    guest_test("restarts", |dir| kills_and_upgrade(dir, Qemu::Installed));
}

#[test]
fn kills_and_upgrade_under_fio_on_qemu_7_2() {
    guest_test("restarts-qemu-7.2", |dir| {
        kills_and_upgrade(dir, Qemu::Debian72)
    });
}

/// The guest chooses write-through (the virtio-blk `writeback` config field, through the
/// driver's `cache_type` attribute) before its fio job starts.
const WRITE_THROUGH: &str = "echo 'write through' >/sys/block/vda/cache_type
cat /sys/block/vda/cache_type
";

/// The restart tests' guest job: `verify` (fio crc32c, its start announced on the console as
/// stage `fio`) beside the I/O probe, then the probe's longest gaps; with `write_through`, the
/// guest first turns its disk's write cache off.
fn probed_verify(verify: &WriteVerify, write_through: bool) -> Job {
    let mut job = Job::new();
    job.file("verify.fio", verify.file());
    if write_through {
        job.sh("write-through", WRITE_THROUGH);
    }
    job.sh("probe", PROBE)
        .sh("fio", &fio_step("fio"))
        .sh("gaps", GAPS);
    job
}

/// What a restart test checks of its guest's job (`probed_verify`) once it is over: fio wrote
/// and verified all of `verify`, and the kernel logged nothing wrong. Prints how long each of
/// `restarts` took until the replacement served the VM, and the probe's longest I/O gaps.
fn check_probed_verify(
    boot: &Boot,
    verify: &WriteVerify,
    test: &str,
    restarts: &[(&str, Duration)],
) -> Result<()> {
    verify.check_written(&boot.fio("fio")?)?;
    let gaps = boot.ok("gaps")?;
    for (what, took) in restarts {
        eprintln!(
            "{test}: {what}; the replacement served the VM {} ms later",
            took.as_millis()
        );
    }
    eprintln!("{test}: the guest probe's longest I/O gaps (s):\n{gaps}");
    boot.check_kernel(&[])
}

/// The write cache of the devices the daemon behind `control` serves, as their workers last
/// reported it (`vublk status --json`, every second).
fn device_write_cache(control: &Path) -> Result<Option<bool>> {
    let out = std::process::Command::new(guest_tests::paths::vublk_bin()?)
        .args(["status", "--json", "--control-socket"])
        .arg(control)
        .output()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    Ok(status["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|vm| vm["devices"].as_array().into_iter().flatten())
        .find_map(|d| d["write_cache"].as_bool()))
}

/// Checks that the device behind `control` runs write-through, as the guest chose, within a
/// few of its workers' reports; `when` names the restart it survived.
fn still_write_through(control: &Path, when: &str) -> Result<()> {
    let start = Instant::now();
    let mut seen = None;
    while start.elapsed() < Duration::from_secs(20) {
        seen = device_write_cache(control)?;
        if seen == Some(false) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("after {when} the device's write cache is {seen:?} (Some(true): it caches writes), though the guest chose write-through")
}

/// `vublk upgrade --control-socket control [--binary binary]`: the new daemon's pid, or the
/// command's error.
fn vublk_upgrade(control: &Path, binary: Option<&str>) -> Result<std::result::Result<u32, String>> {
    let mut cmd = std::process::Command::new(guest_tests::paths::vublk_bin()?);
    cmd.args(["upgrade", "--control-socket"]).arg(control);
    if let Some(binary) = binary {
        cmd.args(["--binary", binary]);
    }
    let out = cmd.output()?;
    if !out.status.success() {
        return Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?))
}

/// Stops a daemon `vublk upgrade` started (not our child): SIGTERM, and waits for it.
fn terminate_upgraded(pid: u32) -> Result<()> {
    // SAFETY: kill(2) only sends a signal; `pid` is the daemon the upgrade reported, which the
    // test has not signalled yet.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } < 0 {
        return Err(std::io::Error::last_os_error()).context("stop the new daemon");
    }
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        ensure!(
            start.elapsed() < Duration::from_secs(15),
            "the new daemon {pid} did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The guest chooses write-through, then runs a fio crc32c verify job while its worker is
/// SIGKILLed several times, then the whole daemon (a new one is started on the same socket),
/// then `vublk upgrade` hands it to a new daemon (after an upgrade to a binary that fails,
/// which must leave the daemon serving). After each kind of restart the device still runs
/// write-through; fio's verify is clean; a probe in the guest measures how long its I/O
/// stalled across each restart (printed, not asserted).
fn kills_and_upgrade(dir: &Path, qemu: Qemu) -> Result<()> {
    prepare()?;
    let img = dir.join("disk.img");
    sparse_image(&img, 64 * MIB)?;
    let control = dir.join("control.sock");
    let args = [
        "--blk-file",
        img.to_str().unwrap(),
        "--control-socket",
        control.to_str().unwrap(),
    ];
    let mut vublk = start_vublk(dir, "vublk", &args)?;
    let vm = Vm::default()
        .disk(vublk.socket(), 1)
        .reconnect(500)
        .qemu(qemu)
        .timeout(Duration::from_secs(360));
    let verify = verify_job(KILLS_MIB, KILLS_IOPS);
    let boot = boot_in_background(&vm, dir, "restarts", probed_verify(&verify, true));

    wait_stage(dir, "restarts", "fio", &boot, Duration::from_secs(200))?;
    still_write_through(&control, "the guest's choice")?;
    let mut restarts = Vec::new();
    let mut old = worker(vublk.pid(), None, Duration::from_secs(5))?;
    for _ in 0..WORKER_KILLS {
        std::thread::sleep(Duration::from_millis(1500));
        let killed = Instant::now();
        sigkill(old)?;
        old = worker(vublk.pid(), Some(old), Duration::from_secs(30))?;
        restarts.push(("worker kill", killed.elapsed()));
    }
    still_write_through(&control, "worker kills")?;
    // The whole daemon: its workers die with it (parent-death signal), and a new daemon
    // takes over the socket it left behind.
    std::thread::sleep(Duration::from_millis(1500));
    let killed = Instant::now();
    vublk.signal(libc::SIGKILL)?;
    let _ = vublk.wait_exit(Duration::from_secs(10));
    let mut vublk = start_vublk_on(dir, "vublk2", &dir.join("vublk.sock"), &args)?;
    worker(vublk.pid(), None, Duration::from_secs(30))?;
    restarts.push(("daemon kill", killed.elapsed()));
    still_write_through(&control, "a daemon kill and restart")?;

    // A new binary that fails: the daemon says so and goes on serving.
    match vublk_upgrade(&control, Some("/bin/false"))? {
        Ok(pid) => bail!("an upgrade to /bin/false succeeded (pid {pid})"),
        Err(e) => ensure!(e.contains("goes on serving"), "{e}"),
    }
    vublk.running()?;
    // The upgrade: the new daemon takes the sockets, the old one hands the VM over and exits.
    std::thread::sleep(Duration::from_millis(1500));
    let upgraded = Instant::now();
    let new = match vublk_upgrade(&control, None)? {
        Ok(pid) => pid,
        Err(e) => bail!("vublk upgrade failed: {e}"),
    };
    worker(new, None, Duration::from_secs(30))?;
    restarts.push(("upgrade", upgraded.elapsed()));
    let status = vublk
        .wait_exit(Duration::from_secs(15))
        .context("the old daemon did not exit after the upgrade")?;
    ensure!(status.success(), "the old daemon exited with {status}");
    ensure!(
        dir.join("vublk.sock").exists(),
        "the socket went away in the upgrade"
    );
    let checked = still_write_through(&control, "an upgrade");

    let boot = boot
        .join()
        .map_err(|_| anyhow::anyhow!("the boot thread panicked"));
    terminate_upgraded(new)?;
    checked?;
    let boot = boot??;
    let chosen = boot.ok("write-through")?;
    ensure!(
        chosen.contains("write through"),
        "the guest's cache_type: {chosen}"
    );
    check_probed_verify(&boot, &verify, &format!("restarts ({qemu:?})"), &restarts)
}

/// How many times the upgrade test restarts vublk under the guest.
const UPGRADES: usize = 2;

/// An upgrade that never drops the listening socket: the socket is held by someone other than
/// vublk (here the test, in production systemd's socket unit: `systemctl restart vublk`), vublk
/// serves it with `--fd 3`, and is stopped with SIGTERM (each worker leaves what it has in
/// flight to the VM's inflight region) and started again on the same socket while the guest's
/// fio job runs. QEMU's reconnects land in the socket's backlog until the new vublk accepts
/// them. The guest chose write-through first; each new vublk serves it so (its state directory
/// beside the socket).
#[test]
fn upgrade_on_a_held_listening_socket() {
    guest_test("upgrade", |dir| {
        prepare()?;
        let img = dir.join("disk.img");
        sparse_image(&img, 64 * MIB)?;
        let control = dir.join("control.sock");
        let args = [
            "--blk-file",
            img.to_str().unwrap(),
            "--control-socket",
            control.to_str().unwrap(),
        ];
        let socket = dir.join("held.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket)?;
        let mut vublk = start_vublk_inherited(dir, "vublk", &listener, &socket, &args)?;
        let vm = Vm::default()
            .disk(&socket, 1)
            .reconnect(500)
            .timeout(Duration::from_secs(300));
        let verify = verify_job(24, 800);
        let boot = boot_in_background(&vm, dir, "upgrade", probed_verify(&verify, true));

        wait_stage(dir, "upgrade", "fio", &boot, Duration::from_secs(200))?;
        worker(vublk.pid(), None, Duration::from_secs(5))?;
        still_write_through(&control, "the guest's choice")?;
        let mut upgrades = Vec::new();
        for i in 0..UPGRADES {
            std::thread::sleep(Duration::from_millis(2000));
            let stopped = Instant::now();
            let status = vublk.try_terminate()?;
            ensure!(status.success(), "vublk exited with {status} after SIGTERM");
            let name = format!("vublk{}", i + 2);
            vublk = start_vublk_inherited(dir, &name, &listener, &socket, &args)?;
            worker(vublk.pid(), None, Duration::from_secs(30))?;
            upgrades.push(("SIGTERM and a new vublk", stopped.elapsed()));
            still_write_through(&control, "a restart on the held socket")?;
        }

        let boot = boot
            .join()
            .map_err(|_| anyhow::anyhow!("the boot thread panicked"))??;
        check_probed_verify(&boot, &verify, "upgrade", &upgrades)?;
        vublk.try_terminate()?;
        Ok(())
    });
}

/// A podman container whose PID 1 is systemd (the host's, its /usr shared read-only, a copy of
/// the host's /etc), removed when dropped.
struct SystemdContainer {
    name: String,
}

impl SystemdContainer {
    fn podman(args: &[&str]) -> Result<String> {
        let out = std::process::Command::new("timeout")
            .args(["--kill-after=5", "120", "podman", "--runtime", "runc"])
            .args(args)
            .output()
            .context("run podman")?;
        ensure!(
            out.status.success(),
            "podman {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Boots systemd in a container on a root file system made in `dir/root`: the host's /usr
    /// (read-only) and its usr-merged links, a copy of its /etc with our units installed, and
    /// `host` mounted at /hostrun.
    fn boot(dir: &Path, host: &Path, units: &[(&str, String)]) -> Result<SystemdContainer> {
        let root = dir.join("root");
        for sub in [
            "usr", "proc", "sys", "dev", "run", "tmp", "var/tmp", "var/lib", "var/log",
        ] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        for link in ["bin", "lib", "lib64", "sbin"] {
            if let Ok(target) = std::fs::read_link(Path::new("/").join(link)) {
                std::os::unix::fs::symlink(target, root.join(link))?;
            }
        }
        let copied = std::process::Command::new("cp")
            .args(["-a", "/etc/."])
            .arg(root.join("etc"))
            .status()?;
        ensure!(copied.success(), "copy /etc");
        let system = root.join("etc/systemd/system");
        // A small boot: sockets and basic services, not the host's graphical target.
        let _ = std::fs::remove_file(system.join("default.target"));
        std::os::unix::fs::symlink(
            "/lib/systemd/system/basic.target",
            system.join("default.target"),
        )?;
        std::fs::create_dir_all(system.join("sockets.target.wants"))?;
        for (name, text) in units {
            std::fs::write(system.join(name), text)?;
        }
        std::os::unix::fs::symlink(
            "/etc/systemd/system/vublk.socket",
            system.join("sockets.target.wants/vublk.socket"),
        )?;
        let name = format!("vublk-systemd-{}", std::process::id());
        let hostrun = format!("{}:/hostrun", host.display());
        Self::podman(&[
            "run",
            "-d",
            "--name",
            &name,
            "--systemd=always",
            // podman's default seccomp profile refuses io_uring (vmm-glue/tests/container.rs
            // runs vublk under a profile that allows it; here the container only hosts systemd).
            "--security-opt",
            "seccomp=unconfined",
            "--ulimit",
            "nofile=16384:16384",
            "--ulimit",
            "nproc=4096:4096",
            "--timeout",
            "900",
            "-v",
            "/usr:/usr:ro",
            "-v",
            &hostrun,
            "--rootfs",
            root.to_str().context("root path")?,
            "/lib/systemd/systemd",
        ])?;
        Ok(SystemdContainer { name })
    }

    fn systemctl(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["exec", self.name.as_str(), "systemctl"];
        all.extend_from_slice(args);
        Self::podman(&all)
    }
}

impl Drop for SystemdContainer {
    fn drop(&mut self) {
        let _ = Self::podman(&["rm", "-f", "-t", "0", &self.name]);
    }
}

/// The systemctl test's job rate: 24 MiB at 300 IOPS is about 20 s of writes. Each `systemctl`
/// in the container can take a second or more on a loaded machine, and a CI run saw the two
/// restarts end 10 s after the job began: at 800 IOPS (7.7 s) the guest had finished and
/// powered off before the second restart, which then had no VM to serve.
const SYSTEMCTL_IOPS: u32 = 300;

/// `systemctl restart vublk.service` for real: systemd runs as PID 1 in a podman container
/// with docs/systemd's units (the socket moved to a directory the host's QEMU reaches, vublk
/// the binary under test with `--single-process`: the supervisor identifies VMMs by pid, and
/// the host's QEMU has none in the container's pid namespace), and restarts the service twice
/// during the guest's fio crc32c verify job. The socket unit holds the socket throughout.
#[test]
fn systemctl_restart_under_fio() {
    guest_test("systemctl", |dir| {
        prepare()?;
        let host = dir.join("hostrun");
        std::fs::create_dir(&host)?;
        sparse_image(&host.join("disk.img"), 64 * MIB)?;
        std::fs::copy(guest_tests::paths::vublk_bin()?, host.join("vublk"))?;
        let shipped = |name: &str| {
            std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../docs/systemd")
                    .join(name),
            )
        };
        let socket_unit = shipped("vublk.socket")?
            .replace("/run/vublk/vublk.sock", "/hostrun/vublk.sock")
            .replace("SocketGroup=kvm\n", "");
        let service_unit = shipped("vublk.service")?
            .replace(
                "/usr/local/bin/vublk --fd 3 --blk-file /var/lib/vublk/disk.img",
                "/hostrun/vublk --single-process --fd 3 --blk-file /hostrun/disk.img",
            )
            .replace(
                "[Service]\n",
                "[Service]\nStandardError=append:/hostrun/vublk.log\n",
            );
        ensure!(
            socket_unit.contains("/hostrun/vublk.sock") && service_unit.contains("/hostrun/vublk "),
            "the shipped units changed: {socket_unit}\n{service_unit}"
        );
        let container = SystemdContainer::boot(
            dir,
            &host,
            &[
                ("vublk.socket", socket_unit),
                ("vublk.service", service_unit),
            ],
        )?;
        let socket = host.join("vublk.sock");
        let start = Instant::now();
        while !socket.exists() {
            ensure!(
                start.elapsed() < Duration::from_secs(60),
                "systemd did not create the socket"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let vm = Vm::default()
            .disk(&socket, 1)
            .reconnect(500)
            .timeout(Duration::from_secs(300));
        let verify = verify_job(24, SYSTEMCTL_IOPS);
        let boot = boot_in_background(&vm, dir, "systemctl", probed_verify(&verify, false));
        wait_stage(dir, "systemctl", "fio", &boot, Duration::from_secs(200))?;
        let log = host.join("vublk.log");
        let served = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("frontend connected")
                .count()
        };
        let mut restarts = Vec::new();
        for _ in 0..UPGRADES {
            std::thread::sleep(Duration::from_millis(2000));
            let before = served();
            let pid = container.systemctl(&["show", "-P", "MainPID", "vublk.service"])?;
            let restarted = Instant::now();
            container.systemctl(&["restart", "vublk.service"])?;
            while served() == before {
                ensure!(
                    restarted.elapsed() < Duration::from_secs(30),
                    "the restarted vublk did not serve the VM"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let new = container.systemctl(&["show", "-P", "MainPID", "vublk.service"])?;
            ensure!(new != pid, "systemctl restart kept vublk pid {pid}");
            restarts.push(("systemctl restart", restarted.elapsed()));
        }
        let boot = boot
            .join()
            .map_err(|_| anyhow::anyhow!("the boot thread panicked"))??;
        check_probed_verify(&boot, &verify, "systemctl", &restarts)?;
        container.systemctl(&["stop", "vublk.service", "vublk.socket"])?;
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        ensure!(
            !log.contains("panicked") && !log.contains(" ERROR "),
            "vublk's log: {log}"
        );
        Ok(())
    });
}
