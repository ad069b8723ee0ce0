//! A scripted vhost-user-blk frontend for protocol tests.
//!
//! It plays the VMM: guest RAM in memfds ([`memory`]), split virtqueues it drives by hand and can
//! corrupt on purpose ([`virtqueue`]), the vhost-user handshake as replayable steps
//! ([`session`]), virtio-blk requests ([`blk`]), and a ready-made test bed around the backend under
//! test as a child process ([`fixture`], over [`crate::daemon`]). [`cloud_hypervisor`] holds
//! cloud-hypervisor's message sequence, cited from its source, for replay tests.
//!
//! ```text
//!   test ──▶ BlkQueue ──▶ Session ──(vhost-user over UnixStream)──▶ backend
//!                │           │ kick/call eventfds                     │
//!                ▼           ▼                                        ▼
//!            SplitQueue ─▶ GuestMemory (memfd, MAP_SHARED) ◀── mmap'd by the backend
//! ```

pub mod blk;
pub mod cloud_hypervisor;
pub mod fixture;
pub mod memory;
pub mod session;
pub mod virtqueue;

pub use blk::{BlkConfig, BlkQueue, Completion, Range, Readback};
pub use fixture::Fixture;
pub use memory::{Arena, GuestMemory, RegionFile, RegionSpec, RemovedRegion};
pub use session::{
    MemAnnounce, PendingReply, Replacement, Reply, Session, SessionConfig, SessionError, Step,
    Vring,
};
pub use virtqueue::{Seg, SplitQueue, UsedElem};
