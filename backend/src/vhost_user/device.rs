//! What the vhost-user layer needs from a virtio device.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::Queue;

use super::memory::GuestMemoryHandle;
use super::vring::RunningQueue;

/// A queue thread's body.
pub type QueueLoop = Box<dyn FnOnce() -> Queue + Send>;

/// A virtio device served over vhost-user. The session calls these from the connection thread;
/// the [`QueueLoop`] that [`VirtioDevice::prepare_queue`] returns runs on the queue's own thread.
pub trait VirtioDevice: Send + Sync + 'static {
    /// Device and transport feature bits (without VHOST_USER_F_PROTOCOL_FEATURES).
    fn features(&self) -> u64;
    /// The number of virtqueues.
    fn num_queues(&self) -> usize;
    /// The largest queue size the frontend may set.
    fn max_queue_size(&self) -> u16;
    /// The features the frontend acknowledged.
    fn set_acked_features(&self, features: u64);
    /// Fills `data` with the configuration space bytes at `offset`; bytes past the end of the
    /// known layout read as zero.
    fn read_config(&self, offset: u32, data: &mut [u8]);
    /// A write to the configuration space from the driver.
    fn write_config(&self, offset: u32, data: &[u8]) -> io::Result<()>;
    /// How long retiring memory (and stopping a ring) waits for in-flight requests before
    /// cancelling them.
    fn retire_timeout(&self) -> Duration {
        Duration::from_secs(5)
    }
    /// The memory of a new session, for the device's status.
    fn attach_memory(&self, _memory: &GuestMemoryHandle) {}
    /// Prepares to serve a queue (on the connection thread, so a failure is reported to the
    /// frontend) and returns the loop to run on the queue's own thread. The loop serves the
    /// queue until `queue.control` asks it to stop; every request it took from the ring is
    /// completed before it returns the queue, whose position goes back to the frontend.
    fn prepare_queue(self: Arc<Self>, queue: RunningQueue) -> io::Result<QueueLoop>;
}
