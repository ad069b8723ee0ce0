//! `vublk top`: a live view of a running daemon, per VM and export: IOPS, bandwidth, latency,
//! polling share and worker CPU, refreshed every second, sorted by IOPS.
//!
//! Each refresh asks the supervisor for its counters on the control socket (the `Counters`
//! request: what `GET /metrics` shows, in JSON; supervisor/control.rs) and [`rates`] turns two
//! answers into rates. The supervisor answers from what its workers last reported, so a
//! stopped worker cannot hold top: its row goes stale. On a terminal the table is redrawn in
//! place ([`terminal`]) until `q`, Ctrl-C, SIGINT, SIGTERM or SIGHUP; `--batch` (or no terminal) prints one table after
//! another, like `top -b`, for `--iterations` tables or until killed.

pub mod rates;
pub mod table;
pub mod terminal;

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use thiserror::Error;

use crate::metrics::Snapshot;
use crate::supervisor::control::{ask, AskError, ExportReply, Request, ANSWER_TIMEOUT};

/// What `vublk top` was asked for.
#[derive(Debug, Clone)]
pub struct TopOptions {
    pub control_socket: PathBuf,
    /// Print tables one after another instead of redrawing the screen.
    pub batch: bool,
    /// Stop after this many tables.
    pub iterations: Option<u64>,
    /// Seconds between tables.
    pub delay: Duration,
}

#[derive(Debug, Error)]
pub enum TopError {
    #[error(transparent)]
    Ask(#[from] AskError),
    #[error("the daemon on {path} refused: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("the daemon on {path} gave an answer that is not one")]
    Answer {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot use the terminal")]
    Terminal(#[source] io::Error),
    #[error("cannot write the table")]
    Output(#[source] io::Error),
}

/// Asks the daemon behind `control` for its counters, within [`ANSWER_TIMEOUT`]: top, whose
/// terminal takes Ctrl-C as a key, must not hang on a stopped or wedged daemon.
pub fn counters(control: &Path) -> Result<Snapshot, TopError> {
    let body = ask(control, &Request::Counters, ANSWER_TIMEOUT)?;
    serde_json::from_slice(&body).map_err(|source| {
        // A daemon that does not know the request says so as an export reply.
        match serde_json::from_slice::<ExportReply>(&body) {
            Ok(Err(reason)) => TopError::Refused {
                path: control.to_path_buf(),
                reason,
            },
            _ => TopError::Answer {
                path: control.to_path_buf(),
                source,
            },
        }
    })
}

/// Runs `vublk top` until `q`, Ctrl-C, a signal to quit on a terminal, or the last of
/// `--iterations`.
pub fn run(options: &TopOptions) -> Result<(), TopError> {
    let interactive = !options.batch && io::stdin().is_terminal() && io::stdout().is_terminal();
    let started = Instant::now();
    let mut tracker = rates::Tracker::default();
    let sample = |tracker: &mut rates::Tracker| -> Result<Vec<rates::Row>, TopError> {
        let snapshot = counters(&options.control_socket)?;
        Ok(tracker.update(&snapshot, started.elapsed().as_secs_f64()))
    };
    // The first answer is the base of the first table's rates.
    sample(&mut tracker)?;
    let mut terminal = if interactive {
        let mut terminal = terminal::Terminal::enter().map_err(TopError::Terminal)?;
        terminal
            .draw("vublk top: waiting for the first rates (q quits)\n")
            .map_err(TopError::Terminal)?;
        Some(terminal)
    } else {
        None
    };
    let delay_secs = options.delay.as_secs_f64();
    let mut shown = 0u64;
    loop {
        match &mut terminal {
            Some(terminal) => {
                if terminal
                    .wait_for_quit(options.delay)
                    .map_err(TopError::Terminal)?
                {
                    return Ok(());
                }
            }
            None => std::thread::sleep(options.delay),
        }
        let rows = sample(&mut tracker)?;
        let clock = table::clock_utc(SystemTime::now());
        match &mut terminal {
            Some(terminal) => {
                let max_rows = terminal.rows().unwrap_or(usize::MAX);
                let text = table::render(&rows, &clock, delay_secs, max_rows);
                terminal.draw(&text).map_err(TopError::Terminal)?;
            }
            None => {
                let text = table::render(&rows, &clock, delay_secs, usize::MAX);
                let mut out = io::stdout().lock();
                out.write_all(text.as_bytes())
                    .and_then(|()| out.write_all(b"\n"))
                    .and_then(|()| out.flush())
                    .map_err(TopError::Output)?;
            }
        }
        shown += 1;
        if options.iterations.is_some_and(|n| shown >= n) {
            return Ok(());
        }
    }
}
