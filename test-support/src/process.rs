//! Child processes of a test: tied to the thread that starts them, handed descriptors at fixed
//! numbers, run to completion under a time limit.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Has the kernel SIGKILL the child when the thread that spawned it exits, so a test process
/// that dies without unwinding (abort, SIGKILL) leaves no daemon, QEMU or frontend behind.
/// Children never outlive the test function (its thread) that starts them.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe, and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes `fd` (open in the parent) appear as `target` in the child, without FD_CLOEXEC.
pub fn pass_fd(cmd: &mut Command, fd: RawFd, target: RawFd) {
    // SAFETY: a pre_exec closure that only calls vmm-glue's async-signal-safe `place`; the
    // caller keeps `fd` open until the command is spawned.
    unsafe {
        cmd.pre_exec(move || vmm_glue::inherit::place(fd, target));
    }
}

/// Runs `cmd` to completion (stdin empty, stdout and stderr collected), tied to this thread;
/// kills it and fails if it takes longer than `timeout`.
pub fn run(mut cmd: Command, timeout: Duration) -> io::Result<Output> {
    die_with_parent(&mut cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return child.wait_with_output();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            return Err(io::Error::other(format!(
                "{:?} did not exit within {timeout:?}; stderr:\n{}",
                cmd.get_program(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
