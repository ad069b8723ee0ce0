//! `vmm-glue launch`: vublk and a VMM started, watched and stopped as a pair.
//!
//! ```text
//!  vmm-glue ── bind+listen S ──▶ [socket.rs]
//!     │ fork: vublk --fd 3 ...            (fd 3 = the listening socket)        [vublk.rs]
//!     │ wait: vublk's status socket appears, or vublk exits (start-up failed)
//!     │ fork: VMM with the vmm-glue options for S
//!     │ poll: pidfd(VMM), pidfd(vublk), signalfd(INT, TERM, HUP)             [supervise.rs]
//!     │ whichever first: stop the rest — SIGTERM, then SIGKILL after --stop-timeout [child.rs]
//!     ▼ remove S; exit with the VMM's status
//! ```
//!
//! The socket exists and listens before either process starts, so the VMM's connect can never
//! race vublk's start-up: a connection made early waits in the listen backlog. vublk must still
//! pass its start-up checks (image, options) before the VMM is started, so a broken vublk never
//! leaves a VMM behind. Both children get SIGTERM if vmm-glue itself dies (parent-death
//! signal), and both stay in vmm-glue's process group, so an interactive VMM keeps the terminal.
//!
//! Exit status ([`Outcome::exit_code`]): the VMM's own (its exit code, or 128 + the signal that
//! ended it, as a shell reports it), whether it ended by itself or because vmm-glue was told to
//! stop; 1 when vublk ended first (the VMM is stopped) or failed to start.

mod child;
mod signals;
mod socket;
mod supervise;
mod vublk;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

pub use child::{describe, shell_code};
pub use signals::name as signal_name;
pub use supervise::Ended;
pub use vublk::{check_extra as check_vublk_extra, Readiness, VublkOptions, SOCKET_FD};

use crate::cmdline::shell;
use child::Child;
use signals::StopSignals;
use socket::BoundSocket;

/// How long vublk may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a launch needs; the VMM's arguments are complete (vmm-glue's options for the
/// export plus the user's).
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// The export's socket, created by the launch.
    pub socket: PathBuf,
    pub vublk: VublkOptions,
    /// The VMM binary and its arguments.
    pub vmm: PathBuf,
    pub vmm_args: Vec<String>,
    /// How long each process gets between SIGTERM and SIGKILL.
    pub stop_timeout: Duration,
    /// How long vublk may take to become ready.
    pub ready_timeout: Duration,
}

/// A launch that got as far as running the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub ended: Ended,
    /// How the VMM ended.
    pub vmm: ExitStatus,
    /// How vublk ended.
    pub vublk: ExitStatus,
}

impl Outcome {
    /// vmm-glue's exit status (see the module docs).
    pub fn exit_code(&self) -> u8 {
        match self.ended {
            Ended::Vublk(_) => 1,
            Ended::Vmm(_) | Ended::Signal(_) => shell_code(self.vmm),
        }
    }
}

/// Why a launch failed before (or while) starting the VMM.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot listen on {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is in use: something listens on it")]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot start {what} ({binary})")]
    Spawn {
        what: &'static str,
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vublk {} before it was ready (its own message is above); the VMM was not started", describe(*.0))]
    VublkFailed(ExitStatus),
    #[error("vublk was not ready after {0:?}; stopped it, the VMM was not started")]
    NotReady(Duration),
    #[error("{} before the VMM started; stopped vublk", signal_name(*.0))]
    Interrupted(i32),
    #[error("cannot watch the processes")]
    Setup(#[source] std::io::Error),
}

/// Runs the launch to its end. `say` gets one line per step (what started, what ended, what
/// was stopped and how), for vmm-glue to print.
pub fn run(opts: &LaunchOptions, say: &mut dyn FnMut(String)) -> Result<Outcome, LaunchError> {
    // Signals first: from here on a Ctrl-C is an event, never a half-done launch.
    let signals = StopSignals::block().map_err(LaunchError::Setup)?;
    let socket = BoundSocket::bind(&opts.socket)?;
    let private = tempfile::Builder::new()
        .prefix("vmm-glue-launch-")
        .tempdir()
        .map_err(LaunchError::Setup)?;

    let (vublk_args, readiness) = opts.vublk.args(private.path());
    let mut cmd = Command::new(&opts.vublk.binary);
    cmd.args(&vublk_args).stdin(Stdio::null());
    let inherit = (socket.listener().as_raw_fd(), SOCKET_FD);
    let mut vublk =
        Child::spawn("vublk", cmd, Some(inherit)).map_err(|source| LaunchError::Spawn {
            what: "vublk",
            binary: opts.vublk.binary.clone(),
            source,
        })?;
    say(format!(
        "listening on {}; started vublk (pid {}): {}",
        socket.path().display(),
        vublk.pid(),
        command_line(&opts.vublk.binary, &vublk_args)
    ));

    if let Err(e) = vublk::wait_ready(&mut vublk, &readiness, opts.ready_timeout, &signals) {
        let _ = vublk.stop(opts.stop_timeout, Some(&signals));
        return Err(e);
    }

    let vmm_name = opts
        .vmm
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "the VMM".into());
    let mut cmd = Command::new(&opts.vmm);
    cmd.args(&opts.vmm_args);
    let mut vmm = match Child::spawn(&vmm_name, cmd, None) {
        Ok(c) => c,
        Err(source) => {
            let _ = vublk.stop(opts.stop_timeout, Some(&signals));
            return Err(LaunchError::Spawn {
                what: "the VMM",
                binary: opts.vmm.clone(),
                source,
            });
        }
    };
    say(format!(
        "vublk is ready; started {} (pid {}): {}",
        vmm.name(),
        vmm.pid(),
        command_line(&opts.vmm, &opts.vmm_args)
    ));

    let ended = supervise::watch(&mut vmm, &mut vublk, &signals)?;
    let grace = opts.stop_timeout;
    let stop = |c: &mut Child, say: &mut dyn FnMut(String)| -> Result<ExitStatus, LaunchError> {
        let s = c.stop(grace, Some(&signals)).map_err(LaunchError::Setup)?;
        if s.killed {
            say(format!(
                "{} did not stop within {grace:?} of SIGTERM: killed it",
                c.name()
            ));
        }
        Ok(s.status)
    };
    let (vmm_status, vublk_status) = match ended {
        Ended::Vmm(st) => {
            say(format!("{} {}; stopping vublk", vmm.name(), describe(st)));
            (st, stop(&mut vublk, say)?)
        }
        Ended::Vublk(st) => {
            say(format!(
                "vublk {} while {} was running; stopping {}",
                describe(st),
                vmm.name(),
                vmm.name()
            ));
            (stop(&mut vmm, say)?, st)
        }
        Ended::Signal(sig) => {
            say(format!(
                "{}: stopping {} and vublk",
                signal_name(sig),
                vmm.name()
            ));
            // The VMM first, so it stops issuing I/O before its backend goes.
            let v = stop(&mut vmm, say)?;
            (v, stop(&mut vublk, say)?)
        }
    };
    if !matches!(ended, Ended::Vublk(_)) && !vublk_status.success() {
        say(format!("vublk {}", describe(vublk_status)));
    }
    drop(socket);
    Ok(Outcome {
        ended,
        vmm: vmm_status,
        vublk: vublk_status,
    })
}

/// `binary arg...` quoted for a shell, for the log lines.
fn command_line(binary: &std::path::Path, args: &[String]) -> String {
    let mut words = vec![shell::quote(&binary.to_string_lossy())];
    words.extend(args.iter().map(|a| shell::quote(a)));
    words.join(" ")
}
