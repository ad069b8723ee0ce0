//! cloud-hypervisor's vhost-user-blk frontend, message by message, for replay tests.
//!
//! cloud-hypervisor needs KVM, which the test machines lack, so its side of a vhost-user-blk disk
//! is replayed here from its source instead of run. Read for this (the v51 line, edition 2024):
//!
//! - `virtio-devices/src/vhost_user/blk.rs` and `mod.rs` of cloud-hypervisor/cloud-hypervisor at
//!   commit 01f937628bea785e8ae7e9b5adacb27e32f8c92d (main): `Blk::new`, the virtio and
//!   protocol features it offers, `VhostUserCommon::activate`/`add_memory_region` and
//!   `VhostUserEpollHandler::reconnect`;
//! - `virtio-devices/src/vhost_user/vu_common_ctrl.rs` as in cyberus-technology/cloud-hypervisor
//!   at ae51f1e40ad61b02ef1990db1a7a3fceb626f36a (a fork whose `cloud-hypervisor/Cargo.toml`
//!   says 51.1.0; the newest copy of that file available here), cross-checked against upstream
//!   copies at a423bf13ad41 and 00800b849985 (older, on vhost's `Master` API), which send the
//!   same messages in the same order;
//! - the `vhost` crate's `Frontend` (0.18 here; cloud-hypervisor pins 0.14), for what each call
//!   puts on the wire.
//!
//! What cloud-hypervisor sends for `--disk vhost_user=true,socket=S,num_queues=N`:
//!
//! ```text
//! Blk::new → negotiate_features_vhost_user
//!   SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES,
//!   SET_PROTOCOL_FEATURES(offered ∩ CONFIG|MQ|CONFIGURE_MEM_SLOTS|REPLY_ACK|INFLIGHT_SHMFD|LOG_SHMFD)
//!   — from here every message carries NEED_REPLY if REPLY_ACK was acked —
//!   GET_QUEUE_NUM (if MQ was acked; more disk queues than the answer is an error),
//!   GET_CONFIG(offset VHOST_USER_CONFIG_OFFSET = 0x100, size_of VirtioBlockConfig = 60, WRITABLE)
//! activate → setup_vhost_user
//!   SET_FEATURES(what the guest acked; PROTOCOL_FEATURES kept by cloud-hypervisor),
//!   SET_MEM_TABLE(every region)             — always, CONFIGURE_MEM_SLOTS or not,
//!   SET_VRING_NUM × N,
//!   [GET_INFLIGHT_FD, SET_INFLIGHT_FD]      — only if INFLIGHT_SHMFD was acked,
//!   per queue: SET_VRING_ADDR, SET_VRING_BASE(avail idx), SET_VRING_CALL, SET_VRING_KICK,
//!   SET_VRING_ENABLE(1) × N
//! memory hot-plug → add_memory_region
//!   ADD_MEM_REG(new region) if CONFIGURE_MEM_SLOTS was acked, else SET_MEM_TABLE(all)
//! guest writes `writeback` → write_config
//!   SET_CONFIG(offset 32 — the raw field offset, not 0x100 + 32 —, WRITABLE, 1 byte)
//! socket hang-up → reconnect → reinitialize_vhost_user (connect retried for up to 60 s)
//!   SET_OWNER, GET_FEATURES, SET_PROTOCOL_FEATURES(as acked before; no GET_PROTOCOL_FEATURES),
//!   then setup_vhost_user again as above (SET_FEATURES with the features acked before). No
//!   GET_QUEUE_NUM, no GET_CONFIG: cloud-hypervisor keeps what it learned the first time.
//! ```
//!
//! cloud-hypervisor never sends GET_MAX_MEM_SLOTS: it does not ask how many ADD_MEM_REGs the
//! backend takes. A Linux guest acks every device feature cloud-hypervisor offers, so the
//! features set are the backend's ∩ [`virtio_features`]. Not replayed: the blk device sets no
//! backend request channel (`SET_BACKEND_REQ_FD`), and dirty logging (`SET_LOG_BASE`) happens
//! only during a live migration.

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    VHOST_USER_CONFIG_OFFSET,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::{
    VIRTIO_F_IN_ORDER, VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_ORDER_PLATFORM, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::memory::RegionSpec;
use super::session::{MemAnnounce, SessionConfig, Step, BLK_CONFIG_LEN};

/// The release line the replay follows.
pub const VERSION: &str = "v51";

/// Byte offset of `writeback` in `struct virtio_blk_config`, where cloud-hypervisor's
/// `write_config` sends SET_CONFIG.
pub const WRITEBACK_OFFSET: u32 = 32;

/// cloud-hypervisor's default queue size for a disk (`--disk queue_size=`).
pub const QUEUE_SIZE: u16 = 128;

fn bit(b: u32) -> u64 {
    1u64 << b
}

/// `DEFAULT_VIRTIO_FEATURES` (mod.rs): what every vhost-user device offers.
pub const DEFAULT_VIRTIO_FEATURES: u64 = (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_F_IN_ORDER)
    | (1 << VIRTIO_F_ORDER_PLATFORM)
    | (1 << VIRTIO_F_NOTIFICATION_DATA)
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// The virtio features `Blk::new` offers (`avail_features`, without an IOMMU): the block
/// features it knows, MQ only for more than one queue, and [`DEFAULT_VIRTIO_FEATURES`].
pub fn virtio_features(num_queues: usize) -> u64 {
    let mut f = bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_GEOMETRY)
        | bit(VIRTIO_BLK_F_RO)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
        | bit(VIRTIO_BLK_F_DISCARD)
        | bit(VIRTIO_BLK_F_WRITE_ZEROES)
        | DEFAULT_VIRTIO_FEATURES;
    if num_queues > 1 {
        f |= bit(VIRTIO_BLK_F_MQ);
    }
    f
}

/// The protocol features `Blk::new` offers (`avail_protocol_features`).
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
}

/// A session that negotiates like cloud-hypervisor with `num_queues` queues of `queue_size`
/// over `memory` (one memfd per region, as cloud-hypervisor's `shared=on` memory has).
pub fn session_config(
    num_queues: usize,
    queue_size: u16,
    memory: Vec<RegionSpec>,
) -> SessionConfig {
    SessionConfig {
        num_queues,
        queue_size,
        memory,
        shared_memfd: false,
        features: virtio_features(num_queues),
        protocol_features: protocol_features(),
        ..SessionConfig::default()
    }
}

/// `setup_vhost_user` (vu_common_ctrl.rs): from SET_FEATURES to the last SET_VRING_ENABLE.
/// `features` is SET_FEATURES' value, `None` for the offered features the session acks.
fn setup(num_queues: usize, features: Option<u64>) -> Vec<Step> {
    let mut v = vec![
        match features {
            Some(f) => Step::SetFeaturesRaw(f),
            None => Step::SetFeatures,
        },
        Step::Memory(MemAnnounce::SetMemTable),
    ];
    v.extend((0..num_queues).map(Step::SetVringNum));
    v.push(Step::Inflight);
    for q in 0..num_queues {
        v.extend([
            Step::SetVringAddr(q),
            Step::SetVringBase(q),
            Step::SetVringCall(q),
            Step::SetVringKick(q),
        ]);
    }
    v.extend((0..num_queues).map(|q| Step::SetVringEnable(q, true)));
    v
}

impl Step {
    /// cloud-hypervisor v51 attaching a vhost-user-blk disk and the guest starting it:
    /// `Blk::new`, then `activate` (see the module docs for the sequence and its sources).
    /// Assumes the backend offers MQ (else cloud-hypervisor skips GET_QUEUE_NUM).
    pub fn cloud_hypervisor_v51(num_queues: usize) -> Vec<Step> {
        let mut v = vec![
            Step::SetOwner,
            Step::GetFeatures,
            Step::GetProtocolFeatures,
            Step::SetProtocolFeatures,
            Step::NeedReply,
            Step::GetQueueNum,
            Step::GetConfig {
                offset: VHOST_USER_CONFIG_OFFSET,
                size: BLK_CONFIG_LEN,
                flags: VhostUserConfigFlags::WRITABLE,
            },
        ];
        v.extend(setup(num_queues, None));
        v
    }

    /// cloud-hypervisor v51 after the socket hung up: `reinitialize_vhost_user` on the new
    /// connection, re-sending the features and protocol features it acked the first time.
    pub fn cloud_hypervisor_v51_reconnect(
        num_queues: usize,
        acked_features: u64,
        acked_protocol_features: VhostUserProtocolFeatures,
    ) -> Vec<Step> {
        let mut v = vec![
            Step::SetOwner,
            Step::GetFeatures,
            Step::SetProtocolFeaturesRaw(acked_protocol_features),
            Step::NeedReply,
        ];
        v.extend(setup(num_queues, Some(acked_features)));
        v
    }

    /// The guest switching the cache mode: `write_config` of the `writeback` byte.
    pub fn cloud_hypervisor_v51_writeback(on: bool) -> Step {
        Step::SetConfig {
            offset: WRITEBACK_OFFSET,
            data: vec![u8::from(on)],
            flags: VhostUserConfigFlags::WRITABLE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_mq_only_for_several_queues() {
        assert_eq!(virtio_features(1) & bit(VIRTIO_BLK_F_MQ), 0);
        assert_ne!(virtio_features(2) & bit(VIRTIO_BLK_F_MQ), 0);
        // GEOMETRY, RO and the transport bits above 32 are cloud-hypervisor's, whatever the
        // backend offers.
        assert_eq!(virtio_features(1) >> 32, 0b101_1001);
    }

    #[test]
    fn reconnect_skips_what_cloud_hypervisor_remembers() {
        let steps = Step::cloud_hypervisor_v51_reconnect(2, 1 << 32, protocol_features());
        assert!(!steps.iter().any(|s| matches!(
            s,
            Step::GetProtocolFeatures | Step::GetQueueNum | Step::GetConfig { .. }
        )));
        // ...and with INFLIGHT_SHMFD offered, the inflight region is fetched and set again.
        assert!(steps.iter().any(|s| matches!(s, Step::Inflight)));
        assert_eq!(steps.len(), 4 + 2 + 2 + 4 * 2 + 2 + 1);
        assert_eq!(Step::cloud_hypervisor(3), Step::cloud_hypervisor_v51(3));
    }
}
