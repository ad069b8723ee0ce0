//! The `session` target: a VMM's side of a vhost-user connection. The input is a sequence of
//! messages — any request code, flags and payload, with file descriptors attached — sent on a
//! socketpair to a [`Session`] of a null-disk [`BlockDevice`], handled one at a time with the
//! vhost crate's `BackendReqHandler` as `serve_connection` (vhost_user/connection.rs) handles
//! them: a fatal error ends the connection, and every ring stops at the end. Queue threads
//! start for real when a ring gets its kick fd.
//!
//! The descriptors: eventfds, or memfds. A SET_MEM_TABLE or ADD_MEM_REG gets, for each region
//! its payload describes, a memfd that covers it (`mmap_offset + size`), or an empty one when
//! the region's frontend address is odd (such a region must be refused: mapped, it would raise
//! SIGBUS); a message whose region no memfd can cover is not sent.
//!
//! Checked: the daemon survives (no panic, no signal), and the stream stays in step: every
//! message that is not fatal gets handled, and the handler does not block on a whole message.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::BackendReqHandler;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vublk::disk::{Disk, DiskSpec, OpenOptions};

use crate::Input;
use vublk::vhost_user::{is_fatal, Session};
use vublk::virtio_blk::{BlockDevice, DeviceOptions};

/// Messages per input.
const MAX_MESSAGES: usize = 16;
/// Payload bytes per message (SET_MEM_TABLE with 8 regions is 264; the vhost crate's limit
/// is 4096, and it refuses more).
const MAX_PAYLOAD: usize = 512;
/// File descriptors per message.
const MAX_FDS: usize = 10;
const SET_MEM_TABLE: u32 = 5;
const ADD_MEM_REG: u32 = 37;
/// A memory region in a message: guest address, size, frontend address, mmap offset.
const REGION_SIZE: usize = 32;

/// Runs one input.
pub fn run(data: &[u8]) {
    let _ = connection(&mut Input::new(data));
}

/// One message to send.
struct Message<'a> {
    code: u32,
    flags: u32,
    payload: &'a [u8],
    nfds: usize,
    /// Bit i: the i-th descriptor past the regions' memfds is an (empty) memfd, not an eventfd.
    memfds: u16,
}

impl<'a> Message<'a> {
    /// `code: u8` (0xff: a `u32` code follows), `flags: u8` (bit 0: NEED_REPLY; 0xff: `u32`
    /// flags follow), `len: u16` (capped at MAX_PAYLOAD), the payload, `nfds: u8` (capped at
    /// MAX_FDS), `memfds: u16`.
    fn read(input: &mut Input<'a>) -> Option<Message<'a>> {
        let code = match input.u8()? {
            0xff => input.u32()?,
            code => u32::from(code),
        };
        let flags = match input.u8()? {
            0xff => input.u32()?,
            // Version 1, and NEED_REPLY (REPLY_ACK) or not.
            f => 0x1 | u32::from(f & 1) << 3,
        };
        let len = usize::from(input.u16()?) % (MAX_PAYLOAD + 1);
        let payload = input.bytes(len.min(input.len()))?;
        let nfds = usize::from(input.u8().unwrap_or(0)) % (MAX_FDS + 1);
        let memfds = input.u16().unwrap_or(0);
        Some(Message {
            code,
            flags,
            payload,
            nfds,
            memfds,
        })
    }
}

fn device(input: &mut Input<'_>) -> Option<Arc<BlockDevice>> {
    let read_only = input.u8()? & 1 != 0;
    let size = (u64::from(input.u16()?) + 1) * 4096;
    let disk = Disk::open(
        &DiskSpec::Null { size },
        OpenOptions {
            read_only,
            direct: false,
        },
    )
    .expect("a null disk");
    let options = DeviceOptions {
        num_queues: u16::from(input.u8()? % 4) + 1,
        max_queue_size: 1 << (input.u8()? % 11),
        blk_size: if input.u8()? & 1 != 0 { 4096 } else { 512 },
        serial: None,
        write_cache: input.u8()? & 1 != 0,
    };
    Some(Arc::new(
        BlockDevice::new(disk, &options).with_retire_timeout(Duration::from_millis(10)),
    ))
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd takes no pointers and returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The memfds covering the regions a memory message's payload describes, in order; `None`
/// when one cannot be made that large.
fn region_files(code: u32, payload: &[u8]) -> Option<Vec<File>> {
    let regions = match code {
        SET_MEM_TABLE => payload.get(8..).unwrap_or_default(),
        ADD_MEM_REG => payload.get(8..).unwrap_or_default(),
        _ => return Some(Vec::new()),
    };
    regions
        .chunks_exact(REGION_SIZE)
        .map(|r| {
            let field = |i: usize| u64::from_le_bytes(r[i * 8..i * 8 + 8].try_into().unwrap());
            let (size, user_addr, offset) = (field(1), field(2), field(3));
            // A frontend address with its low bit set picks an empty memfd: a region longer
            // than its file must be refused, never mapped (it would SIGBUS).
            if user_addr & 1 == 1 {
                crate::memfd(0)
            } else {
                offset.checked_add(size).and_then(crate::memfd)
            }
        })
        .collect()
}

fn connection(input: &mut Input<'_>) -> Option<()> {
    let device = device(input)?;
    let (frontend, backend) = UnixStream::pair().expect("a socketpair");
    frontend.set_nonblocking(true).expect("nonblocking");
    let session = Arc::new(Mutex::new(Session::new(device)));
    let mut handler = BackendReqHandler::from_stream(backend, session.clone());
    let mut replies = [0u8; 4096];
    for _ in 0..MAX_MESSAGES {
        let Some(message) = Message::read(input) else {
            break;
        };
        let Some(mut files) = region_files(message.code, message.payload) else {
            continue;
        };
        files.truncate(message.nfds);
        let mut fds: Vec<OwnedFd> = files.into_iter().map(OwnedFd::from).collect();
        while fds.len() < message.nfds {
            fds.push(if message.memfds & (1 << fds.len()) != 0 {
                crate::memfd(0).expect("a memfd").into()
            } else {
                eventfd()
            });
        }
        let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut bytes = Vec::with_capacity(12 + message.payload.len());
        bytes.extend_from_slice(&message.code.to_le_bytes());
        bytes.extend_from_slice(&message.flags.to_le_bytes());
        bytes.extend_from_slice(&(message.payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(message.payload);
        frontend
            .send_with_fds(&[&bytes[..]], &raw)
            .expect("the message fits the socket buffer");
        drop(fds);

        let result = handler.handle_request();
        session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_explained();
        // Read the replies so the backend never blocks writing one.
        loop {
            match (&frontend).read(&mut replies) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => panic!("reading replies: {e}"),
            }
        }
        match result {
            Ok(()) => {}
            Err(e) if is_fatal(&e) => break,
            Err(_) => {}
        }
    }
    session.lock().unwrap_or_else(|e| e.into_inner()).stop_all();
    Some(())
}
