//! A worker's stderr, relayed into the supervisor's log. The worker's fd 2 is the write end of a
//! pipe (spawn.rs); the supervisor reads the other end without blocking and writes each line as
//! one line of its own: prefixed with the worker and its VMM, control characters escaped (a
//! worker cannot end the line early, start a forged one, or send terminal escapes), at most
//! [`LINE_CAP`] bytes of it, within the uid's log budget for worker lines. A worker's lines are
//! its tenant's words, like anything else it sends.

use std::fmt::Write as _;
use std::os::fd::AsFd;

/// The most of one line that is relayed; the rest is counted.
pub(super) const LINE_CAP: usize = 1024;
/// Bytes read from one pipe per wake-up, so a chatty worker cannot hold the loop.
const READ_PER_WAKEUP: usize = 64 * 1024;

/// The level a worker gave its line (its first word), for the relayed line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LineLevel {
    Error,
    Warn,
    Info,
    Debug,
}

/// One relayed line: escaped, capped.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Line {
    pub level: LineLevel,
    pub text: String,
}

/// What was read of one worker's stderr pipe.
#[derive(Default)]
pub(super) struct WorkerLog {
    /// The start of a line not ended yet, at most [`LINE_CAP`] bytes.
    partial: Vec<u8>,
    /// Bytes of the current line past the cap, left out.
    cut: usize,
}

impl WorkerLog {
    /// Reads what the pipe holds now (up to a bound); returns the complete lines and whether
    /// the worker closed its end (what is left of a last line comes with it).
    pub fn read(&mut self, pipe: impl AsFd) -> (Vec<Line>, bool) {
        let mut lines = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let mut read = 0;
        let mut closed = false;
        while read < READ_PER_WAKEUP {
            match rustix::io::read(&pipe, &mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    read += n;
                    self.take(&buf[..n], &mut lines);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => break,
            }
        }
        if closed && (!self.partial.is_empty() || self.cut > 0) {
            lines.push(self.finish_line());
        }
        (lines, closed)
    }

    fn take(&mut self, mut bytes: &[u8], lines: &mut Vec<Line>) {
        while !bytes.is_empty() {
            let end = bytes.iter().position(|&b| b == b'\n');
            let chunk = &bytes[..end.unwrap_or(bytes.len())];
            let room = LINE_CAP - self.partial.len();
            self.partial
                .extend_from_slice(&chunk[..chunk.len().min(room)]);
            self.cut += chunk.len().saturating_sub(room);
            match end {
                Some(end) => {
                    lines.push(self.finish_line());
                    bytes = &bytes[end + 1..];
                }
                None => break,
            }
        }
    }

    fn finish_line(&mut self) -> Line {
        let raw = std::mem::take(&mut self.partial);
        let cut = std::mem::take(&mut self.cut);
        let mut text = escape(&String::from_utf8_lossy(&raw));
        if cut > 0 {
            let _ = write!(text, " ... ({cut} more bytes left out)");
        }
        Line {
            level: level_of(&text),
            text,
        }
    }
}

/// Control characters (newlines, carriage returns, terminal escapes...) as Rust escapes.
fn escape(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn level_of(line: &str) -> LineLevel {
    match line.split_whitespace().next() {
        Some("ERROR") => LineLevel::Error,
        Some("INFO") => LineLevel::Info,
        Some("DEBUG" | "TRACE") => LineLevel::Debug,
        // WARN, and anything that is not a log line (a panic, say).
        _ => LineLevel::Warn,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        rustix::io::ioctl_fionbio(&r, true).unwrap();
        (r, w)
    }

    #[test]
    fn lines_are_whole_escaped_and_levelled() {
        let (r, w) = pipe();
        let mut log = WorkerLog::default();
        rustix::io::write(&w, b" INFO worker: serving a\n WARN x\x1b[31m\r").unwrap();
        let (lines, closed) = log.read(&r);
        assert!(!closed);
        assert_eq!(
            lines,
            [Line {
                level: LineLevel::Info,
                text: " INFO worker: serving a".into()
            }]
        );
        rustix::io::write(&w, b"FORGED\n\xff panic\n").unwrap();
        drop(w);
        let (lines, closed) = log.read(&r);
        assert!(closed);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].level, LineLevel::Warn);
        assert_eq!(lines[0].text, " WARN x\\u{1b}[31m\\rFORGED");
        assert_eq!(lines[1].text, "\u{fffd} panic");
    }

    #[test]
    fn long_lines_are_cut_and_memory_stays_bounded() {
        let (r, w) = pipe();
        let mut log = WorkerLog::default();
        let chunk = vec![b'x'; 16 * 1024];
        for _ in 0..3 {
            rustix::io::write(&w, &chunk).unwrap();
            let (lines, _) = log.read(&r);
            assert!(lines.is_empty());
            assert!(log.partial.len() <= LINE_CAP);
        }
        rustix::io::write(&w, b"\nERROR next\n").unwrap();
        let (lines, _) = log.read(&r);
        assert_eq!(lines.len(), 2);
        assert!(lines[0].text.starts_with(&"x".repeat(LINE_CAP)));
        assert!(lines[0].text.ends_with(&format!(
            " ... ({} more bytes left out)",
            3 * 16 * 1024 - LINE_CAP
        )));
        assert_eq!(lines[1].level, LineLevel::Error);
        // What is left when the worker closes its end without a newline comes out too.
        rustix::io::write(&w, b"last words").unwrap();
        drop(w);
        let (lines, closed) = log.read(&r);
        assert!(closed && lines.len() == 1 && lines[0].text == "last words");
    }
}
