//! Guest memory for the test frontend.
//!
//! Every region is a `MAP_SHARED` mapping of a memfd, the way QEMU (`memory-backend-memfd`) and
//! cloud-hypervisor (`shared=on`) back guest RAM, so the same fd can be handed to the backend in
//! SET_MEM_TABLE or ADD_MEM_REG and both processes see the same pages. The frontend writes
//! descriptors, rings and data here and reads back what the backend wrote.
//!
//! Addresses inside virtqueue descriptors are guest-physical; the vring addresses a frontend sends
//! are its own virtual addresses ([`GuestMemory::uva`]), as QEMU and cloud-hypervisor do.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rustix::fs::MemfdFlags;
use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    AtomicAccess, ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryBackend,
    GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

/// What can go wrong while building or touching guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create a memfd for guest memory")]
    Memfd(#[source] rustix::io::Errno),
    #[error("cannot size the guest memory memfd to {size} bytes")]
    Truncate {
        size: u64,
        #[source]
        source: rustix::io::Errno,
    },
    #[error("cannot map guest memory region at {guest_addr:#x}")]
    Map {
        guest_addr: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("guest memory regions are invalid (empty, unsorted or overlapping)")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    #[error("guest address {addr:#x} (+{len} bytes) is not in guest memory")]
    Access {
        addr: u64,
        len: usize,
        #[source]
        source: GuestMemoryError,
    },
    #[error("no guest memory region starts at {0:#x}")]
    NoRegion(u64),
    #[error("cannot describe region at {guest_addr:#x} for vhost-user")]
    RegionInfo {
        guest_addr: u64,
        #[source]
        source: vhost::Error,
    },
    #[error("guest memory arena [{start:#x}, {end:#x}) has no room for {len} bytes")]
    ArenaFull { start: u64, end: u64, len: u64 },
    #[error("the region at {0:#x} is not backed by a file")]
    NoFile(u64),
    #[error("cannot access the memfd of the region at {guest_addr:#x}")]
    File {
        guest_addr: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("guest address {addr:#x} (+{len} bytes) is outside the region at {guest_addr:#x}")]
    OutsideRegion {
        guest_addr: u64,
        addr: u64,
        len: u64,
    },
}

/// One guest memory region to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    /// Guest-physical start address.
    pub guest_addr: u64,
    /// Length in bytes (a multiple of the page size).
    pub size: usize,
}

impl RegionSpec {
    /// A region of `size` bytes at guest-physical address `guest_addr`.
    pub const fn new(guest_addr: u64, size: usize) -> Self {
        Self { guest_addr, size }
    }
}

/// A region taken out of guest memory; it stays mapped (and its fd open) until this is dropped,
/// so a REM_MEM_REG or SET_MEM_TABLE can still describe it.
pub struct RemovedRegion {
    region: Arc<GuestRegionMmap>,
}

impl RemovedRegion {
    /// The vhost-user description of the removed region.
    pub fn info(&self) -> Result<VhostUserMemoryRegionInfo, MemoryError> {
        region_info(&self.region)
    }

    /// The region's memfd, to watch its pages after the backend was told to let go of them.
    pub fn file(&self) -> Result<RegionFile, MemoryError> {
        RegionFile::of(&self.region)
    }
}

/// The memfd behind one region (a duplicate descriptor), to read and write the region's pages
/// without going through guest memory: what the backend wrote there, even after the region was
/// unplugged. Its inode names the backend's mappings of the region in `/proc/PID/maps`.
pub struct RegionFile {
    file: File,
    /// Where the region starts in the file (non-zero for regions sharing one memfd).
    offset: u64,
    spec: RegionSpec,
    inode: u64,
}

impl RegionFile {
    fn of(region: &GuestRegionMmap) -> Result<Self, MemoryError> {
        let guest_addr = region.start_addr().0;
        let fo = region
            .file_offset()
            .ok_or(MemoryError::NoFile(guest_addr))?;
        let io = |source| MemoryError::File { guest_addr, source };
        let file = fo.file().try_clone().map_err(io)?;
        let inode = file.metadata().map_err(io)?.ino();
        Ok(Self {
            file,
            offset: fo.start(),
            spec: RegionSpec::new(guest_addr, region.len() as usize),
            inode,
        })
    }

    /// Guest address and size of the region.
    pub fn spec(&self) -> RegionSpec {
        self.spec
    }

    /// The memfd's inode number (the fifth field of a `/proc/PID/maps` line mapping it).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// File offset of guest address `gpa` (checked to lie with `len` bytes in the region).
    fn at(&self, gpa: u64, len: usize) -> Result<u64, MemoryError> {
        let outside = || MemoryError::OutsideRegion {
            guest_addr: self.spec.guest_addr,
            addr: gpa,
            len: len as u64,
        };
        let rel = gpa.checked_sub(self.spec.guest_addr).ok_or_else(outside)?;
        if rel
            .checked_add(len as u64)
            .is_none_or(|end| end > self.spec.size as u64)
        {
            return Err(outside());
        }
        Ok(self.offset + rel)
    }

    /// Reads `len` bytes at guest address `gpa` from the memfd.
    pub fn read(&self, gpa: u64, len: usize) -> Result<Vec<u8>, MemoryError> {
        let at = self.at(gpa, len)?;
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, at)
            .map_err(|source| MemoryError::File {
                guest_addr: self.spec.guest_addr,
                source,
            })?;
        Ok(buf)
    }

    /// Writes `data` at guest address `gpa` into the memfd.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let at = self.at(gpa, data.len())?;
        self.file
            .write_all_at(data, at)
            .map_err(|source| MemoryError::File {
                guest_addr: self.spec.guest_addr,
                source,
            })
    }

    /// Fills the whole region with `byte`.
    pub fn fill(&self, byte: u8) -> Result<(), MemoryError> {
        self.write(self.spec.guest_addr, &vec![byte; self.spec.size])
    }

    /// The whole region's bytes.
    pub fn contents(&self) -> Result<Vec<u8>, MemoryError> {
        self.read(self.spec.guest_addr, self.spec.size)
    }
}

/// Guest RAM as a set of memfd-backed regions.
#[derive(Clone)]
pub struct GuestMemory {
    mmap: GuestMemoryMmap,
}

impl GuestMemory {
    /// Guest memory with one memfd per region.
    pub fn new(regions: &[RegionSpec]) -> Result<Self, MemoryError> {
        let mut mapped = Vec::with_capacity(regions.len());
        for spec in regions {
            let file = memfd(spec.size as u64)?;
            mapped.push(map_region(spec, FileOffset::new(file, 0))?);
        }
        Self::from_regions(mapped)
    }

    /// Guest memory whose regions all live in one memfd, at consecutive offsets.
    ///
    /// This is how QEMU describes a single RAM block split around a hole (below and above 4 GiB
    /// on x86): several regions, one fd, different `mmap_offset`s. A backend that ignores
    /// `mmap_offset` reads the wrong pages.
    pub fn with_shared_file(regions: &[RegionSpec]) -> Result<Self, MemoryError> {
        let total: u64 = regions.iter().map(|r| r.size as u64).sum();
        let file = Arc::new(memfd(total)?);
        let mut offset = 0u64;
        let mut mapped = Vec::with_capacity(regions.len());
        for spec in regions {
            mapped.push(map_region(
                spec,
                FileOffset::from_arc(file.clone(), offset),
            )?);
            offset += spec.size as u64;
        }
        Self::from_regions(mapped)
    }

    fn from_regions(mut regions: Vec<GuestRegionMmap>) -> Result<Self, MemoryError> {
        regions.sort_by_key(|r| r.start_addr());
        let mmap = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Layout)?;
        Ok(Self { mmap })
    }

    /// The vm-memory view, for callers that want the full `Bytes` API.
    pub fn mmap(&self) -> &GuestMemoryMmap {
        &self.mmap
    }

    /// Every region, as SET_MEM_TABLE wants them.
    pub fn region_infos(&self) -> Result<Vec<VhostUserMemoryRegionInfo>, MemoryError> {
        self.mmap.iter().map(region_info).collect()
    }

    /// The region starting at `guest_addr`, as ADD_MEM_REG wants it.
    pub fn region_info(&self, guest_addr: u64) -> Result<VhostUserMemoryRegionInfo, MemoryError> {
        let region = self
            .mmap
            .iter()
            .find(|r| r.start_addr().0 == guest_addr)
            .ok_or(MemoryError::NoRegion(guest_addr))?;
        region_info(region)
    }

    /// The memfd of the region starting at `guest_addr`.
    pub fn region_file(&self, guest_addr: u64) -> Result<RegionFile, MemoryError> {
        let region = self
            .mmap
            .iter()
            .find(|r| r.start_addr().0 == guest_addr)
            .ok_or(MemoryError::NoRegion(guest_addr))?;
        RegionFile::of(region)
    }

    /// (guest address, size) of every region, in address order.
    pub fn regions(&self) -> Vec<RegionSpec> {
        self.mmap
            .iter()
            .map(|r| RegionSpec::new(r.start_addr().0, r.len() as usize))
            .collect()
    }

    /// Adds a region backed by a fresh memfd (memory hotplug); returns its description.
    pub fn add_region(
        &mut self,
        spec: RegionSpec,
    ) -> Result<VhostUserMemoryRegionInfo, MemoryError> {
        let file = memfd(spec.size as u64)?;
        let region = Arc::new(map_region(&spec, FileOffset::new(file, 0))?);
        self.mmap = self
            .mmap
            .insert_region(region.clone())
            .map_err(MemoryError::Layout)?;
        region_info(&region)
    }

    /// Takes the region starting at `guest_addr` out of guest memory (memory unplug).
    pub fn remove_region(&mut self, guest_addr: u64) -> Result<RemovedRegion, MemoryError> {
        let size = self
            .mmap
            .iter()
            .find(|r| r.start_addr().0 == guest_addr)
            .ok_or(MemoryError::NoRegion(guest_addr))?
            .len();
        let (mmap, region) = self
            .mmap
            .remove_region(GuestAddress(guest_addr), size)
            .map_err(MemoryError::Layout)?;
        self.mmap = mmap;
        Ok(RemovedRegion { region })
    }

    /// The frontend's virtual address of guest address `gpa`: what SET_VRING_ADDR carries.
    pub fn uva(&self, gpa: u64) -> Result<u64, MemoryError> {
        self.mmap
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|source| MemoryError::Access {
                addr: gpa,
                len: 0,
                source,
            })
    }

    /// Whether `[gpa, gpa + len)` lies inside one region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        let Some(last) = gpa.checked_add(len.saturating_sub(1)) else {
            return false;
        };
        self.mmap
            .iter()
            .any(|r| gpa >= r.start_addr().0 && last <= r.last_addr().0)
    }

    /// Copies `data` to guest address `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.mmap
            .write_slice(data, GuestAddress(gpa))
            .map_err(|source| access(gpa, data.len(), source))
    }

    /// Reads `len` bytes at guest address `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Result<Vec<u8>, MemoryError> {
        let mut buf = vec![0u8; len];
        self.mmap
            .read_slice(&mut buf, GuestAddress(gpa))
            .map_err(|source| access(gpa, len, source))?;
        Ok(buf)
    }

    /// Fills `[gpa, gpa + len)` with `byte`.
    pub fn fill(&self, gpa: u64, len: usize, byte: u8) -> Result<(), MemoryError> {
        self.write(gpa, &vec![byte; len])
    }

    /// Writes a plain-data object at `gpa`.
    pub fn write_obj<T: ByteValued>(&self, gpa: u64, val: T) -> Result<(), MemoryError> {
        self.mmap
            .write_obj(val, GuestAddress(gpa))
            .map_err(|source| access(gpa, std::mem::size_of::<T>(), source))
    }

    /// Reads a plain-data object at `gpa`.
    pub fn read_obj<T: ByteValued>(&self, gpa: u64) -> Result<T, MemoryError> {
        self.mmap
            .read_obj(GuestAddress(gpa))
            .map_err(|source| access(gpa, std::mem::size_of::<T>(), source))
    }

    /// Atomic store, for ring indexes the backend reads concurrently.
    pub fn store<T: AtomicAccess>(
        &self,
        gpa: u64,
        val: T,
        order: Ordering,
    ) -> Result<(), MemoryError> {
        self.mmap
            .store(val, GuestAddress(gpa), order)
            .map_err(|source| access(gpa, std::mem::size_of::<T>(), source))
    }

    /// Atomic load, for ring indexes the backend writes concurrently.
    pub fn load<T: AtomicAccess>(&self, gpa: u64, order: Ordering) -> Result<T, MemoryError> {
        self.mmap
            .load(GuestAddress(gpa), order)
            .map_err(|source| access(gpa, std::mem::size_of::<T>(), source))
    }
}

/// A bump allocator over a guest address range, for rings and request buffers.
///
/// Tests that issue many requests take a [`Arena::mark`] before a request and
/// [`Arena::release`] it once the request has completed.
#[derive(Debug, Clone)]
pub struct Arena {
    start: u64,
    end: u64,
    next: u64,
}

impl Arena {
    /// An arena handing out `[start, start + len)`.
    pub fn new(start: u64, len: u64) -> Self {
        Self {
            start,
            end: start + len,
            next: start,
        }
    }

    /// An arena covering the whole region `spec`.
    pub fn over(spec: RegionSpec) -> Self {
        Self::new(spec.guest_addr, spec.size as u64)
    }

    /// Reserves `len` bytes aligned to `align` (a power of two); returns the guest address.
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64, MemoryError> {
        let full = || MemoryError::ArenaFull {
            start: self.start,
            end: self.end,
            len,
        };
        let align = align.max(1);
        let at = self.next.checked_add(align - 1).ok_or_else(full)? & !(align - 1);
        let end = at.checked_add(len).ok_or_else(full)?;
        if end > self.end {
            return Err(full());
        }
        self.next = end;
        Ok(at)
    }

    /// The current allocation cursor.
    pub fn mark(&self) -> u64 {
        self.next
    }

    /// Frees everything allocated after `mark`.
    pub fn release(&mut self, mark: u64) {
        debug_assert!(mark >= self.start && mark <= self.end);
        self.next = mark.clamp(self.start, self.end);
    }
}

fn memfd(size: u64) -> Result<File, MemoryError> {
    let fd = rustix::fs::memfd_create("test-frontend-guest-ram", MemfdFlags::CLOEXEC)
        .map_err(MemoryError::Memfd)?;
    rustix::fs::ftruncate(&fd, size).map_err(|source| MemoryError::Truncate { size, source })?;
    Ok(File::from(fd))
}

fn map_region(spec: &RegionSpec, file: FileOffset) -> Result<GuestRegionMmap, MemoryError> {
    GuestRegionMmap::from_range(GuestAddress(spec.guest_addr), spec.size, Some(file)).map_err(
        |source| MemoryError::Map {
            guest_addr: spec.guest_addr,
            source,
        },
    )
}

fn region_info(region: &GuestRegionMmap) -> Result<VhostUserMemoryRegionInfo, MemoryError> {
    VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|source| MemoryError::RegionInfo {
        guest_addr: region.start_addr().0,
        source,
    })
}

fn access(addr: u64, len: usize, source: GuestMemoryError) -> MemoryError {
    MemoryError::Access { addr, len, source }
}
