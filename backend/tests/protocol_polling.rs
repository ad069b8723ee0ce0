//! Protocol tests, layer 2: adaptive polling of the avail ring (`--poll-max-us`).
//!
//! A queue thread that polls serves a chain the driver published without kicking; one that
//! does not poll, or whose window collapsed because the driver went idle, waits for the kick.
//! The tests publish chains without a kick and watch whether they complete.

use std::time::Duration;

use vublk_test_support::frontend::blk::{header, Readback, S_OK, T_IN};
use vublk_test_support::frontend::fixture::image_pattern;
use vublk_test_support::frontend::{Fixture, Seg, Session};
use vublk_test_support::pattern::assert_same;

const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");
const MIB: u64 = 1 << 20;

/// Kicked requests, each after a pause of `GAP`: every idle spell lasts about `GAP`, so the
/// window doubles from 4 µs until it covers the gap (4 µs × 2¹² ≈ 16 ms) and then stays.
const WARM_UP: u64 = 24;
const GAP: Duration = Duration::from_millis(10);
/// Well inside the window the warm-up leaves, well past the moment the thread would otherwise
/// have gone to sleep (see `settle`).
const INSIDE_WINDOW: Duration = Duration::from_millis(3);

/// A 4 KiB read of `sector` published on queue 0 without a kick; returns its head and buffers.
fn publish_read_without_kick(s: &mut Session, sector: u64) -> (u16, Readback) {
    let mut b = s.blk(0);
    let hdr = b.alloc_bytes(&header(T_IN, sector)).unwrap();
    let data = b.alloc(4096, 0xee).unwrap();
    let status = b.alloc_status().unwrap();
    let segs = [
        Seg::readable(hdr, 16),
        Seg::writable(data, 4096),
        Seg::writable(status, 1),
    ];
    let session = b.session();
    let (vr, mem) = session.vring_mut(0).unwrap();
    let head = vr.queue.add_chain(mem, &segs).unwrap();
    vr.queue.publish(mem, head).unwrap();
    (
        head,
        Readback {
            data: vec![(data, 4096)],
            status: Some(status),
        },
    )
}

fn warm_up(s: &mut Session) {
    for i in 0..WARM_UP {
        std::thread::sleep(GAP);
        let c = s.blk(0).read(i * 8, 4096).unwrap();
        assert_eq!(c.status(), S_OK, "warm-up read {i}");
    }
}

/// Gives a queue thread that just completed a request time to go to sleep. Until it has
/// re-enabled kicks it looks at the avail ring once more, and a chain published in that gap is
/// served without a kick, polling or not.
fn settle() {
    std::thread::sleep(Duration::from_millis(50));
}

/// Whether the chain completes within `wait`, checking its data when it does.
fn completes_within(
    s: &mut Session,
    head: u16,
    rb: &Readback,
    sector: u64,
    wait: Duration,
) -> bool {
    match s.blk(0).timeout(wait).finish(head, rb) {
        Ok(c) => {
            assert_eq!(c.status(), S_OK);
            assert_same(
                &c.data,
                &image_pattern(sector * 512, 4096),
                "data of the kickless read",
            );
            true
        }
        Err(_) => false,
    }
}

#[test]
fn a_polling_queue_serves_chains_published_without_a_kick() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &["--poll-max-us", "1000000"]);
    let mut s = fx.session();
    warm_up(&mut s);
    // The queue thread now polls for about 16 ms after each completion.
    for round in 0..5u64 {
        std::thread::sleep(INSIDE_WINDOW);
        let sector = 1000 + round * 8;
        let (head, rb) = publish_read_without_kick(&mut s, sector);
        assert!(
            completes_within(&mut s, head, &rb, sector, Duration::from_secs(5)),
            "round {round}: a chain published without a kick was not served while polling\n{}",
            fx.daemon.log()
        );
    }
}

#[test]
fn without_polling_a_chain_waits_for_its_kick() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &["--poll-max-us", "0"]);
    let mut s = fx.session();
    warm_up(&mut s);
    settle();
    let (head, rb) = publish_read_without_kick(&mut s, 2000);
    assert!(
        !completes_within(&mut s, head, &rb, 2000, Duration::from_millis(300)),
        "served without a kick although polling is off"
    );
    s.kick(0).unwrap();
    assert!(
        completes_within(&mut s, head, &rb, 2000, Duration::from_secs(5)),
        "not served after the kick"
    );
}

#[test]
fn an_idle_driver_shrinks_the_window_until_requests_come_quickly_again() {
    // A 50 ms ceiling: the warm-up grows the window to about 16 ms; idle spells longer than
    // the ceiling halve it, so a kickless chain published after 50 ms waits for its kick.
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &["--poll-max-us", "50000"]);
    let mut s = fx.session();
    warm_up(&mut s);
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(300));
        let c = s.blk(0).read(0, 4096).unwrap();
        assert_eq!(c.status(), S_OK);
    }
    settle();
    let (head, rb) = publish_read_without_kick(&mut s, 3000);
    assert!(
        !completes_within(&mut s, head, &rb, 3000, Duration::from_millis(300)),
        "still polling 50 ms after a completion, after the driver was idle for longer than the ceiling twice"
    );
    s.kick(0).unwrap();
    assert!(
        completes_within(&mut s, head, &rb, 3000, Duration::from_secs(5)),
        "not served after the kick"
    );
    // Requests at short intervals again: polling comes back.
    warm_up(&mut s);
    std::thread::sleep(INSIDE_WINDOW);
    let (head, rb) = publish_read_without_kick(&mut s, 3008);
    assert!(
        completes_within(&mut s, head, &rb, 3008, Duration::from_secs(5)),
        "polling did not resume once requests came quickly again"
    );
}
