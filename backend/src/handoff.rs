//! The channels between the supervisor and a worker, one per direction:
//! - supervisor to worker ([`ToWorker`]): a SOCK_SEQPACKET socketpair carrying one JSON message
//!   per packet, with the file descriptors it hands over attached (SCM_RIGHTS). The supervisor
//!   shuts down its receiving side, so a worker cannot send anything back on it;
//! - worker to supervisor ([`ToSupervisor`]): a pipe of newline-separated JSON ([`report`],
//!   [`ReportReader`]). A pipe cannot carry descriptors: a worker (run by its tenant, who may
//!   take it over) could otherwise hand the supervisor a file whose last close blocks (a
//!   lingering TCP socket, a FUSE file), and stall it.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::export::ExportSpec;
use crate::virtio_blk::stats::{DeviceTotals, QueueCounts};

/// Largest message; exports are small.
const MAX_MESSAGE: usize = 64 * 1024;
/// Longest report line: a worker's stats, about 1.5 KiB per device, for up to
/// `--max-connections-per-vmm` devices (64 by default), and about 100 bytes per queue
/// ([`DeviceStatus::per_queue`], left out where it would not fit: [`stats_message`]).
const MAX_REPORT: usize = 256 * 1024;
/// At most this many fds per message.
const MAX_FDS: usize = 4;

/// Supervisor to worker.
#[derive(Debug, Serialize, Deserialize)]
// A message is built, serialized and dropped once per connection: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum ToWorker {
    /// Serve a connection. Attached fds: the connection, the VMM's pidfd, and with
    /// `open-as=daemon` the backing opened by the supervisor.
    Serve {
        connection: u64,
        export: ExportSpec,
        disk_fd_attached: bool,
        /// The write cache the guest last chose for this export, as an earlier worker of the
        /// same VMM reported it (`ToSupervisor::WriteCache`); `None`: the export's setting.
        #[serde(default)]
        write_cache: Option<bool>,
    },
    /// Stop the device on `connection` cleanly, as if its frontend had closed it: requests in
    /// flight complete, then the connection closes (`vublk export remove --force`).
    Stop { connection: u64 },
    /// The backing of the device on `connection` may have grown: read its size again and, if
    /// it grew, show the new capacity and tell the frontend (`vublk export resize`).
    Resize { connection: u64 },
    /// New QoS limits for the device on `connection` (`vublk export set`).
    SetQos {
        connection: u64,
        qos: crate::qos::QosLimits,
    },
}

/// Worker to supervisor.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToSupervisor {
    /// The worker has the connection: the supervisor may close its copy. Until then it keeps
    /// it, so a connection sent to a worker that died before reading it is not lost.
    Accepted { connection: u64 },
    /// The device could not be served (e.g. the VMM's user may not open the image).
    Refused {
        connection: u64,
        export: String,
        reason: String,
    },
    /// The connection ended.
    Ended { connection: u64 },
    /// What each device of this worker has served so far (sent about once a second).
    Stats { devices: Vec<DeviceStatus> },
    /// The guest set the write cache of the device on `connection` (the `writeback` config
    /// field): device state the supervisor keeps for the next worker of the same VMM, should
    /// this one die.
    WriteCache { connection: u64, write_cache: bool },
    /// The worker's sandbox, once it is on (sent once, before anything else).
    Sandbox(crate::sandbox::SandboxStatus),
    /// The worker made system call `syscall`, which its filter forbids; it is dying of SIGSYS
    /// (sent by the SIGSYS handler, sandbox/seccomp.rs).
    Forbidden { syscall: i64 },
}

/// One device of a worker, for `vublk status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub connection: u64,
    pub export: String,
    pub queues: u16,
    /// Whether the device caches writes (the guest's choice, else `--write-cache`).
    #[serde(default)]
    pub write_cache: Option<bool>,
    #[serde(flatten)]
    pub totals: DeviceTotals,
    /// Memory generations, pins, retire waits, cancellations.
    pub memory: crate::vhost_user::MemoryStatus,
    /// Each queue's request counts, in queue order (empty when the report would not fit).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_queue: Vec<QueueCounts>,
}

/// The [`ToSupervisor::Stats`] message for `devices`, without their per-queue counts if the
/// line would otherwise be longer than the supervisor reads ([`MAX_REPORT`]): a VM with very
/// many devices and queues keeps its device totals and loses only its `queue` series.
pub fn stats_message(devices: Vec<DeviceStatus>) -> ToSupervisor {
    let mut message = ToSupervisor::Stats { devices };
    let len = serde_json::to_vec(&message).map_or(usize::MAX, |line| line.len());
    if len >= MAX_REPORT {
        if let ToSupervisor::Stats { devices } = &mut message {
            devices.iter_mut().for_each(|d| d.per_queue.clear());
        }
    }
    message
}

/// Sends `message` with `fds` attached; on a non-blocking socket that is full, fails with
/// `WouldBlock`.
pub fn send<T: Serialize>(socket: impl AsFd, message: &T, fds: &[&OwnedFd]) -> io::Result<()> {
    let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
    if !borrowed.is_empty() && !ancillary.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many fds for one message",
        ));
    }
    sendmsg(
        socket,
        &[IoSlice::new(&bytes)],
        &mut ancillary,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// Receives one message and its fds; `Ok(None)` when the other side closed the channel.
pub fn recv<T: for<'de> Deserialize<'de>>(
    socket: impl AsFd,
) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let received = loop {
        match recvmsg(
            &socket,
            &mut [IoSliceMut::new(&mut buf)],
            &mut ancillary,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    for message in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if received.bytes == 0 {
        return Ok(None);
    }
    let message = serde_json::from_slice(&buf[..received.bytes])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some((message, fds)))
}

/// The worker's side of the report pipe: writes one message as a line (blocking).
pub fn report(pipe: impl AsFd, message: &ToSupervisor) -> io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
    line.push(b'\n');
    let mut rest = &line[..];
    while !rest.is_empty() {
        match rustix::io::write(&pipe, rest) {
            Ok(n) => rest = &rest[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The worker's side of the report pipe, shared by its threads: one message at a time, so a
/// line longer than `PIPE_BUF` (a worker's stats) is never interleaved with another thread's.
pub struct ReportPipe {
    pipe: std::sync::Mutex<OwnedFd>,
}

impl ReportPipe {
    pub fn new(pipe: OwnedFd) -> ReportPipe {
        ReportPipe {
            pipe: std::sync::Mutex::new(pipe),
        }
    }

    /// Writes `message` (blocking), after any other thread's message.
    pub fn send(&self, message: &ToSupervisor) -> io::Result<()> {
        let pipe = self.pipe.lock().unwrap_or_else(|e| e.into_inner());
        report(&*pipe, message)
    }
}

/// Why a worker's report pipe cannot be read any more: the worker is broken (or hostile).
#[derive(Debug, Error)]
pub enum ReportError {
    #[error("cannot read the pipe")]
    Read(#[source] io::Error),
    #[error("a report longer than 256 KiB")]
    TooLong,
    #[error("a report that is not a message")]
    NotAMessage(#[source] serde_json::Error),
}

/// The supervisor's side of a worker's report pipe (non-blocking): collects lines, at most
/// [`MAX_REPORT`] bytes each, so a worker cannot make it hold more.
#[derive(Default)]
pub struct ReportReader {
    partial: Vec<u8>,
}

/// What one read of a report pipe gave.
#[derive(Debug)]
pub struct Reports {
    pub messages: Vec<ToSupervisor>,
    /// The worker closed its end (it is exiting).
    pub closed: bool,
}

impl ReportReader {
    /// Reads what the pipe holds now, up to `max_messages` messages. A line that is too long
    /// or not a message is an error: the worker is broken (or hostile).
    pub fn read(&mut self, pipe: impl AsFd, max_messages: usize) -> Result<Reports, ReportError> {
        let mut reports = Reports {
            messages: Vec::new(),
            closed: false,
        };
        let mut buf = [0u8; 16 * 1024];
        while reports.messages.len() < max_messages {
            if let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.partial.drain(..=end).collect();
                let message =
                    serde_json::from_slice(&line[..end]).map_err(ReportError::NotAMessage)?;
                reports.messages.push(message);
                continue;
            }
            if self.partial.len() > MAX_REPORT {
                return Err(ReportError::TooLong);
            }
            match rustix::io::read(&pipe, &mut buf) {
                Ok(0) => {
                    reports.closed = true;
                    break;
                }
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => break,
                Err(e) => return Err(ReportError::Read(e.into())),
            }
        }
        Ok(reports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        rustix::io::ioctl_fionbio(&r, true).unwrap();
        (r, w)
    }

    #[test]
    fn reports_arrive_whole_in_order_and_the_end_is_seen() {
        let (r, w) = pipe();
        let mut reader = ReportReader::default();
        for connection in 1..=3 {
            report(&w, &ToSupervisor::Accepted { connection }).unwrap();
        }
        // Half a line stays until the rest comes.
        rustix::io::write(&w, b"{\"Ended\":{\"connect").unwrap();
        let got = reader.read(&r, 2).unwrap();
        assert!(matches!(
            got.messages[..],
            [
                ToSupervisor::Accepted { connection: 1 },
                ToSupervisor::Accepted { connection: 2 }
            ]
        ));
        let got = reader.read(&r, 16).unwrap();
        assert!(
            matches!(got.messages[..], [ToSupervisor::Accepted { connection: 3 }]) && !got.closed
        );
        rustix::io::write(&w, b"ion\":4}}\n").unwrap();
        drop(w);
        let got = reader.read(&r, 16).unwrap();
        assert!(matches!(got.messages[..], [ToSupervisor::Ended { connection: 4 }]) && got.closed);
    }

    /// The supervisor shuts down its receiving side of the control socket: the worker's sends,
    /// descriptors and all, fail instead of queueing files for the supervisor to close.
    #[test]
    fn a_worker_cannot_send_on_the_control_socket() {
        use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
        let (ours, theirs) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        rustix::net::shutdown(&ours, rustix::net::Shutdown::Read).unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = OwnedFd::from(file);
        let sent = send(&theirs, &ToSupervisor::Accepted { connection: 1 }, &[&fd]);
        assert_eq!(sent.unwrap_err().raw_os_error(), Some(libc::EPIPE));
        // The other way still works.
        send(&ours, &ToSupervisor::Accepted { connection: 2 }, &[&fd]).unwrap();
        let (got, fds) = recv::<ToSupervisor>(&theirs).unwrap().unwrap();
        assert!(matches!(got, ToSupervisor::Accepted { connection: 2 }) && fds.len() == 1);
    }

    /// Stats lines longer than PIPE_BUF from one thread and write-cache reports from others
    /// arrive whole: the pipe is shared under a lock.
    #[test]
    fn threads_sharing_the_report_pipe_do_not_interleave_lines() {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let pipe = std::sync::Arc::new(ReportPipe::new(w));
        let device = DeviceStatus {
            connection: 1,
            // Larger than the pipe: its write waits for room, between other threads' writes.
            export: "x".repeat(100 * 1024),
            queues: 1,
            write_cache: None,
            totals: DeviceTotals::default(),
            memory: crate::vhost_user::MemoryStatus::default(),
            per_queue: Vec::new(),
        };
        // The small reports keep coming for as long as the large ones are being written.
        let big_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let (pipe, device, big_done) = (pipe.clone(), device.clone(), big_done.clone());
                std::thread::spawn(move || {
                    let mut sent = 0u64;
                    loop {
                        if t == 0 {
                            let devices = vec![device.clone()];
                            pipe.send(&ToSupervisor::Stats { devices }).unwrap();
                            if sent == 20 {
                                big_done.store(true, std::sync::atomic::Ordering::Relaxed);
                                break sent + 1;
                            }
                        } else {
                            let message = ToSupervisor::WriteCache {
                                connection: t,
                                write_cache: sent % 2 == 0,
                            };
                            pipe.send(&message).unwrap();
                            if big_done.load(std::sync::atomic::Ordering::Relaxed) {
                                break sent + 1;
                            }
                        }
                        sent += 1;
                    }
                })
            })
            .collect();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                std::thread::yield_now();
                match rustix::io::read(&r, &mut buf) {
                    Ok(0) => break all,
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => panic!("read: {e}"),
                }
            }
        });
        let sent: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
        drop(pipe);
        let all = reader.join().unwrap();
        let lines: Vec<ToSupervisor> = all
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).expect("a whole message"))
            .collect();
        assert_eq!(lines.len() as u64, sent);
    }

    /// Per-queue counts that would make the line too long for the supervisor are left out;
    /// the device totals stay.
    #[test]
    fn stats_too_long_for_a_line_lose_their_queue_counts() {
        let queue = QueueCounts {
            by_kind: [u64::MAX; 6],
            bytes_read: u64::MAX,
            bytes_written: u64::MAX,
            in_flight: u64::MAX,
        };
        let device = |queues: usize| DeviceStatus {
            connection: 1,
            export: "x".into(),
            queues: queues as u16,
            totals: DeviceTotals {
                requests: 7,
                ..Default::default()
            },
            memory: crate::vhost_user::MemoryStatus::default(),
            per_queue: vec![queue.clone(); queues],
            write_cache: Some(true),
        };
        let ToSupervisor::Stats { devices } = stats_message(vec![device(2); 3]) else {
            panic!("not a stats message");
        };
        assert!(devices.iter().all(|d| d.per_queue.len() == 2));
        let message = stats_message(vec![device(64); 64]);
        assert!(serde_json::to_vec(&message).unwrap().len() < MAX_REPORT);
        let ToSupervisor::Stats { devices } = message else {
            panic!("not a stats message");
        };
        assert!(devices
            .iter()
            .all(|d| d.per_queue.is_empty() && d.totals.requests == 7));
    }

    #[test]
    fn garbage_and_endless_lines_are_errors() {
        let (r, w) = pipe();
        rustix::io::write(&w, b"not json\n").unwrap();
        assert!(matches!(
            ReportReader::default().read(&r, 16),
            Err(ReportError::NotAMessage(_))
        ));
        let (r, w) = pipe();
        let mut reader = ReportReader::default();
        let chunk = vec![b'x'; 16 * 1024];
        let mut result = Ok(Reports {
            messages: Vec::new(),
            closed: false,
        });
        for _ in 0..(MAX_REPORT / chunk.len() + 2) {
            rustix::io::write(&w, &chunk).unwrap();
            result = reader.read(&r, 16);
            if result.is_err() {
                break;
            }
        }
        assert!(matches!(result, Err(ReportError::TooLong)));
        assert!(
            reader.partial.len() <= MAX_REPORT + 16 * 1024,
            "the reader holds at most one message and a read"
        );
    }
}
