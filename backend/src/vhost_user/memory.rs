//! Guest memory tables as generations, and regions with explicit lifetimes.
//!
//! Every memory table the frontend installs (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG) becomes a
//! new [`Generation`] with its own id. Queue threads load the current generation and parse each
//! chain against it; [`Generation::pin`] turns what the parser found into the request's
//! [`GuestBuffers`] (buffers.rs), which keep an `Arc` of the generation until the request's
//! completion is written back. A mapping is unmapped when the last generation holding its
//! region is dropped, so it can never go away under an in-flight I/O.
//!
//! On top of that, each region has a [`RegionPin`]: a count of the in-flight requests whose
//! buffers (or status byte) lie in it, and a `retiring` flag. It is what makes retiring
//! memory wait for exactly the requests that use it:
//!
//! - a request pins every region it touches (`RegionPin::try_pin`, through
//!   [`Generation::pin`]), which fails once the region is retiring (the kernel's `mmget_not_zero`): increment, then check the flag;
//! - the session retiring a region (REM_MEM_REG, a SET_MEM_TABLE that drops it, disconnect)
//!   sets the flag, then waits for the count to reach zero: set, then check the count.
//!
//! Either the request sees the flag and backs off, or the session sees the request and waits
//! for it (a Dekker handshake, model-checked with loom: see pin.rs).

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use thiserror::Error;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use crate::ratelimit::vmm_line;

pub use super::buffers::{GuestBuffers, RawBuffers, StatusByte};
pub use super::pin::RegionPin;

/// The memory slots we accept with CONFIGURE_MEM_SLOTS (the kernel's vhost limit, which QEMU
/// and cloud-hypervisor are used to): ADD_MEM_REG past it is refused.
pub const MAX_MEM_SLOTS: usize = 509;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot map guest memory region at guest address {gpa:#x} ({size:#x} bytes)")]
    Map {
        gpa: u64,
        size: u64,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("guest memory regions overlap or are invalid")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    #[error("no guest memory region at guest address {gpa:#x} with size {size:#x}")]
    NoSuchRegion { gpa: u64, size: u64 },
    #[error("frontend address {0:#x} is not inside any guest memory region")]
    UnmappedVmmAddress(u64),
    #[error("the region at guest address {gpa:#x} has size 0 or wraps around")]
    BadRegion { gpa: u64 },
    #[error("the table has {MAX_MEM_SLOTS} regions already, the most we offered")]
    TooManyRegions,
    #[error("cannot stat the file of the region at guest address {gpa:#x}")]
    Stat {
        gpa: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the region at guest address {gpa:#x} ends at byte {end:#x} of its file, \
         which has {file_len:#x} bytes"
    )]
    ShortFile { gpa: u64, end: u64, file_len: u64 },
}

/// How one region appears to the frontend, to translate the vring addresses it sends (its own
/// virtual addresses) into guest physical addresses.
#[derive(Debug, Clone)]
struct RegionInfo {
    guest_phys_addr: u64,
    size: u64,
    user_addr: u64,
    /// Declared before `mapping`: the last `RegionInfo` holding both unregisters the range
    /// from the SIGBUS handler before it unmaps it.
    guard: Arc<RegionGuard>,
    mapping: Arc<GuestRegionMmap>,
    pin: Arc<RegionPin>,
}

/// A region's mapping registered with the SIGBUS handler (`sigbus.rs`): the frontend may
/// truncate the file under it after SET_MEM_TABLE was checked, and an access past the new end
/// must not kill the process. The missing pages read as zeroes from then on.
#[derive(Debug)]
struct RegionGuard {
    gpa: u64,
    /// `None` when the handler's table is full: the region is served unguarded.
    guard: Option<crate::sigbus::Guard>,
}

impl RegionGuard {
    fn intact(&self) -> bool {
        self.guard.as_ref().is_none_or(|g| g.intact())
    }
}

impl Drop for RegionGuard {
    fn drop(&mut self) {
        if !self.intact() {
            vmm_line!(
                warn,
                "the frontend truncated the file of guest memory region {:#x} while it was \
                 mapped; its missing pages were replaced with zeroes",
                self.gpa
            );
        }
    }
}

impl RegionInfo {
    fn same_place(&self, other: &VhostUserMemoryRegion) -> bool {
        self.guest_phys_addr == other.guest_phys_addr
            && self.size == other.memory_size
            && self.user_addr == other.user_addr
    }
}

/// Regions taken out of service: the caller waits for their pins to drop before replying.
#[derive(Debug, Default)]
pub struct Retiring {
    pub pins: Vec<Arc<RegionPin>>,
}

/// Counters for `vublk status` and the logs.
#[derive(Debug, Default)]
pub struct MemoryStats {
    pub retire_waits: AtomicU64,
    pub longest_retire_wait_us: AtomicU64,
    pub cancelled: AtomicU64,
}

/// A snapshot of a device's memory lifetimes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryStatus {
    pub generation: u64,
    /// Generations still alive (current, or pinned by requests), and their pins.
    pub live: Vec<(u64, usize)>,
    pub retire_waits: u64,
    pub longest_retire_wait_us: u64,
    pub cancelled: u64,
}

/// One memory table.
#[derive(Debug)]
pub struct Generation {
    id: u64,
    mem: GuestMemoryMmap,
    regions: Vec<RegionInfo>,
}

impl Generation {
    fn build(id: u64, mut regions: Vec<RegionInfo>) -> Result<Generation, MemoryError> {
        regions.sort_by_key(|r| r.guest_phys_addr);
        // Removing the last region leaves an empty table, which vm-memory cannot build.
        let mem = if regions.is_empty() {
            GuestMemoryMmap::new()
        } else {
            GuestMemoryMmap::from_arc_regions(regions.iter().map(|r| r.mapping.clone()).collect())
                .map_err(MemoryError::Layout)?
        };
        Ok(Generation { id, mem, regions })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The index of the region whose mapping holds host addresses `[start, start + len)`.
    pub(super) fn region_index(&self, start: usize, len: usize) -> Option<usize> {
        self.regions.iter().position(|r| {
            let base = r.mapping.as_ptr() as usize;
            start
                .checked_sub(base)
                .and_then(|offset| Some((offset, offset.checked_add(len)?)))
                .is_some_and(|(offset, end)| offset < r.size as usize && end <= r.size as usize)
        })
    }

    /// False once an access found a region's file truncated under its mapping.
    pub fn intact(&self) -> bool {
        self.regions.iter().all(|r| r.guard.intact())
    }

    /// The guest address of host address `host`, inside one of this generation's mappings.
    pub(super) fn host_to_guest(&self, host: usize) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let offset = host.checked_sub(r.mapping.as_ptr() as usize)? as u64;
            (offset < r.size).then(|| r.guest_phys_addr + offset)
        })
    }

    /// The end of the highest region: the guest addresses a dirty log must cover.
    pub fn end(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.guest_phys_addr + r.size)
            .max()
            .unwrap_or(0)
    }

    /// The pin of region `index` (from [`Generation::region_index`]).
    pub(super) fn region_pin(&self, index: usize) -> &Arc<RegionPin> {
        &self.regions[index].pin
    }

    /// Pins what a parsed chain points at, for one request: the regions holding the status
    /// byte at `status` and every iovec of `raw` (host addresses inside this generation's
    /// mappings), which must not be retiring. The result keeps this generation and the pins
    /// until it is released; [`GuestBuffers::is_complete`] says whether everything was
    /// pinned.
    pub fn pin(self: &Arc<Self>, raw: RawBuffers, status: Option<*const u8>) -> GuestBuffers {
        GuestBuffers::pin(self, raw, status)
    }

    /// The pins of the regions, in guest address order.
    #[cfg(test)]
    pub(crate) fn pins(&self) -> Vec<Arc<RegionPin>> {
        self.regions.iter().map(|r| r.pin.clone()).collect()
    }

    /// Translates a frontend virtual address (as in SET_VRING_ADDR) into a guest address.
    pub fn vmm_to_guest(&self, vmm_addr: u64) -> Result<GuestAddress, MemoryError> {
        self.regions
            .iter()
            .find(|r| vmm_addr >= r.user_addr && vmm_addr - r.user_addr < r.size)
            .map(|r| GuestAddress(r.guest_phys_addr + (vmm_addr - r.user_addr)))
            .ok_or(MemoryError::UnmappedVmmAddress(vmm_addr))
    }
}

fn map_region(region: &VhostUserMemoryRegion, file: File) -> Result<RegionInfo, MemoryError> {
    let gpa = region.guest_phys_addr;
    if region.memory_size == 0
        || gpa.checked_add(region.memory_size).is_none()
        || region.user_addr.checked_add(region.memory_size).is_none()
    {
        return Err(MemoryError::BadRegion { gpa });
    }
    let page = check_file_covers(region, &file)?;
    let mmap = region
        .mmap_region(file)
        .map_err(|source| MemoryError::Map {
            gpa,
            size: region.memory_size,
            source,
        })?;
    let mapping =
        GuestRegionMmap::new(mmap, GuestAddress(gpa)).ok_or(MemoryError::BadRegion { gpa })?;
    let guard =
        crate::sigbus::Guard::register(mapping.as_ptr() as usize, mapping.len() as usize, page);
    if guard.is_none() {
        vmm_line!(
            warn,
            "guest memory region {gpa:#x} is not guarded against SIGBUS (table full)"
        );
    }
    Ok(RegionInfo {
        guest_phys_addr: gpa,
        size: region.memory_size,
        user_addr: region.user_addr,
        guard: Arc::new(RegionGuard { gpa, guard }),
        mapping: Arc::new(mapping),
        pin: Arc::new(RegionPin::new(gpa, region.memory_size)),
    })
}

/// A region's file must hold every byte the region maps: a mapping past the end of a file
/// raises SIGBUS when touched, in whichever thread touches it first. Only regular files have
/// a size to check (memfd, hugetlbfs and tmpfs files are regular). Returns the file's page
/// size (a huge page on hugetlbfs), which the SIGBUS handler patches in.
fn check_file_covers(region: &VhostUserMemoryRegion, file: &File) -> Result<usize, MemoryError> {
    let gpa = region.guest_phys_addr;
    let stat = rustix::fs::fstat(file).map_err(|e| MemoryError::Stat {
        gpa,
        source: e.into(),
    })?;
    let page = usize::try_from(stat.st_blksize)
        .ok()
        .filter(|p| p.is_power_of_two() && *p >= 4096)
        .unwrap_or(4096);
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Ok(page);
    }
    let end = region
        .mmap_offset
        .checked_add(region.memory_size)
        .ok_or(MemoryError::BadRegion { gpa })?;
    let file_len = u64::try_from(stat.st_size).unwrap_or(0);
    if file_len < end {
        return Err(MemoryError::ShortFile { gpa, end, file_len });
    }
    Ok(page)
}

/// The current generation of one device's guest memory, shared by its session and its queue
/// threads. Cloning shares it.
#[derive(Clone)]
pub struct GuestMemoryHandle {
    current: Arc<ArcSwap<Generation>>,
    next_id: Arc<AtomicU64>,
    live: Arc<Mutex<Vec<Weak<Generation>>>>,
    stats: Arc<MemoryStats>,
}

impl Default for GuestMemoryHandle {
    fn default() -> Self {
        GuestMemoryHandle {
            current: Arc::new(ArcSwap::from_pointee(Generation {
                id: 0,
                mem: GuestMemoryMmap::new(),
                regions: Vec::new(),
            })),
            next_id: Arc::new(AtomicU64::new(1)),
            live: Arc::new(Mutex::new(Vec::new())),
            stats: Arc::new(MemoryStats::default()),
        }
    }
}

impl GuestMemoryHandle {
    /// The current generation: it stays mapped as long as the returned `Arc` lives.
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    pub fn stats(&self) -> &MemoryStats {
        &self.stats
    }

    /// Builds the next generation from `regions`, checking the layout; nothing changes yet.
    fn build(&self, regions: Vec<RegionInfo>) -> Result<Arc<Generation>, MemoryError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(Generation::build(id, regions)?))
    }

    /// Makes a built generation the current one.
    fn publish(&self, generation: Arc<Generation>) -> Arc<Generation> {
        self.current.store(generation.clone());
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|g| g.strong_count() > 0);
        live.push(Arc::downgrade(&generation));
        generation
    }

    fn install(&self, regions: Vec<RegionInfo>) -> Result<Arc<Generation>, MemoryError> {
        Ok(self.publish(self.build(regions)?))
    }

    /// SET_MEM_TABLE: a whole new table. Old regions not in it (same guest address, size and
    /// frontend address) retire. The new table is checked whole (every region mapped, the
    /// layout valid) before anything retires: a refused table leaves the current one serving.
    pub fn set_table(
        &self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<(Arc<Generation>, Retiring), MemoryError> {
        let mut mapped = regions
            .iter()
            .zip(files)
            .map(|(region, file)| map_region(region, file))
            .collect::<Result<Vec<_>, _>>()?;
        let old = self.current();
        // A region the new table keeps in place keeps its pin: requests still using the old
        // mapping of it count when it is removed later.
        for region in &mut mapped {
            if let Some(kept) = old.regions.iter().find(|r| {
                r.guest_phys_addr == region.guest_phys_addr
                    && r.size == region.size
                    && r.user_addr == region.user_addr
            }) {
                region.pin = kept.pin.clone();
            }
        }
        let generation = self.build(mapped)?;
        let retiring: Vec<_> = old
            .regions
            .iter()
            .filter(|r| !regions.iter().any(|n| r.same_place(n)))
            .map(|r| r.pin.clone())
            .collect();
        for pin in &retiring {
            pin.retire();
        }
        Ok((self.publish(generation), Retiring { pins: retiring }))
    }

    /// ADD_MEM_REG: the current table plus one region.
    pub fn add_region(
        &self,
        region: &VhostUserMemoryRegion,
        file: File,
    ) -> Result<Arc<Generation>, MemoryError> {
        let mut regions = self.current().regions.clone();
        if regions.len() >= MAX_MEM_SLOTS {
            return Err(MemoryError::TooManyRegions);
        }
        regions.push(map_region(region, file)?);
        self.install(regions)
    }

    /// REM_MEM_REG: the current table less the region with this guest address and size, which
    /// retires.
    pub fn remove_region(
        &self,
        region: &VhostUserMemoryRegion,
    ) -> Result<(Arc<Generation>, Retiring), MemoryError> {
        let mut regions = self.current().regions.clone();
        let Some(at) = regions.iter().position(|r| {
            r.guest_phys_addr == region.guest_phys_addr && r.size == region.memory_size
        }) else {
            return Err(MemoryError::NoSuchRegion {
                gpa: region.guest_phys_addr,
                size: region.memory_size,
            });
        };
        let removed = regions.remove(at);
        let generation = self.build(regions)?;
        removed.pin.retire();
        Ok((
            self.publish(generation),
            Retiring {
                pins: vec![removed.pin],
            },
        ))
    }

    /// Drops the table (disconnect): every region retires.
    pub fn clear(&self) -> Retiring {
        let old = self.current();
        let pins: Vec<_> = old.regions.iter().map(|r| r.pin.clone()).collect();
        for pin in &pins {
            pin.retire();
        }
        // An empty table cannot fail to build.
        let _ = self.install(Vec::new());
        Retiring { pins }
    }

    pub fn status(&self) -> MemoryStatus {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        MemoryStatus {
            generation: self.current().id,
            // Pins: every Arc but the handle's own (for the current one) is a request or a
            // queue thread's view of the ring.
            live: live
                .iter()
                .filter_map(|g| g.upgrade())
                .map(|g| (g.id, Arc::strong_count(&g) - 1))
                .collect(),
            retire_waits: self.stats.retire_waits.load(Ordering::Relaxed),
            longest_retire_wait_us: self.stats.longest_retire_wait_us.load(Ordering::Relaxed),
            cancelled: self.stats.cancelled.load(Ordering::Relaxed),
        }
    }
}

/// Guest memory for unit tests: regions `(guest address, size)` backed by files in /dev/shm,
/// installed with SET_MEM_TABLE's path. The frontend addresses are made up (0x7f00_0000_0000
/// plus the guest address).
#[cfg(test)]
pub(crate) fn test_memory(regions: &[(u64, u64)]) -> GuestMemoryHandle {
    let handle = GuestMemoryHandle::default();
    let (table, files): (Vec<_>, Vec<_>) = regions
        .iter()
        .map(|&(gpa, size)| {
            let file = tempfile::tempfile_in("/dev/shm").expect("a file in /dev/shm");
            file.set_len(size).expect("size the region's file");
            let region = VhostUserMemoryRegion::new(gpa, size, 0x7f00_0000_0000 + gpa, 0);
            (region, file)
        })
        .unzip();
    handle.set_table(&table, files).expect("install the table");
    handle
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A region of `size` bytes at `gpa` in a /dev/shm file of `file_len` bytes.
    fn region(gpa: u64, size: u64, file_len: u64) -> (VhostUserMemoryRegion, File) {
        let file = tempfile::tempfile_in("/dev/shm").expect("a file in /dev/shm");
        file.set_len(file_len).expect("size the region's file");
        let region = VhostUserMemoryRegion::new(gpa, size, 0x7f00_0000_0000 + gpa, 0);
        (region, file)
    }

    fn table(regions: &[(u64, u64)]) -> (Vec<VhostUserMemoryRegion>, Vec<File>) {
        regions
            .iter()
            .map(|&(gpa, size)| region(gpa, size, size))
            .unzip()
    }

    /// Whether the current generation still serves guest address `gpa`: its region is there
    /// and can be pinned (not retiring).
    fn serves(handle: &GuestMemoryHandle, gpa: u64) -> bool {
        let current = handle.current();
        let Some(r) = current
            .regions
            .iter()
            .find(|r| (r.guest_phys_addr..r.guest_phys_addr + r.size).contains(&gpa))
        else {
            return false;
        };
        let pinned = r.pin.try_pin();
        if pinned {
            r.pin.unpin();
        }
        pinned
    }

    #[test]
    fn a_refused_table_leaves_the_current_one_serving() {
        let handle = test_memory(&[(0, MIB), (4 * MIB, MIB)]);
        let before = handle.current().id();
        // Overlapping regions: the new table is refused...
        let (regions, files) = table(&[(0, 2 * MIB), (MIB, MIB)]);
        assert!(matches!(
            handle.set_table(&regions, files),
            Err(MemoryError::Layout(_))
        ));
        // ...and the old one is untouched: same generation, every region still pinnable.
        assert_eq!(handle.current().id(), before);
        assert!(serves(&handle, 0), "the kept region serves");
        assert!(
            serves(&handle, 4 * MIB),
            "the region the table dropped serves"
        );
        // A valid table still replaces it, retiring what it drops.
        let (regions, files) = table(&[(0, MIB)]);
        let (generation, retiring) = handle.set_table(&regions, files).unwrap();
        assert_ne!(generation.id(), before);
        assert_eq!(retiring.pins.len(), 1);
        assert_eq!(retiring.pins[0].guest_phys_addr, 4 * MIB);
        assert!(serves(&handle, 0));
        assert!(!serves(&handle, 4 * MIB));
    }

    #[test]
    fn a_refused_region_leaves_the_table_as_it_was() {
        let handle = test_memory(&[(0, MIB)]);
        let before = handle.current().id();
        let (overlapping, file) = region(MIB / 2, MIB, MIB);
        assert!(handle.add_region(&overlapping, file).is_err());
        assert_eq!(handle.current().id(), before);
        assert!(serves(&handle, 0));
        let (zero, file) = region(8 * MIB, 0, MIB);
        assert!(matches!(
            handle.add_region(&zero, file),
            Err(MemoryError::BadRegion { .. })
        ));
        assert_eq!(handle.current().id(), before);
        assert!(serves(&handle, 0));
    }

    /// The frontend shrinks a region's file after the table was accepted: touching the lost
    /// pages must not kill the process (without the guard this test binary dies of SIGBUS).
    #[test]
    fn a_file_truncated_under_its_mapping_reads_as_zeroes() {
        use std::os::unix::fs::FileExt;
        use vm_memory::Bytes;
        let handle = GuestMemoryHandle::default();
        let (region, file) = region(0, MIB, MIB);
        let ours = file.try_clone().unwrap();
        ours.write_all_at(&0x1122_3344_u64.to_le_bytes(), 8192)
            .unwrap();
        handle.set_table(&[region], vec![file]).unwrap();
        let current = handle.current();
        let read = |at: u64| current.memory().read_obj::<u64>(GuestAddress(at)).unwrap();
        assert_eq!(read(8192), 0x1122_3344);
        assert!(current.intact());
        ours.set_len(4096).unwrap();
        assert_eq!(read(0), 0, "the page the file still has");
        assert_eq!(read(8192), 0, "a page past the new end reads as zeroes");
        current
            .memory()
            .write_obj(7u64, GuestAddress(MIB - 8))
            .unwrap();
        assert!(!current.intact());
        drop(current);
        // The broken range leaves the handler's table with its mapping.
        handle.clear();
    }

    #[test]
    fn add_mem_reg_stops_at_the_slots_offered() {
        let handle = GuestMemoryHandle::default();
        for i in 0..MAX_MEM_SLOTS as u64 {
            let (r, file) = region(i * MIB, 4096, 4096);
            handle.add_region(&r, file).unwrap();
        }
        let (r, file) = region(1 << 40, 4096, 4096);
        assert!(matches!(
            handle.add_region(&r, file),
            Err(MemoryError::TooManyRegions)
        ));
        assert_eq!(handle.current().regions.len(), MAX_MEM_SLOTS);
    }

    #[test]
    fn a_region_past_the_end_of_its_file_is_refused() {
        let handle = test_memory(&[(0, MIB)]);
        let before = handle.current().id();
        let (short, file) = region(8 * MIB, 2 * MIB, MIB);
        assert!(matches!(
            handle.add_region(&short, file),
            Err(MemoryError::ShortFile {
                end, file_len, ..
            }) if end == 2 * MIB && file_len == MIB
        ));
        // The offset counts: 1 MiB at offset 512 KiB of a 1 MiB file.
        let (mut offset, file) = region(8 * MIB, MIB, MIB);
        offset.mmap_offset = MIB / 2;
        assert!(matches!(
            handle.add_region(&offset, file),
            Err(MemoryError::ShortFile { .. })
        ));
        let (regions, files) = table(&[(0, MIB)]);
        let (short, file) = region(8 * MIB, 2 * MIB, MIB);
        let mut regions = regions;
        regions.push(short);
        let mut files = files;
        files.push(file);
        assert!(matches!(
            handle.set_table(&regions, files),
            Err(MemoryError::ShortFile { .. })
        ));
        assert_eq!(handle.current().id(), before);
        assert!(serves(&handle, 0));
        // Exactly covered is fine.
        let (mut fits, file) = region(8 * MIB, MIB / 2, MIB);
        fits.mmap_offset = MIB / 2;
        handle.add_region(&fits, file).unwrap();
        assert!(serves(&handle, 8 * MIB));
    }
}
