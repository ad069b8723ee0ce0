//! A message sent from another thread: the test watches what the backend does before it
//! replies (and when it does), and can give up on the reply.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::Frontend;

use super::{Session, SessionError};

impl Session {
    /// Sends one message from another thread and returns at once, so the test can watch what
    /// the backend does before it replies (and when it does). `send` gets a clone of the
    /// frontend; with `need_reply`, the message carries NEED_REPLY (if REPLY_ACK was acked)
    /// and `send` returns only once the backend acknowledged it.
    ///
    /// Send nothing else on this session until the reply has arrived: the frontend is locked
    /// while the message waits for its reply, so anything else would block behind it.
    pub fn send_in_background<T: Send + 'static>(
        &mut self,
        what: &str,
        need_reply: bool,
        send: impl FnOnce(&mut Frontend) -> Result<T, vhost::Error> + Send + 'static,
    ) -> Result<PendingReply<T>, SessionError> {
        let mut frontend = self.frontend.clone();
        let flag = need_reply && self.reply_ack();
        let always = self.need_reply_always;
        let socket = self.socket.try_clone().map_err(SessionError::Socket)?;
        let sent = Instant::now();
        let thread = thread::Builder::new()
            .name(format!("frontend {what}"))
            .spawn(move || {
                if flag {
                    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
                }
                let r = send(&mut frontend);
                let replied = Instant::now();
                if flag && !always {
                    frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
                }
                (r, replied)
            })
            .map_err(SessionError::Socket)?;
        Ok(PendingReply {
            what: what.to_string(),
            sent,
            thread: Some(thread),
            socket,
        })
    }
}

/// A message sent by [`Session::send_in_background`] whose reply may not have arrived yet.
pub struct PendingReply<T> {
    what: String,
    sent: Instant,
    thread: Option<JoinHandle<(Result<T, vhost::Error>, Instant)>>,
    socket: UnixStream,
}

/// A reply and how long after sending it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply<T> {
    pub value: T,
    pub after: Duration,
}

impl<T> PendingReply<T> {
    /// When the message was handed to the sending thread.
    pub fn sent_at(&self) -> Instant {
        self.sent
    }

    /// Whether the reply (or a failure) has arrived.
    pub fn has_reply(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits up to `timeout` (from now) for the reply. On timeout the connection is shut down,
    /// so the backend sees the frontend go away, and this fails.
    pub fn wait(mut self, timeout: Duration) -> Result<Reply<T>, SessionError> {
        let start = Instant::now();
        while !self.has_reply() && start.elapsed() < timeout {
            thread::sleep(Duration::from_millis(2));
        }
        let timed_out = !self.has_reply();
        if timed_out {
            let _ = self.socket.shutdown(Shutdown::Both);
        }
        let Some(thread) = self.thread.take() else {
            return Err(SessionError::NoReply {
                step: self.what.clone(),
                waited: start.elapsed(),
            });
        };
        let joined = thread.join();
        match joined {
            Ok(_) if timed_out => Err(SessionError::NoReply {
                step: self.what.clone(),
                waited: timeout,
            }),
            Ok((Ok(value), replied)) => Ok(Reply {
                value,
                after: replied.saturating_duration_since(self.sent),
            }),
            Ok((Err(source), _)) => Err(SessionError::Vhost {
                step: self.what.clone(),
                source,
            }),
            Err(_) => Err(SessionError::NoReply {
                step: format!("{} (the sending thread panicked)", self.what),
                waited: start.elapsed(),
            }),
        }
    }
}

impl<T> Drop for PendingReply<T> {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            // Abandoned before its reply: unblock the sender by closing the connection.
            if !t.is_finished() {
                let _ = self.socket.shutdown(Shutdown::Both);
            }
            let _ = t.join();
        }
    }
}
