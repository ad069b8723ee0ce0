//! The dirty log of live migration: a bitmap the frontend shares (SET_LOG_BASE), one bit per
//! 4 KiB page of guest physical memory, in which the backend marks every page it writes while
//! the frontend copies guest memory to the destination.
//!
//! ```text
//!  SET_LOG_BASE (fd, size, offset) ─▶ LogMap: mmap'd, checked to cover the memory table
//!  SET_FEATURES (+LOG_ALL)          ─▶ logging on: membarrier, then the reply
//!  SET_VRING_ADDR (+F_LOG, log addr) ─▶ the ring's used-ring log address (QueueControl)
//!  queue thread, each request released: data, status byte, used entry, used index ─▶ mark
//!  SET_FEATURES (-LOG_ALL)          ─▶ logging off: nothing is marked
//! ```
//!
//! Logging is on when the frontend acked `VHOST_F_LOG_ALL` *and* a log is installed (QEMU sends
//! either first, depending on whether a device starts during a migration or a migration starts
//! under a running device). A queue thread checks [`DirtyLog::active`] after it has written a
//! request's status and used entry: a relaxed load, so logging off costs one load per request.
//!
//! Why that is enough for requests in flight when logging starts: the frontend waits for the
//! reply to the SET_FEATURES that turns logging on before it copies the first page, and the
//! session sends that reply only after `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which
//! runs a full memory barrier on every thread of the process. A queue thread's guest writes come
//! before its check of the flag (a compiler fence keeps them there); so either the check comes
//! after that barrier and sees logging on (the pages get marked), or the writes came before it
//! and are visible to the frontend's first copy. The same asymmetric handshake as the kernel's
//! `sys_membarrier` users (liburcu): the hot path pays nothing, the rare path a system call.
//!
//! A log replaced by a new SET_LOG_BASE (QEMU resizes it when memory grows) is handed back only
//! once no queue thread still marks it: QEMU syncs the old log after our reply and then drops it,
//! so a late mark in it would be lost.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use thiserror::Error;

/// The size of a page in the log (the spec's VHOST_LOG_PAGE).
pub const LOG_PAGE: u64 = 0x1000;

#[derive(Debug, Error)]
pub enum DirtyLogError {
    #[error("the dirty log is empty (mmap_size 0)")]
    Empty,
    #[error(
        "the dirty log of {size:#x} bytes covers guest memory up to {covers:#x}, but the memory \
         table reaches {needed:#x}"
    )]
    TooSmall { size: u64, covers: u64, needed: u64 },
    #[error("the dirty log's offset {offset:#x} is not a multiple of the page size")]
    Misaligned { offset: u64 },
    #[error("the dirty log ({offset:#x} + {size:#x} bytes) lies beyond the end of its file ({file:#x} bytes)")]
    BeyondFile { offset: u64, size: u64, file: u64 },
    #[error("the dirty log's size or offset overflows")]
    Overflow,
    #[error("cannot stat the dirty log's file")]
    Stat(#[source] std::io::Error),
    #[error("cannot map the dirty log ({size:#x} bytes at offset {offset:#x})")]
    Map {
        size: u64,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
}

/// A mapped dirty log.
#[derive(Debug)]
pub struct LogMap {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value and only ever accessed through atomic byte
// operations, from any thread.
unsafe impl Send for LogMap {}
// SAFETY: as above: shared access is atomic.
unsafe impl Sync for LogMap {}

impl LogMap {
    /// Maps `size` bytes of `file` at `offset` (SET_LOG_BASE's payload), which must cover guest
    /// addresses up to `needed` (the end of the highest region of the memory table).
    pub fn map(file: &File, size: u64, offset: u64, needed: u64) -> Result<LogMap, DirtyLogError> {
        if size == 0 {
            return Err(DirtyLogError::Empty);
        }
        let covers = size.saturating_mul(8 * LOG_PAGE);
        if covers < needed {
            return Err(DirtyLogError::TooSmall {
                size,
                covers,
                needed,
            });
        }
        if offset % page_size() != 0 {
            return Err(DirtyLogError::Misaligned { offset });
        }
        let end = offset.checked_add(size).ok_or(DirtyLogError::Overflow)?;
        let len = usize::try_from(size).map_err(|_| DirtyLogError::Overflow)?;
        let file_len = file.metadata().map_err(DirtyLogError::Stat)?.len();
        // Touching a mapping past the end of its file is SIGBUS, not an error.
        if end > file_len {
            return Err(DirtyLogError::BeyondFile {
                offset,
                size,
                file: file_len,
            });
        }
        let map_offset = libc::off_t::try_from(offset).map_err(|_| DirtyLogError::Overflow)?;
        // SAFETY: a new shared mapping of a file we hold open, at an address the kernel picks;
        // no existing memory is affected. The result is checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                map_offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(DirtyLogError::Map {
                size,
                offset,
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(base.cast::<u8>()).ok_or(DirtyLogError::Map {
            size,
            offset,
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        Ok(LogMap { base, len })
    }

    /// The guest addresses the log covers: `[0, covers)`.
    pub fn covers(&self) -> u64 {
        (self.len as u64).saturating_mul(8 * LOG_PAGE)
    }

    /// Marks every page of `[gpa, gpa + len)` dirty; `false` if some of it lies beyond the log
    /// (what does is not marked).
    pub fn mark(&self, gpa: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let Some(last) = gpa.checked_add(len - 1) else {
            return false;
        };
        let mut inside = true;
        for page in gpa / LOG_PAGE..=last / LOG_PAGE {
            let byte = (page / 8) as usize;
            if byte >= self.len {
                inside = false;
                break;
            }
            // SAFETY: `byte` is inside the mapping, which lives as long as `self`; u8 has no
            // alignment, and every access to the log is atomic (the frontend clears it with
            // atomic exchanges).
            let cell = unsafe { AtomicU8::from_ptr(self.base.as_ptr().add(byte)) };
            let bit = 1u8 << (page % 8);
            // Already marked: no write (and no cache-line bounce with the frontend's reads).
            if cell.load(Ordering::Relaxed) & bit == 0 {
                cell.fetch_or(bit, Ordering::Relaxed);
            }
        }
        inside
    }
}

impl Drop for LogMap {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `map` with this length and is dropped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096).max(1)
}

/// One session's dirty log, shared with its queue threads. Cloning shares it.
#[derive(Clone, Default)]
pub struct DirtyLog(Arc<Shared>);

#[derive(Default)]
struct Shared {
    map: ArcSwapOption<LogMap>,
    /// The frontend acked VHOST_F_LOG_ALL.
    log_all: AtomicBool,
    /// `log_all` and a log installed: what queue threads check.
    active: AtomicBool,
    /// Marks that fell outside the log (a frontend that grew memory without growing the log).
    missed: AtomicU64,
}

/// Why [`DirtyLog::install`] could not make logging safe.
#[derive(Debug, Error)]
#[error("cannot make the queue threads see that logging is on (membarrier)")]
pub struct BarrierError(#[source] std::io::Error);

impl DirtyLog {
    /// Whether the queue threads must mark what they write. Call after the writes, behind a
    /// compiler fence (see the module comment).
    #[inline]
    pub fn active(&self) -> bool {
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
        self.0.active.load(Ordering::Relaxed)
    }

    /// The log to mark; `None` if logging went off meanwhile.
    pub fn map(&self) -> Option<Arc<LogMap>> {
        self.0.map.load_full()
    }

    /// Counts marks that fell outside the log; `true` for the first (to log it once).
    pub fn note_missed(&self) -> bool {
        self.0.missed.fetch_add(1, Ordering::Relaxed) == 0
    }

    pub fn missed(&self) -> u64 {
        self.0.missed.load(Ordering::Relaxed)
    }

    /// SET_LOG_BASE: installs `map`, replacing the old log once nobody marks it any more.
    pub fn install(&self, map: LogMap) -> Result<(), BarrierError> {
        let old = self.0.map.swap(Some(Arc::new(map)));
        let result = self.update();
        if let Some(old) = old {
            wait_unshared(old);
        }
        result
    }

    /// SET_FEATURES: whether the frontend acked VHOST_F_LOG_ALL.
    pub fn set_log_all(&self, on: bool) -> Result<(), BarrierError> {
        self.0.log_all.store(on, Ordering::SeqCst);
        self.update()
    }

    /// Whether the frontend acked VHOST_F_LOG_ALL.
    pub fn log_all(&self) -> bool {
        self.0.log_all.load(Ordering::SeqCst)
    }

    /// Disconnect or reset: logging off, the log dropped.
    pub fn clear(&self) {
        self.0.log_all.store(false, Ordering::SeqCst);
        self.0.active.store(false, Ordering::SeqCst);
        if let Some(old) = self.0.map.swap(None) {
            wait_unshared(old);
        }
    }

    fn update(&self) -> Result<(), BarrierError> {
        let on = self.0.log_all.load(Ordering::SeqCst) && self.0.map.load().is_some();
        let was = self.0.active.swap(on, Ordering::SeqCst);
        if on && !was {
            membarrier()?;
        }
        Ok(())
    }
}

/// Waits until the queue threads have let `map` go (they hold it for one release at a time).
fn wait_unshared(map: Arc<LogMap>) {
    let start = Instant::now();
    while Arc::strong_count(&map) > 1 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_micros(50));
    }
}

const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

/// A full memory barrier on every running thread of this process.
fn membarrier() -> Result<(), BarrierError> {
    let call = |cmd: libc::c_int| {
        // SAFETY: membarrier takes two integers and touches no memory of ours.
        let r = unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0u32, 0) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // Registering is idempotent and cheap; the first barrier of a process needs it.
    call(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED)
        .and_then(|()| call(MEMBARRIER_CMD_PRIVATE_EXPEDITED))
        .map_err(BarrierError)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_file(size: u64) -> File {
        let file = tempfile::tempfile_in("/dev/shm").expect("a file in /dev/shm");
        file.set_len(size).expect("size the log");
        file
    }

    fn bits(file: &File, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, 0).expect("read the log");
        buf
    }

    #[test]
    fn marks_one_bit_per_page_touched() {
        let file = log_file(4096);
        let map = LogMap::map(&file, 64, 0, 64 * 8 * LOG_PAGE).unwrap();
        assert!(map.mark(0, 1));
        assert!(map.mark(9 * LOG_PAGE + 4095, 2), "straddles pages 9 and 10");
        assert!(
            map.mark(20 * LOG_PAGE, 0),
            "nothing written, nothing marked"
        );
        let log = bits(&file, 3);
        assert_eq!(log, [0b0000_0001, 0b0000_0110, 0]);
        assert!(!map.mark(64 * 8 * LOG_PAGE, 1), "beyond the log");
        assert!(!map.mark(u64::MAX, 2), "wraps around");
    }

    #[test]
    fn a_log_too_small_misplaced_or_beyond_its_file_is_refused() {
        let file = log_file(4096);
        let needed = 65 * 8 * LOG_PAGE;
        assert!(matches!(
            LogMap::map(&file, 64, 0, needed),
            Err(DirtyLogError::TooSmall { .. })
        ));
        assert!(matches!(
            LogMap::map(&file, 0, 0, 0),
            Err(DirtyLogError::Empty)
        ));
        assert!(matches!(
            LogMap::map(&file, 8192, 0, 0),
            Err(DirtyLogError::BeyondFile { .. })
        ));
        assert!(matches!(
            LogMap::map(&file, 64, 100, 0),
            Err(DirtyLogError::Misaligned { .. })
        ));
        assert!(matches!(
            LogMap::map(&file, u64::MAX, 4096, 0),
            Err(DirtyLogError::Overflow)
        ));
    }

    #[test]
    fn logging_is_on_with_log_all_and_a_log() {
        let log = DirtyLog::default();
        log.set_log_all(true).unwrap();
        assert!(!log.active(), "no log yet");
        let file = log_file(4096);
        log.install(LogMap::map(&file, 64, 0, 0).unwrap()).unwrap();
        assert!(log.active());
        log.set_log_all(false).unwrap();
        assert!(!log.active());
        assert!(
            log.map().is_some(),
            "the log stays until replaced or cleared"
        );
        log.clear();
        assert!(log.map().is_none());
    }
}
