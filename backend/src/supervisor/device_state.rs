//! Device state the supervisor keeps for a VMM's next worker: the write cache each of its
//! guests chose (the `writeback` config field), per VMM and export; and which exports each
//! VMM connected to, so that its next connection counts as a reconnect (metrics).
//!
//! The choice is the guest's, made once (at boot, or when an administrator changes the disk's
//! cache type), and VMMs do not send it again after a reconnect; a worker that crashed or was
//! killed took it along, and the next one would serve write-back to a guest that chose
//! write-through. So a worker reports each change ([`ToSupervisor::WriteCache`]) and the
//! supervisor hands the last one to the next worker with the connection
//! ([`ToWorker::Serve`]).
//!
//! What a worker reports is its tenant's word: it is taken only for a connection that worker
//! serves (so only for its own VMM), it is one bit, and the table is bounded: an entry per VMM
//! and export, forgotten when the VMM is gone, and at most [`MAX_ENTRIES`].
//!
//! [`ToSupervisor::WriteCache`]: crate::handoff::ToSupervisor::WriteCache
//! [`ToWorker::Serve`]: crate::handoff::ToWorker::Serve

use std::collections::{HashMap, HashSet};

/// A VMM: its pid and start time, as the VM table keys it.
type VmmKey = (i32, u64);

/// Most (VMM, export) pairs remembered. Past it, the entries of VMMs that have no worker now
/// (gone, or between a crash and their reconnect) make room; if that is not enough, a new
/// choice is not remembered.
pub(super) const MAX_ENTRIES: usize = 65536;

#[derive(Debug, Default)]
pub(super) struct DeviceState {
    write_cache: HashMap<(VmmKey, usize), bool>,
    connected: HashSet<(VmmKey, usize)>,
}

impl DeviceState {
    /// The write cache the guest of `vmm` last chose for export `export`, if it did.
    pub fn write_cache(&self, vmm: VmmKey, export: usize) -> Option<bool> {
        self.write_cache.get(&(vmm, export)).copied()
    }

    /// Remembers the guest's choice. `has_worker` says whether a VMM has a worker now (the
    /// entries of those that do not are dropped first when the table is full). Returns
    /// whether it is remembered.
    pub fn set_write_cache(
        &mut self,
        vmm: VmmKey,
        export: usize,
        on: bool,
        has_worker: impl Fn(VmmKey) -> bool,
    ) -> bool {
        let key = (vmm, export);
        if self.write_cache.len() >= MAX_ENTRIES && !self.write_cache.contains_key(&key) {
            self.write_cache.retain(|(v, _), _| has_worker(*v));
            if self.write_cache.len() >= MAX_ENTRIES {
                return false;
            }
        }
        self.write_cache.insert(key, on);
        true
    }

    /// Notes that `vmm` connected to `export`; returns whether it had before (a reconnect).
    /// Bounded like the write cache: when the table is full, VMMs without a worker make room,
    /// and if that is not enough the connection is not remembered.
    pub fn note_connection(
        &mut self,
        vmm: VmmKey,
        export: usize,
        has_worker: impl Fn(VmmKey) -> bool,
    ) -> bool {
        let key = (vmm, export);
        if self.connected.contains(&key) {
            return true;
        }
        if self.connected.len() >= MAX_ENTRIES {
            self.connected.retain(|(v, _)| has_worker(*v));
        }
        if self.connected.len() < MAX_ENTRIES {
            self.connected.insert(key);
        }
        false
    }

    /// Forgets everything about `vmm` (it exited).
    pub fn forget(&mut self, vmm: VmmKey) {
        self.write_cache.retain(|(v, _), _| *v != vmm);
        self.connected.retain(|(v, _)| *v != vmm);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.write_cache.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: VmmKey = (100, 1);
    const B: VmmKey = (200, 2);

    #[test]
    fn choices_are_per_vmm_and_export_and_forgotten_with_the_vmm() {
        let mut state = DeviceState::default();
        assert_eq!(state.write_cache(A, 0), None);
        assert!(state.set_write_cache(A, 0, false, |_| true));
        assert!(state.set_write_cache(A, 1, true, |_| true));
        assert!(state.set_write_cache(B, 0, true, |_| true));
        assert_eq!(state.write_cache(A, 0), Some(false));
        assert_eq!(state.write_cache(A, 1), Some(true));
        assert_eq!(state.write_cache(B, 0), Some(true));
        assert!(state.set_write_cache(A, 0, true, |_| true));
        assert_eq!(
            state.write_cache(A, 0),
            Some(true),
            "the last choice counts"
        );
        state.forget(A);
        assert_eq!(
            (state.write_cache(A, 0), state.write_cache(A, 1)),
            (None, None)
        );
        assert_eq!(state.write_cache(B, 0), Some(true));
    }

    #[test]
    fn reconnects_are_per_vmm_and_export_and_forgotten_with_the_vmm() {
        let mut state = DeviceState::default();
        assert!(!state.note_connection(A, 0, |_| true));
        assert!(state.note_connection(A, 0, |_| true));
        assert!(!state.note_connection(A, 1, |_| true));
        assert!(!state.note_connection(B, 0, |_| true));
        state.forget(A);
        assert!(!state.note_connection(A, 0, |_| true));
        assert!(state.note_connection(B, 0, |_| true));
    }

    #[test]
    fn the_table_is_bounded() {
        let mut state = DeviceState::default();
        for pid in 0..MAX_ENTRIES as i32 {
            assert!(state.set_write_cache((pid, 0), 0, false, |_| true));
        }
        // Full, and every VMM has a worker: a new one is not remembered, a known one is.
        assert!(!state.set_write_cache(B, 0, false, |_| true));
        assert!(state.set_write_cache((7, 0), 0, true, |_| true));
        assert_eq!(state.len(), MAX_ENTRIES);
        // VMMs without a worker make room.
        assert!(state.set_write_cache(B, 0, false, |(pid, _)| pid < 10));
        assert_eq!(state.len(), 11);
        assert_eq!(state.write_cache((7, 0), 0), Some(true));
    }
}
