//! Booting the guest under QEMU with vhost-user-blk disks and a job, and reading the result.
//!
//! One boot is one QEMU process: `-kernel`/`-initrd` (the cached base initramfs with the job
//! appended as a second cpio archive), guest RAM in a shared memfd (the backend maps it), one
//! `vhost-user-blk-pci` per disk, the serial console in a file, `-no-reboot` so the guest's
//! power-off (or a panic, with `panic=-1`) ends QEMU, and a hard timeout after which QEMU is
//! killed. The console is parsed into the job's steps (console.rs). The QEMU is the installed
//! one (10.0) or Debian 12's 7.2 unpacked beside it ([`Qemu`]), each with its own spellings.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vublk_test_support::process::die_with_parent;

use crate::console::{self, Parsed, Step};
use crate::image::{self, GuestImage};
use crate::{fio, paths};

/// The accelerator QEMU uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    fn args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg", "-cpu", "max"],
        }
    }
}

/// Which QEMU runs the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Qemu {
    /// `qemu-system-x86_64` on the PATH: 10.0 from bookworm-backports on Debian 12
    /// (scripts/prereqs.sh installs it).
    #[default]
    Installed,
    /// Debian 12's own QEMU 7.2, unpacked by scripts/prereqs.sh into [`paths::qemu72_dir`].
    Debian72,
}

impl Qemu {
    /// The `qemu-system-x86_64` to run.
    pub fn binary(self) -> PathBuf {
        match self {
            Qemu::Installed => PathBuf::from("qemu-system-x86_64"),
            Qemu::Debian72 => paths::qemu72_dir().join("usr/bin/qemu-system-x86_64"),
        }
    }

    /// The socket chardev's reconnect option for a delay of `ms`: `reconnect-ms` from QEMU 9.2;
    /// before, `reconnect` in whole seconds (rounded up, at least 1: 0 turns it off).
    fn reconnect_option(self, ms: u32) -> String {
        match self {
            Qemu::Installed => format!(",reconnect-ms={ms}"),
            Qemu::Debian72 => format!(",reconnect={}", ms.div_ceil(1000).max(1)),
        }
    }

    /// "QEMU 10.0.2 (Debian ...)", from the first line of `--version`, for the boot lines and
    /// reports: a log should show which QEMU a failure ran on.
    pub fn version(self) -> &'static str {
        static INSTALLED: OnceLock<String> = OnceLock::new();
        static DEBIAN72: OnceLock<String> = OnceLock::new();
        let cell = match self {
            Qemu::Installed => &INSTALLED,
            Qemu::Debian72 => &DEBIAN72,
        };
        cell.get_or_init(|| {
            let out = Command::new(self.binary()).arg("--version").output();
            match out {
                Ok(o) => String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("QEMU of unknown version")
                    .trim()
                    .replace("QEMU emulator version ", "QEMU "),
                Err(e) => format!("{} --version: {e}", self.binary().display()),
            }
        })
    }

    /// Where the binary comes from, for the error when it cannot run.
    fn install_hint(self) -> &'static str {
        match self {
            Qemu::Installed => "package qemu-system-x86, installed by scripts/prereqs.sh",
            Qemu::Debian72 => {
                "Debian 12's QEMU 7.2, unpacked by scripts/prereqs.sh (vublk_prereqs test) into \
                 $VUBLK_QEMU72_DIR or /opt/vublk-qemu-7.2"
            }
        }
    }
}

/// A vhost-user-blk disk of the guest.
#[derive(Clone, Debug)]
pub struct Disk {
    pub socket: PathBuf,
    pub num_queues: u16,
}

/// What the guest runs: files under `/job/` and the steps of `/job/run.sh`.
#[derive(Clone, Debug, Default)]
pub struct Job {
    files: Vec<(String, Vec<u8>)>,
    run: String,
}

impl Job {
    pub fn new() -> Job {
        Job::default()
    }

    /// Adds `/job/<name>`.
    pub fn file(&mut self, name: &str, contents: impl Into<Vec<u8>>) -> &mut Job {
        self.files.push((name.to_string(), contents.into()));
        self
    }

    /// A step running the busybox shell script `script` in `/job`. busybox runs its own applets
    /// before anything on the PATH: util-linux's blkdiscard is `/usr/bin/blkdiscard`.
    pub fn sh(&mut self, step: &str, script: &str) -> &mut Job {
        self.file(&format!("{step}.sh"), script);
        let _ = writeln!(self.run, "step {step} sh /job/{step}.sh");
        self
    }

    /// A step running fio on the job file `jobfile` with JSON output (see [`Boot::fio`]).
    pub fn fio(&mut self, step: &str, jobfile: &str) -> &mut Job {
        self.file(&format!("{step}.fio"), jobfile);
        let _ = writeln!(
            self.run,
            "step {step} fio --output-format=json /job/{step}.fio"
        );
        self
    }

    /// A step running fio with its normal, human-readable output.
    pub fn fio_text(&mut self, step: &str, jobfile: &str) -> &mut Job {
        self.file(&format!("{step}.fio"), jobfile);
        let _ = writeln!(self.run, "step {step} fio /job/{step}.fio");
        self
    }
}

/// A virtual machine to boot.
#[derive(Clone, Debug)]
pub struct Vm {
    pub cpus: u32,
    pub mem_mib: u32,
    pub disks: Vec<Disk>,
    /// Killed after this long.
    pub timeout: Duration,
    /// None: the best accelerator that works here (see [`accel`]).
    pub accel: Option<Accel>,
    /// Reconnect to a backend that went away after this many milliseconds (`reconnect-ms`
    /// of the socket chardev from QEMU 9.2, `reconnect` in seconds before); None: a lost
    /// backend is never reconnected.
    pub reconnect_ms: Option<u32>,
    /// The QEMU that runs it.
    pub qemu: Qemu,
}

impl Default for Vm {
    fn default() -> Vm {
        Vm {
            cpus: 1,
            mem_mib: 512,
            disks: Vec::new(),
            timeout: Duration::from_secs(180),
            accel: None,
            reconnect_ms: None,
            qemu: Qemu::Installed,
        }
    }
}

impl Vm {
    pub fn disk(mut self, socket: &Path, num_queues: u16) -> Vm {
        self.disks.push(Disk {
            socket: socket.to_path_buf(),
            num_queues,
        });
        self
    }

    /// QEMU reconnects to a backend that went away, after `ms` milliseconds.
    pub fn reconnect(mut self, ms: u32) -> Vm {
        self.reconnect_ms = Some(ms);
        self
    }

    /// Runs the guest on `qemu`.
    pub fn qemu(mut self, qemu: Qemu) -> Vm {
        self.qemu = qemu;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Vm {
        self.timeout = timeout;
        self
    }

    pub fn cpus(mut self, cpus: u32) -> Vm {
        self.cpus = cpus;
        self
    }

    /// Boots the guest in `dir` (which gets `<name>.console`, `<name>.initrd`) and runs `job`.
    /// Fails if QEMU fails or times out, or init did not get through the module loading, the
    /// disk wait and to its end; the job's own steps are checked by the caller.
    pub fn boot(&self, dir: &Path, name: &str, job: &Job) -> Result<Boot> {
        let prepared = self.prepare(dir, name, job)?;
        let boot = self.boot_with(&prepared, dir, name)?;
        eprintln!(
            "guest-tests: boot {name}: {:.1} s under {:?} ({}), init started at {} s guest \
             time",
            boot.elapsed.as_secs_f64(),
            prepared.accel,
            self.qemu.version(),
            boot.parsed
                .booted_at
                .map_or("?".into(), |t| format!("{t:.1}"))
        );
        boot.check_init()?;
        Ok(boot)
    }

    /// The guest's files for `job` (`<dir>/<name>.initrd`) and the accelerator: what every QEMU
    /// that runs this guest shares (a migration's source and destination need the same).
    pub fn prepare(&self, dir: &Path, name: &str, job: &Job) -> Result<Prepared> {
        let image = image::guest_image()?;
        let accel = match self.accel {
            Some(a) => a,
            None => accel(&image)?,
        };
        self.prepare_with(image, accel, dir, name, job)
    }

    fn prepare_with(
        &self,
        image: GuestImage,
        accel: Accel,
        dir: &Path,
        name: &str,
        job: &Job,
    ) -> Result<Prepared> {
        let initrd = dir.join(format!("{name}.initrd"));
        let mut files = job.files.clone();
        files.push(("run.sh".into(), job.run.clone().into_bytes()));
        files.push((
            "disks".into(),
            format!("{}\n", self.disks.len()).into_bytes(),
        ));
        image::initramfs_with_job(&image.initramfs, &initrd, &files)?;
        Ok(Prepared {
            image,
            accel,
            initrd,
        })
    }

    /// One QEMU from boot to power-off, its console in `<dir>/<name>.console`.
    fn boot_with(&self, prepared: &Prepared, dir: &Path, name: &str) -> Result<Boot> {
        let console_path = dir.join(format!("{name}.console"));
        let running = self.spawn(prepared, &console_path, &Launch::default())?;
        let finished = running.wait();
        let _ = std::fs::remove_file(&prepared.initrd);
        Ok(Boot::new(&[console_path], finished))
    }

    /// Starts QEMU on `prepared`, the serial console going to `console_path`; `launch` adds a
    /// QMP socket or an incoming migration. It runs until the guest powers off or the VM's
    /// timeout passes ([`Running::wait`]).
    pub fn spawn(
        &self,
        prepared: &Prepared,
        console_path: &Path,
        launch: &Launch,
    ) -> Result<Running> {
        let accel = prepared.accel;
        let mut cmd = Command::new(self.qemu.binary());
        cmd.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(accel.args())
        .args([
            "-m",
            &self.mem_mib.to_string(),
            "-smp",
            &self.cpus.to_string(),
        ])
        .arg("-object")
        .arg(format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            self.mem_mib
        ))
        .args(["-numa", "node,memdev=mem"])
        .arg("-kernel")
        .arg(&prepared.image.kernel)
        .arg("-initrd")
        .arg(&prepared.initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", console_path.display()));
        let reconnect = self
            .reconnect_ms
            .map_or(String::new(), |ms| self.qemu.reconnect_option(ms));
        for (i, d) in self.disks.iter().enumerate() {
            cmd.arg("-chardev")
                .arg(format!(
                    "socket,id=vu{i},path={}{reconnect}",
                    d.socket.display()
                ))
                .arg("-device")
                .arg(format!(
                    "vhost-user-blk-pci,chardev=vu{i},num-queues={}",
                    d.num_queues
                ));
        }
        if let Some(qmp) = &launch.qmp {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        }
        if let Some(incoming) = &launch.incoming {
            cmd.args(["-incoming", incoming]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);

        let start = Instant::now();
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "run {} ({})",
                self.qemu.binary().display(),
                self.qemu.install_hint()
            )
        })?;
        // Drain QEMU's output on threads so a chatty QEMU cannot block on a full pipe.
        let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_string(&mut s);
                }
                s
            })
        };
        let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
        let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
        Ok(Running {
            child,
            start,
            timeout: self.timeout,
            accel,
            qemu: self.qemu,
            out,
            err,
        })
    }
}

/// The guest's files for one run of a job ([`Vm::prepare`]).
pub struct Prepared {
    image: GuestImage,
    pub accel: Accel,
    initrd: PathBuf,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.initrd);
    }
}

/// What a QEMU runs beyond the guest ([`Vm::spawn`]).
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// A QMP socket to create (`-qmp unix:PATH,server=on,wait=off`).
    pub qmp: Option<PathBuf>,
    /// `-incoming URI`: wait for a migration instead of booting.
    pub incoming: Option<String>,
}

/// A running QEMU.
pub struct Running {
    child: std::process::Child,
    start: Instant,
    timeout: Duration,
    accel: Accel,
    qemu: Qemu,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
}

/// How a QEMU ended.
#[derive(Debug)]
pub struct Finished {
    pub qemu_output: String,
    pub accel: Accel,
    pub qemu: Qemu,
    pub elapsed: Duration,
    /// Why the run failed: QEMU exited non-zero or was killed at the timeout.
    pub failure: Option<String>,
}

impl Running {
    /// Whether QEMU has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Kills QEMU (a migration source, once the destination runs).
    pub fn kill(mut self) -> Finished {
        let _ = self.child.kill();
        let mut finished = self.wait_inner(true);
        finished.failure = None;
        finished
    }

    /// Waits until QEMU exits (the guest powered off) or the VM's timeout passes (then kills it).
    pub fn wait(self) -> Finished {
        self.wait_inner(false)
    }

    fn wait_inner(mut self, killed: bool) -> Finished {
        let mut failure = None;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) => {}
                Err(e) => {
                    failure = Some(format!("cannot wait for QEMU: {e}"));
                    break None;
                }
            }
            if self.start.elapsed() > self.timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                failure = Some(format!(
                    "the guest did not finish within {:?} ({:?}); QEMU killed",
                    self.timeout, self.accel
                ));
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let elapsed = self.start.elapsed();
        let qemu_output = format!(
            "{}{}",
            self.out.join().unwrap_or_default(),
            self.err.join().unwrap_or_default()
        );
        if let Some(s) = status.filter(|s| !s.success() && !killed) {
            failure = Some(format!("QEMU exited with {s}: {}", qemu_output.trim()));
        }
        Finished {
            qemu_output,
            accel: self.accel,
            qemu: self.qemu,
            elapsed,
            failure,
        }
    }
}

/// The result of one boot.
#[derive(Debug)]
pub struct Boot {
    pub console: String,
    pub console_path: PathBuf,
    pub parsed: Parsed,
    pub qemu_output: String,
    pub accel: Accel,
    pub qemu: Qemu,
    pub elapsed: Duration,
    failure: Option<String>,
}

impl Boot {
    /// The boot whose console is `consoles` joined (a migrated guest prints to the source's
    /// console, then to the destination's), as `finished` ended.
    pub fn new(consoles: &[PathBuf], finished: Finished) -> Boot {
        let console: String = consoles
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect();
        Boot {
            parsed: console::parse(&console),
            console,
            console_path: consoles.last().cloned().unwrap_or_default(),
            qemu_output: finished.qemu_output,
            accel: finished.accel,
            qemu: finished.qemu,
            elapsed: finished.elapsed,
            failure: finished.failure,
        }
    }

    /// Fails if QEMU failed or timed out, or init did not get through the module loading, the
    /// disk wait and to its end.
    pub fn check_init(&self) -> Result<()> {
        let mut problems = Vec::new();
        if let Some(p) = &self.failure {
            problems.push(p.clone());
        }
        for s in ["modules", "disks"] {
            match self.parsed.step(s) {
                Some(st) if st.rc == Some(0) => {}
                Some(st) => problems.push(format!("init's {s} step failed: {}", st.stderr)),
                None if problems.is_empty() => {
                    problems.push(format!("init never ran its {s} step"))
                }
                None => {}
            }
        }
        if problems.is_empty() && !self.parsed.done {
            problems.push("init did not reach its end".into());
        }
        if !problems.is_empty() {
            bail!("{}\n{}", problems.join("\n"), self.report());
        }
        Ok(())
    }

    /// The step `name`, which must have run to its end.
    pub fn step(&self, name: &str) -> Result<&Step> {
        match self.parsed.step(name) {
            Some(s) if s.rc.is_some() => Ok(s),
            Some(_) => bail!("the guest died during step {name}\n{}", self.report()),
            None => bail!("the guest never ran step {name}\n{}", self.report()),
        }
    }

    /// The stdout of step `name`, which must have exited 0.
    pub fn ok(&self, name: &str) -> Result<&str> {
        let s = self.step(name)?;
        if s.rc != Some(0) {
            bail!(
                "step {name} exited with {:?}\nstdout:\n{}\nstderr:\n{}\n{}",
                s.rc,
                s.stdout,
                s.stderr,
                self.report()
            );
        }
        Ok(&s.stdout)
    }

    /// The report of fio step `name`, which must have passed (fio.rs).
    pub fn fio(&self, name: &str) -> Result<fio::Report> {
        fio::passed(self.step(name)?)
            .with_context(|| format!("fio step {name} failed\n{}", self.report()))
    }

    /// Fails if the guest's kernel log (dmesg, and the console) shows I/O errors, oopses,
    /// warnings or hung tasks, except lines containing one of `allowed`.
    pub fn check_kernel(&self, allowed: &[&str]) -> Result<()> {
        let dmesg = self.ok("dmesg")?;
        let mut errors = console::kernel_errors(dmesg, allowed);
        // Lines printed on the console outside the steps (e.g. a panic after the last step).
        errors.extend(console::kernel_errors(&self.console, allowed));
        errors.dedup();
        if !errors.is_empty() {
            bail!(
                "the guest kernel complained:\n{}\n{}",
                errors.join("\n"),
                self.report()
            );
        }
        Ok(())
    }

    /// What to show when something went wrong: the end of the console and where it all is.
    pub fn report(&self) -> String {
        const TAIL: usize = 150;
        let lines: Vec<&str> = self.console.lines().collect();
        let from = lines.len().saturating_sub(TAIL);
        let mut s = format!(
            "---- guest console ({}, {:?}, {:.1} s, {}{}) ----\n",
            self.qemu.version(),
            self.accel,
            self.elapsed.as_secs_f64(),
            self.console_path.display(),
            if from > 0 {
                format!(", last {TAIL} of {} lines", lines.len())
            } else {
                String::new()
            }
        );
        for l in &lines[from..] {
            s.push_str(l.trim_end_matches('\r'));
            s.push('\n');
        }
        if !self.qemu_output.trim().is_empty() {
            let _ = writeln!(s, "---- QEMU output ----\n{}", self.qemu_output.trim());
        }
        s.push_str("---- end ----");
        s
    }
}

/// The accelerator to use: `VUBLK_GUEST_ACCEL` (`kvm` or `tcg`) if set; otherwise KVM if
/// `/dev/kvm` opens and a probe boot under it finishes, else TCG. The probe's result is cached
/// per host boot and guest image (`<cache>/accel/`), because a broken KVM (the probe hangs until
/// its timeout) does not heal until the host reboots.
pub fn accel(image: &GuestImage) -> Result<Accel> {
    static ACCEL: Mutex<Option<Accel>> = Mutex::new(None);
    let mut cached = ACCEL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(a) = *cached {
        return Ok(a);
    }
    let a = find_accel(image)?;
    *cached = Some(a);
    Ok(a)
}

fn find_accel(image: &GuestImage) -> Result<Accel> {
    match std::env::var("VUBLK_GUEST_ACCEL").as_deref() {
        Ok("kvm") => return Ok(Accel::Kvm),
        Ok("tcg") => return Ok(Accel::Tcg),
        Ok(other) => bail!("VUBLK_GUEST_ACCEL={other}: use kvm or tcg"),
        Err(_) => {}
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Ok(Accel::Tcg);
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let dir = paths::cache_dir().join("accel");
    let record = dir.join(format!("{}-{}", boot_id.trim(), image.key));
    match std::fs::read_to_string(&record).as_deref() {
        Ok("kvm") => return Ok(Accel::Kvm),
        Ok("tcg") => return Ok(Accel::Tcg),
        _ => {}
    }

    let probe_dir = tempfile::Builder::new()
        .prefix("vublk-kvm-probe-")
        .tempdir()?;
    let vm = Vm {
        timeout: Duration::from_secs(30),
        mem_mib: 256,
        ..Vm::default()
    };
    let start = Instant::now();
    let result = vm
        .prepare_with(
            image.clone(),
            Accel::Kvm,
            probe_dir.path(),
            "probe",
            &Job::new(),
        )
        .and_then(|prepared| vm.boot_with(&prepared, probe_dir.path(), "probe"));
    let works = matches!(&result, Ok(b) if b.failure.is_none() && b.parsed.done);
    let accel = if works { Accel::Kvm } else { Accel::Tcg };
    let why = match &result {
        Ok(b) => b.failure.clone().unwrap_or_default(),
        Err(e) => format!("{e:#}"),
    };
    eprintln!(
        "guest-tests: a probe boot under KVM {} ({:.1} s{}{}): using {accel:?}",
        if works { "finished" } else { "failed" },
        start.elapsed().as_secs_f64(),
        if why.is_empty() { "" } else { ": " },
        why.lines().next().unwrap_or("")
    );
    std::fs::create_dir_all(&dir)?;
    // Records of earlier host boots are stale.
    for old in std::fs::read_dir(&dir)?.flatten() {
        let _ = std::fs::remove_file(old.path());
    }
    std::fs::write(&record, if works { "kvm" } else { "tcg" })?;
    Ok(accel)
}
