//! The systems under test: the backends, each a child process serving a vhost-user-blk socket per
//! VM, and the references without one.
//!
//! - `vublk`: the default mode, a supervisor that forks a worker per VM (per client process:
//!   the workers serve the queues; all are counted for CPU). Several VMs get an export each
//!   (`--export`) on the one daemon.
//! - `vublk-single`: `vublk --single-process`, serving from the daemon itself (one VM: it serves
//!   one export to one frontend at a time).
//! - `vublk-qos`: `vublk` with every export limited far above reach (`--iops-limit` and
//!   `--bps-limit` of [`UNREACHABLE_LIMIT`]): the throttle's arithmetic runs for every request
//!   and never delays one. Beside `vublk` (no limit) it shows what the limiter costs.
//! - `qsd`: qemu-storage-daemon, `driver=file` with `aio=io_uring` (plus `cache.direct=on` on
//!   the real disk), `driver=null-co,read-zeroes=on`, or `driver=rbd` with `cache.direct=on`
//!   (librbd's cache off, as vublk has it), exported as vhost-user-blk: a block node,
//!   an export and an iothread per VM. QSD serves all queues of an export from one thread (an
//!   iothread, or the main loop without one); without iothreads every export of the daemon
//!   would share the main loop's one thread, where vublk gives each VM a worker of its own. The
//!   iothread (QEMU's defaults: adaptive polling up to 32 µs) is how QSD is meant to serve a
//!   disk that matters, so one VM gets one too.
//! - `io_uring`: no backend at all. The load generator opens the image with libblkio's `io_uring`
//!   driver (`direct=true` on the real disk) and submits to the kernel itself: what the medium
//!   costs without vhost-user in between. It has no null medium (there is no file to open).
//! - `fio`: the disk's own limit, measured by the usual tool: fio's io_uring engine with
//!   O_DIRECT on the disk medium's images, a job per queue of each VM at the cell's block size
//!   and depth (`fio.rs`). Only the disk, and only interrupt-driven cells: fio has no
//!   counterpart of a busy-polling client there.
//! - `rbd-bench`: what the cluster gives a librbd client, measured by Ceph's own tool: `rbd
//!   bench` on the rbd medium's image with librbd's cache off, the cell's depth in flight
//!   (`rbd_bench.rs`). Only the rbd medium, one VM, interrupt-driven cells at full load.
//!
//! The backends see the same media and the same number of queues. They run on the tests' process
//! harness ([`vublk_test_support::Daemon`]); logs go to a file next to the sockets (vublk at
//! `RUST_LOG=warn` unless set, so logging costs nothing on the data path).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context, Error, Result};
use vublk_test_support::daemon::{Options, SocketAtExit};
use vublk_test_support::Daemon;

use crate::media::{Medium, Prepared};
use crate::{Cell, ClientMode, Rate};

/// The limits of `vublk-qos`: 10^12 requests (or bytes) per second, out of any load's reach.
pub const UNREACHABLE_LIMIT: &str = "1000000000000";

/// How long a backend may take to create its socket, and to exit after SIGTERM.
const TIMEOUT: Duration = Duration::from_secs(15);

/// The vublk binary of this workspace (`VUBLK_BIN` overrides it): next to this executable in
/// the target directory, built if missing or stale (`vublk_test_support::vublk_binary`).
fn vublk_bin() -> Result<PathBuf> {
    vublk_test_support::vublk_binary::vublk().context("the vublk binary")
}

/// The QSD executable; `QSD_BIN` overrides it.
pub fn qsd_bin() -> PathBuf {
    std::env::var_os("QSD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| "qemu-storage-daemon".into())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum System {
    Vublk,
    VublkSingle,
    /// vublk with limits no load reaches: the cost of the QoS limiter.
    VublkQos,
    Qsd,
    /// libblkio's `io_uring` driver on the image, in the load generator's process.
    IoUring,
    /// fio's io_uring engine with O_DIRECT on the disk: the disk's own limit.
    Fio,
    /// librbd's own `rbd bench` on the rbd medium's image: what the cluster gives a librbd
    /// client.
    RbdBench,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Vublk => "vublk",
            System::VublkSingle => "vublk-single",
            System::VublkQos => "vublk-qos",
            System::Qsd => "qsd",
            System::IoUring => "io_uring",
            System::Fio => "fio",
            System::RbdBench => "rbd-bench",
        }
    }

    pub fn is_vublk(self) -> bool {
        matches!(self, System::Vublk | System::VublkSingle | System::VublkQos)
    }

    /// Whether a backend process serves the I/O (`vublk`, `vublk-single`, `qsd`), or the client
    /// does it all (`io_uring`, `fio`, `rbd-bench`).
    pub fn has_backend(self) -> bool {
        !matches!(self, System::IoUring | System::Fio | System::RbdBench)
    }

    /// Whether the system can run `cell`; `None` if it can, or why not.
    pub fn unsupported(self, cell: &Cell) -> Option<&'static str> {
        match self {
            System::IoUring if matches!(cell.medium, Medium::Null | Medium::Rbd) => {
                Some("io_uring does not run on the null and rbd media: there is no file to open")
            }
            System::Fio if cell.medium != Medium::Disk => {
                Some("fio is the disk's own limit: it runs on the disk medium only")
            }
            System::Fio if cell.client == ClientMode::Poll => Some(
                "fio does not run with polled clients: its io_uring engine cannot busy-poll \
                 completions on these media",
            ),
            System::RbdBench if cell.medium != Medium::Rbd => {
                Some("rbd-bench is librbd's own benchmark: it runs on the rbd medium only")
            }
            System::RbdBench if cell.client == ClientMode::Poll => {
                Some("rbd-bench does not run with polled clients: librbd has no polled completions")
            }
            System::RbdBench if cell.vms > 1 || cell.rate != Rate::Max => Some(
                "rbd-bench runs with one VM at full load only: it cannot pace, and one process \
                 drives one image",
            ),
            System::VublkSingle if cell.vms > 1 => Some(
                "vublk-single runs with one VM only: --single-process serves one export to one \
                 frontend at a time",
            ),
            _ => None,
        }
    }

    /// The command line serving `media` (a VM each) on `sockets` with `queues` virtqueues each.
    fn command(self, media: &Prepared, queues: u16, sockets: &[PathBuf]) -> Result<Command> {
        let image = |vm: usize| {
            media
                .image_str(vm)
                .context("the medium has no image path (or it is not UTF-8)")
        };
        let ceph_conf = || -> Result<&str> {
            media
                .ceph_conf
                .as_deref()
                .and_then(|p| p.to_str())
                .context("the medium has no Ceph configuration (or it is not UTF-8)")
        };
        let socket_str = |vm: usize| -> Result<&str> {
            sockets[vm].to_str().context("socket path is not UTF-8")
        };
        Ok(match self {
            System::Vublk | System::VublkSingle | System::VublkQos => {
                let mut cmd = Command::new(vublk_bin()?);
                cmd.arg("--socket-path").arg(&sockets[0]);
                cmd.args(["--num-queues", &queues.to_string()]);
                match media.medium {
                    Medium::Null => {
                        cmd.args(["--null", &media.size.to_string()]);
                    }
                    Medium::Tmpfs | Medium::Disk => {
                        cmd.args(["--blk-file", image(0)?]);
                    }
                    Medium::Rbd => {
                        cmd.args(["--blk-file", image(0)?]);
                        cmd.arg("--ceph-conf").arg(ceph_conf()?);
                    }
                }
                if media.medium.direct() {
                    cmd.arg("--direct");
                }
                // The other VMs' exports: the same options.
                for vm in 1..sockets.len() {
                    let mut export = format!("socket-path={}", socket_str(vm)?);
                    match media.medium {
                        Medium::Null => export.push_str(&format!(",null={}", media.size)),
                        Medium::Tmpfs | Medium::Disk => {
                            export.push_str(&format!(",blk-file={}", image(vm)?))
                        }
                        Medium::Rbd => export.push_str(&format!(
                            ",blk-file={},ceph-conf={}",
                            image(vm)?,
                            ceph_conf()?
                        )),
                    }
                    export.push_str(&format!(",num-queues={queues}"));
                    if media.medium.direct() {
                        export.push_str(",direct");
                    }
                    if self == System::VublkQos {
                        export.push_str(&format!(
                            ",iops-limit={UNREACHABLE_LIMIT},bps-limit={UNREACHABLE_LIMIT}"
                        ));
                    }
                    cmd.args(["--export", &export]);
                }
                if self == System::VublkSingle {
                    cmd.arg("--single-process");
                }
                if self == System::VublkQos {
                    cmd.args(["--iops-limit", UNREACHABLE_LIMIT]);
                    cmd.args(["--bps-limit", UNREACHABLE_LIMIT]);
                }
                if std::env::var_os("RUST_LOG").is_none() {
                    cmd.env("RUST_LOG", "warn");
                }
                cmd.env("NO_COLOR", "1");
                cmd
            }
            System::Qsd => {
                let mut cmd = Command::new(qsd_bin());
                for vm in 0..sockets.len() {
                    let blockdev = match media.medium {
                        Medium::Null => format!(
                            "driver=null-co,node-name=f{vm},size={},read-zeroes=on",
                            media.size
                        ),
                        Medium::Tmpfs => format!(
                            "driver=file,node-name=f{vm},filename={},aio=io_uring",
                            image(vm)?
                        ),
                        Medium::Disk => format!(
                            "driver=file,node-name=f{vm},filename={},aio=io_uring,\
                             cache.direct=on",
                            image(vm)?
                        ),
                        Medium::Rbd => {
                            let image = image(vm)?;
                            let (pool, name) = image
                                .strip_prefix("rbd:")
                                .and_then(|l| l.split_once('/'))
                                .context("not an rbd:POOL/IMAGE image")?;
                            format!(
                                "driver=rbd,node-name=f{vm},pool={pool},image={name},conf={},\
                                 user=admin,cache.direct=on",
                                ceph_conf()?
                            )
                        }
                    };
                    let export = format!(
                        "type=vhost-user-blk,id=e{vm},node-name=f{vm},iothread=io{vm},\
                         addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                        socket_str(vm)?
                    );
                    cmd.args(["--object", &format!("iothread,id=io{vm}")]);
                    cmd.args(["--blockdev", &blockdev, "--export", &export]);
                }
                cmd
            }
            System::IoUring | System::Fio | System::RbdBench => {
                bail!("{self} has no backend process")
            }
        })
    }
}

impl FromStr for System {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "vublk" => System::Vublk,
            "vublk-single" => System::VublkSingle,
            "vublk-qos" => System::VublkQos,
            "qsd" => System::Qsd,
            "io_uring" | "io-uring" | "iouring" => System::IoUring,
            "fio" => System::Fio,
            "rbd-bench" | "rbd_bench" => System::RbdBench,
            _ => bail!(
                "unknown system {s:?} (vublk, vublk-single, vublk-qos, qsd, io_uring, fio, rbd-bench)"
            ),
        })
    }
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A backend serving an export per VM.
pub struct Backend {
    pub daemon: Daemon,
    /// VM `i`'s socket.
    pub sockets: Vec<PathBuf>,
}

/// Starts `system` serving `media` (an export per VM) with `queues` queues each on
/// `<dir>/<name>.sock` (one VM) or `<dir>/<name>-<i>.sock`, its log in `<dir>/<name>.log`, and
/// waits for the sockets to appear (clients still retry connecting until they accept). Dropping
/// the backend kills it; [`Daemon::try_stop`] stops it cleanly (exit 0).
pub fn start(
    system: System,
    media: &Prepared,
    queues: u16,
    dir: &Path,
    name: &str,
) -> Result<Backend> {
    let sockets: Vec<PathBuf> = if media.vms == 1 {
        vec![dir.join(format!("{name}.sock"))]
    } else {
        (0..media.vms)
            .map(|vm| dir.join(format!("{name}-{vm}.sock")))
            .collect()
    };
    for s in &sockets {
        let _ = std::fs::remove_file(s);
    }
    let cmd = system.command(media, queues, &sockets)?;
    let mut daemon = Options::default()
        .name(system.name())
        .log_file(dir.join(format!("{name}.log")))
        .socket(sockets[0].clone(), SocketAtExit::Unchecked)
        .timeout(TIMEOUT)
        .spawn(cmd)?;
    for s in &sockets {
        daemon.try_wait_for(s)?;
    }
    Ok(Backend { daemon, sockets })
}

/// One line saying which version of `system` runs (for the report).
pub fn version(system: System) -> String {
    let out = match system {
        System::Vublk | System::VublkSingle | System::VublkQos => match vublk_bin() {
            Ok(bin) => Command::new(bin).arg("--version").output(),
            Err(e) => return format!("unknown ({e:#})"),
        },
        System::Qsd => Command::new(qsd_bin()).arg("--version").output(),
        System::Fio => Command::new(crate::fio::fio_bin())
            .arg("--version")
            .output(),
        System::RbdBench => Command::new(crate::rbd_bench::rbd_bin())
            .arg("--version")
            .output(),
        System::IoUring => {
            let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
            return format!("libblkio io_uring driver, Linux {}", kernel.trim());
        }
    };
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}
