//! What the frontend offers the backend and builds for it: the features its driver honours,
//! the protocol features it acks, guest memory and the vrings.

use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_config::{VIRTIO_F_ANY_LAYOUT, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::frontend::memory::RegionSpec;

/// Virtio features this frontend's driver can honour: every device-specific bit (0..=23),
/// indirect descriptors, event index, VERSION_1, ANY_LAYOUT and vhost-user's PROTOCOL_FEATURES.
/// Not PACKED, IN_ORDER, ACCESS_PLATFORM and friends, which the driver does not implement.
pub const DRIVER_FEATURES: u64 = 0x00ff_ffff
    | (1 << VIRTIO_F_ANY_LAYOUT)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_F_VERSION_1)
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// What the frontend offers and builds.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Vrings set up by the vring steps (and created in guest memory).
    pub num_queues: usize,
    /// Entries per vring.
    pub queue_size: u16,
    /// Guest RAM layout.
    pub memory: Vec<RegionSpec>,
    /// Back all regions with one memfd at consecutive offsets (exercises `mmap_offset`).
    pub shared_memfd: bool,
    /// Virtio features the frontend acks if offered.
    pub features: u64,
    /// Protocol features the frontend acks if offered.
    pub protocol_features: VhostUserProtocolFeatures,
    /// How long one step may take before the frontend gives up: the socket is shut down so the
    /// step fails instead of hanging (a backend that never answers must fail a test, not hang
    /// it). `None` waits forever.
    pub reply_timeout: Option<Duration>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            num_queues: 1,
            queue_size: 128,
            memory: vec![RegionSpec::new(0, 16 << 20)],
            shared_memfd: false,
            features: DRIVER_FEATURES,
            protocol_features: VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
            reply_timeout: Some(Duration::from_secs(10)),
        }
    }
}
