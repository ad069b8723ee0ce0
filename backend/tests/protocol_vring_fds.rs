//! Protocol tests, layer 2: a running ring's eventfds.
//!
//! SET_VRING_KICK on a running ring restarts its thread with the new kick fd; the call fd and
//! the error fd the frontend gave before must stay, since a frontend sends only the kick again
//! (QEMU does, when it switches a ring's host notifier). And the error fd is what the backend
//! signals when the driver corrupts its ring, as the kernel's vhost does (`vq_err`).

use std::time::{Duration, Instant};

use vublk_test_support::frontend::blk::{self, header, Readback, S_OK};
use vublk_test_support::frontend::{Fixture, Seg, Session, Step};

const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");
const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(5);

/// Publishes a 4 KiB read at `sector`; returns its head and what to read back.
fn post_read(s: &mut Session, sector: u64) -> (u16, Readback) {
    let mut b = s.blk(0);
    let hdr = b.alloc_bytes(&header(blk::T_IN, sector)).unwrap();
    let data = b.alloc(4096, 0xee).unwrap();
    let status = b.alloc_status().unwrap();
    let rb = Readback {
        data: vec![(data, 4096)],
        status: Some(status),
    };
    let segs = [
        Seg::readable(hdr, 16),
        Seg::writable(data, 4096),
        Seg::writable(status, 1),
    ];
    let head = s.submit(0, &segs).unwrap();
    (head, rb)
}

/// A read that must be completed *and* signalled on the call fd.
fn read_with_interrupt(fx: &Fixture, s: &mut Session, sector: u64) {
    let (head, rb) = post_read(s, sector);
    assert!(
        s.wait_call(0, WAIT).unwrap(),
        "no interrupt for the read at sector {sector}\nlog:\n{}",
        fx.daemon.log()
    );
    let c = s.blk(0).finish(head, &rb).unwrap();
    assert_eq!(c.status(), S_OK);
}

/// Whether the error eventfd of queue 0 is signalled within [`WAIT`].
fn err_signalled(s: &Session) -> bool {
    let deadline = Instant::now() + WAIT;
    loop {
        if s.vring(0).unwrap().err.read().is_ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_new_kick_fd_keeps_the_call_fd() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = fx.session();
    read_with_interrupt(&fx, &mut s, 0);
    // The kick again, on the running ring, and nothing else.
    s.step(&Step::WithReply(Box::new(Step::SetVringKick(0))))
        .unwrap();
    read_with_interrupt(&fx, &mut s, 8);
    read_with_interrupt(&fx, &mut s, 16);
}

#[test]
fn a_corrupted_ring_signals_the_error_fd_even_after_a_new_kick_fd() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = fx.session();
    s.step(&Step::WithReply(Box::new(Step::SetVringErr(0))))
        .unwrap();
    s.step(&Step::WithReply(Box::new(Step::SetVringKick(0))))
        .unwrap();
    read_with_interrupt(&fx, &mut s, 0);
    assert!(
        s.vring(0).unwrap().err.read().is_err(),
        "no error on a healthy ring"
    );
    // An avail index that jumps past the ring's size: the queue is broken.
    let (vr, mem) = s.vring_mut(0).unwrap();
    let size = vr.queue.size();
    let jump = vr.queue.avail_idx().wrapping_add(size + 7);
    vr.queue.set_avail_idx(mem, jump).unwrap();
    s.kick(0).unwrap();
    assert!(
        err_signalled(&s),
        "the error fd was not signalled\nlog:\n{}",
        fx.daemon.log()
    );
}
