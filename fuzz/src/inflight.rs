//! The `inflight` target: a queue's inflight region as a frontend hands it over
//! (SET_INFLIGHT_FD, vhost_user/inflight.rs) — any header, any descriptor states — read back
//! when the ring starts ([`QueueRegion::recover`]), with the ring's used index and the base
//! SET_VRING_BASE gave; then, if accepted, the queue thread's writes ([`Tracker`]) of a few
//! more heads taken and completed, a crash, and a second recovery.
//!
//! Input, front to back (`fuzz/make_seeds.py` writes seeds in it):
//! - `u8 k`: the ring's size, `k + 1` when `k < 0xf0`, else a `u16` that follows (any value,
//!   0 and sizes above the region's 1024 included);
//! - `u16 ring_used`, `u16 base`: the used ring's index in guest memory, SET_VRING_BASE's;
//! - `u8 n`: bits 0-5 the number of `u16` steps that follow, bit 7 a crash after the last one
//!   (the oldest head in flight reaches the used ring, the region is not told);
//! - each step: bit 15 set completes the in-flight head at index `(v & 0x7fff) % in flight`,
//!   clear takes head `(v & 0x7fff) % size` (unless it is in flight already);
//! - the rest: the region's bytes as the spec lays them out (header, then `desc_num` states of
//!   16 bytes), zero-padded to the ring's size.
//!
//! Checked:
//! - a refused region is refused whole: not a byte of it changed;
//! - recovery never reads or writes past the ring's descriptors (a canary after them);
//! - an accepted region's heads to run again are below the ring's size, unique, flagged in
//!   flight in the region handed over, in counter order (ties by head), and they are exactly
//!   the heads the region flags afterwards; the avail position is the used index plus them;
//!   recovery writes only flags, `used_idx` and (of a fresh region) the header;
//! - after heads are taken and completed through the tracker and the backend crashes, the
//!   next recovery runs again exactly the heads left in flight, oldest first.
//!
//! One sealed memfd of a region for rings of up to 1024 is made and mapped per thread, and
//! rewritten for each input: a memfd per input would make the target ten times slower.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vublk::vhost_user::{
    create_inflight, InflightError, InflightMap, QueueRegion, Recovered, Tracker,
};

use crate::Input;

/// The region's ring size (vublk's default `--queue-size`): larger rings are refused, and a
/// region of rings of 32768 (512 KiB rewritten per input) would make the target ten times
/// slower without a path more to cover.
const MAX_SIZE: u16 = 1024;
const HEADER: usize = 16;
const DESC: usize = 16;
/// A descriptor state's bytes after the ring's last one, which recovery must not touch.
const CANARY: [u8; DESC] = [0xa5; DESC];

thread_local! {
    static REGION: RefCell<Option<(File, Arc<InflightMap>)>> = const { RefCell::new(None) };
}

/// Runs one input.
pub fn run(data: &[u8]) {
    REGION.with(|cell| {
        let mut cell = cell.borrow_mut();
        let (file, map) = cell.get_or_insert_with(|| {
            let (file, size) = create_inflight(1, MAX_SIZE, 1, MAX_SIZE).expect("a region memfd");
            let map = InflightMap::map(&file, size, 0, 1, MAX_SIZE, MAX_SIZE).expect("mapped");
            (file, Arc::new(map))
        });
        one(&mut Input::new(data), file, map);
    });
}

/// A descriptor state of a region's bytes.
#[derive(Clone, Copy, PartialEq, Debug)]
struct State {
    inflight: u8,
    next: u16,
    counter: u64,
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn state(bytes: &[u8], head: u16) -> State {
    let at = HEADER + DESC * usize::from(head);
    State {
        inflight: bytes[at],
        next: u16_at(bytes, at + 6),
        counter: u64::from_le_bytes(bytes[at + 8..at + 16].try_into().expect("8 bytes")),
    }
}

fn one(input: &mut Input<'_>, file: &File, map: &Arc<InflightMap>) {
    let Some(size) = ring_size(input) else {
        return;
    };
    let (Some(ring_used), Some(base), Some(n)) = (input.u16(), input.u16(), input.u8()) else {
        return;
    };
    let mut steps = Vec::new();
    for _ in 0..n & 0x3f {
        let Some(step) = input.u16() else { return };
        steps.push(step);
    }
    let crash = n & 0x80 != 0;

    // The region: the rest of the input, then zeros, up to the ring's descriptors, then the
    // canary (the region of the largest ring has room for it: it is padded to 64 bytes).
    let descs = usize::from(size.min(MAX_SIZE));
    let span = HEADER + DESC * descs;
    let rest = input.bytes(input.len()).unwrap_or_default();
    let mut before = rest[..rest.len().min(span)].to_vec();
    before.resize(span, 0);
    before.extend_from_slice(&CANARY);
    file.write_all_at(&before, 0).expect("write the region");

    let recovered = map
        .queue(0, size)
        .and_then(|region: QueueRegion| region.recover(ring_used, base));
    let mut after = vec![0; before.len()];
    file.read_exact_at(&mut after, 0).expect("read the region");
    assert_eq!(
        after[span..],
        CANARY,
        "recovery wrote past the ring's descriptors"
    );

    let recovered = match recovered {
        Err(e) => {
            assert!(
                after == before,
                "a refused region ({e}) was changed: partial state"
            );
            if size > MAX_SIZE {
                assert!(matches!(e, InflightError::RingTooBig { .. }), "{e}");
            }
            return;
        }
        Ok(r) => r,
    };
    assert!(
        size <= MAX_SIZE,
        "a ring larger than its region was accepted"
    );
    check_accepted(&before, &after, size, ring_used, base, &recovered);
    if size > 0 {
        let counters_fit = recovered
            .resubmit
            .iter()
            .all(|&h| state(&before, h).counter < u64::MAX - 64);
        // A forged counter at the end of its range wraps the next heads' counters below the
        // forged ones: the order among heads the frontend forged is its own business, so the
        // model (which assumes counters grow) is only checked when they cannot wrap.
        if counters_fit {
            continue_and_crash(map, size, ring_used, recovered, &steps, crash);
        }
    }
}

fn ring_size(input: &mut Input<'_>) -> Option<u16> {
    match input.u8()? {
        k @ 0..0xf0 => Some(u16::from(k) + 1),
        _ => input.u16(),
    }
}

/// What an accepted recovery returned and wrote is what the region handed over allowed.
fn check_accepted(
    before: &[u8],
    after: &[u8],
    size: u16,
    ring_used: u16,
    base: u16,
    r: &Recovered,
) {
    let version = u16_at(before, 8);
    let after_header = (
        u16_at(after, 8),
        u16_at(after, 10),
        u16_at(after, 14),
        &after[..8],
    );
    assert_eq!(
        after_header,
        (vublk_version(), size, ring_used, &before[..8]),
        "header after recovery (version, desc_num, used_idx, features)"
    );
    if version == 0 {
        assert!(
            r.resubmit.is_empty(),
            "a fresh region has heads to run again"
        );
        assert_eq!(r.next_avail, base);
        // Its states' padding stays what it was: nothing reads it.
        for head in 0..size {
            let s = state(after, head);
            assert_eq!(
                (s.inflight, s.next, s.counter),
                (0, 0, 0),
                "a fresh region's descriptor {head} is not cleared"
            );
        }
        return;
    }
    assert_eq!(
        version,
        vublk_version(),
        "a region of another version accepted"
    );
    assert_eq!(
        u16_at(before, 10),
        size,
        "a desc_num other than the ring's accepted"
    );

    let mut seen = HashSet::new();
    let mut last: Option<(u64, u16)> = None;
    for &head in &r.resubmit {
        assert!(head < size, "head {head} to run again, ring of {size}");
        assert!(seen.insert(head), "head {head} to run again twice");
        let s = state(before, head);
        assert_eq!(s.inflight, 1, "head {head} to run again was not in flight");
        let key = (s.counter, head);
        assert!(
            last.is_none_or(|l| l < key),
            "heads to run again out of counter order: {:?}",
            r.resubmit
        );
        last = Some(key);
    }
    let nothing_in_flight = (0..size).all(|h| state(before, h).inflight == 0);
    let expected_avail = if nothing_in_flight {
        base
    } else {
        ring_used.wrapping_add(r.resubmit.len() as u16)
    };
    assert_eq!(
        r.next_avail, expected_avail,
        "avail position after recovery"
    );
    for head in 0..size {
        let (b, a) = (state(before, head), state(after, head));
        assert_eq!(
            a.inflight == 1,
            seen.contains(&head),
            "head {head}: flag {} after recovery, to run again: {}",
            a.inflight,
            seen.contains(&head)
        );
        assert_eq!(
            (a.next, a.counter),
            (b.next, b.counter),
            "head {head}'s link or counter rewritten"
        );
        let at = HEADER + DESC * usize::from(head);
        assert_eq!(
            after[at + 1..at + 6],
            before[at + 1..at + 6],
            "padding rewritten"
        );
    }
}

fn vublk_version() -> u16 {
    vublk::vhost_user::INFLIGHT_VERSION
}

/// The queue thread takes and completes heads through the tracker, then the backend dies
/// (in the middle of a completion, with `crash`); the next recovery must run again exactly the
/// heads still in flight, oldest first.
fn continue_and_crash(
    map: &Arc<InflightMap>,
    size: u16,
    ring_used: u16,
    recovered: Recovered,
    steps: &[u16],
    crash: bool,
) {
    let mut in_flight = recovered.resubmit;
    let mut tracker: Tracker = recovered.tracker;
    let mut used = ring_used;
    for &step in steps {
        let v = step & 0x7fff;
        if step & 0x8000 == 0 {
            let head = v % size;
            if !in_flight.contains(&head) {
                tracker.taken(head);
                in_flight.push(head);
            }
        } else if !in_flight.is_empty() {
            let head = in_flight.remove(usize::from(v) % in_flight.len());
            tracker.completing(head);
            used = used.wrapping_add(1);
            tracker.completed(head, used);
        }
    }
    let crashed = crash && !in_flight.is_empty();
    if crashed {
        // In the used ring, not yet recorded as done.
        let head = in_flight.remove(0);
        tracker.completing(head);
        used = used.wrapping_add(1);
    }
    drop(tracker);
    let base = used.wrapping_sub(7);
    let again = map
        .queue(0, size)
        .and_then(|region| region.recover(used, base))
        .unwrap_or_else(|e| panic!("a region vublk wrote itself is refused: {e}"));
    assert_eq!(
        again.resubmit, in_flight,
        "heads to run again after a crash"
    );
    // The ring's base when the region flags nothing; with the crashed head still flagged (and
    // cleared as the last batch), the used index plus the heads left.
    let avail = if in_flight.is_empty() && !crashed {
        base
    } else {
        used.wrapping_add(in_flight.len() as u16)
    };
    assert_eq!(again.next_avail, avail);
}
