//! vublk serving a socket for a guest test, on the shared harness
//! ([`vublk_test_support::Daemon`]): its log next to the socket in the test's directory (kept when
//! the test fails), at `RUST_LOG=info` unless set, ready once it logs that it is listening. A
//! clean stop ([`Daemon::try_stop`]) also means no WARN or ERROR line: a well-behaved guest
//! causes none.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use vublk_test_support::daemon::{Options, SocketAtExit};
use vublk_test_support::Daemon;

use crate::paths;

/// How long vublk may take to start listening, and to exit after SIGTERM.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(15);

/// Starts `vublk --socket-path <dir>/<name>.sock ARGS...` (e.g. `["--blk-file", img,
/// "--num-queues", "2"]`), logging to `<dir>/<name>.log`, and waits until it is listening.
pub fn start_vublk(dir: &Path, name: &str, args: &[&str]) -> Result<Daemon> {
    start_vublk_on(dir, name, &dir.join(format!("{name}.sock")), args)
}

/// vublk serving the listening socket `listener` (`--fd 3`), as systemd's socket unit starts
/// it: whoever holds the socket keeps it listening across vublk's restarts. `socket` is its
/// path (left in place at exit). Logs to `<dir>/<name>.log`.
pub fn start_vublk_inherited(
    dir: &Path,
    name: &str,
    listener: &std::os::unix::net::UnixListener,
    socket: &Path,
    args: &[&str],
) -> Result<Daemon> {
    let mut cmd = Command::new(paths::vublk_bin()?);
    cmd.args(["--fd", "3"]).args(args);
    let fd = std::os::fd::OwnedFd::from(listener.try_clone()?);
    let mut vublk = Options::default()
        .name("vublk")
        .log_file(dir.join(format!("{name}.log")))
        .socket(socket.to_path_buf(), SocketAtExit::Kept)
        .log_level("info")
        .timeout(DAEMON_TIMEOUT)
        .quiet()
        .fd(fd, 3)
        .spawn(cmd)?;
    vublk.try_wait_for_log("listening")?;
    Ok(vublk)
}

/// [`start_vublk`] on the socket `socket` (e.g. one a killed daemon left behind, which the new
/// one replaces), logging to `<dir>/<name>.log`.
pub fn start_vublk_on(dir: &Path, name: &str, socket: &Path, args: &[&str]) -> Result<Daemon> {
    let socket = socket.to_path_buf();
    let mut cmd = Command::new(paths::vublk_bin()?);
    cmd.arg("--socket-path").arg(&socket).args(args);
    let mut vublk = Options::default()
        .name("vublk")
        .log_file(dir.join(format!("{name}.log")))
        .socket(socket, SocketAtExit::Removed)
        .log_level("info")
        .timeout(DAEMON_TIMEOUT)
        .quiet()
        .spawn(cmd)?;
    // The contract: the socket is listening before vublk logs "listening".
    vublk.try_wait_for_log("listening")?;
    Ok(vublk)
}
