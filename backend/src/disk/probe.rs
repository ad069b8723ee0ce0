//! Finding out what a backing can do, without changing its data.

use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use super::ZeroesMethod;

pub(crate) const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
pub(crate) const BLKSSZGET: libc::c_ulong = 0x1268;

/// What O_DIRECT requires: buffer addresses aligned to `memory`, offsets and lengths to `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectIoAlignment {
    pub memory: u32,
    pub offset: u32,
}

impl DirectIoAlignment {
    /// No requirement (buffered I/O).
    pub const NONE: DirectIoAlignment = DirectIoAlignment {
        memory: 1,
        offset: 1,
    };
}

pub(super) fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live local.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

fn logical_block_size(file: &File) -> Option<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to a live local.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut size as *mut libc::c_int) };
    (ret == 0 && size > 0).then_some(size as u32)
}

/// Asks the kernel (statx STATX_DIOALIGN, Linux 6.1+); falls back to the logical block size for
/// block devices and to 4096 for files, which satisfies every filesystem we know of.
pub(super) fn direct_io_alignment(file: &File, block_device: bool) -> DirectIoAlignment {
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: statx writes into the zeroed buffer we own; the empty path with AT_EMPTY_PATH
    // refers to the fd itself.
    let ret = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if ret == 0 {
        // SAFETY: statx succeeded and filled the structure (zeroed beforehand, so any field the
        // kernel did not fill is a valid zero).
        let stx = unsafe { stx.assume_init() };
        if stx.stx_mask & libc::STATX_DIOALIGN != 0
            && stx.stx_dio_mem_align > 0
            && stx.stx_dio_offset_align > 0
        {
            return DirectIoAlignment {
                memory: stx.stx_dio_mem_align,
                offset: stx.stx_dio_offset_align,
            };
        }
    }
    let fallback = if block_device {
        logical_block_size(file).unwrap_or(4096)
    } else {
        4096
    };
    DirectIoAlignment {
        memory: fallback,
        offset: fallback,
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate only reads its scalar arguments.
    let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Probes hole punching and zero ranges *past the end of the file*, with KEEP_SIZE, where no
/// data lives: a probe must never touch the guest's data.
pub(super) fn file_zeroing(file: &File, size: u64) -> (bool, Option<ZeroesMethod>) {
    let probe_at = size.div_ceil(65536) * 65536 + 65536;
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    let punch = fallocate(file, libc::FALLOC_FL_PUNCH_HOLE | keep, probe_at, 4096).is_ok();
    let zero_range = fallocate(file, libc::FALLOC_FL_ZERO_RANGE | keep, probe_at, 4096).is_ok();
    if zero_range && punch {
        // Give back the block the ZERO_RANGE probe allocated past EOF.
        let _ = fallocate(file, libc::FALLOC_FL_PUNCH_HOLE | keep, probe_at, 4096);
    }
    let method = if zero_range {
        Some(ZeroesMethod::ZeroRange)
    } else if punch {
        Some(ZeroesMethod::PunchThenAllocate)
    } else {
        None
    };
    (punch, method)
}

/// For a block device, fallocate maps ZERO_RANGE to BLKZEROOUT (the kernel falls back to writing
/// zeroes) and PUNCH_HOLE to an unmapping write-zeroes, which only works where the device can
/// do it: the queue's `write_zeroes_max_bytes` says so.
pub(super) fn block_device_zeroing(file: &File) -> (bool, Option<ZeroesMethod>) {
    let punch = file
        .metadata()
        .ok()
        .and_then(|m| {
            let rdev = m.rdev();
            let (major, minor) = (libc::major(rdev), libc::minor(rdev));
            std::fs::read_to_string(format!(
                "/sys/dev/block/{major}:{minor}/queue/write_zeroes_max_bytes"
            ))
            .ok()
            .or_else(|| {
                // A partition: its queue is the parent disk's.
                std::fs::read_to_string(format!(
                    "/sys/dev/block/{major}:{minor}/../queue/write_zeroes_max_bytes"
                ))
                .ok()
            })
        })
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|max| max > 0);
    (punch, Some(ZeroesMethod::ZeroRange))
}
