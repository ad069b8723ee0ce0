//! The `memory` target: a VMM's memory tables — SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG and
//! disconnects, with any guest addresses, sizes, frontend addresses and file offsets — against
//! [`GuestMemoryHandle`] (vhost_user/memory.rs), with requests holding pinned buffers across
//! the changes as queue threads do.
//!
//! Checked after every step:
//! - the current table's regions do not overlap, and each is mapped for its whole size (its
//!   first and last bytes are written: a short mapping faults);
//! - a refused message leaves the current table as it was;
//! - every region of the table a message leaves is pinnable (not retiring);
//! - a frontend address that translates ([`Generation::vmm_to_guest`]) lands in guest memory;
//! - buffers pinned earlier stay mapped and writable whatever the table became since (their
//!   generation keeps the mappings).
//!
//! Regions whose memfd is shorter than the region (picked by an odd frontend address) must be
//! refused; a refused SET_MEM_TABLE must leave the table before it serving.

use std::sync::Arc;

use arbitrary::{Result, Unstructured};
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};
use vublk::vhost_user::{Generation, GuestBuffers, GuestMemoryHandle, RawBuffers};

/// Steps per input.
const MAX_STEPS: usize = 32;
/// Regions per SET_MEM_TABLE (the vhost crate's message limit is 8).
const MAX_TABLE: usize = 8;
/// Buffers held at once.
const MAX_HELD: usize = 16;

/// Runs one input.
pub fn run(data: &[u8]) {
    let _ = steps(&mut Unstructured::new(data));
}

fn address(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0u8..=3)? {
        0 => u64::from(u.arbitrary::<u16>()?) << 12,
        1 => u64::from(u.arbitrary::<u32>()?),
        2 => u64::MAX - u64::from(u.arbitrary::<u32>()?),
        _ => u.arbitrary()?,
    })
}

fn size(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0u8..=3)? {
        0 => u64::from(u.int_in_range(1u8..=16)?) << 12,
        1 => u64::from(u.arbitrary::<u16>()?),
        2 => u64::from(u.arbitrary::<u32>()?),
        _ => u.arbitrary()?,
    })
}

fn offset(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0u8..=2)? {
        0 => 0,
        1 => u64::from(u.arbitrary::<u8>()?) << 12,
        _ => u.arbitrary()?,
    })
}

/// A region and a memfd covering it, or `None` when no memfd can be that large.
fn region(u: &mut Unstructured<'_>) -> Result<Option<(VhostUserMemoryRegion, std::fs::File)>> {
    let region = VhostUserMemoryRegion::new(address(u)?, size(u)?, address(u)?, offset(u)?);
    // A frontend address with its low bit set (it means nothing to the backend) picks an
    // empty memfd: a region longer than its file must be refused, never mapped.
    let file = if region.user_addr & 1 == 1 {
        crate::memfd(0)
    } else {
        region
            .mmap_offset
            .checked_add(region.memory_size)
            .and_then(crate::memfd)
    };
    Ok(file.map(|f| (region, f)))
}

fn steps(u: &mut Unstructured<'_>) -> Result<()> {
    let handle = GuestMemoryHandle::default();
    let mut held: Vec<GuestBuffers> = Vec::new();
    for _ in 0..MAX_STEPS {
        if u.is_empty() {
            break;
        }
        let before = handle.current();
        let changed = match u.int_in_range(0u8..=5)? {
            0 => {
                let n = u.int_in_range(0..=MAX_TABLE)?;
                let mut table = Vec::new();
                let mut files = Vec::new();
                for _ in 0..n {
                    if let Some((r, f)) = region(u)? {
                        table.push(r);
                        files.push(f);
                    }
                }
                let result = handle.set_table(&table, files);
                if let Ok((generation, _)) = &result {
                    assert_eq!(generation.memory().num_regions(), table.len());
                } else {
                    // A refused table leaves the one before it serving.
                    check_held(&held);
                }
                Some(result.is_ok())
            }
            1 => region(u)?.map(|(r, f)| handle.add_region(&r, f).is_ok()),
            2 => {
                // An existing region most of the time, anything otherwise.
                let regions = regions(&before);
                let r = if !regions.is_empty() && u.arbitrary()? {
                    let (gpa, size) = regions[u.choose_index(regions.len())?];
                    VhostUserMemoryRegion::new(gpa, size, 0, 0)
                } else {
                    VhostUserMemoryRegion::new(address(u)?, size(u)?, 0, 0)
                };
                Some(handle.remove_region(&r).is_ok())
            }
            3 => {
                let retiring = handle.clear();
                assert_eq!(retiring.pins.len(), before.memory().num_regions());
                assert!(handle.current().is_empty());
                Some(true)
            }
            4 => {
                if held.len() < MAX_HELD {
                    if let Some(buffers) = pin_some(u, &before)? {
                        held.push(buffers);
                    }
                } else {
                    held.remove(0);
                }
                None
            }
            _ => {
                let vmm_addr = address(u)?;
                if let Ok(gpa) = before.vmm_to_guest(vmm_addr) {
                    assert!(
                        before.memory().find_region(gpa).is_some(),
                        "frontend address {vmm_addr:#x} translated to {gpa:?}, outside guest memory"
                    );
                }
                None
            }
        };
        let current = handle.current();
        match changed {
            Some(false) => {
                assert!(
                    Arc::ptr_eq(&before, &current),
                    "a refused message changed the memory table"
                );
                check_table(&current);
            }
            Some(true) => check_table(&current),
            None => {}
        }
        check_held(&held);
    }
    Ok(())
}

/// `(guest address, size)` of each region of a generation.
fn regions(generation: &Generation) -> Vec<(u64, u64)> {
    generation
        .memory()
        .iter()
        .map(|r| (r.start_addr().raw_value(), r.len()))
        .collect()
}

/// The table is consistent, mapped for its whole size, and nothing in it is retiring.
fn check_table(generation: &Arc<Generation>) {
    let mut regions = regions(generation);
    regions.sort();
    for pair in regions.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        assert!(
            a.0.checked_add(a.1).is_some_and(|end| end <= b.0),
            "regions overlap: {a:x?} and {b:x?}"
        );
    }
    let mem = generation.memory();
    for &(gpa, size) in &regions {
        for at in [gpa, gpa + size - 1] {
            mem.write_obj(0xa5u8, GuestAddress(at))
                .expect("a byte inside a region is writable");
        }
        let host = mem
            .get_host_address(GuestAddress(gpa))
            .expect("the region's host address");
        let buffers = pin(generation, host as usize, 1);
        assert!(
            buffers.is_complete(),
            "the region at {gpa:#x} of the current table cannot be pinned (retiring)"
        );
    }
}

fn pin(generation: &Arc<Generation>, host: usize, len: usize) -> GuestBuffers {
    let mut raw = RawBuffers::default();
    raw.iovecs_mut().push(libc::iovec {
        iov_base: host as *mut libc::c_void,
        iov_len: len,
    });
    generation.pin(raw, Some(host as *const u8))
}

/// Buffers of a request inside one region of `generation`, if it has one and the region can
/// be pinned.
fn pin_some(
    u: &mut Unstructured<'_>,
    generation: &Arc<Generation>,
) -> Result<Option<GuestBuffers>> {
    let regions = regions(generation);
    if regions.is_empty() {
        return Ok(None);
    }
    let (gpa, size) = regions[u.choose_index(regions.len())?];
    let start = u.int_in_range(0..=size - 1)?;
    let len = u.int_in_range(1..=(size - start).min(1 << 16))?;
    let region = generation
        .memory()
        .find_region(GuestAddress(gpa))
        .expect("a region of the table");
    let host = region
        .get_host_address(MemoryRegionAddress(start))
        .expect("inside the region") as usize;
    let buffers = pin(generation, host, len as usize);
    Ok(buffers.is_complete().then_some(buffers))
}

/// Every held request's buffers are still mapped: writing them must not fault.
fn check_held(held: &[GuestBuffers]) {
    for buffers in held {
        for v in buffers.iovecs() {
            let base = v.iov_base.cast::<u8>();
            // SAFETY: `buffers` pins its regions and keeps its generation (and so the mappings)
            // alive: this is the invariant being checked.
            unsafe {
                base.write_volatile(0x5a);
                base.add(v.iov_len - 1).write_volatile(0x5a);
            }
        }
    }
}
