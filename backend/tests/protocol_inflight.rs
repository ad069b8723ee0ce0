//! Protocol tests, layer 2: inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD).
//!
//! The scripted frontend plays a QEMU whose previous backend died: it takes the region from
//! GET_INFLIGHT_FD, writes into it what a crashed backend would have left (heads in flight with
//! their counters, a last batch published in the used ring but not recorded), hands it back
//! with SET_INFLIGHT_FD and starts the ring at the used index, as QEMU does. vublk must run the
//! heads left in flight again, oldest first, never the ones that completed, and carry on from
//! the right avail position. Hostile regions (bad sizes, indexes, flags, an fd that could
//! shrink) are refused with a clear error, and the daemon keeps serving.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vublk_test_support::frontend::blk::{header, S_OK, T_OUT};
use vublk_test_support::frontend::fixture::image_pattern;
use vublk_test_support::frontend::{Fixture, Seg, Session, SessionConfig, Step};
use vublk_test_support::io_gate::IoGate;
use vublk_test_support::pattern::assert_same;

const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");
const MIB: u64 = 1 << 20;
const QUEUE_SIZE: u16 = 128;
const WAIT: Duration = Duration::from_secs(10);

/// The region layout (vhost-user spec, "Inflight I/O tracking", split rings).
const VERSION: u64 = 8;
const DESC_NUM: u64 = 10;
const LAST_BATCH_HEAD: u64 = 12;
const USED_IDX: u64 = 14;
fn desc_at(head: u16) -> u64 {
    16 + 16 * u64::from(head)
}

fn config() -> SessionConfig {
    let mut config = SessionConfig {
        queue_size: QUEUE_SIZE,
        ..SessionConfig::default()
    };
    config.protocol_features |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    config
}

/// QEMU's handshake up to the memory table, every message asking for a reply; the vring steps
/// come after the inflight region.
fn before_rings() -> Vec<Step> {
    let mut steps = Step::qemu(1);
    // Step::qemu(1) ends with the five vring steps of queue 0 and its enable.
    steps.truncate(steps.len() - 6);
    steps.insert(3, Step::NeedReply);
    steps
}

/// Starts queue 0 at avail index `base`, as QEMU does after its backend went away.
fn start_ring(s: &mut Session, base: u16) -> Result<(), String> {
    let err = |e: vublk_test_support::frontend::session::SessionError| format!("{e}");
    s.step(&Step::SetVringNum(0)).map_err(err)?;
    s.frontend()
        .set_vring_base(0, base)
        .map_err(|e| format!("SET_VRING_BASE: {e}"))?;
    s.step(&Step::SetVringAddr(0)).map_err(err)?;
    s.step(&Step::SetVringKick(0)).map_err(err)?;
    s.step(&Step::SetVringCall(0)).map_err(err)?;
    s.step(&Step::SetVringEnable(0, true)).map_err(err)
}

fn get_region(s: &mut Session) -> (VhostUserInflight, File) {
    let ask = VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: QUEUE_SIZE,
    };
    s.frontend().get_inflight_fd(&ask).expect("GET_INFLIGHT_FD")
}

fn put<const N: usize>(file: &File, at: u64, bytes: [u8; N]) {
    file.write_all_at(&bytes, at).expect("write the region");
}

/// Marks `head` in flight with `counter`.
fn in_flight(file: &File, head: u16, counter: u64) {
    put(file, desc_at(head), [1]);
    put(file, desc_at(head) + 8, counter.to_le_bytes());
}

/// A write of `fill` bytes at `sector` as one chain (not published). Returns the head.
fn write_chain(s: &mut Session, sector: u64, fill: u8) -> u16 {
    let mut q = s.blk(0);
    let hdr = q.alloc_bytes(&header(T_OUT, sector)).unwrap();
    let data = q.alloc(4096, fill).unwrap();
    let status = q.alloc_status().unwrap();
    let (vr, mem) = s.vring_mut(0).unwrap();
    vr.queue
        .add_chain(
            mem,
            &[
                Seg::readable(hdr, 16),
                Seg::readable(data, 4096),
                Seg::writable(status, 1),
            ],
        )
        .unwrap()
}

#[test]
fn heads_left_in_flight_run_again_oldest_first_and_only_they() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = fx.session_with(config(), &before_rings());
    let (region, file) = get_region(&mut s);
    assert!(
        region.mmap_size >= 16 + 16 * u64::from(QUEUE_SIZE),
        "region of {} bytes",
        region.mmap_size
    );

    // The driver made three writes available; the previous backend took all three, completed
    // B (used index 1) and died before recording that, with A and C in flight, C taken first.
    let a = write_chain(&mut s, 0, 0x11);
    let b = write_chain(&mut s, 8, 0x22);
    let c = write_chain(&mut s, 16, 0x33);
    {
        let (vr, mem) = s.vring_mut(0).unwrap();
        vr.queue.publish_batch(mem, &[a, b, c]).unwrap();
        let used = vr.queue.used_ring();
        mem.store(used + 4, u32::from(b), Ordering::Relaxed)
            .unwrap();
        mem.store(used + 8, 1u32, Ordering::Relaxed).unwrap();
        mem.store(used + 2, 1u16, Ordering::Release).unwrap();
        let seen = vr.queue.pop_used(mem).unwrap().expect("B in the used ring");
        assert_eq!(seen.id, u32::from(b));
    }
    put(&file, VERSION, 1u16.to_le_bytes());
    put(&file, DESC_NUM, QUEUE_SIZE.to_le_bytes());
    put(&file, LAST_BATCH_HEAD, b.to_le_bytes());
    put(&file, USED_IDX, 0u16.to_le_bytes());
    in_flight(&file, a, 7);
    in_flight(&file, b, 5);
    in_flight(&file, c, 3);
    s.frontend()
        .set_inflight_fd(&region, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    start_ring(&mut s, 1).unwrap_or_else(|e| panic!("{e}\n{}", fx.daemon.log()));

    for head in [a, c] {
        let used = s
            .wait_head(0, head, WAIT)
            .unwrap_or_else(|e| panic!("head {head}: {e}\n{}", fx.daemon.log()));
        assert_eq!(used.len, 1, "head {head}");
    }
    assert_same(&fx.image_bytes(0, 4096), &[0x11; 4096], "A's write");
    assert_same(&fx.image_bytes(16 * 512, 4096), &[0x33; 4096], "C's write");
    // B completed before the crash: it must not run again.
    assert_same(
        &fx.image_bytes(8 * 512, 4096),
        &image_pattern(8 * 512, 4096),
        "B's sectors",
    );
    let heads = format!("heads [{c}, {a}]");
    assert!(
        fx.daemon.log_shows(&heads),
        "not resubmitted as C then A ({c}, {a}):\n{}",
        fx.daemon.log()
    );
    // The ring goes on from avail index 3: a new request is served, and B is not.
    let r = s.blk(0).read(16, 4096).unwrap();
    assert_eq!(r.status(), S_OK);
    assert_same(&r.data, &[0x33; 4096], "read after the resubmissions");
    assert_same(
        &fx.image_bytes(8 * 512, 4096),
        &image_pattern(8 * 512, 4096),
        "B's sectors after more requests",
    );

    // What vublk left in the region: nothing in flight, used_idx that of the ring.
    let mut hdr = [0u8; 16];
    file.read_exact_at(&mut hdr, 0).unwrap();
    assert_eq!(u16::from_le_bytes([hdr[14], hdr[15]]), 4, "used_idx");
    for head in [a, b, c] {
        let mut flag = [0u8];
        file.read_exact_at(&mut flag, desc_at(head)).unwrap();
        assert_eq!(flag[0], 0, "head {head} still marked in flight");
    }
}

#[test]
fn a_fresh_region_takes_the_used_index_of_the_ring() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = fx.session_with(config(), &before_rings());
    let (region, file) = get_region(&mut s);
    // A ring that has been running: 40 completions before this backend (e.g. after a
    // migration or a reset of the region).
    {
        let (vr, mem) = s.vring_mut(0).unwrap();
        let used = vr.queue.used_ring();
        mem.store(used + 2, 40u16, Ordering::Release).unwrap();
        let avail = vr.queue.avail_ring();
        mem.store(avail + 2, 40u16, Ordering::Release).unwrap();
    }
    s.frontend()
        .set_inflight_fd(&region, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    start_ring(&mut s, 40).unwrap();
    let mut hdr = [0u8; 16];
    file.read_exact_at(&mut hdr, 0).unwrap();
    assert_eq!(u16::from_le_bytes([hdr[8], hdr[9]]), 1, "version");
    assert_eq!(
        u16::from_le_bytes([hdr[10], hdr[11]]),
        QUEUE_SIZE,
        "desc_num"
    );
    assert_eq!(u16::from_le_bytes([hdr[14], hdr[15]]), 40, "used_idx");
}

/// Starts a session whose region `corrupt` spoils; the ring's start must be refused with a
/// line saying `why` (a daemon each: a VMM's warnings are rate-limited), and the daemon must
/// serve the next frontend.
fn refused_ring(corrupt: impl FnOnce(&File), why: &str) {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let fx = &mut fx;
    let mut s = fx.session_with(config(), &before_rings());
    let (region, file) = get_region(&mut s);
    put(&file, VERSION, 1u16.to_le_bytes());
    put(&file, DESC_NUM, QUEUE_SIZE.to_le_bytes());
    // Something left in flight: a region with nothing in flight needs no repair, and only
    // follows the ring.
    in_flight(&file, 2, 1);
    corrupt(&file);
    s.frontend()
        .set_inflight_fd(&region, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    let started = start_ring(&mut s, 0);
    assert!(started.is_err(), "ring started on a region with {why}");
    assert!(
        fx.daemon.log_shows(why),
        "no line saying {why:?}:\n{}",
        fx.daemon.log()
    );
    drop(s);
    let mut s = fx.session();
    assert_eq!(s.blk(0).read(0, 512).unwrap().status(), S_OK);
}

#[test]
fn hostile_regions_are_refused_and_the_daemon_serves_on() {
    refused_ring(
        |f| put(f, DESC_NUM, 64u16.to_le_bytes()),
        "desc_num 64 is not the ring's size 128",
    );
    refused_ring(
        |f| put(f, desc_at(5), [2]),
        "descriptor 5 has inflight flag 2",
    );
    refused_ring(
        |f| {
            put(f, USED_IDX, u16::MAX.to_le_bytes());
            put(f, LAST_BATCH_HEAD, 500u16.to_le_bytes());
        },
        "last_batch_head 500 is not below 128",
    );
    refused_ring(
        |f| put(f, USED_IDX, 100u16.to_le_bytes()),
        "is longer than the ring",
    );
    refused_ring(
        |f| {
            put(f, USED_IDX, (u16::MAX - 1).to_le_bytes());
            put(f, LAST_BATCH_HEAD, 3u16.to_le_bytes());
            put(f, desc_at(3) + 6, 4000u16.to_le_bytes());
        },
        "links to descriptor 4000",
    );
    refused_ring(|f| put(f, VERSION, 9u16.to_le_bytes()), "version 9");

    // SET_INFLIGHT_FD itself: a file that could shrink under the mapping, a region too small.
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = fx.session_with(config(), &before_rings());
    let plain = tempfile::tempfile().unwrap();
    plain.set_len(1 << 20).unwrap();
    let region = VhostUserInflight {
        mmap_size: 1 << 20,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: QUEUE_SIZE,
    };
    assert!(s
        .frontend()
        .set_inflight_fd(&region, plain.as_raw_fd())
        .is_err());
    let (mut region, file) = get_region(&mut s);
    region.mmap_size = 64;
    assert!(s
        .frontend()
        .set_inflight_fd(&region, file.as_raw_fd())
        .is_err());
    region.mmap_size = 1 << 30;
    assert!(s
        .frontend()
        .set_inflight_fd(&region, file.as_raw_fd())
        .is_err());
    assert!(
        fx.daemon.log_shows("not a sealed memfd"),
        "{}",
        fx.daemon.log()
    );
    assert!(fx.daemon.log_shows("need"), "{}", fx.daemon.log());

    // And the daemon serves the next frontend.
    let mut s = fx.session();
    assert_eq!(s.blk(0).read(0, 512).unwrap().status(), S_OK);
}

/// QEMU sends a ring's call fd after its kick fd, so a request resubmitted at the ring's start
/// (the held one here, its byte already waiting at the gate) can complete before there is a fd
/// to signal; with EVENT_IDX no later completion signals for it either. The call fd must be
/// signalled when it arrives, or the guest never hears of that completion (it hung so).
#[test]
fn a_completion_before_the_call_fd_is_signalled_when_it_arrives() {
    let gate = IoGate::new();
    gate.release(1);
    let args = ["--test-io-gate", gate.arg(), "--test-io-gate-offset", "0"];
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &args);
    let mut s = fx.session_with(config(), &before_rings());
    let (region, file) = get_region(&mut s);
    let a = write_chain(&mut s, 0, 0x11);
    {
        let (vr, mem) = s.vring_mut(0).unwrap();
        vr.queue.publish_batch(mem, &[a]).unwrap();
    }
    put(&file, VERSION, 1u16.to_le_bytes());
    put(&file, DESC_NUM, QUEUE_SIZE.to_le_bytes());
    in_flight(&file, a, 7);
    s.frontend()
        .set_inflight_fd(&region, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    s.step(&Step::SetVringNum(0)).unwrap();
    s.frontend().set_vring_base(0, 0).unwrap();
    s.step(&Step::SetVringAddr(0)).unwrap();
    s.step(&Step::SetVringKick(0)).unwrap();
    s.step(&Step::SetVringEnable(0, true)).unwrap();
    let used = s
        .wait_head(0, a, WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", fx.daemon.log()));
    assert_eq!(used.len, 1);
    s.step(&Step::SetVringCall(0)).unwrap();
    assert!(
        s.wait_call(0, WAIT).unwrap(),
        "no call after the call fd arrived"
    );
}

/// A backend stopping cleanly completes what it has in flight after its socket closed, so the
/// frontend may reconnect with used entries in the ring it was never told about (QEMU's avail
/// position, taken when the socket closed, is behind them too). The next backend must signal
/// the call fd however the handshake orders it (cloud-hypervisor sends CALL before KICK), or a
/// driver with EVENT_IDX waits for those completions for good (a guest hung so across an
/// upgrade).
#[test]
fn used_entries_left_by_a_previous_backend_are_signalled() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let config = vublk_test_support::frontend::cloud_hypervisor::session_config(
        1,
        QUEUE_SIZE,
        SessionConfig::default().memory,
    );
    let stream = fx.stream();
    let mut s = Session::new(stream, config).unwrap();
    let a = write_chain(&mut s, 0, 0x11);
    {
        let (vr, mem) = s.vring_mut(0).unwrap();
        vr.queue.publish_batch(mem, &[a]).unwrap();
        let used = vr.queue.used_ring();
        mem.store(used + 4, u32::from(a), Ordering::Relaxed)
            .unwrap();
        mem.store(used + 8, 1u32, Ordering::Relaxed).unwrap();
        mem.store(used + 2, 1u16, Ordering::Release).unwrap();
    }
    s.run(&Step::cloud_hypervisor(1))
        .unwrap_or_else(|e| panic!("{e}\n{}", fx.daemon.log()));
    assert!(
        s.wait_call(0, WAIT).unwrap(),
        "the used entry left by the previous backend was never signalled"
    );
}

/// A frontend that keeps an inflight region and goes away (QEMU, when vublk stops cleanly for
/// an upgrade) gets nothing more in its used ring: the request still in flight finishes its
/// I/O, but its head stays in flight in the region and out of the used ring, for the next
/// backend to run again. A used entry written after the frontend left would complete a head
/// the next backend also runs (the guest's "id N is not a head" across an upgrade).
#[test]
fn a_frontend_that_leaves_with_a_region_gets_no_late_used_entry() {
    let gate = IoGate::new();
    let args = ["--test-io-gate", gate.arg(), "--test-io-gate-offset", "0"];
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &args);
    let mut s = fx.session_with(config(), &before_rings());
    let (region, file) = get_region(&mut s);
    s.frontend()
        .set_inflight_fd(&region, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    start_ring(&mut s, 0).unwrap_or_else(|e| panic!("{e}\n{}", fx.daemon.log()));
    let a = write_chain(&mut s, 0, 0x11);
    {
        let (vr, mem) = s.vring_mut(0).unwrap();
        vr.queue.publish_batch(mem, &[a]).unwrap();
    }
    s.kick(0).unwrap();
    // Held at the gate, and recorded in flight.
    let flag = |file: &File| {
        let mut flag = [0u8];
        file.read_exact_at(&mut flag, desc_at(a)).unwrap();
        flag[0]
    };
    let deadline = std::time::Instant::now() + WAIT;
    while flag(&file) != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "head {a} never in flight\n{}",
            fx.daemon.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // The frontend goes away (keeping its memory and the region), then the write finishes.
    let (elsewhere, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    s.reconnect(elsewhere).unwrap();
    gate.release(1);
    let deadline = std::time::Instant::now() + WAIT;
    while !fx.daemon.log_shows("frontend disconnected; device stopped") {
        assert!(
            std::time::Instant::now() < deadline,
            "the device did not stop\n{}",
            fx.daemon.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_same(&fx.image_bytes(0, 4096), &[0x11; 4096], "the held write");
    let (vr, mem) = s.vring_mut(0).unwrap();
    assert_eq!(
        vr.queue.used_idx(mem).unwrap(),
        0,
        "the backend returned head {a} to a frontend that had gone\n{}",
        fx.daemon.log()
    );
    assert_eq!(flag(&file), 1, "head {a} no longer in flight in the region");
}
