//! Protocol tests, layer 2: descriptor chains a buggy or hostile guest could post.
//!
//! Each test posts one chain through the scripted frontend and checks that vublk
//! - completes it (the used ring advances; a guest must not be left waiting forever),
//! - writes IOERR or UNSUPP into the status byte when there is a writable one, and never writes
//!   into device-readable buffers,
//! - does no I/O for it (the image is unchanged),
//! - and keeps serving the queue (a valid read afterwards returns the right data).
//!
//! Odd but valid layouts (split header, data and status sharing a descriptor, indirect tables)
//! must succeed: virtio 1.x drivers may frame a request any way they like.

use vublk_test_support::frontend::blk::{
    self, header, Readback, STATUS_UNTOUCHED, S_IOERR, S_OK, S_UNSUPP,
};
use vublk_test_support::frontend::fixture::image_pattern;
use vublk_test_support::frontend::virtqueue::{
    desc, write_table, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE,
};
use vublk_test_support::frontend::{Completion, Fixture, Seg, Session};
use vublk_test_support::pattern::assert_same;

const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");
const MIB: u64 = 1 << 20;
/// 8 MiB image: 16384 sectors.
const CAPACITY: u64 = 8 * MIB / 512;
/// Far outside the 16 MiB of guest RAM the session maps at 0.
const OUTSIDE: u64 = 0x7_dead_0000;

fn setup(args: &[&str]) -> (Fixture, Session) {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, args);
    let s = fx.session();
    (fx, s)
}

/// A valid read at a sector the hostile chains never target, proving the queue still works.
fn assert_still_serves(fx: &mut Fixture, s: &mut Session) {
    let c = s
        .blk(0)
        .read(42, 1024)
        .unwrap_or_else(|e| panic!("queue stopped serving: {e}\nlog:\n{}", fx.daemon.log()));
    assert_eq!(c.status(), S_OK, "valid read after a bad chain");
    assert_same(
        &c.data,
        &image_pattern(42 * 512, 1024),
        "valid read after a bad chain",
    );
    assert!(
        fx.daemon.try_wait().is_none(),
        "vublk exited after a bad chain:\n{}",
        fx.daemon.log()
    );
}

fn assert_error_status(c: &Completion, what: &str) {
    let st = c.status();
    assert!(
        st == S_IOERR || st == S_UNSUPP,
        "{what}: status {st:#x}, expected IOERR or UNSUPP (used {:?})",
        c.used
    );
}

/// Buffers for a hand-built request, all in guest RAM.
struct Bufs {
    hdr: u64,
    data: u64,
    status: u64,
}

fn bufs(s: &mut Session, req_type: u32, sector: u64, data_len: usize) -> Bufs {
    let mut b = s.blk(0);
    Bufs {
        hdr: b.alloc_bytes(&header(req_type, sector)).unwrap(),
        data: b.alloc(data_len, 0xee).unwrap(),
        status: b.alloc_status().unwrap(),
    }
}

fn run(s: &mut Session, segs: &[Seg], data: Option<(u64, u32)>, status: Option<u64>) -> Completion {
    let rb = Readback {
        data: data.into_iter().collect(),
        status,
    };
    s.blk(0)
        .submit_raw(segs, &rb)
        .unwrap_or_else(|e| panic!("chain {segs:?} was not completed: {e}"))
}

#[test]
fn header_shorter_than_16_bytes() {
    let (mut fx, mut s) = setup(&[]);
    for len in [0u32, 1, 8, 15] {
        let b = bufs(&mut s, blk::T_IN, 0, 512);
        let segs = [
            Seg::readable(b.hdr, len),
            Seg::writable(b.data, 512),
            Seg::writable(b.status, 1),
        ];
        let c = run(&mut s, &segs, Some((b.data, 512)), Some(b.status));
        assert_error_status(&c, &format!("{len}-byte header"));
    }
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn status_descriptor_not_writable() {
    let (mut fx, mut s) = setup(&[]);
    // FLUSH whose only buffer after the header is device-readable: nowhere to put a status.
    let b = bufs(&mut s, blk::T_FLUSH, 0, 0);
    let segs = [Seg::readable(b.hdr, 16), Seg::readable(b.status, 1)];
    let c = run(&mut s, &segs, None, Some(b.status));
    assert_eq!(
        c.status,
        Some(STATUS_UNTOUCHED),
        "device wrote into a readable buffer"
    );
    assert_eq!(
        c.used.len, 0,
        "nothing writable, yet used.len {}",
        c.used.len
    );
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn no_status_at_all() {
    let (mut fx, mut s) = setup(&[]);
    let b = bufs(&mut s, blk::T_IN, 0, 0);
    let c = run(&mut s, &[Seg::readable(b.hdr, 16)], None, None);
    assert_eq!(c.used.len, 0);
    let b = bufs(&mut s, blk::T_FLUSH, 0, 0);
    let c = run(&mut s, &[Seg::readable(b.hdr, 16)], None, None);
    assert_eq!(c.used.len, 0);
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn sector_beyond_capacity() {
    let (mut fx, mut s) = setup(&[]);
    let before = fx.image_bytes((CAPACITY - 1) * 512, 512);
    for (sector, len) in [
        (CAPACITY, 512u32),
        (CAPACITY - 1, 1024),
        (CAPACITY + 1000, 512),
        (u64::MAX / 1024, 512),
    ] {
        let c = s.blk(0).read(sector, len).unwrap();
        assert_eq!(c.status(), S_IOERR, "read of {len} at sector {sector}");
        let c = s.blk(0).write(sector, &vec![0x11; len as usize]).unwrap();
        assert_eq!(c.status(), S_IOERR, "write of {len} at sector {sector}");
    }
    assert_same(
        &fx.image_bytes((CAPACITY - 1) * 512, 512),
        &before,
        "out-of-range write landed",
    );
    // The very last sector is fine.
    let c = s.blk(0).read(CAPACITY - 1, 512).unwrap();
    assert_eq!(c.status(), S_OK);
    assert_same(&c.data, &before, "read data");
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn sector_plus_length_overflows_u64() {
    let (mut fx, mut s) = setup(&[]);
    // sector * 512 overflows; sector * 512 + len overflows; both wrap to small offsets.
    for sector in [u64::MAX, u64::MAX / 512, (u64::MAX / 512) - 1, 1 << 55] {
        let c = s.blk(0).read(sector, 4096).unwrap();
        assert_eq!(c.status(), S_IOERR, "read at sector {sector:#x}");
        let c = s.blk(0).write(sector, &[0x22; 4096]).unwrap();
        assert_eq!(c.status(), S_IOERR, "write at sector {sector:#x}");
        let c = s
            .blk(0)
            .write_zeroes(&[blk::Range::new(sector, 8)])
            .unwrap();
        assert_error_status(&c, &format!("write-zeroes at sector {sector:#x}"));
        let c = s
            .blk(0)
            .discard(&[blk::Range::new(sector, u32::MAX)])
            .unwrap();
        assert_error_status(&c, &format!("discard at sector {sector:#x}"));
    }
    assert_same(
        &fx.image_bytes(0, 64 * 1024),
        &image_pattern(0, 64 * 1024),
        "a wrapped write landed",
    );
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn in_request_with_device_readable_data() {
    let (mut fx, mut s) = setup(&[]);
    let b = bufs(&mut s, blk::T_IN, 3, 512);
    let segs = [
        Seg::readable(b.hdr, 16),
        Seg::readable(b.data, 512),
        Seg::writable(b.status, 1),
    ];
    let c = run(&mut s, &segs, None, Some(b.status));
    assert_error_status(&c, "IN with a readable data buffer");
    assert_eq!(
        s.mem().read(b.data, 512).unwrap(),
        vec![0xee; 512],
        "device wrote into a readable buffer"
    );
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn out_request_with_device_writable_data() {
    let (mut fx, mut s) = setup(&[]);
    let b = bufs(&mut s, blk::T_OUT, 3, 512);
    let segs = [
        Seg::readable(b.hdr, 16),
        Seg::writable(b.data, 512),
        Seg::writable(b.status, 1),
    ];
    let c = run(&mut s, &segs, None, Some(b.status));
    assert_error_status(&c, "OUT with a writable data buffer");
    assert_same(
        &fx.image_bytes(3 * 512, 512),
        &image_pattern(3 * 512, 512),
        "image changed",
    );
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn descriptor_outside_guest_memory() {
    let (mut fx, mut s) = setup(&[]);
    // Data buffer outside RAM.
    let b = bufs(&mut s, blk::T_IN, 0, 0);
    let segs = [
        Seg::readable(b.hdr, 16),
        Seg::writable(OUTSIDE, 512),
        Seg::writable(b.status, 1),
    ];
    let c = run(&mut s, &segs, None, Some(b.status));
    assert_error_status(&c, "data outside guest memory");
    // Data buffer straddling the end of RAM.
    let b = bufs(&mut s, blk::T_IN, 0, 0);
    let ram_end = 16 * MIB;
    let segs = [
        Seg::readable(b.hdr, 16),
        Seg::writable(ram_end - 256, 512),
        Seg::writable(b.status, 1),
    ];
    let c = run(&mut s, &segs, None, Some(b.status));
    assert_error_status(&c, "data straddling the end of guest memory");
    // OUT data outside RAM: nothing may be written to the image.
    let b = bufs(&mut s, blk::T_OUT, 5, 0);
    let segs = [
        Seg::readable(b.hdr, 16),
        Seg::readable(OUTSIDE, 512),
        Seg::writable(b.status, 1),
    ];
    let c = run(&mut s, &segs, None, Some(b.status));
    assert_error_status(&c, "OUT data outside guest memory");
    assert_same(
        &fx.image_bytes(5 * 512, 512),
        &image_pattern(5 * 512, 512),
        "image contents",
    );
    // Header outside RAM.
    let b = bufs(&mut s, blk::T_IN, 0, 512);
    let segs = [
        Seg::readable(OUTSIDE, 16),
        Seg::writable(b.data, 512),
        Seg::writable(b.status, 1),
    ];
    let c = run(&mut s, &segs, None, Some(b.status));
    assert_error_status(&c, "header outside guest memory");
    // Status outside RAM: nothing can be reported, but the chain must still come back.
    let b = bufs(&mut s, blk::T_IN, 0, 512);
    let segs = [
        Seg::readable(b.hdr, 16),
        Seg::writable(b.data, 512),
        Seg::writable(OUTSIDE, 1),
    ];
    run(&mut s, &segs, None, None);
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn read_only_device_refuses_writes() {
    let (mut fx, mut s) = setup(&["--read-only"]);
    let c = s.blk(0).write(9, &[0x33; 4096]).unwrap();
    assert_eq!(c.status(), S_IOERR, "write to a --read-only device");
    let c = s.blk(0).write_zeroes(&[blk::Range::new(9, 8)]).unwrap();
    assert_error_status(&c, "write-zeroes to a --read-only device");
    let c = s.blk(0).discard(&[blk::Range::new(9, 8)]).unwrap();
    assert_error_status(&c, "discard on a --read-only device");
    assert_same(
        &fx.image_bytes(9 * 512, 4096),
        &image_pattern(9 * 512, 4096),
        "read-only image changed",
    );
    // Reads and flushes still work.
    assert_eq!(s.blk(0).flush().unwrap().status(), S_OK);
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn unknown_request_type_is_unsupp() {
    let (mut fx, mut s) = setup(&[]);
    // 2 = SCSI_CMD (legacy), 14 = SECURE_ERASE (not offered), 16 = ZONE_REPORT, 99 = nothing.
    // (Not 0x8000_0000: legacy BARRIER, which QEMU masks off and serves as a read.)
    for t in [2u32, 14, 16, 99] {
        let c = s.blk(0).request(t, 0, &[], 512).unwrap();
        assert_eq!(c.status(), S_UNSUPP, "request type {t:#x}");
    }
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn header_split_across_three_descriptors() {
    let (mut fx, mut s) = setup(&[]);
    let b = bufs(&mut s, blk::T_IN, 11, 1024);
    let segs = [
        Seg::readable(b.hdr, 4),
        Seg::readable(b.hdr + 4, 5),
        Seg::readable(b.hdr + 9, 7),
        Seg::writable(b.data, 1024),
        Seg::writable(b.status, 1),
    ];
    let c = run(&mut s, &segs, Some((b.data, 1024)), Some(b.status));
    assert_eq!(c.status(), S_OK, "split header is valid virtio 1.x framing");
    assert_same(&c.data, &image_pattern(11 * 512, 1024), "read data");
    assert_eq!(c.used.len, 1025);
    // Same for a write whose header and data share descriptors.
    let data = vec![0x5a; 512];
    let mut joined = header(blk::T_OUT, 12).to_vec();
    joined.extend_from_slice(&data);
    let at = s.blk(0).alloc_bytes(&joined).unwrap();
    let st = s.blk(0).alloc_status().unwrap();
    let segs = [
        Seg::readable(at, 10),
        Seg::readable(at + 10, 518),
        Seg::writable(st, 1),
    ];
    let c = run(&mut s, &segs, None, Some(st));
    assert_eq!(c.status(), S_OK, "header+data in shared descriptors");
    assert_same(&fx.image_bytes(12 * 512, 512), &data, "image contents");
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn data_and_status_in_one_descriptor() {
    let (mut fx, mut s) = setup(&[]);
    let b = bufs(&mut s, blk::T_IN, 20, 513);
    let segs = [Seg::readable(b.hdr, 16), Seg::writable(b.data, 513)];
    let c = run(&mut s, &segs, Some((b.data, 513)), None);
    assert_eq!(
        c.data[512], S_OK,
        "status is the last byte of the writable part"
    );
    assert_same(
        &c.data[..512],
        &image_pattern(20 * 512, 512)[..],
        "read data",
    );
    assert_eq!(c.used.len, 513);
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn data_spread_over_many_descriptors() {
    let (mut fx, mut s) = setup(&[]);
    let b = bufs(&mut s, blk::T_IN, 30, 4096);
    let cuts = [
        (0u64, 100u32),
        (100, 412),
        (512, 1),
        (513, 2047),
        (2560, 1536),
    ];
    let mut segs = vec![Seg::readable(b.hdr, 16)];
    segs.extend(cuts.iter().map(|&(o, l)| Seg::writable(b.data + o, l)));
    segs.push(Seg::writable(b.status, 1));
    let c = run(&mut s, &segs, Some((b.data, 4096)), Some(b.status));
    assert_eq!(c.status(), S_OK);
    assert_same(&c.data, &image_pattern(30 * 512, 4096), "read data");
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn indirect_table_chain() {
    let (mut fx, mut s) = setup(&[]);
    let b = bufs(&mut s, blk::T_IN, 40, 2048);
    let table = s.blk(0).alloc(16 * 4, 0).unwrap();
    let segs = [
        Seg::readable(b.hdr, 16),
        Seg::writable(b.data, 1024),
        Seg::writable(b.data + 1024, 1024),
        Seg::writable(b.status, 1),
    ];
    let head = {
        let (vr, mem) = s.vring_mut(0).unwrap();
        vr.queue.add_indirect(mem, table, &segs).unwrap()
    };
    s.publish(0, head).unwrap();
    let c = s
        .blk(0)
        .finish(
            head,
            &Readback {
                data: vec![(b.data, 2048)],
                status: Some(b.status),
            },
        )
        .unwrap();
    assert_eq!(c.status(), S_OK, "indirect chain");
    assert_same(&c.data, &image_pattern(40 * 512, 2048), "read data");
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn nested_indirect_table() {
    let (mut fx, mut s) = setup(&[]);
    let b = bufs(&mut s, blk::T_IN, 41, 512);
    let inner = s.blk(0).alloc(16 * 2, 0).unwrap();
    let outer = s.blk(0).alloc(16 * 2, 0).unwrap();
    let mem = s.mem().clone();
    write_table(
        &mem,
        inner,
        &[
            desc(b.data, 512, DESC_F_WRITE | DESC_F_NEXT, 1),
            desc(b.status, 1, DESC_F_WRITE, 0),
        ],
    )
    .unwrap();
    write_table(
        &mem,
        outer,
        &[
            desc(b.hdr, 16, DESC_F_NEXT, 1),
            desc(inner, 32, DESC_F_INDIRECT, 0),
        ],
    )
    .unwrap();
    let head = {
        let (vr, mem) = s.vring_mut(0).unwrap();
        vr.queue
            .add_linked(mem, &[(outer, 32, DESC_F_INDIRECT)])
            .unwrap()
    };
    s.publish(0, head).unwrap();
    let c = s
        .blk(0)
        .finish(
            head,
            &Readback {
                data: vec![(b.data, 512)],
                status: Some(b.status),
            },
        )
        .unwrap_or_else(|e| panic!("nested indirect chain not completed: {e}"));
    assert_ne!(
        c.status(),
        S_OK,
        "nested indirect tables are forbidden by the spec"
    );
    assert_eq!(c.data, vec![0xee; 512], "data read through a nested table");
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn readable_descriptor_after_a_writable_one() {
    let (mut fx, mut s) = setup(&[]);
    let b = bufs(&mut s, blk::T_IN, 50, 512);
    let extra = s.blk(0).alloc(16, 0x77).unwrap();
    let segs = [
        Seg::readable(b.hdr, 16),
        Seg::writable(b.data, 512),
        Seg::readable(extra, 16),
        Seg::writable(b.status, 1),
    ];
    let c = run(&mut s, &segs, Some((b.data, 512)), Some(b.status));
    assert_error_status(&c, "readable after writable");
    assert_eq!(s.mem().read(extra, 16).unwrap(), vec![0x77; 16]);
    // The OUT flavour must not reach the disk.
    let b = bufs(&mut s, blk::T_OUT, 51, 512);
    s.mem().fill(b.data, 512, 0x44).unwrap();
    let st2 = s.blk(0).alloc_status().unwrap();
    let segs = [
        Seg::readable(b.hdr, 16),
        Seg::writable(b.status, 1),
        Seg::readable(b.data, 512),
        Seg::writable(st2, 1),
    ];
    let c = run(&mut s, &segs, None, Some(st2));
    assert_error_status(&c, "OUT with readable data after a writable byte");
    assert_same(
        &fx.image_bytes(51 * 512, 512),
        &image_pattern(51 * 512, 512),
        "image contents",
    );
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn data_length_not_a_multiple_of_512() {
    let (mut fx, mut s) = setup(&[]);
    let c = s.blk(0).read(60, 100).unwrap();
    assert_error_status(&c, "read of 100 bytes");
    let c = s.blk(0).write(60, &[0x66; 700]).unwrap();
    assert_error_status(&c, "write of 700 bytes");
    assert_same(
        &fx.image_bytes(60 * 512, 1024),
        &image_pattern(60 * 512, 1024),
        "image contents",
    );
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn descriptor_loop() {
    let (mut fx, mut s) = setup(&[]);
    let b = bufs(&mut s, blk::T_IN, 70, 512);
    let head = {
        let (vr, mem) = s.vring_mut(0).unwrap();
        let slots = vr.queue.alloc_slots(2).unwrap();
        let (a, c) = (slots[0], slots[1]);
        vr.queue
            .write_desc(mem, a, desc(b.hdr, 16, DESC_F_NEXT, c))
            .unwrap();
        vr.queue
            .write_desc(mem, c, desc(b.data, 512, DESC_F_NEXT, a))
            .unwrap();
        vr.queue.track(a, slots);
        a
    };
    s.publish(0, head).unwrap();
    let c = s
        .blk(0)
        .finish(head, &Readback::default())
        .unwrap_or_else(|e| panic!("looping chain not completed: {e}"));
    assert_eq!(c.used.len, 0, "a looping chain has nothing writable");
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn many_bad_chains_in_one_batch() {
    // A burst of garbage published with a single avail update, then valid reads.
    let (mut fx, mut s) = setup(&[]);
    let mut heads = Vec::new();
    for i in 0..32u64 {
        let b = bufs(&mut s, blk::T_IN, CAPACITY + i, 512);
        let (vr, mem) = s.vring_mut(0).unwrap();
        let h = vr
            .queue
            .add_chain(
                mem,
                &[
                    Seg::readable(b.hdr, 16),
                    Seg::writable(b.data, 512),
                    Seg::writable(b.status, 1),
                ],
            )
            .unwrap();
        heads.push((h, b.status));
    }
    {
        let (vr, mem) = s.vring_mut(0).unwrap();
        let hs: Vec<u16> = heads.iter().map(|h| h.0).collect();
        vr.queue.publish_batch(mem, &hs).unwrap();
    }
    s.kick(0).unwrap();
    for (h, st) in heads {
        s.wait_head(0, h, blk::TIMEOUT).unwrap();
        assert_eq!(s.mem().read(st, 1).unwrap()[0], S_IOERR);
    }
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn avail_index_jump_does_not_take_the_daemon_down() {
    // avail.idx moved further than the ring holds: the queue may be given up on (the kernel's
    // vhost marks it broken), but the daemon must survive and serve the next connection.
    let (mut fx, mut s) = setup(&[]);
    {
        let (vr, mem) = s.vring_mut(0).unwrap();
        let size = vr.queue.size();
        let jump = vr.queue.avail_idx().wrapping_add(size + 7);
        vr.queue.set_avail_idx(mem, jump).unwrap();
    }
    s.kick(0).unwrap();
    let _ = s
        .drain_used(0, std::time::Duration::from_millis(300))
        .unwrap();
    s.close();
    let mut s = fx.session();
    assert_still_serves(&mut fx, &mut s);
}

#[test]
fn head_index_out_of_range_does_not_take_the_daemon_down() {
    let (mut fx, mut s) = setup(&[]);
    {
        let (vr, mem) = s.vring_mut(0).unwrap();
        let bad = vr.queue.size() + 3;
        vr.queue.push_avail_entry(mem, bad).unwrap();
        let next = vr.queue.avail_idx().wrapping_add(1);
        vr.queue.set_avail_idx(mem, next).unwrap();
    }
    s.kick(0).unwrap();
    let used = s
        .drain_used(0, std::time::Duration::from_millis(300))
        .unwrap();
    assert!(
        used.iter().all(|u| u.id < u32::from(s.config().queue_size)),
        "device returned an out-of-range head: {used:?}"
    );
    s.close();
    let mut s = fx.session();
    assert_still_serves(&mut fx, &mut s);
}
