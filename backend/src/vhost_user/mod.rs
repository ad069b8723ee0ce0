//! The vhost-user plumbing: one frontend connection, its memory table, its vrings and their
//! threads. It knows virtqueues, not sectors: the device behind it implements [`VirtioDevice`].
//!
//! Why not `vhost_user_backend::VhostUserDaemon`: it only serves a path or a listening socket,
//! and its request handler is private, so it cannot serve an already-connected stream (a
//! connected `--fd`, a launcher's socketpair, a per-VM worker's handed-over connection). The
//! `vhost` crate's `BackendReqHandler::from_stream` can, given a handler: [`session::Session`]
//! is that handler, and owning it is also what lets us control when memory is retired and when
//! a stopped ring's in-flight requests have finished.

mod backend_channel;
mod buffers;
mod connection;
mod device;
mod dirty_log;
mod inflight;
mod memory;
mod pin;
mod session;
mod vring;

pub use backend_channel::BackendChannel;
pub use connection::{is_fatal, serve_connection, ConnectionEnd, ConnectionThread};
pub use device::{QueueLoop, VirtioDevice};
pub use dirty_log::{DirtyLog, LogMap};
/// The inflight region's parser, for the `inflight` fuzz target (vublk-fuzz): the session maps
/// a frontend's region with [`InflightMap::map`] and recovers each ring's with
/// [`QueueRegion::recover`].
#[doc(hidden)]
pub use inflight::{
    create as create_inflight, InflightError, InflightMap, QueueRegion, Recovered,
    VERSION as INFLIGHT_VERSION,
};
pub use inflight::{ChainWalk, Tracker};
pub use memory::{
    Generation, GuestBuffers, GuestMemoryHandle, MemoryStatus, RawBuffers, RegionPin, StatusByte,
};
pub use session::Session;
pub use vring::{CallFd, QueueControl, RunningQueue};

#[cfg(test)]
pub(crate) use memory::test_memory;
