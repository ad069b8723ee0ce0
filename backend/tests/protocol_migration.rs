//! Protocol tests of live migration's dirty log: the scripted frontend plays QEMU starting a
//! migration under a running ring (SET_LOG_BASE, SET_FEATURES with VHOST_F_LOG_ALL, SET_VRING_ADDR
//! with VHOST_VRING_F_LOG) and reads the log the way QEMU syncs it.
//!
//! Every buffer a test looks at has a 4 KiB page of its own, so a page marked for one reason
//! cannot pass for another: the read's data, its status byte, the used ring, and the header (a
//! page the backend only reads, never marked).

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vublk_test_support::frontend::blk::{header, Readback, S_OK, T_IN, T_OUT};
use vublk_test_support::frontend::fixture::image_pattern;
use vublk_test_support::frontend::{Fixture, Seg, Session, SessionConfig, Step};
use vublk_test_support::io_gate::IoGate;
use vublk_test_support::pattern::assert_same;

const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// The guest memory of these tests: one 16 MiB region at 0.
const GUEST: u64 = 16 * MIB;
/// The log covering it: one bit per page.
const LOG_BYTES: u64 = GUEST / PAGE / 8;
const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();

/// QEMU's handshake with LOG_SHMFD acked; queue 0 running, logging off.
fn session(fx: &mut Fixture) -> Session {
    let mut config = SessionConfig::default();
    config.protocol_features |= VhostUserProtocolFeatures::LOG_SHMFD;
    fx.session_with(config, &Step::qemu(1))
}

/// A dirty log in a file of its own, the way QEMU shares it (a memfd; here /dev/shm).
struct Log(File);

impl Log {
    fn new(len: u64) -> Log {
        let file = tempfile::tempfile_in("/dev/shm").expect("a file in /dev/shm");
        file.set_len(len).expect("size the log");
        Log(file)
    }

    fn bytes(&self) -> Vec<u8> {
        let mut buf = vec![0; LOG_BYTES as usize];
        self.0.read_exact_at(&mut buf, 0).expect("read the log");
        buf
    }

    fn marked(&self, gpa: u64) -> bool {
        let page = gpa / PAGE;
        self.bytes()[(page / 8) as usize] & (1 << (page % 8)) != 0
    }

    /// What QEMU's sync does: takes the marks, clearing them.
    fn clear(&self) {
        self.0
            .write_all_at(&vec![0; LOG_BYTES as usize], 0)
            .expect("clear the log");
    }

    fn marked_pages(&self) -> Vec<u64> {
        let bytes = self.bytes();
        (0..LOG_BYTES * 8)
            .filter(|p| bytes[(p / 8) as usize] & (1 << (p % 8)) != 0)
            .map(|p| p * PAGE)
            .collect()
    }
}

/// What QEMU sends when a migration starts: the log, LOG_ALL (waiting for the reply, as QEMU
/// does), and the used ring's log address.
fn start_logging(s: &mut Session, log: &Log) {
    s.set_log_base(log.0.as_fd(), LOG_BYTES, 0)
        .expect("SET_LOG_BASE");
    let features = s.acked_features() | LOG_ALL;
    s.run(&[
        Step::WithReply(Box::new(Step::SetFeaturesRaw(features))),
        Step::WithReply(Box::new(Step::SetVringAddrLog(0))),
    ])
    .expect("turn logging on");
}

/// Where a request's buffers are, each on a page of its own.
struct Placed {
    header: u64,
    data: u64,
    status: u64,
}

/// Publishes a read (or a write of `data`) of one page at `sector`, every buffer on its own page.
fn post(s: &mut Session, req_type: u32, sector: u64, data: Option<&[u8]>) -> (u16, Placed) {
    let arena = s.arena();
    let placed = Placed {
        header: arena.alloc(PAGE, PAGE).unwrap(),
        data: arena.alloc(PAGE, PAGE).unwrap(),
        status: arena.alloc(PAGE, PAGE).unwrap(),
    };
    let mem = s.mem();
    mem.write(placed.header, &header(req_type, sector)).unwrap();
    mem.fill(placed.data, PAGE as usize, 0xee).unwrap();
    mem.fill(placed.status, 1, 0xff).unwrap();
    let data_seg = match data {
        Some(bytes) => {
            mem.write(placed.data, bytes).unwrap();
            Seg::readable(placed.data, PAGE as u32)
        }
        None => Seg::writable(placed.data, PAGE as u32),
    };
    let segs = [
        Seg::readable(placed.header, 16),
        data_seg,
        Seg::writable(placed.status, 1),
    ];
    let head = s.submit(0, &segs).expect("publish the request");
    (head, placed)
}

fn finish(s: &mut Session, head: u16, placed: &Placed) -> Vec<u8> {
    let rb = Readback {
        data: vec![(placed.data, PAGE as u32)],
        status: Some(placed.status),
    };
    let c = s.blk(0).finish(head, &rb).expect("the request completes");
    assert_eq!(c.status(), S_OK);
    c.data
}

/// The pages of the used ring's index and of the entry the backend wrote last.
fn used_pages(s: &Session) -> (u64, u64) {
    let q = &s.vring(0).unwrap().queue;
    let slot = u64::from(q.last_used().wrapping_sub(1) % q.size());
    (q.used_ring() + 2, q.used_ring() + 4 + 8 * slot)
}

#[test]
fn logging_is_offered_and_postcopy_is_not() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let s = session(&mut fx);
    assert_ne!(s.backend_features() & LOG_ALL, 0, "VHOST_F_LOG_ALL");
    let protocol = s.backend_protocol_features();
    assert!(protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    assert!(
        !protocol.contains(VhostUserProtocolFeatures::PAGEFAULT),
        "postcopy needs PAGEFAULT, which is not offered"
    );
}

#[test]
fn reads_mark_their_data_status_and_the_used_ring() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = session(&mut fx);
    let log = Log::new(LOG_BYTES);
    start_logging(&mut s, &log);

    let (head, read) = post(&mut s, T_IN, 16, None);
    let data = finish(&mut s, head, &read);
    assert_same(&data, &image_pattern(16 * 512, PAGE as usize), "read data");
    let (idx, entry) = used_pages(&s);
    assert!(log.marked(read.data), "the read's data page");
    assert!(log.marked(read.status), "the read's status page");
    assert!(log.marked(entry), "the used entry's page");
    assert!(log.marked(idx), "the used index's page");
    assert!(!log.marked(read.header), "the header page is only read");

    // A write marks its status byte, not the buffer the device only read.
    log.clear();
    let (head, write) = post(&mut s, T_OUT, 32, Some(&[0x42; PAGE as usize]));
    finish(&mut s, head, &write);
    assert!(log.marked(write.status), "the write's status page");
    assert!(
        !log.marked(write.data),
        "the write's data page is only read"
    );
    assert!(log.marked(used_pages(&s).1), "the used entry's page");
    assert_eq!(fx.image_bytes(32 * 512, 8), [0x42; 8]);
}

#[test]
fn stopping_a_ring_while_logging_marks_its_whole_used_ring() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = session(&mut fx);
    let log = Log::new(LOG_BYTES);
    start_logging(&mut s, &log);
    let (head, read) = post(&mut s, T_IN, 16, None);
    finish(&mut s, head, &read);
    // QEMU's last sync comes after GET_VRING_BASE: the ring's flags and avail_event (written
    // when the thread turned notifications on and off) must be marked by then.
    log.clear();
    s.step(&Step::GetVringBase(0)).expect("GET_VRING_BASE");
    let q = &s.vring(0).unwrap().queue;
    let (start, len) = (q.used_ring(), 4 + 8 * u64::from(q.size()) + 2);
    let pages: Vec<u64> = (start / PAGE..=(start + len - 1) / PAGE)
        .map(|p| p * PAGE)
        .collect();
    assert_eq!(
        log.marked_pages(),
        pages,
        "the used ring's pages, and only them"
    );
}

#[test]
fn nothing_is_marked_while_logging_is_off() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = session(&mut fx);
    let log = Log::new(LOG_BYTES);
    // A log without LOG_ALL: not logging yet.
    s.set_log_base(log.0.as_fd(), LOG_BYTES, 0)
        .expect("SET_LOG_BASE");
    s.run(&[Step::WithReply(Box::new(Step::SetVringAddrLog(0)))])
        .unwrap();
    let (head, read) = post(&mut s, T_IN, 16, None);
    finish(&mut s, head, &read);
    assert_eq!(log.marked_pages(), [0u64; 0], "marked before LOG_ALL");

    // On, then off again (a migration that was cancelled).
    let features = s.acked_features();
    s.run(&[Step::WithReply(Box::new(Step::SetFeaturesRaw(
        features | LOG_ALL,
    )))])
    .unwrap();
    let (head, read) = post(&mut s, T_IN, 16, None);
    finish(&mut s, head, &read);
    assert!(log.marked(read.data), "logging on");
    s.run(&[Step::WithReply(Box::new(Step::SetFeaturesRaw(features)))])
        .unwrap();
    log.clear();
    let (head, read) = post(&mut s, T_IN, 24, None);
    finish(&mut s, head, &read);
    assert_eq!(
        log.marked_pages(),
        [0u64; 0],
        "marked after logging went off"
    );
}

#[test]
fn a_log_too_small_for_guest_memory_is_refused_and_the_connection_closed() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = session(&mut fx);
    // Covers the first half of guest memory only.
    let log = Log::new(LOG_BYTES);
    assert!(
        s.set_log_base(log.0.as_fd(), LOG_BYTES / 2, 0).is_err(),
        "a log too small was accepted"
    );
    assert!(
        s.wait_hangup(Duration::from_secs(5)).unwrap(),
        "the connection stayed open with the frontend waiting for a reply"
    );
    fx.daemon
        .try_wait_for_log("SET_LOG_BASE refused")
        .expect("the refusal is logged");

    // A log beyond the end of its file: refused, not a SIGBUS.
    let mut s = session(&mut fx);
    let short = Log::new(LOG_BYTES / 2);
    assert!(s.set_log_base(short.0.as_fd(), LOG_BYTES, 0).is_err());
    assert!(s.wait_hangup(Duration::from_secs(5)).unwrap());

    // The daemon serves the next frontend.
    let mut s = session(&mut fx);
    let c = s.blk(0).read(0, 512).expect("a read on a new connection");
    assert_eq!(c.status(), S_OK);
}

#[test]
fn set_log_fd_is_refused_by_closing_the_connection() {
    use std::os::fd::AsRawFd;
    use vhost::VhostBackend;
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = session(&mut fx);
    // The vhost crate's backend handler has no SET_LOG_FD hook (0.18): it refuses the message
    // as invalid, which ends the connection; the daemon serves the next frontend.
    let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let _ = s.frontend().set_log_fd(efd.as_raw_fd());
    assert!(s.wait_hangup(Duration::from_secs(5)).unwrap());
    let mut s = session(&mut fx);
    assert_eq!(s.blk(0).read(0, 512).unwrap().status(), S_OK);
}

#[test]
fn a_read_in_flight_when_logging_starts_is_marked() {
    let gate = IoGate::new();
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &["--test-io-gate", gate.arg()]);
    let mut s = session(&mut fx);
    let (head, read) = post(&mut s, T_IN, 40, None);
    // Held by the gate: nothing comes back.
    assert!(s
        .drain_used(0, Duration::from_millis(200))
        .unwrap()
        .is_empty());

    let log = Log::new(LOG_BYTES);
    start_logging(&mut s, &log);
    gate.release(1);
    let data = finish(&mut s, head, &read);
    assert_same(&data, &image_pattern(40 * 512, PAGE as usize), "read data");
    assert!(log.marked(read.data), "the data page of the read in flight");
    assert!(log.marked(read.status), "its status page");
    assert!(log.marked(used_pages(&s).1), "its used entry");
}
