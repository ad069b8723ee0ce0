//! Guest memory as the backend learns it: the whole table at once (SET_MEM_TABLE) or a region at
//! a time (ADD_MEM_REG, REM_MEM_REG), at start-up and as hot-plug, in line or in the background.

use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

use super::{PendingReply, Session, SessionError};
use crate::frontend::memory::{Arena, RegionSpec, RemovedRegion};

/// How guest memory is announced to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemAnnounce {
    /// One SET_MEM_TABLE with every region.
    SetMemTable,
    /// One ADD_MEM_REG per region (needs CONFIGURE_MEM_SLOTS).
    AddMemReg,
}

/// A SET_MEM_TABLE sent by [`Session::replace_regions_in_background`].
pub struct Replacement {
    pub reply: PendingReply<()>,
    /// The regions it dropped (mapped and open until dropped).
    pub removed: Vec<RemovedRegion>,
    /// An arena over each region it added.
    pub added: Vec<Arena>,
}

impl Session {
    pub(super) fn announce_memory(&mut self, how: MemAnnounce) -> Result<(), SessionError> {
        let regions = self.mem.region_infos()?;
        let fail = |source| SessionError::Vhost {
            step: format!("{how:?}"),
            source,
        };
        match how {
            MemAnnounce::SetMemTable => {
                self.frontend.set_mem_table(&regions).map_err(fail)?;
            }
            MemAnnounce::AddMemReg => {
                for r in &regions {
                    self.frontend.add_mem_region(r).map_err(fail)?;
                }
            }
        }
        Ok(())
    }

    /// Hot-plugs a region: maps a new memfd and tells the backend with ADD_MEM_REG or a full
    /// SET_MEM_TABLE, asking for a reply (if REPLY_ACK was acked) so the backend has applied it
    /// before the next request. Returns an arena over the new region.
    pub fn plug_region(
        &mut self,
        spec: RegionSpec,
        how: MemAnnounce,
    ) -> Result<Arena, SessionError> {
        let what = format!("plug {how:?} {:#x}", spec.guest_addr);
        self.guarded(&what, |s| s.with_reply(|s| s.plug_region_inner(spec, how)))
    }

    fn plug_region_inner(
        &mut self,
        spec: RegionSpec,
        how: MemAnnounce,
    ) -> Result<Arena, SessionError> {
        let info = self.mem.add_region(spec)?;
        let fail = |source| SessionError::Vhost {
            step: format!("plug {how:?} {:#x}", spec.guest_addr),
            source,
        };
        match how {
            MemAnnounce::SetMemTable => {
                let all = self.mem.region_infos()?;
                self.frontend.set_mem_table(&all).map_err(fail)?;
            }
            MemAnnounce::AddMemReg => {
                self.frontend.add_mem_region(&info).map_err(fail)?;
            }
        }
        Ok(Arena::over(spec))
    }

    /// Unplugs the region at `guest_addr` with REM_MEM_REG or a full SET_MEM_TABLE (with a reply,
    /// as for [`Session::plug_region`]). The returned region keeps the frontend's mapping and
    /// memfd alive until dropped, so a test can watch what happens to its pages afterwards.
    pub fn unplug_region(
        &mut self,
        guest_addr: u64,
        how: MemAnnounce,
    ) -> Result<RemovedRegion, SessionError> {
        let what = format!("unplug {how:?} {guest_addr:#x}");
        self.guarded(&what, |s| {
            s.with_reply(|s| s.unplug_region_inner(guest_addr, how))
        })
    }

    fn unplug_region_inner(
        &mut self,
        guest_addr: u64,
        how: MemAnnounce,
    ) -> Result<RemovedRegion, SessionError> {
        let removed = self.mem.remove_region(guest_addr)?;
        let fail = |source| SessionError::Vhost {
            step: format!("unplug {how:?} {guest_addr:#x}"),
            source,
        };
        match how {
            MemAnnounce::SetMemTable => {
                let all = self.mem.region_infos()?;
                self.frontend.set_mem_table(&all).map_err(fail)?;
            }
            MemAnnounce::AddMemReg => {
                let info = removed.info()?;
                self.frontend.remove_mem_region(&info).map_err(fail)?;
            }
        }
        Ok(removed)
    }

    /// REM_MEM_REG (with NEED_REPLY) for the region at `guest_addr`, sent in the background
    /// (see [`Session::send_in_background`]). The region leaves the frontend's guest memory at
    /// once; the returned [`RemovedRegion`] keeps its memfd and mapping for the test.
    pub fn remove_region_in_background(
        &mut self,
        guest_addr: u64,
    ) -> Result<(PendingReply<()>, RemovedRegion), SessionError> {
        let removed = self.mem.remove_region(guest_addr)?;
        let info = removed.info()?;
        let pending =
            self.send_in_background(&format!("REM_MEM_REG {guest_addr:#x}"), true, move |f| {
                f.remove_mem_region(&info)
            })?;
        Ok((pending, removed))
    }

    /// One SET_MEM_TABLE (with NEED_REPLY) that drops the regions starting at `remove` and adds
    /// fresh memfd regions `add`, keeping every other region as it was (same guest address,
    /// size and frontend address), sent in the background.
    pub fn replace_regions_in_background(
        &mut self,
        remove: &[u64],
        add: &[RegionSpec],
    ) -> Result<Replacement, SessionError> {
        let mut removed = Vec::with_capacity(remove.len());
        for &gpa in remove {
            removed.push(self.mem.remove_region(gpa)?);
        }
        for &spec in add {
            self.mem.add_region(spec)?;
        }
        let table = self.mem.region_infos()?;
        let pending = self.send_in_background("SET_MEM_TABLE", true, move |f| {
            f.set_mem_table(&table).map(|_| ())
        })?;
        Ok(Replacement {
            reply: pending,
            removed,
            added: add.iter().map(|&s| Arena::over(s)).collect(),
        })
    }
}
