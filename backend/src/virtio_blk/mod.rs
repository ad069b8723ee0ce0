//! The virtio-blk device: configuration, request parsing, and the queue loop that turns
//! requests into I/O on the disk. It knows sectors, not sockets.

pub mod config;
mod device;
mod direct;
mod poll;
mod queue;
pub mod request;
pub mod spec;
pub mod stats;

pub use config::{BlockConfig, DeviceOptions};
pub use device::{BlockDevice, ResizeError, Resized, WriteCacheWatch};

/// The device an export describes, with the daemon-wide settings the export carries.
pub fn device_for(
    disk: crate::disk::Disk,
    export: &crate::export::ExportSpec,
) -> std::io::Result<BlockDevice> {
    let gate = match &export.test_io_gate {
        Some(path) => Some(crate::io::gate::TestGate {
            fifo: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)?,
            offset: export.test_io_gate_offset,
        }),
        None => None,
    };
    Ok(BlockDevice::new(disk, &export.device)
        .with_retire_timeout(std::time::Duration::from_millis(export.retire_timeout_ms))
        .with_poll_max(std::time::Duration::from_micros(export.poll_max_us))
        .with_qos(export.qos)
        .with_test_gate(gate))
}
