//! The virtio-blk device: configuration, request parsing, and the queue loop that turns
//! requests into I/O on the disk. It knows sectors, not sockets.

mod bounce;
pub mod config;
mod device;
pub mod request;
pub mod spec;
pub mod stats;
mod worker;

pub use config::{BlockConfig, DeviceOptions};
pub use device::BlockDevice;
