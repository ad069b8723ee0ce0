//! vublk: a vhost-user virtio-blk backend.
//!
//! The request path, by module: [`daemon`] accepts a frontend connection; [`vhost_user`]
//! speaks the protocol, maps guest memory and starts a thread per virtqueue; [`virtio_blk`]
//! turns descriptor chains into requests and requests into [`io`] on the [`disk`].

pub mod cli;
pub mod daemon;
pub mod disk;
pub mod io;
mod ratelimit;
pub mod vhost_user;
pub mod virtio_blk;

use std::error::Error;
use std::sync::Arc;

use cli::Export;
use disk::Disk;
use virtio_blk::BlockDevice;

/// Opens the disk and serves it until stopped.
pub fn run(export: Export) -> Result<(), Box<dyn Error + Send + Sync>> {
    let disk = Disk::open(&export.disk, export.open)?;
    let device = Arc::new(BlockDevice::new(disk, &export.device));
    let config = device.config();
    tracing::info!(
        "serving {}: {} bytes, {} queue(s), {}{}{}",
        device.disk().name,
        config.capacity,
        config.num_queues,
        if config.read_only { "read-only" } else { "read-write" },
        if device.disk().direct { ", O_DIRECT" } else { "" },
        if config.writeback() { ", write-back" } else { ", write-through" },
    );
    daemon::run(export.endpoint, device)?;
    Ok(())
}

/// An error and its causes on one line: "cannot open x.img: No such file or directory".
pub fn error_line(e: &(dyn Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
