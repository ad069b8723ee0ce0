//! cloud-hypervisor's vhost-user-blk conversation with a real vublk, replayed message by message.
//!
//! cloud-hypervisor needs KVM, which this machine lacks, so its side is replayed from its source
//! instead: the sequences, and the version and commits they were read from, are in
//! `vublk_test_support::frontend::cloud_hypervisor` (cloud-hypervisor v51: `virtio-devices/src/vhost_user/
//! blk.rs`, `mod.rs`, `vu_common_ctrl.rs`). Each test starts vublk as deployed (supervisor and
//! per-VM worker) on a patterned image and checks every reply cloud-hypervisor acts on: the
//! virtio features (exactly what vublk offers), the protocol features (exactly MQ, CONFIG,
//! REPLY_ACK, CONFIGURE_MEM_SLOTS, INFLIGHT_SHMFD: cloud-hypervisor then sends GET_INFLIGHT_FD
//! once and SET_INFLIGHT_FD on every connection), the queue number, the 60 config bytes it reads at 0x100, and every
//! REPLY_ACK (each message after negotiation carries NEED_REPLY). Then data goes through the
//! rings, and the connection is lost and re-made the way cloud-hypervisor re-makes it.

mod common;

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use common::vublk;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    VHOST_USER_CONFIG_OFFSET,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vublk_test_support::frontend::blk::{self, header, BLK_CONFIG_LEN_FULL};
use vublk_test_support::frontend::cloud_hypervisor::{self as ch, QUEUE_SIZE};
use vublk_test_support::frontend::fixture::{image_pattern, START_TIMEOUT};
use vublk_test_support::frontend::session::BLK_CONFIG_LEN;
use vublk_test_support::frontend::{
    BlkConfig, Fixture, MemAnnounce, Readback, RegionSpec, Seg, Session, Step,
};
use vublk_test_support::pattern::assert_same;
use vublk_test_support::Daemon;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const IMAGE: u64 = 8 * MIB;
/// Guest RAM at boot: one region at 0, as cloud-hypervisor lays out a small guest.
const BOOT_RAM: RegionSpec = RegionSpec::new(0, 32 << 20);
/// Hot-plugged RAM (`ch-remote resize --memory`) lands above the boot RAM.
const HOTPLUG_RAM: RegionSpec = RegionSpec::new(4 * GIB, 4 << 20);

fn bit(b: u32) -> u64 {
    1 << b
}

/// vublk's virtio features for a writable raw image in `dir`, from its documented rules
/// (README, `backend/src/virtio_blk/config.rs`): the fixed set, DISCARD when holes can be
/// punched in the image's filesystem, WRITE_ZEROES when ranges can be zeroed or punched — probed
/// here the way vublk probes, past the end of a scratch file.
fn vublk_features(dir: &Path) -> u64 {
    let probe = dir.join("probe");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&probe)
        .unwrap();
    let try_mode = |mode: i32| {
        // SAFETY: fallocate on a file we own and keep open; KEEP_SIZE past EOF never changes
        // its contents.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                mode | libc::FALLOC_FL_KEEP_SIZE,
                1 << 20,
                4096,
            )
        };
        rc == 0
    };
    let punch = try_mode(libc::FALLOC_FL_PUNCH_HOLE);
    let zero_range = try_mode(libc::FALLOC_FL_ZERO_RANGE);
    drop(f);
    std::fs::remove_file(&probe).unwrap();

    let mut features = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
        | bit(VIRTIO_BLK_F_MQ)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VhostUserVirtioFeatures::LOG_ALL.bits();
    if punch {
        features |= bit(VIRTIO_BLK_F_DISCARD);
    }
    if punch || zero_range {
        features |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
    }
    features
}

/// The protocol features vublk offers, all of which cloud-hypervisor takes.
fn vublk_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
        // The backend request channel (resize's CONFIG_CHANGE_MSG), which cloud-hypervisor's
        // block device does not take.
        | VhostUserProtocolFeatures::BACKEND_REQ
}

/// vublk on a fresh patterned image with `queues` queues, and cloud-hypervisor attaching it.
fn boot(queues: usize) -> (Fixture, Session) {
    let n = queues.to_string();
    let mut fx = Fixture::start(vublk().to_str().unwrap(), IMAGE, &["--num-queues", &n]);
    let config = ch::session_config(queues, QUEUE_SIZE, vec![BOOT_RAM]);
    let s = fx.session_with(config, &Step::cloud_hypervisor_v51(queues));
    (fx, s)
}

/// Every reply of the boot sequence, as cloud-hypervisor uses it.
fn check_boot_replies(fx: &Fixture, s: &Session, queues: usize) {
    let offered = vublk_features(fx.dir.path());
    assert_eq!(
        s.backend_features(),
        offered,
        "GET_FEATURES: {:#x}, expected exactly {offered:#x}",
        s.backend_features()
    );
    // Blk::new acks offered ∩ its own; a Linux guest then acks all of those.
    let acked = offered & ch::virtio_features(queues);
    assert_eq!(s.acked_features(), acked, "SET_FEATURES");
    if queues == 1 {
        assert_eq!(acked & bit(VIRTIO_BLK_F_MQ), 0, "one queue: no MQ");
    }
    assert_eq!(
        s.backend_protocol_features(),
        vublk_protocol_features(),
        "GET_PROTOCOL_FEATURES"
    );
    // INFLIGHT_SHMFD too (cloud-hypervisor then sends GET/SET_INFLIGHT_FD); nothing it would
    // use for SET_LOG_BASE.
    assert_eq!(
        s.acked_protocol_features(),
        vublk_protocol_features() & ch::protocol_features(),
        "SET_PROTOCOL_FEATURES (offered ∩ cloud-hypervisor's)"
    );
    assert_eq!(s.queue_num(), Some(queues as u64), "GET_QUEUE_NUM");

    // GET_CONFIG at 0x100, 60 bytes: VirtioBlockConfig::from_slice needs exactly that many,
    // and cloud-hypervisor takes byte 0 of the reply as config offset 0.
    let bytes = s.last_config().expect("GET_CONFIG reply");
    assert_eq!(bytes.len(), BLK_CONFIG_LEN as usize);
    let c = BlkConfig::parse(bytes);
    assert_eq!(c.capacity, IMAGE / 512, "capacity in 512-byte sectors");
    assert_eq!(c.blk_size, 512, "blk_size");
    assert_eq!(c.num_queues, queues as u16, "num_queues");
    assert_eq!(c.writeback, 1, "writeback (vublk --write-cache on)");
    assert!(c.size_max >= 4096, "size_max {}", c.size_max);
    assert!(c.seg_max >= 1, "seg_max {}", c.seg_max);
    // Not offered: GEOMETRY.
    assert_eq!((c.cylinders, c.heads, c.sectors), (0, 0, 0), "geometry");
    assert_eq!(
        u32::from(c.min_io_size),
        1 << c.physical_block_exp,
        "topology: {c:?}"
    );
    let discard = offered & bit(VIRTIO_BLK_F_DISCARD) != 0;
    assert_eq!(c.max_discard_sectors != 0, discard, "{c:?}");
    assert_eq!(c.max_discard_seg != 0, discard, "{c:?}");
    if discard {
        assert_eq!(c.discard_sector_alignment, c.blk_size / 512);
    }
    let zeroes = offered & bit(VIRTIO_BLK_F_WRITE_ZEROES) != 0;
    assert_eq!(c.max_write_zeroes_sectors != 0, zeroes, "{c:?}");
    assert_eq!(c.max_write_zeroes_seg != 0, zeroes, "{c:?}");
    assert_eq!(&bytes[57..60], &[0, 0, 0], "padding");
}

/// Reads patterned sectors, writes, reads back and checks the image on queue `q`; `tag` makes
/// each call's data distinct. Returns the sector written.
fn io_round(fx: &Fixture, s: &mut Session, q: usize, tag: u8) -> u64 {
    for sector in [0u64, 9, IMAGE / 512 - 1] {
        let c = s.blk(q).read(sector, 512).unwrap();
        assert_eq!(c.status(), blk::S_OK, "read sector {sector}, queue {q}");
        assert_same(&c.data, &image_pattern(sector * 512, 512), "read data");
    }
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 13) as u8 ^ tag).collect();
    let sector = 64 + 32 * u64::from(tag) + 16 * q as u64;
    assert_eq!(s.blk(q).write(sector, &data).unwrap().status(), blk::S_OK);
    assert_same(
        &s.blk(q).read(sector, 8192).unwrap().data,
        &data,
        "read back",
    );
    assert_eq!(s.blk(q).flush().unwrap().status(), blk::S_OK, "flush");
    assert_same(&fx.image_bytes(sector * 512, 8192), &data, "image contents");
    sector
}

/// One read of `segs` 512-byte data descriptors in an indirect table, the way a Linux guest
/// sends its largest requests (header + seg_max data + status).
fn big_indirect_read(s: &mut Session, q: usize, sector: u64, segs: usize) {
    let mut b = s.blk(q);
    let hdr = b.alloc_bytes(&header(blk::T_IN, sector)).unwrap();
    let mut chain = vec![Seg::readable(hdr, 16)];
    let mut rb = Readback::default();
    for _ in 0..segs {
        let at = b.alloc(512, 0xee).unwrap();
        chain.push(Seg::writable(at, 512));
        rb.data.push((at, 512));
    }
    let st = b.alloc_status().unwrap();
    chain.push(Seg::writable(st, 1));
    rb.status = Some(st);
    let table = {
        let (mem, arena) = s.mem_and_arena();
        let t = arena.alloc(16 * chain.len() as u64, 16).unwrap();
        mem.fill(t, 16 * chain.len(), 0).unwrap();
        t
    };
    let head = {
        let (vr, mem) = s.vring_mut(q).unwrap();
        vr.queue.add_indirect(mem, table, &chain).unwrap()
    };
    s.publish(q, head).unwrap();
    let c = s.blk(q).finish(head, &rb).unwrap();
    assert_eq!(c.status(), blk::S_OK, "{segs}-segment indirect read");
    assert_same(
        &c.data,
        &image_pattern(sector * 512, segs * 512),
        "indirect read data",
    );
}

/// Pids of `pid`'s children (vublk's per-VM workers).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

fn kill(pid: u32, sig: i32) {
    // SAFETY: kill() on a worker pid read from its parent's children list just now; the parent
    // has not reaped it (the test waits for the hang-up only after this).
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "kill {pid}");
}

#[test]
fn boot_sequence_replies_and_io_on_every_queue() {
    let (fx, mut s) = boot(2);
    check_boot_replies(&fx, &s, 2);
    // Each message after SET_PROTOCOL_FEATURES went out with NEED_REPLY and got a zero ack
    // (the vhost crate fails the step otherwise); the whole sequence ran, in order.
    assert_eq!(s.sent(), &Step::cloud_hypervisor_v51(2)[..]);
    for q in 0..2 {
        io_round(&fx, &mut s, q, q as u8);
    }
    // A guest's largest request: seg_max data segments through an indirect table, on a queue
    // of cloud-hypervisor's default size.
    let seg_max = BlkConfig::parse(s.last_config().unwrap()).seg_max as usize;
    big_indirect_read(&mut s, 1, 1000, seg_max);

    // With one queue cloud-hypervisor does not offer MQ, and vublk is fine without it.
    let (fx, mut s) = boot(1);
    check_boot_replies(&fx, &s, 1);
    io_round(&fx, &mut s, 0, 7);
}

#[test]
fn memory_hotplug_and_the_cache_mode_switch() {
    let (fx, mut s) = boot(1);
    // Hot-plugged RAM: cloud-hypervisor sends ADD_MEM_REG for the new region alone
    // (CONFIGURE_MEM_SLOTS was acked); buffers there must work at once.
    let mut hot = s.plug_region(HOTPLUG_RAM, MemAnnounce::AddMemReg).unwrap();
    let hdr = hot.alloc(16, 8).unwrap();
    s.mem().write(hdr, &header(blk::T_IN, 33)).unwrap();
    let data = hot.alloc(4096, 8).unwrap();
    let st = hot.alloc(1, 1).unwrap();
    s.mem().fill(st, 1, blk::STATUS_UNTOUCHED).unwrap();
    let c = s
        .blk(0)
        .submit_raw(
            &[
                Seg::readable(hdr, 16),
                Seg::writable(data, 4096),
                Seg::writable(st, 1),
            ],
            &Readback {
                data: vec![(data, 4096)],
                status: Some(st),
            },
        )
        .unwrap();
    assert_eq!(c.status(), blk::S_OK, "read into hot-plugged RAM");
    assert_same(
        &c.data,
        &image_pattern(33 * 512, 4096),
        "hot-plugged read data",
    );

    // The guest turns the write cache off: SET_CONFIG at the raw writeback offset (32), not at
    // 0x100 + 32 as cloud-hypervisor's GET_CONFIG was. vublk acks it (NEED_REPLY) ...
    s.step(&Step::cloud_hypervisor_v51_writeback(false))
        .unwrap_or_else(|e| panic!("SET_CONFIG writeback=0: {e}\n{}", fx.daemon.log()));
    // ... and applies it: cloud-hypervisor does not read the config again, this check does.
    let after = s
        .get_config(
            VHOST_USER_CONFIG_OFFSET,
            BLK_CONFIG_LEN,
            VhostUserConfigFlags::WRITABLE,
        )
        .unwrap();
    assert_eq!(
        BlkConfig::parse(&after).writeback,
        0,
        "writeback after SET_CONFIG"
    );
    io_round(&fx, &mut s, 0, 3);

    // Not part of cloud-hypervisor's sequence (it never asks): how many regions vublk takes,
    // i.e. how far cloud-hypervisor can hot-plug before ADD_MEM_REG fails.
    s.step(&Step::GetMaxMemSlots).unwrap();
    assert!(
        s.max_mem_slots().unwrap_or(0) >= 32,
        "GET_MAX_MEM_SLOTS {:?}",
        s.max_mem_slots()
    );
    // The whole config space is readable too (what a 96-byte read by another VMM gets).
    let full = s
        .get_config(
            VHOST_USER_CONFIG_OFFSET,
            BLK_CONFIG_LEN_FULL,
            VhostUserConfigFlags::empty(),
        )
        .unwrap();
    assert_eq!(&full[..BLK_CONFIG_LEN as usize], &after[..]);
}

#[test]
fn reconnects_after_the_worker_dies_and_after_vublk_restarts() {
    let (mut fx, mut s) = boot(1);
    check_boot_replies(&fx, &s, 1);
    let acked = s.acked_features();
    let acked_protocol = s.acked_protocol_features();
    let before = io_round(&fx, &mut s, 0, 1);
    // Hot-plugged RAM is part of guest memory from now on: the SET_MEM_TABLE of a reconnect
    // carries both regions.
    s.plug_region(HOTPLUG_RAM, MemAnnounce::AddMemReg).unwrap();

    // 1. The per-VM worker dies (crash, OOM kill): the supervisor keeps the socket, the VMM
    //    sees its connection hang up and reconnects. Here the reconnect waits until the
    //    supervisor has reaped the dead worker; `reconnect_at_once_after_the_worker_dies`
    //    reconnects at once, as cloud-hypervisor does.
    kill_worker(&fx, &s);
    wait_reaped(&fx);
    reconnect(&mut fx, &mut s, acked, acked_protocol);
    let c = s.blk(0).read(before, 8192).unwrap();
    assert_eq!(c.status(), blk::S_OK);
    assert_same(
        &c.data,
        &fx.image_bytes(before * 512, 8192),
        "data written before the worker died",
    );
    let second = io_round(&fx, &mut s, 0, 2);

    // 2. vublk itself restarts (upgrade): SIGTERM, exit 0, socket gone; a new vublk on the same
    //    socket and image. cloud-hypervisor retries the connect (every 100 ms for a minute).
    fx.daemon.signal(libc::SIGTERM).unwrap();
    let st = fx
        .daemon
        .wait_exit(Duration::from_secs(20))
        .expect("vublk did not stop on SIGTERM");
    assert!(st.success(), "vublk exit {st}: {}", fx.daemon.log());
    assert!(s.wait_hangup(Duration::from_secs(5)).unwrap());
    let args: Vec<String> = [
        "--blk-file",
        fx.image.to_str().unwrap(),
        "--num-queues",
        "1",
    ]
    .map(String::from)
    .to_vec();
    fx.daemon = Daemon::listen(&vublk(), &fx.socket, &args).unwrap();
    reconnect(&mut fx, &mut s, acked, acked_protocol);
    for (sector, what) in [
        (before, "before the worker died"),
        (second, "before the restart"),
    ] {
        let c = s.blk(0).read(sector, 8192).unwrap();
        assert_eq!(c.status(), blk::S_OK);
        assert_same(
            &c.data,
            &fx.image_bytes(sector * 512, 8192),
            &format!("data written {what}"),
        );
    }
    io_round(&fx, &mut s, 0, 4);
}

/// The same reconnect without waiting for the supervisor to notice the dead worker, as
/// cloud-hypervisor does it: its HUP handler reconnects at once, and if that connection fails
/// it gives up on the disk for good (`VhostUserEpollHandler::reconnect` returns an error and the
/// device's vhost-user thread ends). The supervisor may not have reaped the dead worker yet:
/// the hand-over to it fails and the connection must go to a new worker (this failed 18 of 20
/// runs before the supervisor retried).
#[test]
fn reconnect_at_once_after_the_worker_dies() {
    let (mut fx, mut s) = boot(1);
    let (acked, acked_protocol) = (s.acked_features(), s.acked_protocol_features());
    let before = io_round(&fx, &mut s, 0, 1);
    kill_worker(&fx, &s);
    reconnect(&mut fx, &mut s, acked, acked_protocol);
    assert_same(
        &s.blk(0).read(before, 8192).unwrap().data,
        &fx.image_bytes(before * 512, 8192),
        "data written before the worker died",
    );
}

/// Kills the VM's worker with SIGKILL and waits for the connection to hang up.
fn kill_worker(fx: &Fixture, s: &Session) {
    let workers = children(fx.daemon.pid());
    assert_eq!(workers.len(), 1, "one worker for one VM: {workers:?}");
    kill(workers[0], libc::SIGKILL);
    let start = Instant::now();
    assert!(
        s.wait_hangup(Duration::from_secs(10)).unwrap(),
        "no hang-up after the worker died\n{}",
        fx.daemon.log()
    );
    eprintln!("hang-up {:?} after the worker was killed", start.elapsed());
}

/// Waits until the supervisor has reaped its workers.
fn wait_reaped(fx: &Fixture) {
    let start = Instant::now();
    while !children(fx.daemon.pid()).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the supervisor did not reap its worker\n{}",
            fx.daemon.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// cloud-hypervisor's reconnect: a new connection (retried while nobody listens), then
/// `reinitialize_vhost_user` with what it acked the first time. Every message is acked.
fn reconnect(
    fx: &mut Fixture,
    s: &mut Session,
    acked: u64,
    acked_protocol: VhostUserProtocolFeatures,
) {
    let stream = fx
        .daemon
        .connect(START_TIMEOUT)
        .unwrap_or_else(|e| panic!("reconnect: {e}\n{}", fx.daemon.log()));
    s.reconnect(stream).unwrap();
    let steps = Step::cloud_hypervisor_v51_reconnect(1, acked, acked_protocol);
    s.run(&steps)
        .unwrap_or_else(|e| panic!("reconnect sequence: {e:?}\n{}", fx.daemon.log()));
    // GET_FEATURES is the only reply cloud-hypervisor gets (and ignores) on a reconnect; it
    // must still offer everything acked the first time, or SET_FEATURES would be refused.
    assert_eq!(
        s.backend_features() & acked,
        acked,
        "GET_FEATURES on reconnect"
    );
    assert_eq!(s.acked_protocol_features(), acked_protocol);
}
