//! The terminal while `vublk top` runs interactively: keys are read one at a time without
//! echo, the table is drawn on the alternate screen (cleared and redrawn each time, as top
//! and iotop do), and everything is put back when top ends, however it ends short of SIGKILL:
//! a quit key, an error, or SIGINT, SIGTERM or SIGHUP, which top blocks and watches while it
//! owns the terminal (their default action would end it with the terminal left without echo).
//!
//! Plain ANSI escapes and termios (through rustix, which vublk already uses) rather than a
//! terminal crate: top needs four escapes and one termios change, which crossterm would bring
//! with its own event machinery and a dozen dependencies.

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::termios::{tcgetattr, tcgetwinsize, tcsetattr, LocalModes, OptionalActions, Termios};

use crate::signals::Signals;

/// Switch to the alternate screen, hide the cursor.
const ENTER: &str = "\x1b[?1049h\x1b[?25l";
/// Show the cursor, back to the normal screen.
const LEAVE: &str = "\x1b[?25h\x1b[?1049l";
/// Cursor home, clear the screen.
const CLEAR: &str = "\x1b[H\x1b[2J";

/// Ctrl-C, read as a key: signals are off while top owns the terminal.
const CTRL_C: u8 = 0x03;

/// The terminal, set up for top until dropped.
pub struct Terminal {
    saved: Termios,
    /// SIGINT, SIGTERM and SIGHUP, blocked from before the terminal changes: each is a quit
    /// (the signals stay blocked after the terminal is put back, as top ends then).
    signals: Signals,
}

impl Terminal {
    /// Takes the terminal on stdin and stdout: no line buffering, no echo, and Ctrl-C as a key
    /// (so that quitting always goes through [`Drop`], which puts the terminal back). Blocks
    /// SIGINT, SIGTERM and SIGHUP in the calling thread, top's only one.
    pub fn enter() -> io::Result<Terminal> {
        let signals = Signals::block_and_watch_these(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP])?;
        let stdin = io::stdin();
        let saved = tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        raw.local_modes
            .remove(LocalModes::ICANON | LocalModes::ECHO | LocalModes::ISIG);
        tcsetattr(stdin.as_fd(), OptionalActions::Now, &raw)?;
        let terminal = Terminal { saved, signals };
        let mut out = io::stdout().lock();
        out.write_all(ENTER.as_bytes())?;
        out.flush()?;
        Ok(terminal)
    }

    /// Rows the screen has for the table (its height less the head), if it says.
    pub fn rows(&self) -> Option<usize> {
        let size = tcgetwinsize(io::stdout().as_fd()).ok()?;
        (size.ws_row > 0).then(|| usize::from(size.ws_row).saturating_sub(3))
    }

    /// Clears the screen and draws `text`.
    pub fn draw(&mut self, text: &str) -> io::Result<()> {
        let mut out = io::stdout().lock();
        out.write_all(CLEAR.as_bytes())?;
        out.write_all(text.as_bytes())?;
        out.flush()
    }

    /// Waits `timeout` for a key or a signal; true when one asked to quit (`q`, `Q`, Ctrl-C,
    /// SIGINT, SIGTERM, SIGHUP).
    pub fn wait_for_quit(&mut self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        let stdin = io::stdin();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let timespec = rustix::event::Timespec::try_from(left).map_err(io::Error::other)?;
            let mut fds = [
                PollFd::new(&stdin, PollFlags::IN),
                PollFd::new(&self.signals, PollFlags::IN),
            ];
            match poll(&mut fds, Some(&timespec)) {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
            if !fds[1].revents().is_empty() {
                return Ok(true);
            }
            if fds[0].revents().is_empty() {
                continue;
            }
            let mut keys = [0u8; 64];
            let n = rustix::io::read(&stdin, &mut keys)?;
            if n == 0 {
                // The terminal is gone.
                return Ok(true);
            }
            if keys[..n].iter().any(|&k| matches!(k, b'q' | b'Q' | CTRL_C)) {
                return Ok(true);
            }
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let mut out = io::stdout().lock();
        let _ = out.write_all(LEAVE.as_bytes());
        let _ = out.flush();
        let _ = tcsetattr(io::stdin().as_fd(), OptionalActions::Now, &self.saved);
    }
}
