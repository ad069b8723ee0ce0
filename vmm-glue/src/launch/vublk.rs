//! vublk's side of a launch: its command line and knowing when it is ready.
//!
//! vublk gets the listening socket as `--fd 3` and is told the export's shape by vmm-glue
//! (`--num-queues`, `--queue-size`), so the checks vmm-glue runs on the VMM's options hold for
//! the vublk it starts. Extra vublk arguments may not take those over.
//!
//! Ready means vublk has checked its image and taken over the socket. vublk creates its status
//! socket (`--control-socket`) only after both, so vmm-glue asks for one in a private directory
//! and waits for it to appear; a vublk that fails at start-up (a missing image, a bad option)
//! exits instead, before any VMM runs. `--single-process` has no status socket: there vublk
//! counts as ready once it has run for [`SINGLE_PROCESS_GRACE`] without exiting.

use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cmdline::CmdlineError;

use super::child::{poll_readable, Child};
use super::signals::StopSignals;
use super::LaunchError;

/// The descriptor vublk finds the listening socket at.
pub const SOCKET_FD: i32 = 3;
/// How long a `--single-process` vublk must run before the VMM starts.
pub const SINGLE_PROCESS_GRACE: Duration = Duration::from_millis(500);

/// vublk options vmm-glue sets itself.
const RESERVED: [(&str, &str); 8] = [
    (
        "--socket-path",
        "vmm-glue creates the socket (--socket) and passes it as --fd",
    ),
    ("--fd", "vmm-glue passes the socket it created as --fd 3"),
    ("--export", "a launch serves one export"),
    ("--blk-file", "give the image with vmm-glue's --blk-file"),
    ("--null", "give --blk-file null:SIZE"),
    (
        "--num-queues",
        "vmm-glue sets it from --backend-queues (default: --queues)",
    ),
    ("--queue-size", "vmm-glue sets it from --backend-queue-size"),
    ("--print-capabilities", "it does not serve"),
];

/// What vublk is started with.
#[derive(Debug, Clone)]
pub struct VublkOptions {
    /// The vublk binary.
    pub binary: PathBuf,
    /// `--blk-file`: an image, a block device or `null:SIZE`.
    pub blk_file: String,
    /// `--num-queues`.
    pub num_queues: u16,
    /// `--queue-size`, `None` for vublk's default.
    pub queue_size: Option<u16>,
    /// More vublk options (`--direct`, `--read-only`, `--serial S`, ...).
    pub extra: Vec<String>,
}

/// How to tell that vublk is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// The status socket at this path exists.
    ControlSocket(PathBuf),
    /// vublk has not exited after this long.
    Grace(Duration),
}

/// Refuses extra vublk arguments that would take over what vmm-glue sets.
pub fn check_extra(extra: &[String]) -> Result<(), CmdlineError> {
    for arg in extra {
        let name = arg.split('=').next().unwrap_or(arg);
        if let Some((_, why)) = RESERVED.iter().find(|(opt, _)| *opt == name) {
            return Err(CmdlineError::Conflict(format!(
                "vublk {arg}: {why}; drop it"
            )));
        }
    }
    Ok(())
}

/// The value of option `name` in `args` (`--name V` or `--name=V`).
fn option_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == name {
            return it.next().map(String::as_str);
        }
        if let Some(v) = a.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            return Some(v);
        }
    }
    None
}

impl VublkOptions {
    /// vublk's arguments, and how to tell it is ready. `private_dir` holds the status socket
    /// unless the extra arguments name one (or ask for `--single-process`, which has none).
    pub fn args(&self, private_dir: &Path) -> (Vec<String>, Readiness) {
        let mut args = vec![
            "--fd".to_string(),
            SOCKET_FD.to_string(),
            "--blk-file".to_string(),
            self.blk_file.clone(),
            "--num-queues".to_string(),
            self.num_queues.to_string(),
        ];
        if let Some(qs) = self.queue_size {
            args.extend(["--queue-size".to_string(), qs.to_string()]);
        }
        let readiness = if self.extra.iter().any(|a| a == "--single-process") {
            Readiness::Grace(SINGLE_PROCESS_GRACE)
        } else if let Some(path) = option_value(&self.extra, "--control-socket") {
            Readiness::ControlSocket(PathBuf::from(path))
        } else {
            let path = private_dir.join("control.sock");
            args.extend(["--control-socket".to_string(), path.display().to_string()]);
            Readiness::ControlSocket(path)
        };
        args.extend(self.extra.iter().cloned());
        (args, readiness)
    }
}

/// Waits until vublk is ready, has exited, a stop signal came, or `timeout` passed.
pub fn wait_ready(
    vublk: &mut Child,
    readiness: &Readiness,
    timeout: Duration,
    signals: &StopSignals,
) -> Result<(), LaunchError> {
    let start = Instant::now();
    let setup = LaunchError::Setup;
    loop {
        if let Some(status) = vublk.try_wait().map_err(setup)? {
            return Err(LaunchError::VublkFailed(status));
        }
        if let Some(sig) = signals.take().map_err(setup)? {
            return Err(LaunchError::Interrupted(sig));
        }
        let waited = start.elapsed();
        match readiness {
            Readiness::ControlSocket(path) => {
                if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    return Ok(());
                }
                if waited >= timeout {
                    return Err(LaunchError::NotReady(timeout));
                }
            }
            Readiness::Grace(grace) => {
                if waited >= *grace {
                    return Ok(());
                }
            }
        }
        // The socket's appearance has no descriptor to wait on: look again soon.
        poll_readable(
            &[vublk.as_fd(), signals.as_fd()],
            Some(Duration::from_millis(10)),
        )
        .map_err(setup)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(extra: &[&str]) -> VublkOptions {
        VublkOptions {
            binary: "vublk".into(),
            blk_file: "/srv/disk.img".into(),
            num_queues: 2,
            queue_size: Some(256),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn command_line_and_readiness() {
        let (args, ready) = opts(&["--direct"]).args(Path::new("/tmp/x"));
        assert_eq!(
            args,
            [
                "--fd",
                "3",
                "--blk-file",
                "/srv/disk.img",
                "--num-queues",
                "2",
                "--queue-size",
                "256",
                "--control-socket",
                "/tmp/x/control.sock",
                "--direct"
            ]
        );
        assert_eq!(
            ready,
            Readiness::ControlSocket("/tmp/x/control.sock".into())
        );

        let (args, ready) = opts(&["--control-socket=/run/c.sock"]).args(Path::new("/tmp/x"));
        assert_eq!(args.iter().filter(|a| a.contains("control")).count(), 1);
        assert_eq!(ready, Readiness::ControlSocket("/run/c.sock".into()));

        let (args, ready) = opts(&["--single-process"]).args(Path::new("/tmp/x"));
        assert!(!args.iter().any(|a| a.contains("control")));
        assert_eq!(ready, Readiness::Grace(SINGLE_PROCESS_GRACE));
    }

    #[test]
    fn extra_arguments_cannot_take_over_the_export() {
        check_extra(&["--direct".into(), "--serial".into(), "disk-1".into()]).unwrap();
        for bad in [
            "--socket-path",
            "--fd=4",
            "--num-queues",
            "--blk-file",
            "--export",
        ] {
            assert!(
                matches!(check_extra(&[bad.into()]), Err(CmdlineError::Conflict(_))),
                "{bad} was accepted"
            );
        }
        assert_eq!(
            check_extra(&["--num-queues=4".into()])
                .unwrap_err()
                .to_string(),
            "vublk --num-queues=4: vmm-glue sets it from --backend-queues (default: --queues); \
             drop it"
        );
    }
}
