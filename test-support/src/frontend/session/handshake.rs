//! The handshake as steps: one [`Step`] per vhost-user message, the sequences QEMU and
//! cloud-hypervisor send, and what the session learns from each reply (features, protocol
//! features, queue number, memory slots, device config, vring base).

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVringAddrFlags,
};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

use super::{MemAnnounce, Session, SessionError};
use crate::frontend::BlkConfig;

/// Size of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding: what QEMU
/// and cloud-hypervisor ask for.
pub const BLK_CONFIG_LEN: u32 = 60;

/// One frontend action; almost all are exactly one vhost-user message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    SetOwner,
    ResetOwner,
    GetFeatures,
    /// SET_FEATURES with `offered & config.features`.
    SetFeatures,
    /// SET_FEATURES with exactly these bits.
    SetFeaturesRaw(u64),
    GetProtocolFeatures,
    /// SET_PROTOCOL_FEATURES with `offered & config.protocol_features`.
    SetProtocolFeatures,
    /// SET_PROTOCOL_FEATURES with exactly these bits (no GET_PROTOCOL_FEATURES needed first:
    /// cloud-hypervisor re-sends what it acked before when it reconnects).
    SetProtocolFeaturesRaw(VhostUserProtocolFeatures),
    /// No message: from now on every request carries NEED_REPLY if REPLY_ACK was acked
    /// (cloud-hypervisor does this right after negotiation).
    NeedReply,
    GetQueueNum,
    GetMaxMemSlots,
    GetConfig {
        offset: u32,
        size: u32,
        flags: VhostUserConfigFlags,
    },
    /// SET_CONFIG of `data` at `offset` (the driver writing a config field).
    SetConfig {
        offset: u32,
        data: Vec<u8>,
        flags: VhostUserConfigFlags,
    },
    /// Announce all current regions the given way.
    Memory(MemAnnounce),
    /// Announce memory as ADD_MEM_REG if CONFIGURE_MEM_SLOTS was acked, else SET_MEM_TABLE.
    MemoryPreferSlots,
    /// If INFLIGHT_SHMFD was acked: GET_INFLIGHT_FD (the first time only; the region is kept
    /// across reconnects, as VMMs keep it) for every queue, then SET_INFLIGHT_FD with it.
    Inflight,
    SetVringNum(usize),
    /// SET_VRING_BASE with the driver's current avail index.
    SetVringBase(usize),
    SetVringAddr(usize),
    /// SET_VRING_ADDR with VHOST_VRING_F_LOG and the used ring as the log address: what QEMU
    /// sends to a running ring when a migration starts.
    SetVringAddrLog(usize),
    SetVringKick(usize),
    SetVringCall(usize),
    SetVringErr(usize),
    SetVringEnable(usize, bool),
    GetVringBase(usize),
    /// The inner step with NEED_REPLY set on its message if REPLY_ACK was acked, the way QEMU
    /// flags SET_MEM_TABLE: the frontend waits until the backend has applied it.
    WithReply(Box<Step>),
}

impl Step {
    /// Roughly QEMU 8-10's vhost-user-blk: realize (vhost_dev_init, config read at offset 0),
    /// then vhost_dev_start. Only SET_MEM_TABLE asks for a reply, as in QEMU.
    pub fn qemu(num_queues: usize) -> Vec<Step> {
        let mut v = vec![
            Step::GetFeatures,
            Step::GetProtocolFeatures,
            Step::SetProtocolFeatures,
            Step::GetQueueNum,
            Step::GetMaxMemSlots,
            Step::SetOwner,
            Step::GetFeatures,
            Step::GetConfig {
                offset: 0,
                size: BLK_CONFIG_LEN,
                flags: VhostUserConfigFlags::empty(),
            },
            Step::SetFeatures,
            Step::WithReply(Box::new(Step::Memory(MemAnnounce::SetMemTable))),
        ];
        v.extend(Step::vrings(num_queues));
        v
    }

    /// QEMU's vring setup: per queue NUM, BASE, ADDR, KICK and CALL, then every queue enabled.
    fn vrings(num_queues: usize) -> impl Iterator<Item = Step> {
        (0..num_queues)
            .flat_map(|q| {
                [
                    Step::SetVringNum(q),
                    Step::SetVringBase(q),
                    Step::SetVringAddr(q),
                    Step::SetVringKick(q),
                    Step::SetVringCall(q),
                ]
            })
            .chain((0..num_queues).map(|q| Step::SetVringEnable(q, true)))
    }

    /// cloud-hypervisor's vhost-user-blk: `Blk::new` (negotiate_features_vhost_user, queue
    /// number, GET_CONFIG at VHOST_USER_CONFIG_OFFSET with WRITABLE), then activate
    /// (setup_vhost_user: SET_FEATURES, memory, all SET_VRING_NUMs, then per queue ADDR, BASE,
    /// CALL, KICK, then all SET_VRING_ENABLEs). Every message after negotiation asks for a reply.
    /// The same as [`Step::cloud_hypervisor_v51`], where the source it follows is cited.
    pub fn cloud_hypervisor(num_queues: usize) -> Vec<Step> {
        Step::cloud_hypervisor_v51(num_queues)
    }

    /// Negotiation only: features, protocol features, queue number, NEED_REPLY.
    pub fn negotiate() -> Vec<Step> {
        vec![
            Step::SetOwner,
            Step::GetFeatures,
            Step::GetProtocolFeatures,
            Step::SetProtocolFeatures,
            Step::NeedReply,
            Step::GetQueueNum,
        ]
    }

    /// Negotiation, then SET_FEATURES: what makes the config space's writeback byte writable
    /// (CONFIG_WCE acked), with no queue started.
    pub fn negotiate_features() -> Vec<Step> {
        let mut steps = Step::negotiate();
        steps.push(Step::SetFeatures);
        steps
    }

    /// Everything after negotiation needed to start all queues, announcing memory `how`.
    pub fn start(num_queues: usize, how: MemAnnounce) -> Vec<Step> {
        let mut v = vec![Step::SetFeatures, Step::Memory(how)];
        v.extend(Step::vrings(num_queues));
        v
    }
}

impl Session {
    /// Runs `steps` in order, stopping at the first failure.
    pub fn run(&mut self, steps: &[Step]) -> Result<(), SessionError> {
        steps.iter().try_for_each(|s| self.step(s))
    }

    /// Runs one step.
    pub fn step(&mut self, step: &Step) -> Result<(), SessionError> {
        self.guarded(&format!("{step:?}"), |s| s.step_inner(step))
    }

    fn step_inner(&mut self, step: &Step) -> Result<(), SessionError> {
        let fail = |source: vhost::Error| SessionError::Vhost {
            step: format!("{step:?}"),
            source,
        };
        match *step {
            Step::SetOwner => self.frontend.set_owner().map_err(fail)?,
            Step::ResetOwner => self.frontend.reset_owner().map_err(fail)?,
            Step::GetFeatures => {
                self.backend_features = self.frontend.get_features().map_err(fail)?
            }
            Step::SetFeatures => {
                let acked = self.backend_features & self.config.features;
                self.frontend.set_features(acked).map_err(fail)?;
                self.acked_features = acked;
            }
            Step::SetFeaturesRaw(bits) => {
                self.frontend.set_features(bits).map_err(fail)?;
                self.acked_features = bits;
            }
            Step::GetProtocolFeatures => {
                self.backend_protocol_features =
                    self.frontend.get_protocol_features().map_err(fail)?;
            }
            Step::SetProtocolFeatures => {
                let acked = self.backend_protocol_features & self.config.protocol_features;
                self.frontend.set_protocol_features(acked).map_err(fail)?;
                self.acked_protocol_features = acked;
            }
            Step::SetProtocolFeaturesRaw(bits) => {
                self.frontend.set_protocol_features(bits).map_err(fail)?;
                self.acked_protocol_features = bits;
            }
            Step::Inflight => {
                if !self
                    .acked_protocol_features
                    .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
                {
                    return Ok(());
                }
                if self.inflight.is_none() {
                    let ask = vhost::vhost_user::message::VhostUserInflight {
                        mmap_size: 0,
                        mmap_offset: 0,
                        num_queues: self.config.num_queues as u16,
                        queue_size: self.config.queue_size,
                    };
                    self.inflight = Some(self.frontend.get_inflight_fd(&ask).map_err(fail)?);
                }
                if let Some((region, file)) = &self.inflight {
                    use std::os::fd::AsRawFd;
                    self.frontend
                        .set_inflight_fd(region, file.as_raw_fd())
                        .map_err(fail)?;
                }
            }
            Step::NeedReply => {
                if self.reply_ack() {
                    self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
                    self.need_reply_always = true;
                }
            }
            Step::GetQueueNum => {
                self.queue_num = Some(self.frontend.get_queue_num().map_err(fail)?)
            }
            Step::GetMaxMemSlots => {
                self.max_mem_slots = Some(self.frontend.get_max_mem_slots().map_err(fail)?)
            }
            Step::GetConfig {
                offset,
                size,
                flags,
            } => {
                let buf = vec![0u8; size as usize];
                let (_, payload) = self
                    .frontend
                    .get_config(offset, size, flags, &buf)
                    .map_err(fail)?;
                self.last_config = Some(payload);
            }
            Step::SetConfig {
                offset,
                ref data,
                flags,
            } => self
                .frontend
                .set_config(offset, flags, data)
                .map_err(fail)?,
            Step::Memory(how) => self.announce_memory(how).map_err(|e| match e {
                SessionError::Vhost { source, .. } => fail(source),
                other => other,
            })?,
            Step::MemoryPreferSlots => {
                let how = if self
                    .acked_protocol_features
                    .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
                {
                    MemAnnounce::AddMemReg
                } else {
                    MemAnnounce::SetMemTable
                };
                self.step_inner(&Step::Memory(how))?;
                return Ok(());
            }
            Step::SetVringNum(q) => {
                let size = self.vring(q)?.queue.size();
                self.frontend.set_vring_num(q, size).map_err(fail)?;
            }
            Step::SetVringBase(q) => {
                let base = self.vring(q)?.queue.avail_idx();
                self.frontend.set_vring_base(q, base).map_err(fail)?;
            }
            Step::SetVringAddr(q) => {
                let data = self.vring(q)?.queue.config_data(&self.mem)?;
                self.frontend.set_vring_addr(q, &data).map_err(fail)?;
            }
            Step::SetVringAddrLog(q) => {
                let mut data = self.vring(q)?.queue.config_data(&self.mem)?;
                data.flags |= VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits();
                data.log_addr = Some(self.vring(q)?.queue.used_ring());
                self.frontend.set_vring_addr(q, &data).map_err(fail)?;
            }
            Step::SetVringKick(q) => {
                let vr = self.vrings.get(q).ok_or(SessionError::NoQueue(q))?;
                self.frontend.set_vring_kick(q, &vr.kick).map_err(fail)?;
            }
            Step::SetVringCall(q) => {
                let vr = self.vrings.get(q).ok_or(SessionError::NoQueue(q))?;
                self.frontend.set_vring_call(q, &vr.call).map_err(fail)?;
            }
            Step::SetVringErr(q) => {
                let vr = self.vrings.get(q).ok_or(SessionError::NoQueue(q))?;
                self.frontend.set_vring_err(q, &vr.err).map_err(fail)?;
            }
            Step::SetVringEnable(q, on) => self.frontend.set_vring_enable(q, on).map_err(fail)?,
            Step::GetVringBase(q) => {
                self.last_vring_base = Some(self.frontend.get_vring_base(q).map_err(fail)?)
            }
            Step::WithReply(ref inner) => {
                self.with_reply(|s| s.step_inner(inner))?;
                return Ok(());
            }
        }
        self.sent.push(step.clone());
        Ok(())
    }

    pub(super) fn reply_ack(&self) -> bool {
        self.acked_protocol_features
            .contains(VhostUserProtocolFeatures::REPLY_ACK)
    }

    /// Runs `f` with NEED_REPLY on every message it sends (if REPLY_ACK was acked).
    pub(super) fn with_reply<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, SessionError>,
    ) -> Result<T, SessionError> {
        if self.reply_ack() {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let r = f(self);
        if !self.need_reply_always {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        }
        r
    }

    /// GET_CONFIG, returning the payload.
    pub fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>, SessionError> {
        self.step(&Step::GetConfig {
            offset,
            size,
            flags,
        })?;
        Ok(self.last_config.clone().unwrap_or_default())
    }

    /// GET_CONFIG of the whole virtio-blk config space, parsed.
    pub fn blk_config(&mut self) -> Result<BlkConfig, SessionError> {
        let raw = self.get_config(0, BLK_CONFIG_LEN, VhostUserConfigFlags::empty())?;
        Ok(BlkConfig::parse(&raw))
    }

    /// SET_LOG_BASE with the dirty log in `log` (`size` bytes at `offset`), as QEMU sends it
    /// with LOG_SHMFD: the frontend waits for the backend's reply.
    pub fn set_log_base(
        &mut self,
        log: std::os::fd::BorrowedFd<'_>,
        size: u64,
        offset: u64,
    ) -> Result<(), SessionError> {
        use std::os::fd::AsRawFd;
        let region = vhost::VhostUserDirtyLogRegion {
            mmap_size: size,
            mmap_offset: offset,
            mmap_handle: log.as_raw_fd(),
        };
        self.guarded("SET_LOG_BASE", |s| {
            s.frontend
                .set_log_base(0, Some(region))
                .map_err(|source| SessionError::Vhost {
                    step: "SET_LOG_BASE".into(),
                    source,
                })
        })
    }

    /// Features from the last GET_FEATURES.
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// Features sent in the last SET_FEATURES.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Protocol features from the last GET_PROTOCOL_FEATURES.
    pub fn backend_protocol_features(&self) -> VhostUserProtocolFeatures {
        self.backend_protocol_features
    }

    /// Protocol features sent in the last SET_PROTOCOL_FEATURES.
    pub fn acked_protocol_features(&self) -> VhostUserProtocolFeatures {
        self.acked_protocol_features
    }

    /// Reply to the last GET_QUEUE_NUM.
    pub fn queue_num(&self) -> Option<u64> {
        self.queue_num
    }

    /// Reply to the last GET_MAX_MEM_SLOTS.
    pub fn max_mem_slots(&self) -> Option<u64> {
        self.max_mem_slots
    }

    /// Payload of the last GET_CONFIG.
    pub fn last_config(&self) -> Option<&[u8]> {
        self.last_config.as_deref()
    }

    /// Reply to the last GET_VRING_BASE.
    pub fn last_vring_base(&self) -> Option<u32> {
        self.last_vring_base
    }

    /// Steps completed so far, in order.
    pub fn sent(&self) -> &[Step] {
        &self.sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_sets_up_each_vring_in_turn_then_enables_them_all() {
        let steps = Step::start(2, MemAnnounce::AddMemReg);
        assert_eq!(
            steps,
            [
                Step::SetFeatures,
                Step::Memory(MemAnnounce::AddMemReg),
                Step::SetVringNum(0),
                Step::SetVringBase(0),
                Step::SetVringAddr(0),
                Step::SetVringKick(0),
                Step::SetVringCall(0),
                Step::SetVringNum(1),
                Step::SetVringBase(1),
                Step::SetVringAddr(1),
                Step::SetVringKick(1),
                Step::SetVringCall(1),
                Step::SetVringEnable(0, true),
                Step::SetVringEnable(1, true),
            ]
        );
        let qemu = Step::qemu(2);
        assert_eq!(qemu[qemu.len() - 12..], steps[2..]);
    }
}
