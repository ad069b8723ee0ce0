//! The systems under test: the backends, each a child process serving one vhost-user-blk socket,
//! and the reference without one.
//!
//! - `vublk`: the default mode, a supervisor that forks a per-VM worker for the connection (the
//!   worker serves the queues; both are counted for CPU).
//! - `vublk-single`: `vublk --single-process`, serving from the daemon itself.
//! - `qsd`: qemu-storage-daemon, `driver=file` with `aio=io_uring` (plus `cache.direct=on` on
//!   the real disk) or `driver=null-co,read-zeroes=on`, exported as vhost-user-blk.
//! - `io_uring`: no backend at all. The load generator opens the image with libblkio's `io_uring`
//!   driver (`direct=true` on the real disk) and submits to the kernel itself: what the medium
//!   costs without vhost-user in between. It has no null medium (there is no file to open).
//!
//! The backends see the same medium and the same number of queues. They run on the tests' process
//! harness ([`vublk_test_support::Daemon`]); logs go to a file next to the socket (vublk at
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
    Qsd,
    /// libblkio's `io_uring` driver on the image, in the load generator's process.
    IoUring,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Vublk => "vublk",
            System::VublkSingle => "vublk-single",
            System::Qsd => "qsd",
            System::IoUring => "io_uring",
        }
    }

    pub fn is_vublk(self) -> bool {
        matches!(self, System::Vublk | System::VublkSingle)
    }

    /// Whether a backend process serves the I/O (every system but `io_uring`).
    pub fn has_backend(self) -> bool {
        self != System::IoUring
    }

    /// Whether the system can serve `medium`; `None` if it can, or why not.
    pub fn unsupported(self, medium: Medium) -> Option<&'static str> {
        (self == System::IoUring && medium == Medium::Null)
            .then_some("io_uring does not run on the null medium: there is no file to open")
    }

    /// The command line serving `media` on `socket` with `queues` virtqueues.
    fn command(self, media: &Prepared, queues: u16, socket: &Path) -> Result<Command> {
        let image = || {
            media
                .image_str()
                .context("the medium has no image path (or it is not UTF-8)")
        };
        let socket_str = socket.to_str().context("socket path is not UTF-8")?;
        Ok(match self {
            System::Vublk | System::VublkSingle => {
                let mut cmd = Command::new(vublk_bin()?);
                cmd.arg("--socket-path").arg(socket);
                cmd.args(["--num-queues", &queues.to_string()]);
                match media.medium {
                    Medium::Null => {
                        cmd.args(["--null", &media.size.to_string()]);
                    }
                    Medium::Tmpfs | Medium::Disk => {
                        cmd.args(["--blk-file", image()?]);
                    }
                }
                if media.medium.direct() {
                    cmd.arg("--direct");
                }
                if self == System::VublkSingle {
                    cmd.arg("--single-process");
                }
                if std::env::var_os("RUST_LOG").is_none() {
                    cmd.env("RUST_LOG", "warn");
                }
                cmd.env("NO_COLOR", "1");
                cmd
            }
            System::Qsd => {
                let blockdev = match media.medium {
                    Medium::Null => format!(
                        "driver=null-co,node-name=f,size={},read-zeroes=on",
                        media.size
                    ),
                    Medium::Tmpfs => {
                        format!("driver=file,node-name=f,filename={},aio=io_uring", image()?)
                    }
                    Medium::Disk => format!(
                        "driver=file,node-name=f,filename={},aio=io_uring,cache.direct=on",
                        image()?
                    ),
                };
                let export = format!(
                    "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={socket_str},\
                     writable=on,num-queues={queues}"
                );
                let mut cmd = Command::new(qsd_bin());
                cmd.args(["--blockdev", &blockdev, "--export", &export]);
                cmd
            }
            System::IoUring => bail!("io_uring has no backend process"),
        })
    }
}

impl FromStr for System {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "vublk" => System::Vublk,
            "vublk-single" => System::VublkSingle,
            "qsd" => System::Qsd,
            "io_uring" | "io-uring" | "iouring" => System::IoUring,
            _ => bail!("unknown system {s:?} (vublk, vublk-single, qsd, io_uring)"),
        })
    }
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Starts `system` serving `media` with `queues` queues on `<dir>/<name>.sock`, its log in
/// `<dir>/<name>.log`, and waits for the socket to appear (clients still retry connecting until
/// it accepts). Dropping the backend kills it; [`Daemon::try_stop`] stops it cleanly (exit 0).
pub fn start(
    system: System,
    media: &Prepared,
    queues: u16,
    dir: &Path,
    name: &str,
) -> Result<Daemon> {
    let socket = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&socket);
    let cmd = system.command(media, queues, &socket)?;
    let mut backend = Options::default()
        .name(system.name())
        .log_file(dir.join(format!("{name}.log")))
        .socket(socket.clone(), SocketAtExit::Unchecked)
        .timeout(TIMEOUT)
        .spawn(cmd)?;
    backend.try_wait_for(&socket)?;
    Ok(backend)
}

/// One line saying which version of `system` runs (for the report).
pub fn version(system: System) -> String {
    let out = match system {
        System::Vublk | System::VublkSingle => match vublk_bin() {
            Ok(bin) => Command::new(bin).arg("--version").output(),
            Err(e) => return format!("unknown ({e:#})"),
        },
        System::Qsd => Command::new(qsd_bin()).arg("--version").output(),
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
