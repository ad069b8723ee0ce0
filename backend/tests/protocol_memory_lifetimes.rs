//! Protocol tests, layer 2: guest memory lifetimes under in-flight I/O (docs/memory.md).
//!
//! The VMM may take guest memory back at any time: REM_MEM_REG (memory hot-unplug), a
//! SET_MEM_TABLE that drops a region, GET_VRING_BASE (a stopped ring), disconnect. These tests
//! hold requests in flight on purpose, with `--test-io-gate FIFO`: every request that needs I/O
//! waits behind a one-byte read from that FIFO, a real pending io_uring request, until the test
//! writes a byte (one byte releases one request). Then they check, from outside the daemon:
//!
//! - when the reply to the message arrives (in a background thread, [`Session::
//!   remove_region_in_background`] and friends), against what the gate let through;
//! - whether the region is still mapped, in `/proc/PID/maps` of the serving process
//!   (`--single-process`, so that is the daemon itself), found by the memfd's inode;
//! - what lands in the region's memfd afterwards: a sentinel written after the reply must stay.
//!
//! Requests that need no I/O operation (GET_ID) pass the gate, which is how these tests show that
//! a queue keeps serving other memory while a region drains.

use std::thread;
use std::time::{Duration, Instant};

use vublk_test_support::frontend::blk::{self, header, STATUS_UNTOUCHED, S_IOERR, S_OK};
use vublk_test_support::frontend::fixture::image_pattern;
use vublk_test_support::frontend::memory::Arena;
use vublk_test_support::frontend::{
    Fixture, RegionFile, RegionSpec, Seg, Session, SessionConfig, Step,
};
use vublk_test_support::io_gate::IoGate;
use vublk_test_support::pattern::assert_same;

const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const IMAGE_SIZE: u64 = 64 * MIB;

/// The boot region: rings, and the test's "other memory".
const LOW: RegionSpec = RegionSpec::new(0, 16 << 20);
/// The region the tests unplug.
const HOT: RegionSpec = RegionSpec::new(4 * GIB, 2 << 20);
/// How long "the reply does not come" is watched.
const HOLD: Duration = Duration::from_millis(300);
/// How long a request that needs no gated I/O may take.
const PROMPT: Duration = Duration::from_secs(2);
/// `--retire-timeout` of the tests where the bound expires.
const BOUND_MS: u64 = 500;

/// vublk serving a patterned image, single-process, with every I/O behind `gate`.
fn start(gate: &IoGate, extra: &[&str]) -> Fixture {
    let mut args = vec!["--single-process", "--test-io-gate", gate.arg()];
    args.extend_from_slice(extra);
    Fixture::start(VUBLK, IMAGE_SIZE, &args)
}

/// QEMU's handshake with guest memory `regions`; queue 0 running.
fn session(fx: &mut Fixture, regions: &[RegionSpec]) -> Session {
    let config = SessionConfig {
        memory: regions.to_vec(),
        ..SessionConfig::default()
    };
    fx.session_with(config, &Step::qemu(1))
}

/// An arena in the boot region that the session's own helpers will not hand out again.
fn low_arena(s: &mut Session) -> Arena {
    let len = 4 * MIB;
    let at = s.arena().alloc(len, 4096).expect("room in the boot region");
    Arena::new(at, len)
}

/// A request that was published and may still be in flight.
#[derive(Debug, Clone)]
struct Posted {
    head: u16,
    what: String,
    /// Writable data buffers.
    data: Vec<(u64, u32)>,
    status: u64,
}

/// Publishes `hdr | segs | status` with the header of `req_type` at `sector`; the status byte is
/// preset to STATUS_UNTOUCHED and writable data buffers in the session's guest memory to 0xee
/// (the caller presets the others).
fn post(
    s: &mut Session,
    what: &str,
    req_type: u32,
    sector: u64,
    hdr: u64,
    segs: &[Seg],
    status: u64,
) -> Posted {
    let mem = s.mem().clone();
    mem.write(hdr, &header(req_type, sector))
        .expect("write header");
    for seg in segs
        .iter()
        .filter(|g| g.write && mem.contains(g.addr, u64::from(g.len)))
    {
        mem.fill(seg.addr, seg.len as usize, 0xee)
            .expect("preset data");
    }
    mem.write(status, &[STATUS_UNTOUCHED])
        .expect("preset status");
    let mut chain = vec![Seg::readable(hdr, 16)];
    chain.extend_from_slice(segs);
    chain.push(Seg::writable(status, 1));
    let head = s.submit(0, &chain).expect("publish chain");
    Posted {
        head,
        what: what.to_string(),
        data: segs
            .iter()
            .filter(|g| g.write)
            .map(|g| (g.addr, g.len))
            .collect(),
        status,
    }
}

/// A read of `len` bytes at `sector` with header, data and status all taken from `arena`.
fn post_read(s: &mut Session, what: &str, arena: &mut Arena, sector: u64, len: u32) -> Posted {
    let hdr = arena.alloc(16, 16).unwrap();
    let data = arena.alloc(u64::from(len), 512).unwrap();
    let status = arena.alloc(1, 1).unwrap();
    post(
        s,
        what,
        blk::T_IN,
        sector,
        hdr,
        &[Seg::writable(data, len)],
        status,
    )
}

/// A read whose data buffer comes from `data_arena` and header and status from `arena`.
fn post_read_into(
    s: &mut Session,
    what: &str,
    arena: &mut Arena,
    data_arena: &mut Arena,
    sector: u64,
    len: u32,
) -> Posted {
    let hdr = arena.alloc(16, 16).unwrap();
    let data = data_arena.alloc(u64::from(len), 512).unwrap();
    let status = arena.alloc(1, 1).unwrap();
    post(
        s,
        what,
        blk::T_IN,
        sector,
        hdr,
        &[Seg::writable(data, len)],
        status,
    )
}

/// A write of `data` at `sector`, every buffer from `arena`.
fn post_write(s: &mut Session, what: &str, arena: &mut Arena, sector: u64, data: &[u8]) -> Posted {
    let hdr = arena.alloc(16, 16).unwrap();
    let buf = arena.alloc(data.len() as u64, 512).unwrap();
    let status = arena.alloc(1, 1).unwrap();
    s.mem().write(buf, data).expect("write data");
    post(
        s,
        what,
        blk::T_OUT,
        sector,
        hdr,
        &[Seg::readable(buf, data.len() as u32)],
        status,
    )
}

/// GET_ID with every buffer from `arena`: no I/O operation, so the gate does not hold it.
fn post_get_id(s: &mut Session, what: &str, arena: &mut Arena) -> Posted {
    let hdr = arena.alloc(16, 16).unwrap();
    let data = arena.alloc(blk::ID_BYTES as u64, 8).unwrap();
    let status = arena.alloc(1, 1).unwrap();
    post(
        s,
        what,
        blk::T_GET_ID,
        0,
        hdr,
        &[Seg::writable(data, blk::ID_BYTES as u32)],
        status,
    )
}

/// `len` bytes at `gpa`, from guest memory where the session still has it, else from the memfds
/// in `files` (the range may span several regions).
fn peek(s: &Session, files: &[&RegionFile], gpa: u64, len: usize) -> Vec<u8> {
    let end = gpa + len as u64;
    let mut out = Vec::with_capacity(len);
    let mut at = gpa;
    while at < end {
        let inside = |r: &RegionSpec| at >= r.guest_addr && at < r.guest_addr + r.size as u64;
        let until = |r: &RegionSpec| end.min(r.guest_addr + r.size as u64);
        if let Some(r) = s.mem().regions().iter().find(|r| inside(r)) {
            let n = (until(r) - at) as usize;
            out.extend(s.mem().read(at, n).expect("read guest memory"));
            at += n as u64;
        } else if let Some(f) = files.iter().find(|f| inside(&f.spec())) {
            let n = (until(&f.spec()) - at) as usize;
            out.extend(f.read(at, n).expect("read memfd"));
            at += n as u64;
        } else {
            panic!("no memory covers {at:#x}");
        }
    }
    out
}

/// Waits for `p` on the used ring; returns its status byte and data.
#[track_caller]
fn wait(s: &mut Session, files: &[&RegionFile], p: &Posted, within: Duration) -> (u8, Vec<u8>) {
    if let Err(e) = s.wait_head(0, p.head, within) {
        panic!("{}: not completed within {within:?}: {e}", p.what);
    }
    let status = peek(s, files, p.status, 1)[0];
    let data = p
        .data
        .iter()
        .flat_map(|&(a, l)| peek(s, files, a, l as usize))
        .collect();
    (status, data)
}

/// Waits for `p` and checks it succeeded.
#[track_caller]
fn wait_ok(s: &mut Session, files: &[&RegionFile], p: &Posted, within: Duration) -> Vec<u8> {
    let (status, data) = wait(s, files, p, within);
    assert_eq!(status, S_OK, "{}: status", p.what);
    data
}

/// Waits for `p` and checks it failed with IOERR.
#[track_caller]
fn wait_ioerr(s: &mut Session, files: &[&RegionFile], p: &Posted, within: Duration) -> Vec<u8> {
    let (status, data) = wait(s, files, p, within);
    assert_eq!(status, S_IOERR, "{}: status", p.what);
    data
}

/// Waits until vublk has taken every published chain off the avail ring (with EVENT_IDX it
/// then sets `avail_event` to the driver's avail index), so the requests are in flight before
/// the test changes memory under them.
#[track_caller]
fn wait_taken(s: &Session) {
    let start = Instant::now();
    loop {
        let q = &s.vring(0).unwrap().queue;
        if q.avail_event(s.mem()).expect("read avail_event") == q.avail_idx() {
            return;
        }
        assert!(
            start.elapsed() < PROMPT,
            "vublk did not take the published chains within {PROMPT:?}"
        );
        thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until every published chain is in flight, and checks none completed.
#[track_caller]
fn assert_held(s: &Session) {
    wait_taken(s);
    thread::sleep(Duration::from_millis(50));
    assert_eq!(used_idx(s), 0, "a request completed through a closed gate");
}

/// The device's used index.
fn used_idx(s: &Session) -> u16 {
    s.vring(0)
        .unwrap()
        .queue
        .used_idx(s.mem())
        .expect("read used.idx")
}

/// The daemon's mappings of `f`'s memfd.
fn mappings(fx: &Fixture, f: &RegionFile) -> Vec<String> {
    fx.daemon
        .mappings_of(f.inode())
        .expect("read /proc/PID/maps")
}

#[track_caller]
fn assert_mapped(fx: &Fixture, f: &RegionFile, when: &str) {
    assert!(
        !mappings(fx, f).is_empty(),
        "region {:#x} is not mapped in vublk {when}",
        f.spec().guest_addr
    );
}

/// Waits up to `within` for vublk to unmap `f`'s memfd; returns how long it took.
#[track_caller]
fn assert_unmapped_within(fx: &Fixture, f: &RegionFile, within: Duration, when: &str) -> Duration {
    let start = Instant::now();
    loop {
        let m = mappings(fx, f);
        if m.is_empty() {
            return start.elapsed();
        }
        if start.elapsed() >= within {
            panic!(
                "region {:#x} still mapped in vublk {within:?} {when}:\n{}",
                f.spec().guest_addr,
                m.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Fills `f` with a sentinel; returns a check that it is still all sentinel.
fn sentinel(f: &RegionFile) -> impl Fn(&str) + '_ {
    f.fill(0x5a).expect("write sentinel");
    move |when| {
        let got = f.contents().expect("read memfd");
        if let Some(at) = got.iter().position(|&b| b != 0x5a) {
            panic!(
                "vublk wrote into region {:#x} {when}: byte {:#x} is {:#04x}",
                f.spec().guest_addr,
                f.spec().guest_addr + at as u64,
                got[at]
            );
        }
    }
}

/// Lines of the daemon's log containing every one of `words` (case-insensitive).
fn log_lines(fx: &Fixture, words: &[&str]) -> Vec<String> {
    fx.daemon
        .log()
        .lines()
        .filter(|l| {
            let l = l.to_lowercase();
            words.iter().all(|w| l.contains(w))
        })
        .map(str::to_string)
        .collect()
}

/// Checks the log has a line with all of `words`, giving the pipe from vublk's stderr a moment.
#[track_caller]
fn assert_logged(fx: &Fixture, words: &[&str]) {
    let start = Instant::now();
    while log_lines(fx, words).is_empty() && start.elapsed() < PROMPT {
        thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !log_lines(fx, words).is_empty(),
        "no log line containing {words:?}; log:\n{}",
        fx.daemon.log()
    );
}

#[track_caller]
fn assert_running(fx: &mut Fixture) {
    assert!(
        fx.daemon.try_wait().is_none(),
        "vublk exited; log:\n{}",
        fx.daemon.log()
    );
}

/// After the reply: I/O on the rest of memory still works, and nothing lands in `f` meanwhile.
fn check_quiet_afterwards(
    fx: &Fixture,
    s: &mut Session,
    low: &mut Arena,
    gate: &IoGate,
    f: &RegionFile,
) {
    let still_sentinel = sentinel(f);
    let id = post_get_id(s, "GET_ID after the reply", low);
    wait_ok(s, &[], &id, PROMPT);
    let r = post_read(s, "read after the reply", low, 300, 4096);
    gate.release(1);
    assert_same(
        &wait_ok(s, &[], &r, PROMPT),
        &image_pattern(300 * 512, 4096),
        "read after the reply",
    );
    let w = post_write(s, "write after the reply", low, 310, &[0x42; 4096]);
    gate.release(1);
    wait_ok(s, &[], &w, PROMPT);
    assert_eq!(
        fx.image_bytes(310 * 512, 4096),
        vec![0x42; 4096],
        "image after the write"
    );
    thread::sleep(Duration::from_millis(200));
    still_sentinel("after replying that it let go of it");
}

#[test]
fn rem_mem_reg_waits_for_a_pending_read_into_the_region() {
    let gate = IoGate::new();
    let mut fx = start(&gate, &[]);
    let mut s = session(&mut fx, &[LOW, HOT]);
    let mut low = low_arena(&mut s);
    let mut hot = Arena::over(HOT);
    let hot_file = s.mem().region_file(HOT.guest_addr).unwrap();
    assert_mapped(&fx, &hot_file, "after SET_MEM_TABLE");

    // A read with header, data and status in the hot region, held by the closed gate.
    let read = post_read(&mut s, "read into the hot region", &mut hot, 40, 8192);
    assert_held(&s);

    let (pending, _removed) = s.remove_region_in_background(HOT.guest_addr).unwrap();
    thread::sleep(HOLD);
    assert!(
        !pending.has_reply(),
        "REM_MEM_REG replied while a read into the region was in flight"
    );
    assert_mapped(&fx, &hot_file, "while a read into it is in flight");
    // The queue keeps serving chains on other memory while the region drains.
    let id = post_get_id(
        &mut s,
        "GET_ID in the boot region during the drain",
        &mut low,
    );
    wait_ok(&mut s, &[], &id, PROMPT);
    assert!(
        !pending.has_reply(),
        "REM_MEM_REG replied while a read into the region was in flight"
    );

    gate.release(1);
    let reply = pending
        .wait(Duration::from_secs(5))
        .expect("REM_MEM_REG reply");
    assert!(reply.after >= HOLD, "replied after {:?}", reply.after);
    // Its status and used entry were written before the reply.
    let data = wait_ok(&mut s, &[&hot_file], &read, Duration::from_millis(100));
    assert_same(
        &data,
        &image_pattern(40 * 512, 8192),
        "data of the drained read, in the memfd",
    );
    let took = assert_unmapped_within(
        &fx,
        &hot_file,
        Duration::from_millis(500),
        "after the REM_MEM_REG reply",
    );
    eprintln!("hot region unmapped {took:?} after the reply");
    check_quiet_afterwards(&fx, &mut s, &mut low, &gate, &hot_file);
    assert_logged(&fx, &["retir", "ms"]);
    assert_running(&mut fx);
}

#[test]
fn rem_mem_reg_cancels_a_read_that_never_completes() {
    let gate = IoGate::new();
    let bound = BOUND_MS.to_string();
    let mut fx = start(&gate, &["--retire-timeout", &bound]);
    let mut s = session(&mut fx, &[LOW, HOT]);
    let mut low = low_arena(&mut s);
    let mut hot = Arena::over(HOT);
    let hot_file = s.mem().region_file(HOT.guest_addr).unwrap();

    // One read entirely in the hot region, one with only its data buffer there.
    let inside = post_read(
        &mut s,
        "read with every buffer in the hot region",
        &mut hot,
        40,
        4096,
    );
    let data_only = post_read_into(
        &mut s,
        "read with its data in the hot region",
        &mut low,
        &mut hot,
        48,
        4096,
    );
    assert_held(&s);

    let (pending, _removed) = s.remove_region_in_background(HOT.guest_addr).unwrap();
    thread::sleep(HOLD);
    assert!(!pending.has_reply(), "REM_MEM_REG replied before the bound");
    assert_mapped(&fx, &hot_file, "while reads into it are in flight");
    let reply = pending
        .wait(Duration::from_secs(10))
        .expect("REM_MEM_REG reply");
    let bound = Duration::from_millis(BOUND_MS);
    assert!(
        reply.after >= bound,
        "replied after {:?}, before the {bound:?} bound",
        reply.after
    );
    assert!(
        reply.after < Duration::from_secs(3),
        "replied only after {:?}",
        reply.after
    );
    // Cancelled and completed with IOERR before the reply: used entries and status bytes are
    // there (the one in the hot region too, since it was still mapped until the reply).
    wait_ioerr(&mut s, &[&hot_file], &inside, Duration::from_millis(100));
    wait_ioerr(&mut s, &[&hot_file], &data_only, Duration::from_millis(100));
    assert_logged(&fx, &["cancel"]);
    assert_logged(&fx, &["retir", "ms"]);
    assert_unmapped_within(
        &fx,
        &hot_file,
        Duration::from_millis(500),
        "after the REM_MEM_REG reply",
    );
    // The cancelled reads took no gate byte with them: the next operation takes the next one.
    check_quiet_afterwards(&fx, &mut s, &mut low, &gate, &hot_file);
    assert_running(&mut fx);
}

#[test]
fn set_mem_table_replacing_the_table_under_load() {
    let gate = IoGate::new();
    let mut fx = start(&gate, &[]);
    let mut s = session(&mut fx, &[LOW, HOT]);
    let mut low = low_arena(&mut s);
    let mut hot = Arena::over(HOT);
    let low_file = s.mem().region_file(LOW.guest_addr).unwrap();
    let hot_file = s.mem().region_file(HOT.guest_addr).unwrap();
    let files = [&hot_file];

    // In flight: requests on the boot region (which stays) and on the hot region (which goes).
    let a1 = post_read(&mut s, "read a1 (boot region)", &mut low, 100, 4096);
    let a2 = post_write(
        &mut s,
        "write a2 (boot region)",
        &mut low,
        120,
        &[0x61; 4096],
    );
    let b1 = post_read(&mut s, "read b1 (hot region)", &mut hot, 140, 4096);
    let b2 = post_read_into(
        &mut s,
        "read b2 (data in the hot region)",
        &mut low,
        &mut hot,
        160,
        8192,
    );
    let a3 = post_read(&mut s, "read a3 (boot region)", &mut low, 180, 2048);
    let a4 = post_write(
        &mut s,
        "write a4 (boot region)",
        &mut low,
        200,
        &[0x64; 512],
    );
    assert_held(&s);

    // One SET_MEM_TABLE: the boot region as it was, the hot region gone, a new one at 8 GiB.
    let new = RegionSpec::new(8 * GIB, 1 << 20);
    let mut replacement = s
        .replace_regions_in_background(&[HOT.guest_addr], &[new])
        .unwrap();
    let pending = replacement.reply;
    thread::sleep(Duration::from_millis(200));
    assert!(
        !pending.has_reply(),
        "SET_MEM_TABLE replied with requests on a dropped region in flight"
    );
    assert_mapped(&fx, &hot_file, "while requests on it are in flight");
    // The boot region is served while the hot region drains.
    let id = post_get_id(
        &mut s,
        "GET_ID in the boot region during the drain",
        &mut low,
    );
    wait_ok(&mut s, &files, &id, PROMPT);

    // Let the operations through one at a time, whichever request the kernel hands each byte to:
    // the reply must come exactly when both requests on the hot region have completed.
    let expect: [(&Posted, Option<Vec<u8>>); 6] = [
        (&a1, Some(image_pattern(100 * 512, 4096))),
        (&a2, None),
        (&b1, Some(image_pattern(140 * 512, 4096))),
        (&b2, Some(image_pattern(160 * 512, 8192))),
        (&a3, Some(image_pattern(180 * 512, 2048))),
        (&a4, None),
    ];
    let mut open: Vec<u16> = expect.iter().map(|(p, _)| p.head).collect();
    let mut pending = Some(pending);
    let mut order = Vec::new();
    while !open.is_empty() {
        gate.release(1);
        let used = s.wait_used(0, PROMPT).unwrap_or_else(|e| {
            panic!("after letting one more operation through ({order:?} done): {e}")
        });
        let (p, want) = expect
            .iter()
            .find(|(p, _)| u32::from(p.head) == used.id && open.contains(&p.head))
            .unwrap_or_else(|| panic!("unexpected used element {used:?} ({order:?} done)"));
        open.retain(|&h| h != p.head);
        order.push(p.what.clone());
        assert_eq!(
            peek(&s, &files, p.status, 1)[0],
            S_OK,
            "{}: status ({order:?} done)",
            p.what
        );
        if let Some(want) = want {
            let data: Vec<u8> = p
                .data
                .iter()
                .flat_map(|&(a, l)| peek(&s, &files, a, l as usize))
                .collect();
            assert_same(&data, want, &p.what);
        }
        if open.contains(&b1.head) || open.contains(&b2.head) {
            thread::sleep(Duration::from_millis(50));
            assert!(
                pending.as_ref().is_some_and(|p| !p.has_reply()),
                "SET_MEM_TABLE replied with a request on the dropped region in flight ({order:?} done)"
            );
            assert_mapped(&fx, &hot_file, "while requests on it are in flight");
        } else if let Some(p) = pending.take() {
            let reply = p
                .wait(Duration::from_secs(1))
                .expect("SET_MEM_TABLE reply once the dropped region drained");
            assert!(
                reply.after >= Duration::from_millis(200),
                "replied after {:?}",
                reply.after
            );
            assert_unmapped_within(
                &fx,
                &hot_file,
                Duration::from_millis(500),
                "after the SET_MEM_TABLE reply",
            );
        }
    }
    assert_eq!(
        fx.image_bytes(120 * 512, 4096),
        vec![0x61; 4096],
        "a2 on the image"
    );
    assert_eq!(
        fx.image_bytes(200 * 512, 512),
        vec![0x64; 512],
        "a4 on the image"
    );

    // The new region and the kept one both work.
    let c = post_read_into(
        &mut s,
        "read into the new region",
        &mut low,
        &mut replacement.added[0],
        220,
        4096,
    );
    gate.release(1);
    assert_same(
        &wait_ok(&mut s, &files, &c, PROMPT),
        &image_pattern(220 * 512, 4096),
        "read into the new region",
    );
    // Once drained, the kept region is mapped once (whether vublk kept or remapped it).
    let start = Instant::now();
    while mappings(&fx, &low_file).len() != 1 && start.elapsed() < Duration::from_millis(500) {
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        mappings(&fx, &low_file).len(),
        1,
        "mappings of the kept region: {:#?}",
        mappings(&fx, &low_file)
    );
    check_quiet_afterwards(&fx, &mut s, &mut low, &gate, &hot_file);
    assert_running(&mut fx);
}

/// QEMU sends the whole table again on every layout change: a region it keeps is the same
/// region, so requests pinned to it before must still hold a later removal back.
#[test]
fn a_region_kept_by_set_mem_table_still_drains_when_removed_later() {
    let gate = IoGate::new();
    let mut fx = start(&gate, &[]);
    let mut s = session(&mut fx, &[LOW, HOT]);
    let mut low = low_arena(&mut s);
    let mut hot = Arena::over(HOT);
    let hot_file = s.mem().region_file(HOT.guest_addr).unwrap();
    let read = post_read(&mut s, "read into the hot region", &mut hot, 40, 4096);
    assert_held(&s);

    // The same table again: nothing retires, so the reply comes at once.
    let same = s.replace_regions_in_background(&[], &[]).unwrap();
    assert!(same.removed.is_empty());
    let reply = same.reply.wait(PROMPT).expect("SET_MEM_TABLE reply");
    assert!(
        reply.after < HOLD,
        "SET_MEM_TABLE keeping every region waited {:?}",
        reply.after
    );

    // Now unplug the hot region: the read parsed before the SET_MEM_TABLE still uses it.
    let (pending, _removed) = s.remove_region_in_background(HOT.guest_addr).unwrap();
    thread::sleep(HOLD);
    assert!(
        !pending.has_reply(),
        "REM_MEM_REG replied while a read into the region (pinned before the last SET_MEM_TABLE) was in flight"
    );
    gate.release(1);
    pending
        .wait(Duration::from_secs(5))
        .expect("REM_MEM_REG reply");
    assert_same(
        &wait_ok(&mut s, &[&hot_file], &read, Duration::from_millis(100)),
        &image_pattern(40 * 512, 4096),
        "read data",
    );
    assert_unmapped_within(
        &fx,
        &hot_file,
        Duration::from_millis(500),
        "after the REM_MEM_REG reply",
    );
    check_quiet_afterwards(&fx, &mut s, &mut low, &gate, &hot_file);
    assert_running(&mut fx);
}

#[test]
fn get_vring_base_waits_for_requests_in_flight() {
    let gate = IoGate::new();
    let mut fx = start(&gate, &[]);
    let mut s = fx.session();
    let mut low = low_arena(&mut s);
    let reads: Vec<Posted> = (0..3u64)
        .map(|i| post_read(&mut s, &format!("read {i}"), &mut low, 500 + 16 * i, 4096))
        .collect();
    assert_held(&s);
    let avail = s.vring(0).unwrap().queue.avail_idx();

    let (took, used_at_reply) = thread::scope(|scope| {
        scope.spawn(|| {
            thread::sleep(Duration::from_millis(200));
            gate.release(3);
        });
        let t = Instant::now();
        s.step(&Step::GetVringBase(0)).expect("GET_VRING_BASE");
        (t.elapsed(), used_idx(&s))
    });
    assert!(
        took >= Duration::from_millis(180),
        "GET_VRING_BASE replied after {took:?}, before the gate opened"
    );
    assert_eq!(used_at_reply, 3, "used index when GET_VRING_BASE replied");
    assert_eq!(
        s.last_vring_base(),
        Some(u32::from(avail)),
        "GET_VRING_BASE counts the drained requests"
    );
    for (i, r) in reads.iter().enumerate() {
        let data = wait_ok(&mut s, &[], r, Duration::from_millis(100));
        assert_same(
            &data,
            &image_pattern((500 + 16 * i as u64) * 512, 4096),
            &r.what,
        );
    }

    // The ring starts again where it stopped.
    s.run(&[
        Step::SetVringBase(0),
        Step::SetVringAddr(0),
        Step::SetVringKick(0),
        Step::SetVringCall(0),
    ])
    .expect("restart the ring");
    let r = post_read(
        &mut s,
        "read after restarting the ring",
        &mut low,
        600,
        4096,
    );
    gate.release(1);
    assert_same(
        &wait_ok(&mut s, &[], &r, PROMPT),
        &image_pattern(600 * 512, 4096),
        "read after the restart",
    );
    assert_running(&mut fx);
}

#[test]
fn get_vring_base_cancels_requests_past_the_bound() {
    let gate = IoGate::new();
    let bound = BOUND_MS.to_string();
    let mut fx = start(&gate, &["--retire-timeout", &bound]);
    let mut s = fx.session();
    let mut low = low_arena(&mut s);
    let reads: Vec<Posted> = (0..3u64)
        .map(|i| post_read(&mut s, &format!("read {i}"), &mut low, 500 + 16 * i, 4096))
        .collect();
    assert_held(&s);
    let avail = s.vring(0).unwrap().queue.avail_idx();

    let t = Instant::now();
    s.step(&Step::GetVringBase(0)).expect("GET_VRING_BASE");
    let took = t.elapsed();
    let bound = Duration::from_millis(BOUND_MS);
    assert!(
        took >= bound,
        "GET_VRING_BASE replied after {took:?}, before the {bound:?} bound"
    );
    assert!(
        took < Duration::from_secs(3),
        "GET_VRING_BASE replied only after {took:?}"
    );
    assert_eq!(used_idx(&s), 3, "used index when GET_VRING_BASE replied");
    assert_eq!(
        s.last_vring_base(),
        Some(u32::from(avail)),
        "GET_VRING_BASE counts the cancelled requests"
    );
    for r in &reads {
        let data = wait_ioerr(&mut s, &[], r, Duration::from_millis(100));
        assert_eq!(
            data,
            vec![0xee; 4096],
            "{}: data of a cancelled read",
            r.what
        );
    }
    assert_logged(&fx, &["cancel"]);

    // The cancelled reads took no gate byte with them; the ring restarts.
    s.run(&[
        Step::SetVringBase(0),
        Step::SetVringAddr(0),
        Step::SetVringKick(0),
        Step::SetVringCall(0),
    ])
    .expect("restart the ring");
    let r = post_read(
        &mut s,
        "read after restarting the ring",
        &mut low,
        600,
        4096,
    );
    gate.release(1);
    assert_same(
        &wait_ok(&mut s, &[], &r, PROMPT),
        &image_pattern(600 * 512, 4096),
        "read after the restart",
    );
    assert_running(&mut fx);
}

#[test]
fn buffers_straddling_into_a_retiring_region_fail_and_the_queue_goes_on() {
    let gate = IoGate::new();
    let mut fx = start(&gate, &[]);
    // The hot region right after the boot region, so one descriptor can span both.
    let adjacent = RegionSpec::new(LOW.guest_addr + LOW.size as u64, 2 << 20);
    let mut s = session(&mut fx, &[LOW, adjacent]);
    let mut low = low_arena(&mut s);
    let mut hot = Arena::over(adjacent);
    let hot_file = s.mem().region_file(adjacent.guest_addr).unwrap();
    let files = [&hot_file];

    // Keep the region retiring: a read into it behind the closed gate, then REM_MEM_REG.
    let held = post_read(&mut s, "read holding the region", &mut hot, 40, 4096);
    assert_held(&s);
    let (pending, _removed) = s.remove_region_in_background(adjacent.guest_addr).unwrap();
    thread::sleep(Duration::from_millis(100));
    assert!(
        !pending.has_reply(),
        "REM_MEM_REG replied with a read into the region in flight"
    );

    // Two data buffers, the second in the retiring region.
    let straddle = |s: &mut Session, low: &mut Arena, hot: &mut Arena, what: &str| {
        let hdr = low.alloc(16, 16).unwrap();
        let first = low.alloc(2048, 512).unwrap();
        let second = hot.alloc(2048, 512).unwrap();
        let status = low.alloc(1, 1).unwrap();
        // The session no longer has the region; preset it through the memfd.
        hot_file.write(second, &[0xee; 2048]).unwrap();
        post(
            s,
            what,
            blk::T_IN,
            60,
            hdr,
            &[Seg::writable(first, 2048), Seg::writable(second, 2048)],
            status,
        )
    };
    let two = straddle(
        &mut s,
        &mut low,
        &mut hot,
        "read with its second buffer in the retiring region",
    );
    let data = wait_ioerr(&mut s, &files, &two, PROMPT);
    assert_eq!(data, vec![0xee; 4096], "a refused read wrote data");

    // One descriptor across the boundary of the two regions.
    let hdr = low.alloc(16, 16).unwrap();
    let status = low.alloc(1, 1).unwrap();
    let across = adjacent.guest_addr - 2048;
    s.mem().fill(across, 2048, 0xee).unwrap();
    hot_file.write(adjacent.guest_addr, &[0xee; 2048]).unwrap();
    let one = post(
        &mut s,
        "read with one buffer across into the retiring region",
        blk::T_IN,
        70,
        hdr,
        &[Seg::writable(across, 4096)],
        status,
    );
    wait_ioerr(&mut s, &files, &one, PROMPT);
    assert_eq!(
        s.mem().read(across, 2048).unwrap(),
        vec![0xee; 2048],
        "a refused read wrote data"
    );

    // A write whose source straddles: nothing may reach the image.
    let hdr = low.alloc(16, 16).unwrap();
    let status = low.alloc(1, 1).unwrap();
    let src = low.alloc(512, 512).unwrap();
    s.mem().fill(src, 512, 0x77).unwrap();
    let write = post(
        &mut s,
        "write with its second buffer in the retiring region",
        blk::T_OUT,
        80,
        hdr,
        &[
            Seg::readable(src, 512),
            Seg::readable(adjacent.guest_addr + 8192, 512),
        ],
        status,
    );
    wait_ioerr(&mut s, &files, &write, PROMPT);
    assert_same(
        &fx.image_bytes(80 * 512, 1024),
        &image_pattern(80 * 512, 1024),
        "image after a refused write",
    );

    // The queue goes on: GET_ID on the boot region, without the gate.
    let id = post_get_id(&mut s, "GET_ID after the refused chains", &mut low);
    wait_ok(&mut s, &files, &id, PROMPT);
    assert!(
        !pending.has_reply(),
        "REM_MEM_REG replied with a read into the region in flight"
    );

    gate.release(1);
    pending
        .wait(Duration::from_secs(5))
        .expect("REM_MEM_REG reply");
    wait_ok(&mut s, &files, &held, Duration::from_millis(100));
    assert_unmapped_within(
        &fx,
        &hot_file,
        Duration::from_millis(500),
        "after the REM_MEM_REG reply",
    );

    // Once removed, the same shapes still fail, and a read in the boot region works.
    let gone = straddle(
        &mut s,
        &mut low,
        &mut hot,
        "read with its second buffer in the removed region",
    );
    wait_ioerr(&mut s, &files, &gone, PROMPT);
    let r = post_read(&mut s, "read in the boot region", &mut low, 90, 4096);
    gate.release(1);
    assert_same(
        &wait_ok(&mut s, &files, &r, PROMPT),
        &image_pattern(90 * 512, 4096),
        "read in the boot region",
    );
    assert_running(&mut fx);
}

/// Posts four reads (two per region) behind the closed gate and drops the connection.
fn disconnect_with_io_in_flight(fx: &mut Fixture) -> (RegionFile, RegionFile) {
    let mut s = session(fx, &[LOW, HOT]);
    let mut low = low_arena(&mut s);
    let mut hot = Arena::over(HOT);
    let low_file = s.mem().region_file(LOW.guest_addr).unwrap();
    let hot_file = s.mem().region_file(HOT.guest_addr).unwrap();
    post_read(&mut s, "read 0 (boot region)", &mut low, 100, 4096);
    post_read(&mut s, "read 1 (hot region)", &mut hot, 110, 4096);
    post_read_into(
        &mut s,
        "read 2 (data in the hot region)",
        &mut low,
        &mut hot,
        120,
        4096,
    );
    post_write(
        &mut s,
        "write 3 (boot region)",
        &mut low,
        130,
        &[0x33; 4096],
    );
    assert_held(&s);
    s.close();
    (low_file, hot_file)
}

/// A new connection is served (one gate byte for its read).
fn serves_a_new_connection(fx: &mut Fixture, gate: &IoGate) {
    let mut s = fx.session();
    let mut low = low_arena(&mut s);
    let r = post_read(&mut s, "read on the next connection", &mut low, 700, 4096);
    gate.release(1);
    assert_same(
        &wait_ok(&mut s, &[], &r, PROMPT),
        &image_pattern(700 * 512, 4096),
        "read on the next connection",
    );
}

#[test]
fn frontend_gone_with_io_in_flight_drains_then_unmaps() {
    let gate = IoGate::new();
    let mut fx = start(&gate, &[]);
    let (low_file, hot_file) = disconnect_with_io_in_flight(&mut fx);
    thread::sleep(HOLD);
    assert_running(&mut fx);
    // The default bound (5 s) has not expired: the requests are still in flight, so their
    // memory must still be mapped.
    assert_mapped(
        &fx,
        &low_file,
        "with requests into it in flight after the disconnect",
    );
    assert_mapped(
        &fx,
        &hot_file,
        "with requests into it in flight after the disconnect",
    );
    gate.release(4);
    assert_unmapped_within(
        &fx,
        &low_file,
        Duration::from_secs(2),
        "after its requests completed",
    );
    assert_unmapped_within(
        &fx,
        &hot_file,
        Duration::from_secs(2),
        "after its requests completed",
    );
    assert_eq!(
        fx.image_bytes(130 * 512, 4096),
        vec![0x33; 4096],
        "the drained write reached the image"
    );
    let low_quiet = sentinel(&low_file);
    let hot_quiet = sentinel(&hot_file);
    serves_a_new_connection(&mut fx, &gate);
    thread::sleep(Duration::from_millis(100));
    low_quiet("after the connection ended");
    hot_quiet("after the connection ended");
    assert_running(&mut fx);
}

#[test]
fn frontend_gone_with_io_that_never_completes_is_cancelled_within_the_bound() {
    let gate = IoGate::new();
    let bound = BOUND_MS.to_string();
    let mut fx = start(&gate, &["--retire-timeout", &bound]);
    let gone = Instant::now();
    let (low_file, hot_file) = disconnect_with_io_in_flight(&mut fx);
    let within = Duration::from_millis(2500).saturating_sub(gone.elapsed());
    assert_unmapped_within(&fx, &low_file, within, "after the disconnect");
    assert_unmapped_within(&fx, &hot_file, within, "after the disconnect");
    assert!(
        gone.elapsed() >= Duration::from_millis(BOUND_MS),
        "guest memory unmapped {:?} after the disconnect, before the bound: with requests in flight?",
        gone.elapsed()
    );
    assert_running(&mut fx);
    assert_logged(&fx, &["cancel"]);
    assert_same(
        &fx.image_bytes(130 * 512, 4096),
        &image_pattern(130 * 512, 4096),
        "the cancelled write never reached the image",
    );
    let low_quiet = sentinel(&low_file);
    let hot_quiet = sentinel(&hot_file);
    serves_a_new_connection(&mut fx, &gate);
    thread::sleep(Duration::from_millis(100));
    low_quiet("after the connection ended");
    hot_quiet("after the connection ended");
    assert_running(&mut fx);
}

/// The gate itself (the other tests lean on it): one byte lets exactly one request through
/// (which one is up to the kernel: the gate's reads wait on the FIFO in no set order), and
/// every held request gets through in the end.
#[test]
fn test_io_gate_releases_one_operation_per_byte() {
    let gate = IoGate::new();
    let mut fx = start(&gate, &[]);
    let mut s = fx.session();
    let mut low = low_arena(&mut s);
    let mut heads = Vec::new();
    for i in 0..6u64 {
        heads.push(post_read(&mut s, &format!("read {i}"), &mut low, 100 + 16 * i, 4096).head);
        wait_taken(&s);
    }
    assert_held(&s);
    let mut order = Vec::new();
    for _ in 0..heads.len() {
        gate.release(1);
        let used = s.wait_used(0, PROMPT).expect("one request per byte");
        order.push(
            heads
                .iter()
                .position(|&h| u32::from(h) == used.id)
                .expect("a posted head"),
        );
        thread::sleep(Duration::from_millis(30));
        assert_eq!(
            used_idx(&s) as usize,
            order.len(),
            "one byte let more than one request through"
        );
    }
    order.sort_unstable();
    assert_eq!(
        order,
        (0..heads.len()).collect::<Vec<_>>(),
        "every held read completed once"
    );
    assert_running(&mut fx);
}
