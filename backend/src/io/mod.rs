//! I/O on the backing, behind one boundary: the queue loop hands each request to its queue's
//! [`Engine`] (engine.rs) and takes completions back.
//!
//! | File | Job |
//! |---|---|
//! | `engine.rs` | the [`Engine`] trait: submit with a tag, reap completions, watch eventfds |
//! | `file.rs` | the engine of a file or block device: io_uring, inline and mapped I/O, bounce buffers, short I/O |
//! | `null.rs` | the engine of the null disk |
//! | `rbd/` | the engine of an RBD image: librbd aio, completions through an eventfd |
//! | `gate.rs` | the test I/O gate, a wrapper engine |
//! | `uring.rs` | a queue's io_uring |
//! | `inline.rs`, `mapped.rs` | reads and writes a queue thread does itself |
//! | `bounce.rs` | aligned bounce buffers for O_DIRECT |
//!
//! [`engine_for`] chooses the engine once per queue, when the queue starts.

mod bounce;
pub mod engine;
pub mod file;
pub mod gate;
pub mod inline;
pub mod mapped;
pub mod null;
pub mod rbd;
pub mod uring;

use std::os::fd::RawFd;
use std::time::Duration;

pub use engine::{Completion, Engine, Event, Operation, Publication, Publisher, Segment, Tag};

use crate::disk::{Backing, Disk};
use crate::vhost_user::GuestBuffers;

/// The engine of a disk, as [`engine_for`] chose it. An enum rather than a `Box<dyn Engine>`:
/// the queue loop calls its engine a few times per request, and static calls let the compiler
/// inline them.
pub enum DiskEngine {
    File(file::FileEngine),
    Null(null::NullEngine),
    Rbd(rbd::RbdEngine),
    Gated(gate::Gated<file::FileEngine>),
}

/// The engine for a queue of `depth` requests on `disk`; with `gate` (a test FIFO, see
/// gate.rs) every request waits for a byte of it first, and all of them go through io_uring
/// (an RBD image takes no gate).
/// The disk (which owns the backing's file descriptor) must outlive the engine.
pub fn engine_for(
    disk: &Disk,
    gate: Option<&gate::TestGate>,
    depth: u16,
) -> std::io::Result<DiskEngine> {
    Ok(match (&disk.backing, gate) {
        (Backing::Null, _) => DiskEngine::Null(null::NullEngine::new(depth)?),
        (Backing::Rbd(_), _) => DiskEngine::Rbd(rbd::RbdEngine::new(disk, depth)?),
        (Backing::File { .. }, None) => DiskEngine::File(file::FileEngine::new(disk, depth, true)?),
        (Backing::File { .. }, Some(gate)) => {
            let inner = file::FileEngine::new(disk, depth, false)?;
            DiskEngine::Gated(gate::Gated::new(inner, gate, depth)?)
        }
    })
}

/// Calls `$method` on whichever engine `$self` holds.
macro_rules! each {
    ($self:ident, $engine:ident => $call:expr) => {
        match $self {
            DiskEngine::File($engine) => $call,
            DiskEngine::Null($engine) => $call,
            DiskEngine::Rbd($engine) => $call,
            DiskEngine::Gated($engine) => $call,
        }
    };
}

impl Engine for DiskEngine {
    fn start(&mut self) -> std::io::Result<()> {
        each!(self, e => e.start())
    }

    fn submit(
        &mut self,
        tag: Tag,
        operation: Operation<'_>,
        buffers: GuestBuffers,
    ) -> Option<Completion> {
        each!(self, e => e.submit(tag, operation, buffers))
    }

    fn cancel(&mut self, which: &dyn Fn(&GuestBuffers) -> bool) -> std::io::Result<()> {
        each!(self, e => e.cancel(which))
    }

    fn watch(&mut self, fd: RawFd, len: u32, token: u32) -> std::io::Result<()> {
        each!(self, e => e.watch(fd, len, token))
    }

    fn unwatch(&mut self, token: u32) -> std::io::Result<()> {
        each!(self, e => e.unwatch(token))
    }

    fn enter(&mut self, wait: bool) -> std::io::Result<()> {
        each!(self, e => e.enter(wait))
    }

    fn enter_timeout(&mut self, timeout: Duration) -> std::io::Result<bool> {
        each!(self, e => e.enter_timeout(timeout))
    }

    fn has_events(&mut self) -> bool {
        each!(self, e => e.has_events())
    }

    fn reap(&mut self, events: &mut Vec<Event>) {
        each!(self, e => e.reap(events))
    }

    fn may_poll(&self) -> bool {
        each!(self, e => e.may_poll())
    }

    fn publish_with(&mut self, publisher: std::sync::Arc<dyn Publisher>) -> bool {
        each!(self, e => e.publish_with(publisher))
    }
}
