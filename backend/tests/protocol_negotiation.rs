//! Protocol tests, layer 2: what vublk says about itself over vhost-user.
//!
//! A scripted frontend (vmm-glue) connects to a `vublk` child process and checks feature and
//! protocol-feature negotiation, GET_QUEUE_NUM, GET_CONFIG (sizes, offsets, fields) and GET_ID,
//! and replays QEMU's and cloud-hypervisor's handshakes before doing I/O.

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    VHOST_USER_CONFIG_OFFSET,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vublk_test_support::frontend::blk::{self, BLK_CONFIG_LEN_FULL};
use vublk_test_support::frontend::fixture::image_pattern;
use vublk_test_support::frontend::session::BLK_CONFIG_LEN;
use vublk_test_support::frontend::{BlkConfig, Fixture, MemAnnounce, Session, SessionConfig, Step};
use vublk_test_support::pattern::assert_same;

const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");
const MIB: u64 = 1 << 20;

fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Features every vublk offers, whatever the options (the brief's list; DISCARD and
/// WRITE_ZEROES because the test image is a regular file on a filesystem that can punch holes).
fn contract_features() -> Vec<(&'static str, u64)> {
    vec![
        ("VERSION_1", bit(VIRTIO_F_VERSION_1)),
        ("RING_EVENT_IDX", bit(VIRTIO_RING_F_EVENT_IDX)),
        ("RING_INDIRECT_DESC", bit(VIRTIO_RING_F_INDIRECT_DESC)),
        ("BLK_F_SIZE_MAX", bit(VIRTIO_BLK_F_SIZE_MAX)),
        ("BLK_F_SEG_MAX", bit(VIRTIO_BLK_F_SEG_MAX)),
        ("BLK_F_BLK_SIZE", bit(VIRTIO_BLK_F_BLK_SIZE)),
        ("BLK_F_TOPOLOGY", bit(VIRTIO_BLK_F_TOPOLOGY)),
        ("BLK_F_FLUSH", bit(VIRTIO_BLK_F_FLUSH)),
        ("BLK_F_CONFIG_WCE", bit(VIRTIO_BLK_F_CONFIG_WCE)),
        ("BLK_F_MQ", bit(VIRTIO_BLK_F_MQ)),
        ("BLK_F_DISCARD", bit(VIRTIO_BLK_F_DISCARD)),
        ("BLK_F_WRITE_ZEROES", bit(VIRTIO_BLK_F_WRITE_ZEROES)),
        (
            "VHOST_USER_F_PROTOCOL_FEATURES",
            VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        ),
    ]
}

fn negotiated(fx: &mut Fixture) -> Session {
    fx.session_with(SessionConfig::default(), &Step::negotiate())
}

fn missing(offered: u64) -> Vec<&'static str> {
    contract_features()
        .into_iter()
        .filter(|(_, b)| offered & b == 0)
        .map(|(n, _)| n)
        .collect()
}

#[test]
fn offers_the_contract_features_and_not_ro() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let s = negotiated(&mut fx);
    let f = s.backend_features();
    assert!(
        missing(f).is_empty(),
        "features {f:#x} lack {:?}",
        missing(f)
    );
    assert_eq!(
        f & bit(VIRTIO_BLK_F_RO),
        0,
        "RO offered without --read-only"
    );
}

#[test]
fn read_only_offers_ro() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &["--read-only"]);
    let s = negotiated(&mut fx);
    assert_ne!(s.backend_features() & bit(VIRTIO_BLK_F_RO), 0);
}

#[test]
fn offers_the_contract_protocol_features() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let s = negotiated(&mut fx);
    let want = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    let got = s.backend_protocol_features();
    assert!(
        got.contains(want),
        "protocol features {got:?} lack {:?}",
        want - got
    );
}

#[test]
fn queue_num_matches_num_queues() {
    for n in [1u64, 3, 8] {
        let arg = n.to_string();
        let mut fx = Fixture::start(VUBLK, 8 * MIB, &["--num-queues", &arg]);
        let s = negotiated(&mut fx);
        assert_eq!(
            s.queue_num(),
            Some(n),
            "GET_QUEUE_NUM with --num-queues {n}"
        );
    }
}

#[test]
fn get_config_returns_exactly_the_bytes_asked_for() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = negotiated(&mut fx);
    let flags = VhostUserConfigFlags::empty();
    let full = s
        .get_config(0, BLK_CONFIG_LEN, flags)
        .expect("GET_CONFIG 60");
    assert_eq!(full.len(), BLK_CONFIG_LEN as usize);
    for size in [8u32, 60, 96, 1] {
        let got = s.get_config(0, size, flags).expect("GET_CONFIG");
        assert_eq!(got.len(), size as usize, "GET_CONFIG size {size}");
        let common = got.len().min(full.len());
        assert_eq!(
            got[..common],
            full[..common],
            "GET_CONFIG size {size} disagrees"
        );
    }
    let big = s.get_config(0, BLK_CONFIG_LEN_FULL, flags).unwrap();
    assert!(
        big[60..].iter().all(|&b| b == 0),
        "config bytes past write_zeroes_may_unmap should read as zero: {:?}",
        &big[60..]
    );
    // Partial reads at an offset see the same bytes as a full read.
    for (offset, size) in [(20u32, 4u32), (34, 2), (8, 16), (32, 1), (36, 24)] {
        let got = s
            .get_config(offset, size, flags)
            .expect("GET_CONFIG at offset");
        let (o, n) = (offset as usize, size as usize);
        assert_eq!(
            got,
            full[o..o + n],
            "GET_CONFIG offset {offset} size {size}"
        );
    }
}

#[test]
fn config_describes_the_image_and_options() {
    let size = 12 * MIB + 4096;
    let cases: [(&[&str], u32, u8, u16); 4] = [
        (&[], 512, 1, 1),
        (&["--blk-size", "4096"], 4096, 1, 1),
        (&["--write-cache", "off", "--num-queues", "2"], 512, 0, 2),
        (
            &[
                "--write-cache",
                "on",
                "--num-queues",
                "4",
                "--blk-size",
                "512",
            ],
            512,
            1,
            4,
        ),
    ];
    for (args, blk_size, writeback, queues) in cases {
        let mut fx = Fixture::start(VUBLK, size, args);
        let mut s = negotiated(&mut fx);
        let c = s.blk_config().unwrap();
        assert_eq!(c.capacity, size / 512, "{args:?}: capacity");
        assert_eq!(c.blk_size, blk_size, "{args:?}: blk_size");
        assert_eq!(c.writeback, writeback, "{args:?}: writeback");
        assert_eq!(c.num_queues, queues, "{args:?}: num_queues");
        assert!(c.seg_max >= 1, "{args:?}: seg_max {}", c.seg_max);
        assert!(c.max_discard_sectors > 0, "{args:?}: max_discard_sectors 0");
        assert!(
            c.max_write_zeroes_sectors > 0,
            "{args:?}: max_write_zeroes 0"
        );
    }
}

#[test]
fn get_id_returns_the_serial_nul_padded() {
    for serial in ["vublk-serial-01", "exactly-twenty-bytes", "x"] {
        let mut fx = Fixture::start(VUBLK, 8 * MIB, &["--serial", serial]);
        let mut s = fx.session();
        let c = s.blk(0).get_id().unwrap();
        assert_eq!(c.status(), blk::S_OK);
        let mut want = serial.as_bytes().to_vec();
        want.resize(blk::ID_BYTES, 0);
        assert_same(&c.data, &want, &format!("GET_ID with --serial {serial:?}"));
    }
}

#[test]
fn get_id_default_is_a_stable_nul_padded_string() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = fx.session();
    let first = s.blk(0).get_id().unwrap();
    let again = s.blk(0).get_id().unwrap();
    assert_eq!(first.status(), blk::S_OK);
    assert_same(
        &first.data,
        &again.data,
        "GET_ID changed within one session",
    );
    let id = first.data;
    assert_eq!(id.len(), blk::ID_BYTES);
    assert!(id.iter().any(|&b| b != 0), "default serial is empty");
    let end = id.iter().position(|&b| b == 0).unwrap_or(id.len());
    assert!(
        id[end..].iter().all(|&b| b == 0),
        "serial not NUL padded: {id:?}"
    );
}

#[test]
fn get_id_default_depends_only_on_the_image_path() {
    // Two daemons, one after the other, on the very same image path.
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let first = fx.session().blk(0).get_id().unwrap().data;
    let image = fx.image.clone();
    let socket2 = fx.dir.path().join("second.sock");
    let args = vec!["--blk-file".to_string(), image.display().to_string()];
    let mut d2 = vublk_test_support::Daemon::listen(std::path::Path::new(VUBLK), &socket2, &args)
        .expect("spawn second vublk");
    let stream = d2.connect(std::time::Duration::from_secs(10)).unwrap();
    let mut s2 = Session::connect(stream, SessionConfig::default(), &Step::qemu(1)).unwrap();
    let second = s2.blk(0).get_id().unwrap().data;
    assert_eq!(
        first, second,
        "default serial changed between runs on the same path"
    );
}

/// Reads at three places and writes once, checking data both ways.
fn exercise_io(fx: &Fixture, s: &mut Session, q: usize) {
    for sector in [0u64, 7, 16383] {
        let c = s.blk(q).read(sector, 512).unwrap();
        assert_eq!(c.status(), blk::S_OK, "read sector {sector} on queue {q}");
        assert_same(
            &c.data,
            &image_pattern(sector * 512, 512),
            &format!("data of sector {sector}"),
        );
    }
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + q as u32) as u8).collect();
    let sector = 100 + 8 * q as u64;
    assert_eq!(s.blk(q).write(sector, &data).unwrap().status(), blk::S_OK);
    assert_same(
        &s.blk(q).read(sector, 4096).unwrap().data,
        &data,
        "read data",
    );
    assert_same(
        &fx.image_bytes(sector * 512, 4096),
        &data,
        "write did not reach the image",
    );
}

#[test]
fn qemu_handshake_serves_io() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = fx.session_with(SessionConfig::default(), &Step::qemu(1));
    let c = BlkConfig::parse(s.last_config().unwrap());
    assert_eq!(c.capacity, 8 * MIB / 512);
    exercise_io(&fx, &mut s, 0);
}

#[test]
fn cloud_hypervisor_handshake_serves_io() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &["--num-queues", "2"]);
    let config = SessionConfig {
        num_queues: 2,
        ..SessionConfig::default()
    };
    let mut s = fx.session_with(config, &Step::cloud_hypervisor(2));
    // cloud-hypervisor reads the config at VHOST_USER_CONFIG_OFFSET (0x100) and uses the bytes
    // as the config space from offset 0 (libvhost-user and cloud-hypervisor's own backend
    // ignore the offset). A backend that honours 0x100 literally gives it capacity 0.
    let c = BlkConfig::parse(s.last_config().unwrap());
    assert_eq!(
        c.capacity,
        8 * MIB / 512,
        "GET_CONFIG at offset {VHOST_USER_CONFIG_OFFSET:#x} (cloud-hypervisor) must return the config space"
    );
    exercise_io(&fx, &mut s, 0);
    exercise_io(&fx, &mut s, 1);
}

#[test]
fn add_mem_reg_handshake_serves_io() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut steps = Step::negotiate();
    steps.push(Step::GetMaxMemSlots);
    steps.extend(Step::start(1, MemAnnounce::AddMemReg));
    let mut s = fx.session_with(SessionConfig::default(), &steps);
    assert!(
        s.max_mem_slots().unwrap_or(0) >= 8,
        "GET_MAX_MEM_SLOTS {:?}",
        s.max_mem_slots()
    );
    exercise_io(&fx, &mut s, 0);
}

#[test]
fn every_queue_serves_io() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &["--num-queues", "4"]);
    let config = SessionConfig {
        num_queues: 4,
        ..SessionConfig::default()
    };
    let mut s = fx.session_with(config, &Step::qemu(4));
    for q in 0..4 {
        exercise_io(&fx, &mut s, q);
    }
}

/// The descriptors of a read of `len` bytes at `sector` on queue 0, built by hand (nothing
/// published, nothing read from the call eventfd); returns them and the status byte.
fn read_segs(
    s: &mut Session,
    sector: u64,
    len: u32,
) -> ([vublk_test_support::frontend::Seg; 3], u64) {
    let mut b = s.blk(0);
    let hdr = b.alloc_bytes(&blk::header(blk::T_IN, sector)).unwrap();
    let data = b.alloc(len as usize, 0).unwrap();
    let status = b.alloc_status().unwrap();
    let segs = [
        vublk_test_support::frontend::Seg::readable(hdr, 16),
        vublk_test_support::frontend::Seg::writable(data, len),
        vublk_test_support::frontend::Seg::writable(status, 1),
    ];
    (segs, status)
}

/// Early calls (virtio_blk/queue.rs) stay one per wait of the driver: a batch published with one index
/// update and one kick gets one call, with EVENT_IDX (the driver asked for a call at the first
/// completion, and not again) and without it (one per round of the queue thread).
#[test]
fn a_batch_gets_one_call() {
    const BATCH: u64 = 16;
    for event_idx in [true, false] {
        // No polling: the thread sleeps until the kick and takes the whole batch at once.
        let mut fx = Fixture::start(VUBLK, 8 * MIB, &["--poll-max-us", "0"]);
        let mut features = vublk_test_support::frontend::session::DRIVER_FEATURES;
        if !event_idx {
            features &= !bit(VIRTIO_RING_F_EVENT_IDX);
        }
        let mut s = fx.session_with(
            SessionConfig {
                features,
                ..SessionConfig::default()
            },
            &Step::qemu(1),
        );
        // One request first, so the thread has gone through a round and sleeps with kicks on.
        let c = s.blk(0).read(0, 512).unwrap();
        assert_eq!(c.status(), blk::S_OK);
        std::thread::sleep(std::time::Duration::from_millis(50));
        s.call_count(0).unwrap();

        let mut heads = Vec::new();
        let mut statuses = Vec::new();
        for i in 0..BATCH {
            let (segs, status) = read_segs(&mut s, i, 4096);
            let (vr, mem) = s.vring_mut(0).unwrap();
            heads.push(vr.queue.add_chain(mem, &segs).unwrap());
            statuses.push(status);
        }
        let (vr, mem) = s.vring_mut(0).unwrap();
        vr.queue.publish_batch(mem, &heads).unwrap();
        s.kick(0).unwrap();
        // Collect the completions from the used ring directly: the session's waits read (and
        // so clear) the call eventfd.
        let start = std::time::Instant::now();
        let mut used = 0;
        while used < heads.len() {
            assert!(
                start.elapsed() < blk::TIMEOUT,
                "{used} of {BATCH} completed (event_idx {event_idx})"
            );
            let (vr, mem) = s.vring_mut(0).unwrap();
            match vr.queue.pop_used(mem).unwrap() {
                Some(e) => {
                    assert!(heads.contains(&(e.id as u16)));
                    used += 1;
                }
                None => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        }
        for status in statuses {
            assert_eq!(s.mem().read(status, 1).unwrap()[0], blk::S_OK);
        }
        // A call may follow the last used entry by a moment; none may follow it later.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let calls = s.call_count(0).unwrap();
        assert_eq!(
            calls, 1,
            "calls for a batch of {BATCH} (event_idx {event_idx})"
        );
    }
}

#[test]
fn works_without_event_idx_and_indirect() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let config = SessionConfig {
        features: vublk_test_support::frontend::session::DRIVER_FEATURES
            & !bit(VIRTIO_RING_F_EVENT_IDX)
            & !bit(VIRTIO_RING_F_INDIRECT_DESC),
        ..SessionConfig::default()
    };
    let mut s = fx.session_with(config, &Step::qemu(1));
    assert_eq!(s.acked_features() & bit(VIRTIO_RING_F_EVENT_IDX), 0);
    exercise_io(&fx, &mut s, 0);
}

#[test]
fn completions_are_signalled_on_the_call_eventfd() {
    for event_idx in [true, false] {
        let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
        let mut features = vublk_test_support::frontend::session::DRIVER_FEATURES;
        if !event_idx {
            features &= !bit(VIRTIO_RING_F_EVENT_IDX);
        }
        let config = SessionConfig {
            features,
            ..SessionConfig::default()
        };
        let mut s = fx.session_with(config, &Step::qemu(1));
        for i in 0..4u64 {
            // Build and submit by hand so nothing reads the call eventfd before we check it.
            let (segs, status) = read_segs(&mut s, i, 512);
            let head = s.submit(0, &segs).unwrap();
            assert!(
                s.wait_call(0, blk::TIMEOUT).unwrap(),
                "no call after request {i} (event_idx {event_idx})"
            );
            let used = s.wait_head(0, head, blk::TIMEOUT).unwrap();
            assert_eq!(used.len, 513);
            assert_eq!(s.mem().read(status, 1).unwrap()[0], blk::S_OK);
        }
    }
}
