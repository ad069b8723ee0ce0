//! I/O on the backing, behind one boundary: the queue loop hands each request to its queue's
//! [`Engine`] (engine.rs) and takes completions back.
//!
//! | File | Job |
//! |---|---|
//! | `engine.rs` | the [`Engine`] trait: submit with a tag, reap completions, watch eventfds |
//! | `file.rs` | the engine of a file or block device: io_uring, inline and mapped I/O, bounce buffers, short I/O |
//! | `null.rs` | the engine of the null disk |
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
pub mod uring;

use std::fs::File;

pub use engine::{Completion, Engine, Event, Operation, Segment, Tag};

use crate::disk::{Backing, Disk};

/// The engine for a queue of `depth` requests on `disk`; with `gate` (a test FIFO, see
/// gate.rs) every request waits for a byte of it first, and all of them go through io_uring.
/// The disk (which owns the backing's file descriptor) must outlive the engine.
pub fn engine_for(
    disk: &Disk,
    gate: Option<&File>,
    depth: u16,
) -> std::io::Result<Box<dyn Engine>> {
    Ok(match (&disk.backing, gate) {
        (Backing::Null, _) => Box::new(null::NullEngine::new(depth)?),
        (Backing::File { .. }, None) => Box::new(file::FileEngine::new(disk, depth, true)?),
        (Backing::File { .. }, Some(fifo)) => {
            let inner = file::FileEngine::new(disk, depth, false)?;
            Box::new(gate::Gated::new(inner, fifo.try_clone()?, depth))
        }
    })
}
