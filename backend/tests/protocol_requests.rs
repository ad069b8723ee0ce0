//! Protocol tests, layer 2: well-formed requests and vring state over vhost-user.
//!
//! DISCARD / WRITE_ZEROES / FLUSH semantics, the null backing, a full queue of requests published
//! at once (completions matched to heads), chains longer than seg_max refused, SET_CONFIG of the
//! writeback byte, GET_VRING_BASE after traffic, and the queue-size limit.

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vublk_test_support::frontend::blk::{self, header, Range, Readback, S_IOERR, S_OK};
use vublk_test_support::frontend::fixture::image_pattern;
use vublk_test_support::frontend::{BlkConfig, Fixture, Seg, Session, SessionConfig, Step};
use vublk_test_support::pattern::assert_same;
use vublk_test_support::Daemon;

const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");
const MIB: u64 = 1 << 20;

#[test]
fn write_zeroes_zeroes_and_discard_succeeds() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = fx.session();
    let c = s
        .blk(0)
        .write_zeroes(&[Range::new(8, 8), Range::new(100, 3)])
        .unwrap();
    assert_eq!(c.status(), S_OK, "WRITE_ZEROES");
    assert_same(&fx.image_bytes(8 * 512, 4096), &[0; 4096], "zeroed range 1");
    assert_same(
        &fx.image_bytes(100 * 512, 1536),
        &[0; 1536],
        "zeroed range 2",
    );
    assert_same(
        &fx.image_bytes(16 * 512, 512),
        &image_pattern(16 * 512, 512),
        "after range 1",
    );
    assert_same(
        &fx.image_bytes(7 * 512, 512),
        &image_pattern(7 * 512, 512),
        "before range 1",
    );
    let c = s
        .blk(0)
        .write_zeroes(&[Range::new(200, 8).unmap()])
        .unwrap();
    assert_eq!(c.status(), S_OK, "WRITE_ZEROES with UNMAP");
    assert_same(
        &s.blk(0).read(200, 4096).unwrap().data,
        &[0; 4096],
        "unmapped zeroes",
    );
    let c = s.blk(0).discard(&[Range::new(300, 64)]).unwrap();
    assert_eq!(c.status(), S_OK, "DISCARD");
    assert_eq!(s.blk(0).flush().unwrap().status(), S_OK);
    // Neighbours of the discarded range are untouched.
    assert_same(
        &fx.image_bytes(364 * 512, 512),
        &image_pattern(364 * 512, 512),
        "after discard",
    );
}

#[test]
fn discard_and_write_zeroes_respect_capacity() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = fx.session();
    let cap = 8 * MIB / 512;
    let c = s.blk(0).write_zeroes(&[Range::new(cap - 4, 8)]).unwrap();
    assert_eq!(c.status(), S_IOERR, "WRITE_ZEROES across the end");
    assert_same(
        &fx.image_bytes((cap - 4) * 512, 2048),
        &image_pattern((cap - 4) * 512, 2048),
        "tail after a refused WRITE_ZEROES",
    );
    let c = s.blk(0).discard(&[Range::new(cap, 1)]).unwrap();
    assert_eq!(c.status(), S_IOERR, "DISCARD past the end");
}

#[test]
fn null_backing_reads_zeroes_and_drops_writes() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("null.sock");
    let args = vec!["--null".to_string(), "64M".to_string()];
    let mut d = Daemon::listen(std::path::Path::new(VUBLK), &socket, &args).unwrap();
    let stream = d.connect(std::time::Duration::from_secs(10)).unwrap();
    let mut s = Session::connect(stream, SessionConfig::default(), &Step::qemu(1)).unwrap();
    let c = BlkConfig::parse(s.last_config().unwrap());
    assert_eq!(c.capacity, 64 * MIB / 512);
    assert_eq!(s.blk(0).write(10, &[0x99; 4096]).unwrap().status(), S_OK);
    let c = s.blk(0).read(10, 4096).unwrap();
    assert_eq!(c.status(), S_OK);
    assert_same(&c.data, &[0; 4096], "null read after write");
    assert_eq!(
        s.blk(0).read(64 * MIB / 512, 512).unwrap().status(),
        S_IOERR
    );
}

#[test]
fn a_full_queue_published_at_once_completes_every_head() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = fx.session();
    let n = s.config().queue_size as u64;
    let mut reqs = Vec::new();
    let mut heads = Vec::new();
    // Every head an indirect table, so all `n` descriptors of the ring are in flight at once.
    for i in 0..n {
        let sector = (i * 37) % 16000;
        let len = 512 * (1 + (i % 8)) as u32;
        let mut b = s.blk(0);
        let hdr = b.alloc_bytes(&header(blk::T_IN, sector)).unwrap();
        let data = b.alloc(len as usize, 0xee).unwrap();
        let st = b.alloc_status().unwrap();
        let table = b.alloc(48, 0).unwrap();
        let (vr, mem) = s.vring_mut(0).unwrap();
        let head = vr
            .queue
            .add_indirect(
                mem,
                table,
                &[
                    Seg::readable(hdr, 16),
                    Seg::writable(data, len),
                    Seg::writable(st, 1),
                ],
            )
            .unwrap();
        heads.push(head);
        reqs.push((head, sector, data, len, st));
    }
    {
        let (vr, mem) = s.vring_mut(0).unwrap();
        vr.queue.publish_batch(mem, &heads).unwrap();
    }
    s.kick(0).unwrap();
    for (head, sector, data, len, st) in reqs {
        let used = s.wait_head(0, head, blk::TIMEOUT).unwrap();
        assert_eq!(used.len, len + 1, "used.len of head {head}");
        let mem = s.mem();
        assert_eq!(mem.read(st, 1).unwrap()[0], S_OK, "status of head {head}");
        assert_same(
            &mem.read(data, len as usize).unwrap(),
            &image_pattern(sector * 512, len as usize),
            &format!("data of head {head} (sector {sector})"),
        );
    }
}

#[test]
fn chains_longer_than_seg_max_get_ioerr() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    // A ring longer than the chains, so only seg_max stops them.
    let config = SessionConfig {
        queue_size: 512,
        ..SessionConfig::default()
    };
    let mut s = fx.session_with(config, &Step::qemu(1));
    let seg_max = BlkConfig::parse(s.last_config().unwrap()).seg_max as usize;
    assert!(
        seg_max + 2 <= 128,
        "seg_max {seg_max} does not fit a ring of 128"
    );
    for nseg in [seg_max, seg_max + 1] {
        let mut b = s.blk(0);
        let hdr = b.alloc_bytes(&header(blk::T_IN, 0)).unwrap();
        let data = b.alloc(512 * nseg, 0xee).unwrap();
        let st = b.alloc_status().unwrap();
        let mut segs = vec![Seg::readable(hdr, 16)];
        segs.extend((0..nseg as u64).map(|i| Seg::writable(data + 512 * i, 512)));
        segs.push(Seg::writable(st, 1));
        let c = s
            .blk(0)
            .submit_raw(
                &segs,
                &Readback {
                    data: vec![(data, 512 * nseg as u32)],
                    status: Some(st),
                },
            )
            .unwrap();
        if nseg == seg_max {
            assert_eq!(c.status(), S_OK, "{nseg} data segments");
            assert_same(&c.data, &image_pattern(0, 512 * nseg), "long chain data");
        } else {
            assert_eq!(
                c.status(),
                S_IOERR,
                "{nseg} data segments (seg_max {seg_max})"
            );
            assert!(
                c.data.iter().all(|&b| b == 0xee),
                "a refused read wrote data"
            );
        }
    }
    assert_eq!(s.blk(0).read(1, 512).unwrap().status(), S_OK);
}

#[test]
fn set_config_toggles_writeback() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &["--write-cache", "on"]);
    // The writeback byte is only writable once CONFIG_WCE is negotiated.
    let mut s = fx.session_with(SessionConfig::default(), &Step::negotiate_features());
    let flags = VhostUserConfigFlags::WRITABLE;
    let read = |s: &mut Session| s.blk_config().unwrap().writeback;
    assert_eq!(read(&mut s), 1);
    s.frontend().set_config(32, flags, &[0]).unwrap();
    assert_eq!(read(&mut s), 0, "writeback after SET_CONFIG 0");
    s.frontend().set_config(32, flags, &[1]).unwrap();
    assert_eq!(read(&mut s), 1, "writeback after SET_CONFIG 1");
    // Other fields are read-only: capacity must not change.
    let _ = s.frontend().set_config(0, flags, &[0xff; 8]);
    assert_eq!(
        s.blk_config().unwrap().capacity,
        8 * MIB / 512,
        "capacity was writable"
    );
}

/// The guest's write-cache choice is device state: a reconnect (same VMM, so the same worker)
/// keeps it; VMMs do not send it again.
#[test]
fn write_cache_choice_survives_a_reconnect() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &["--write-cache", "on"]);
    let mut s = fx.session_with(SessionConfig::default(), &Step::negotiate_features());
    let read = |s: &mut Session| s.blk_config().unwrap().writeback;
    s.frontend()
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();
    assert_eq!(read(&mut s), 0);
    s.close();
    let mut s = fx.session_with(SessionConfig::default(), &Step::negotiate_features());
    assert_eq!(
        read(&mut s),
        0,
        "write-through chosen by the guest was lost on reconnect"
    );
}

#[test]
fn get_vring_base_reports_consumed_requests() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = fx.session();
    for i in 0..5 {
        assert_eq!(s.blk(0).read(i, 512).unwrap().status(), S_OK);
    }
    s.step(&Step::GetVringBase(0)).unwrap();
    assert_eq!(
        s.last_vring_base(),
        Some(5),
        "GET_VRING_BASE after 5 requests"
    );
}

#[test]
fn queue_size_above_the_limit_is_refused() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &["--queue-size", "256"]);
    let mut s = fx.session_with(SessionConfig::default(), &Step::negotiate());
    // NEED_REPLY is on, so the refusal comes back as a non-zero ack.
    assert!(
        s.frontend().set_vring_num(0, 512).is_err(),
        "SET_VRING_NUM 512 accepted with --queue-size 256"
    );
    assert!(
        s.frontend().set_vring_num(0, 100).is_err(),
        "SET_VRING_NUM 100 (not a power of two) accepted"
    );
    assert!(s.frontend().set_vring_num(0, 256).is_ok());
}
