//! Surviving SIGBUS in shared mappings of files that someone else may truncate.
//!
//! Touching a page of a `MAP_SHARED` mapping that lies past the end of its file raises SIGBUS,
//! and two kinds of mapping in vublk are of files other people own: a mapped image on a memory
//! filesystem (`io/mapped.rs`; the image is the VMM's user's file) and guest memory
//! (`vhost_user/memory.rs`; the VMM's memfds, which it may truncate after SET_MEM_TABLE was
//! checked). Without a handler the default action kills the process: the worker, or the whole
//! daemon with `--single-process`.
//!
//! So each such mapping registers its range here ([`Guard`]). One process-wide SIGBUS handler
//! looks the faulting address up among the registered ranges; inside one, it maps an anonymous
//! zero page (of the range's page size) over the faulting page, marks the range broken and
//! returns, so the access that faulted finishes (a read sees zeroes, a write goes nowhere). The
//! owner of the range sees [`Guard::intact`] turn false and stops trusting it. A SIGBUS
//! anywhere else gets the default action.
//!
//! The table is a fixed array of atomics, as the handler may only use async-signal-safe
//! operations: no locks, no allocation. A range is registered with its end last and
//! unregistered with its end first, so the handler never sees a range larger than the one
//! registered.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

/// Ranges the handler knows at once: every mapped image and guest memory region of a process.
const SLOTS: usize = 1024;

/// A registered range: start, end and page size; a start of 0 marks a free slot.
struct Range {
    start: AtomicUsize,
    end: AtomicUsize,
    page: AtomicUsize,
    broken: AtomicBool,
}

static RANGES: [Range; SLOTS] = [const {
    Range {
        start: AtomicUsize::new(0),
        end: AtomicUsize::new(0),
        page: AtomicUsize::new(4096),
        broken: AtomicBool::new(false),
    }
}; SLOTS];
static HANDLER: Once = Once::new();

/// A mapped range the SIGBUS handler patches instead of letting the process die; unregistered
/// when dropped (or by [`Guard::unregister`], which the owner calls before it unmaps).
#[derive(Debug)]
pub struct Guard {
    slot: Option<usize>,
}

impl Guard {
    /// Registers `[start, start + len)`, mapped in pages of `page` bytes (a power of two: the
    /// base page, or a huge page for hugetlbfs). `None` when the table is full.
    pub fn register(start: usize, len: usize, page: usize) -> Option<Guard> {
        HANDLER.call_once(install_handler);
        let end = start.checked_add(len)?;
        if start == 0 || !page.is_power_of_two() {
            return None;
        }
        let slot = RANGES.iter().position(|r| {
            r.start
                .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })?;
        let range = &RANGES[slot];
        range.broken.store(false, Ordering::Relaxed);
        range.page.store(page, Ordering::Relaxed);
        range.end.store(end, Ordering::Release);
        Some(Guard { slot: Some(slot) })
    }

    /// False once an access faulted past the end of the file (see the module docs).
    pub fn intact(&self) -> bool {
        self.slot
            .is_none_or(|slot| !RANGES[slot].broken.load(Ordering::Acquire))
    }

    /// Takes the range out of the table: the caller is about to unmap it.
    pub fn unregister(&mut self) {
        if let Some(slot) = self.slot.take() {
            RANGES[slot].end.store(0, Ordering::Release);
            RANGES[slot].start.store(0, Ordering::Release);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.unregister();
    }
}

fn install_handler() {
    // SAFETY: sigaction with a zeroed struct, our handler and SA_SIGINFO; the previous action
    // is not needed (a SIGBUS outside our ranges gets the default one).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigbus;
        action.sa_sigaction = handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
            tracing::warn!(
                "cannot install the SIGBUS handler: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// Async-signal-safe: atomics, mmap and signal only.
extern "C" fn on_sigbus(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for range in &RANGES {
        let start = range.start.load(Ordering::Acquire);
        let end = range.end.load(Ordering::Acquire);
        if start == 0 || !(start..end).contains(&addr) {
            continue;
        }
        range.broken.store(true, Ordering::Release);
        let page = range.page.load(Ordering::Relaxed);
        // SAFETY: replaces one page of a registered mapping with anonymous memory, so the
        // faulting access can finish; the owner never trusts the range again (`broken`). The
        // mapping stays registered until its owner unregisters it, before unmapping it, so
        // the page is ours to replace.
        let fixed = unsafe {
            libc::mmap(
                (addr & !(page - 1)) as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if fixed != libc::MAP_FAILED {
            return;
        }
        break;
    }
    // Not ours (or it could not be patched): the default action; on return the fault repeats.
    // SAFETY: resetting SIGBUS to its default disposition.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}
