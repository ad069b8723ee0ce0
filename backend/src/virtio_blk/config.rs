//! The device as the guest sees it: feature bits, the configuration space, the serial, and the
//! limits requests are checked against.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::disk::Disk;

use super::spec::{self, config_offset as off};

/// What the command line asks of the device (as opposed to what the disk can do).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeviceOptions {
    pub num_queues: u16,
    pub max_queue_size: u16,
    /// Logical block size the guest sees: 512 or 4096.
    pub blk_size: u32,
    pub serial: Option<String>,
    /// Write-back cache (flushes needed) or write-through (every write durable on completion).
    pub write_cache: bool,
}

/// Largest data segment, in bytes (VIRTIO_BLK_F_SIZE_MAX); a request with a longer one is
/// refused.
pub const SIZE_MAX: u32 = 1 << 20;
/// The ring size `seg_max` is sized for: QEMU's vhost-user-blk and cloud-hypervisor set up
/// rings of 128 entries by default, and the driver reads `seg_max` before any ring exists.
pub const SEG_MAX_RING: u16 = 128;
/// Discard and write-zeroes: sectors per segment and segments per request.
pub const MAX_ZEROING_SECTORS: u32 = 1 << 22;
pub const MAX_ZEROING_SEGMENTS: u32 = 32;
/// Host iovecs one request may need (IOV_MAX); a segment crossing memory regions takes two.
pub const MAX_IOVECS: usize = 1024;

/// The device configuration, fixed when the device is created except for the write cache mode,
/// which the driver may change through the config space, and the capacity, which grows when the
/// backing does (`vublk export resize`).
#[derive(Debug)]
pub struct BlockConfig {
    /// Bytes, a multiple of 512; read by the queue threads for every request.
    capacity: AtomicU64,
    pub blk_size: u32,
    pub seg_max: u32,
    pub num_queues: u16,
    pub max_queue_size: u16,
    pub discard: bool,
    pub write_zeroes: bool,
    pub may_unmap: bool,
    pub read_only: bool,
    pub serial: [u8; spec::VIRTIO_BLK_ID_BYTES as usize],
    features: u64,
    /// Shared by every connection of one export in a worker (see `share_writeback`).
    writeback: Arc<AtomicBool>,
    acked_features: AtomicU64,
}

fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Data segments per request: what fits in a chain as long as the ring, less the header and
/// status descriptors (the spec bounds a chain by the queue size, and a Linux driver without
/// indirect descriptors cannot queue a longer one at all), for the smaller of `max_queue_size`
/// and [`SEG_MAX_RING`]. The config space is read before the driver sets any ring's size, so
/// this cannot follow the ring; a frontend that sets smaller rings still has longer chains
/// served through indirect descriptors.
pub fn seg_max(max_queue_size: u16) -> u32 {
    u32::from(max_queue_size.min(SEG_MAX_RING))
        .saturating_sub(2)
        .max(1)
}

impl BlockConfig {
    pub fn new(disk: &Disk, options: &DeviceOptions) -> BlockConfig {
        // O_DIRECT needs requests aligned to the backing's block: make the guest use at least
        // that logical block size, so a well-behaved driver never sends an unaligned request.
        let mut blk_size = options.blk_size;
        if disk.direct && disk.dio_align.offset > blk_size && disk.dio_align.offset <= 4096 {
            tracing::info!(
                "logical block size raised from {blk_size} to {} for O_DIRECT on {}",
                disk.dio_align.offset,
                disk.name
            );
            blk_size = disk.dio_align.offset;
        }
        let serial_text = options
            .serial
            .clone()
            .unwrap_or_else(|| disk.default_serial());
        let mut serial = [0u8; spec::VIRTIO_BLK_ID_BYTES as usize];
        let n = serial_text.len().min(serial.len());
        serial[..n].copy_from_slice(&serial_text.as_bytes()[..n]);

        let discard = disk.supports_discard();
        let write_zeroes = disk.write_zeroes.is_some();
        let mut features = bit(spec::VIRTIO_F_VERSION_1)
            | bit(spec::VIRTIO_RING_F_INDIRECT_DESC)
            | bit(spec::VIRTIO_RING_F_EVENT_IDX)
            | bit(spec::VIRTIO_BLK_F_SIZE_MAX)
            | bit(spec::VIRTIO_BLK_F_SEG_MAX)
            | bit(spec::VIRTIO_BLK_F_BLK_SIZE)
            | bit(spec::VIRTIO_BLK_F_TOPOLOGY)
            | bit(spec::VIRTIO_BLK_F_FLUSH)
            | bit(spec::VIRTIO_BLK_F_CONFIG_WCE)
            | bit(spec::VIRTIO_BLK_F_MQ);
        if discard {
            features |= bit(spec::VIRTIO_BLK_F_DISCARD);
        }
        if write_zeroes {
            features |= bit(spec::VIRTIO_BLK_F_WRITE_ZEROES);
        }
        if disk.read_only {
            features |= bit(spec::VIRTIO_BLK_F_RO);
        }
        BlockConfig {
            capacity: AtomicU64::new(disk.capacity),
            blk_size,
            seg_max: seg_max(options.max_queue_size),
            num_queues: options.num_queues,
            max_queue_size: options.max_queue_size,
            discard,
            write_zeroes,
            may_unmap: disk.punch_hole,
            read_only: disk.read_only,
            serial,
            features,
            writeback: Arc::new(AtomicBool::new(options.write_cache)),
            acked_features: AtomicU64::new(0),
        }
    }

    pub fn features(&self) -> u64 {
        self.features
    }

    /// The disk's size in bytes, as the guest sees it now.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    /// A new capacity in bytes (rounded down to sectors): the config space shows it from now
    /// on, and requests are checked against it.
    pub fn set_capacity(&self, bytes: u64) {
        self.capacity.store(bytes & !511, Ordering::Relaxed);
    }

    pub fn set_acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
    }

    /// The write-cache setting as a cell that outlives this device: the guest's choice is
    /// device state, and the next connection of the same export takes it over.
    pub fn writeback_cell(&self) -> Arc<AtomicBool> {
        self.writeback.clone()
    }

    /// Uses `cell` (from an earlier connection's `writeback_cell`) for the write cache.
    pub fn share_writeback(&mut self, cell: Arc<AtomicBool>) {
        self.writeback = cell;
    }

    /// The write-cache setting: the command line's, or the driver's choice (the `writeback`
    /// field of the config space, which shows it).
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// Whether writes, discards and write-zeroes must be durable when they complete: the
    /// write cache is off, or the driver did not negotiate VIRTIO_BLK_F_FLUSH — a driver
    /// that cannot flush gets a write-through device (virtio 1.2, 5.2.5.2 and 5.2.6.2; Linux
    /// assumes no write cache then).
    pub fn write_through(&self) -> bool {
        let flush = self.acked_features.load(Ordering::Relaxed) & bit(spec::VIRTIO_BLK_F_FLUSH);
        !self.writeback() || flush == 0
    }

    /// The configuration space, `struct virtio_blk_config`, little-endian.
    pub fn config_space(&self) -> [u8; off::END] {
        let mut c = [0u8; off::END];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(
            off::CAPACITY,
            &(self.capacity() >> spec::SECTOR_SHIFT).to_le_bytes(),
        );
        put(off::SIZE_MAX, &SIZE_MAX.to_le_bytes());
        put(off::SEG_MAX, &self.seg_max.to_le_bytes());
        put(off::BLK_SIZE, &self.blk_size.to_le_bytes());
        // Physical blocks of 4 KiB (what filesystems and SSDs use); I/O is best in those units.
        let physical = self.blk_size.max(4096);
        put(
            off::PHYSICAL_BLOCK_EXP,
            &[(physical / self.blk_size).trailing_zeros() as u8],
        );
        put(off::ALIGNMENT_OFFSET, &[0]);
        put(
            off::MIN_IO_SIZE,
            &((physical / self.blk_size) as u16).to_le_bytes(),
        );
        put(off::OPT_IO_SIZE, &0u32.to_le_bytes());
        put(off::WRITEBACK, &[u8::from(self.writeback())]);
        put(off::NUM_QUEUES, &self.num_queues.to_le_bytes());
        if self.discard {
            put(off::MAX_DISCARD_SECTORS, &MAX_ZEROING_SECTORS.to_le_bytes());
            put(off::MAX_DISCARD_SEG, &MAX_ZEROING_SEGMENTS.to_le_bytes());
            put(
                off::DISCARD_SECTOR_ALIGNMENT,
                &(self.blk_size >> spec::SECTOR_SHIFT).to_le_bytes(),
            );
        }
        if self.write_zeroes {
            put(
                off::MAX_WRITE_ZEROES_SECTORS,
                &MAX_ZEROING_SECTORS.to_le_bytes(),
            );
            put(
                off::MAX_WRITE_ZEROES_SEG,
                &MAX_ZEROING_SEGMENTS.to_le_bytes(),
            );
            put(off::WRITE_ZEROES_MAY_UNMAP, &[u8::from(self.may_unmap)]);
        }
        c
    }

    /// Reads `data.len()` bytes at `offset`; bytes beyond the layout we know read as zero.
    pub fn read_config(&self, offset: u32, data: &mut [u8]) {
        let space = self.config_space();
        data.fill(0);
        let start = (offset as usize).min(space.len());
        let end = (offset as usize)
            .saturating_add(data.len())
            .min(space.len());
        data[..end - start].copy_from_slice(&space[start..end]);
    }

    /// A driver write to the config space: only `writeback` is writable, and only when
    /// VIRTIO_BLK_F_CONFIG_WCE was negotiated.
    pub fn write_config(&self, offset: u32, data: &[u8]) -> std::io::Result<()> {
        let wce =
            self.acked_features.load(Ordering::Relaxed) & bit(spec::VIRTIO_BLK_F_CONFIG_WCE) != 0;
        if offset as usize == off::WRITEBACK && data.len() == 1 && wce {
            let writeback = data[0] != 0;
            self.writeback.store(writeback, Ordering::Relaxed);
            tracing::info!(
                "driver set the write cache to {}",
                if writeback {
                    "write-back"
                } else {
                    "write-through"
                }
            );
            return Ok(());
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "config write of {} bytes at offset {offset} is not allowed",
                data.len()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{DiskSpec, OpenOptions};

    fn options() -> DeviceOptions {
        DeviceOptions {
            num_queues: 4,
            max_queue_size: 1024,
            blk_size: 4096,
            serial: Some("abc".into()),
            write_cache: true,
        }
    }

    #[test]
    fn config_space_layout() {
        let disk = Disk::open(&DiskSpec::Null { size: 1 << 30 }, OpenOptions::default()).unwrap();
        let config = BlockConfig::new(&disk, &options());
        let mut c = [0u8; 96];
        config.read_config(0, &mut c);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1u64 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(
            u32::from_le_bytes(c[40..44].try_into().unwrap()),
            MAX_ZEROING_SEGMENTS
        );
        assert!(c[60..].iter().all(|b| *b == 0));
        let mut part = [0u8; 2];
        config.read_config(34, &mut part);
        assert_eq!(u16::from_le_bytes(part), 4);
        assert_eq!(&config.serial[..4], b"abc\0");
        assert!(config.features() & bit(spec::VIRTIO_BLK_F_RO) == 0);
    }

    #[test]
    fn seg_max_fits_the_rings_frontends_set_up() {
        let disk = Disk::open(&DiskSpec::Null { size: 1 << 20 }, OpenOptions::default()).unwrap();
        // QEMU's vhost-user-blk and cloud-hypervisor use rings of 128 entries by default: a
        // request of seg_max data segments plus its header and status must fit one.
        for (max_queue_size, expected) in [(1024, 126), (256, 126), (128, 126), (64, 62), (2, 1)] {
            let config = BlockConfig::new(
                &disk,
                &DeviceOptions {
                    max_queue_size,
                    ..options()
                },
            );
            assert_eq!(config.seg_max, expected, "--queue-size {max_queue_size}");
            let mut c = [0u8; 4];
            config.read_config(off::SEG_MAX as u32, &mut c);
            assert_eq!(u32::from_le_bytes(c), expected);
        }
        let mut c = [0u8; 4];
        BlockConfig::new(&disk, &options()).read_config(off::SIZE_MAX as u32, &mut c);
        assert_eq!(u32::from_le_bytes(c), SIZE_MAX);
    }

    #[test]
    fn writeback_is_writable_only_after_wce_is_acked() {
        let disk = Disk::open(&DiskSpec::Null { size: 1 << 20 }, OpenOptions::default()).unwrap();
        let config = BlockConfig::new(&disk, &options());
        assert!(config.write_config(off::WRITEBACK as u32, &[0]).is_err());
        config.set_acked_features(config.features());
        config.write_config(off::WRITEBACK as u32, &[0]).unwrap();
        assert!(!config.writeback());
        assert!(config.write_config(0, &[0; 8]).is_err());
    }

    #[test]
    fn write_through_unless_the_cache_is_on_and_flush_negotiated() {
        let disk = Disk::open(&DiskSpec::Null { size: 1 << 20 }, OpenOptions::default()).unwrap();
        let config = BlockConfig::new(&disk, &options());
        // Features not negotiated yet: nothing may be left volatile.
        assert!(config.write_through());
        config.set_acked_features(config.features());
        assert!(!config.write_through());
        config.set_acked_features(config.features() & !bit(spec::VIRTIO_BLK_F_FLUSH));
        assert!(config.write_through(), "a driver that cannot flush");
        assert!(config.writeback(), "the setting itself is unchanged");
        config.set_acked_features(config.features());
        config.write_config(off::WRITEBACK as u32, &[0]).unwrap();
        assert!(config.write_through(), "the driver chose write-through");
    }

    #[test]
    fn read_only_disk_offers_ro_and_no_zeroing() {
        let disk = Disk::open(
            &DiskSpec::Null { size: 1 << 20 },
            OpenOptions {
                read_only: true,
                direct: false,
            },
        )
        .unwrap();
        let config = BlockConfig::new(&disk, &options());
        assert!(config.features() & bit(spec::VIRTIO_BLK_F_RO) != 0);
        assert!(config.features() & bit(spec::VIRTIO_BLK_F_DISCARD) == 0);
        assert!(config.features() & bit(spec::VIRTIO_BLK_F_WRITE_ZEROES) == 0);
    }
}
