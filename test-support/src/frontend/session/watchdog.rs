//! The reply watchdog: a step that takes longer than the session's reply timeout shuts the
//! connection down, so a backend that never answers fails the test instead of hanging it.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{Session, SessionError};

impl Session {
    /// Runs `f` under the reply watchdog: if it takes longer than the reply timeout, the socket
    /// is shut down and `f` fails instead of hanging.
    pub(super) fn guarded<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Self) -> Result<T, SessionError>,
    ) -> Result<T, SessionError> {
        if let Some(w) = &self.watchdog {
            w.arm();
        }
        let r = f(self);
        if let Some(w) = &self.watchdog {
            if w.disarm() {
                return Err(SessionError::NoReply {
                    step: what.to_string(),
                    waited: w.timeout,
                });
            }
        }
        r
    }
}

/// Shuts the socket down when a step takes longer than `timeout`, so a backend that never
/// replies fails the step (the `vhost` crate retries reads that time out, so SO_RCVTIMEO alone
/// would spin forever).
pub(super) struct Watchdog {
    timeout: Duration,
    tx: Option<mpsc::Sender<Option<Instant>>>,
    fired: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    pub(super) fn new(stream: UnixStream, timeout: Duration) -> Self {
        let (tx, rx) = mpsc::channel::<Option<Instant>>();
        let fired = Arc::new(AtomicBool::new(false));
        let flag = fired.clone();
        let thread = thread::spawn(move || {
            let mut deadline: Option<Instant> = None;
            loop {
                let msg = match deadline {
                    Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
                    None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                };
                match msg {
                    Ok(d) => deadline = d,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        flag.store(true, AtomicOrdering::SeqCst);
                        let _ = stream.shutdown(Shutdown::Both);
                        deadline = None;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        });
        Self {
            timeout,
            tx: Some(tx),
            fired,
            thread: Some(thread),
        }
    }

    pub(super) fn arm(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Some(Instant::now() + self.timeout));
        }
    }

    /// Returns whether the watchdog fired since it was armed.
    pub(super) fn disarm(&self) -> bool {
        if let Some(tx) = &self.tx {
            let _ = tx.send(None);
        }
        self.fired.load(AtomicOrdering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
