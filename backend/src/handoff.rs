//! The channel between the supervisor and a worker: a SOCK_SEQPACKET socketpair carrying one
//! JSON message per packet, with the file descriptors it hands over attached (SCM_RIGHTS).

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

use crate::cli::ExportSpec;
use crate::virtio_blk::stats::DeviceTotals;

/// Largest message; exports are small.
const MAX_MESSAGE: usize = 64 * 1024;
/// At most this many fds per message.
const MAX_FDS: usize = 4;

/// Supervisor to worker.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToWorker {
    /// Serve a connection. Attached fds: the connection, the VMM's pidfd, and with
    /// `open-as=daemon` the backing opened by the supervisor.
    Serve {
        connection: u64,
        export: ExportSpec,
        disk_fd_attached: bool,
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
}

/// One device of a worker, for `vublk status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub connection: u64,
    pub export: String,
    pub queues: u16,
    #[serde(flatten)]
    pub totals: DeviceTotals,
    /// Memory generations, pins, retire waits, cancellations.
    pub memory: crate::vhost_user::MemoryStatus,
}

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
