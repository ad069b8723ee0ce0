//! [`BlockDevice`]: a disk and its virtio-blk configuration, served over vhost-user.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::disk::Disk;
use crate::qos::{QosLimits, Throttle};
use crate::vhost_user::{GuestMemoryHandle, MemoryStatus, QueueLoop, RunningQueue, VirtioDevice};

use super::config::{self, BlockConfig, DeviceOptions};
use super::queue::QueueServer;
use super::request::Limits;
use super::stats::{self, DeviceTotals, QueueStats};

pub struct BlockDevice {
    pub(super) config: BlockConfig,
    pub(super) disk: Disk,
    /// What requests are checked against; its capacity is the one at creation; queue threads
    /// take the current one from the config (it grows on resize).
    pub(super) limits: Limits,
    pub(super) stats: Vec<QueueStats>,
    /// Test only: operations wait for a byte from this FIFO (`--test-io-gate`).
    pub(super) test_gate: Option<crate::io::gate::TestGate>,
    pub(super) retire_timeout: Duration,
    /// The longest a queue thread busy-polls before sleeping (0: never); see poll.rs.
    pub(super) poll_max: Duration,
    memory: Mutex<Option<GuestMemoryHandle>>,
    /// Told each time the driver changes the write cache (a worker reports it to the
    /// supervisor, which keeps it for the VMM's next worker).
    write_cache_watch: Option<WriteCacheWatch>,
    /// The export's QoS limits, shared by the queue threads (`vublk export set` changes them).
    pub(super) throttle: Throttle,
}

/// Why [`BlockDevice::resize`] left the capacity as it was.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("cannot read the size of {disk}")]
    Probe {
        disk: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{disk} shrank from {from} to {to} bytes; vublk only grows a disk (a guest may have \
         data past the new end)"
    )]
    Shrunk { disk: String, from: u64, to: u64 },
}

/// What [`BlockDevice::resize`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resized {
    /// The capacity grew from `from` to `to` bytes: the guest must be told.
    Grown { from: u64, to: u64 },
    /// The backing has the size the device already shows.
    Unchanged(u64),
}

/// What [`BlockDevice::with_write_cache_watch`] calls with the new setting.
pub type WriteCacheWatch = Box<dyn Fn(bool) + Send + Sync>;

impl BlockDevice {
    pub fn new(disk: Disk, options: &DeviceOptions) -> BlockDevice {
        let config = BlockConfig::new(&disk, options);
        let limits = Limits {
            capacity: disk.capacity,
            read_only: disk.read_only,
            seg_max: config.seg_max as usize,
            size_max: u64::from(config::SIZE_MAX),
            max_iovecs: config::MAX_IOVECS,
            discard: config.discard,
            write_zeroes: config.write_zeroes,
            max_zeroing_sectors: u64::from(config::MAX_ZEROING_SECTORS),
            max_zeroing_segments: config::MAX_ZEROING_SEGMENTS as usize,
            offset_align: u64::from(disk.dio_align.offset),
        };
        let stats = (0..options.num_queues)
            .map(|_| QueueStats::default())
            .collect();
        BlockDevice {
            config,
            disk,
            limits,
            stats,
            test_gate: None,
            retire_timeout: Duration::from_secs(5),
            poll_max: Duration::ZERO,
            memory: Mutex::new(None),
            write_cache_watch: None,
            throttle: Throttle::new(QosLimits::default()),
        }
    }

    /// Limits what the device serves (docs/operations.md#qos).
    pub fn with_qos(self, limits: QosLimits) -> BlockDevice {
        self.throttle.set(limits);
        self
    }

    /// Replaces the QoS limits of a running device (`vublk export set`); its queue threads
    /// follow from their next batch of requests on (a throttled one within 100 ms).
    pub fn set_qos(&self, limits: QosLimits) {
        self.throttle.set(limits);
    }

    /// The QoS limits in force.
    pub fn qos(&self) -> QosLimits {
        self.throttle.limits()
    }

    /// How long retiring memory and stopping a ring wait before cancelling requests.
    pub fn with_retire_timeout(mut self, timeout: Duration) -> BlockDevice {
        self.retire_timeout = timeout;
        self
    }

    /// How long a queue thread may busy-poll for more requests before it sleeps (the
    /// adaptive window's ceiling; zero turns polling off).
    pub fn with_poll_max(mut self, max: Duration) -> BlockDevice {
        self.poll_max = max;
        self
    }

    /// Takes over the write-cache setting of an earlier connection of the same export.
    pub fn with_write_cache(
        mut self,
        cell: Option<Arc<std::sync::atomic::AtomicBool>>,
    ) -> BlockDevice {
        if let Some(cell) = cell {
            self.config.share_writeback(cell);
        }
        self
    }

    /// Calls `watch` with the new setting each time the driver changes the write cache.
    pub fn with_write_cache_watch(mut self, watch: WriteCacheWatch) -> BlockDevice {
        self.write_cache_watch = Some(watch);
        self
    }

    /// Test only: hold operations until a byte can be read from the gate's FIFO.
    pub fn with_test_gate(mut self, gate: Option<crate::io::gate::TestGate>) -> BlockDevice {
        self.test_gate = gate;
        self
    }

    /// The memory lifetimes of the current (or last) session.
    pub fn memory_status(&self) -> MemoryStatus {
        self.memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|m| m.status())
            .unwrap_or_default()
    }

    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Reads the backing's size again and, if it grew, makes the new capacity the one the
    /// config space shows and requests are checked against (`vublk export resize`). A smaller
    /// backing is refused: the guest may have data past the new end.
    pub fn resize(&self) -> Result<Resized, ResizeError> {
        let from = self.config.capacity();
        let to = self
            .disk
            .current_size()
            .map_err(|source| ResizeError::Probe {
                disk: self.disk.name.clone(),
                source,
            })?
            & !511;
        if to < from {
            return Err(ResizeError::Shrunk {
                disk: self.disk.name.clone(),
                from,
                to,
            });
        }
        if to == from {
            return Ok(Resized::Unchanged(from));
        }
        self.config.set_capacity(to);
        Ok(Resized::Grown { from, to })
    }

    /// What the device has served so far.
    pub fn totals(&self) -> DeviceTotals {
        stats::totals(&self.stats)
    }

    /// What each queue has served so far, in queue order.
    pub fn per_queue(&self) -> Vec<stats::QueueCounts> {
        stats::per_queue(&self.stats)
    }
}

impl VirtioDevice for BlockDevice {
    fn features(&self) -> u64 {
        self.config.features()
    }

    fn num_queues(&self) -> usize {
        usize::from(self.config.num_queues)
    }

    fn max_queue_size(&self) -> u16 {
        self.config.max_queue_size
    }

    fn set_acked_features(&self, features: u64) {
        self.config.set_acked_features(features);
    }

    fn read_config(&self, offset: u32, data: &mut [u8]) {
        self.config.read_config(offset, data);
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> io::Result<()> {
        let before = self.config.writeback();
        self.config.write_config(offset, data)?;
        let after = self.config.writeback();
        if after != before {
            if let Some(watch) = &self.write_cache_watch {
                watch(after);
            }
        }
        Ok(())
    }

    fn retire_timeout(&self) -> Duration {
        self.retire_timeout
    }

    fn attach_memory(&self, memory: &GuestMemoryHandle) {
        *self.memory.lock().unwrap_or_else(|e| e.into_inner()) = Some(memory.clone());
    }

    fn prepare_queue(self: Arc<Self>, queue: RunningQueue) -> io::Result<QueueLoop> {
        let server = QueueServer::new(self, queue)?;
        Ok(Box::new(move || server.run()))
    }
}
