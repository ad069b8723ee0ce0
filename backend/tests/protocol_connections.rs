//! Protocol tests, layer 2: connection lifecycle and memory-table changes.
//!
//! - vublk keeps accepting on its socket after a frontend leaves (cleanly, mid-handshake, or with
//!   requests in flight), and what one connection wrote the next one reads;
//! - guest memory can change mid-session (SET_MEM_TABLE with more or fewer regions, ADD_MEM_REG /
//!   REM_MEM_REG) and I/O keeps landing in the right pages, including regions that share one
//!   memfd at different offsets;
//! - `--fd 3` with a connected socketpair serves that connection and exits 0 when it closes.

use std::path::Path;
use std::time::Duration;

use vublk_test_support::frontend::blk::{self, header, Readback, S_OK};
use vublk_test_support::frontend::fixture::{image_pattern, IMAGE_SEED};
use vublk_test_support::frontend::memory::Arena;
use vublk_test_support::frontend::{
    Fixture, MemAnnounce, RegionSpec, Seg, Session, SessionConfig, Step,
};
use vublk_test_support::pattern::{assert_same, create_image};
use vublk_test_support::Daemon;

const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Reads `len` bytes at `sector` into buffers taken from `arena` (any region), checks the data.
fn read_via(s: &mut Session, arena: &mut Arena, sector: u64, len: u32) -> Vec<u8> {
    let mem = s.mem().clone();
    let hdr = arena.alloc(16, 8).unwrap();
    let data = arena.alloc(u64::from(len), 512).unwrap();
    let status = arena.alloc(1, 1).unwrap();
    mem.write(hdr, &header(blk::T_IN, sector)).unwrap();
    mem.fill(data, len as usize, 0xee).unwrap();
    mem.write(status, &[blk::STATUS_UNTOUCHED]).unwrap();
    let segs = [
        Seg::readable(hdr, 16),
        Seg::writable(data, len),
        Seg::writable(status, 1),
    ];
    let c = s
        .blk(0)
        .submit_raw(
            &segs,
            &Readback {
                data: vec![(data, len)],
                status: Some(status),
            },
        )
        .unwrap();
    assert_eq!(
        c.status(),
        S_OK,
        "read at sector {sector} via buffers at {data:#x}"
    );
    c.data
}

/// Writes `data` at `sector` from a buffer taken from `arena`.
fn write_via(s: &mut Session, arena: &mut Arena, sector: u64, data: &[u8]) {
    let mem = s.mem().clone();
    let hdr = arena.alloc(16, 8).unwrap();
    let buf = arena.alloc(data.len() as u64, 512).unwrap();
    let status = arena.alloc(1, 1).unwrap();
    mem.write(hdr, &header(blk::T_OUT, sector)).unwrap();
    mem.write(buf, data).unwrap();
    mem.write(status, &[blk::STATUS_UNTOUCHED]).unwrap();
    let segs = [
        Seg::readable(hdr, 16),
        Seg::readable(buf, data.len() as u32),
        Seg::writable(status, 1),
    ];
    let c = s
        .blk(0)
        .submit_raw(
            &segs,
            &Readback {
                data: vec![],
                status: Some(status),
            },
        )
        .unwrap();
    assert_eq!(c.status(), S_OK, "write at sector {sector} from {buf:#x}");
}

#[test]
fn second_connection_after_the_first_disconnects() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let data = vec![0x3c; 4096];
    {
        let mut s = fx.session();
        assert_eq!(s.blk(0).write(5, &data).unwrap().status(), S_OK);
        s.close();
    }
    for round in 0..3 {
        let mut s = fx.session();
        let c = s.blk(0).read(5, 4096).unwrap();
        assert_eq!(c.status(), S_OK, "connection {}", round + 2);
        assert_same(
            &c.data,
            &data,
            &format!("connection {} sees the first one's write", round + 2),
        );
    }
    assert!(fx.daemon.try_wait().is_none(), "vublk exited");
}

#[test]
fn disconnect_mid_handshake_then_reconnect() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    // Gone after feature negotiation.
    drop(fx.session_with(SessionConfig::default(), &Step::negotiate()));
    // Gone after memory and one vring address, before any kick fd.
    let mut partial = Step::negotiate();
    partial.extend([
        Step::SetFeatures,
        Step::Memory(MemAnnounce::SetMemTable),
        Step::SetVringNum(0),
        Step::SetVringAddr(0),
    ]);
    drop(fx.session_with(SessionConfig::default(), &partial));
    // Connected and gone without a word.
    drop(fx.stream());
    let mut s = fx.session();
    let c = s.blk(0).read(1, 512).unwrap();
    assert_eq!(c.status(), S_OK);
    assert_same(&c.data, &image_pattern(512, 512), "read data");
}

#[test]
fn disconnect_with_requests_in_flight_then_reconnect() {
    let mut fx = Fixture::start(VUBLK, 64 * MIB, &[]);
    {
        let mut s = fx.session();
        // Post a burst of large reads and leave without waiting for them.
        for i in 0..32u64 {
            let mut b = s.blk(0);
            let hdr = b.alloc_bytes(&header(blk::T_IN, i * 256)).unwrap();
            let data = b.alloc(128 * 1024, 0).unwrap();
            let st = b.alloc_status().unwrap();
            s.submit(
                0,
                &[
                    Seg::readable(hdr, 16),
                    Seg::writable(data, 128 * 1024),
                    Seg::writable(st, 1),
                ],
            )
            .unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    let mut s = fx.session();
    let c = s.blk(0).read(300, 4096).unwrap();
    assert_eq!(c.status(), S_OK);
    assert_same(&c.data, &image_pattern(300 * 512, 4096), "read data");
}

#[test]
fn set_mem_table_adds_and_removes_regions_mid_session() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut s = fx.session();
    assert_same(
        &s.blk(0).read(0, 512).unwrap().data,
        &image_pattern(0, 512),
        "read data",
    );
    // Hot-plug 2 MiB at 4 GiB with a full SET_MEM_TABLE; use only the new region for buffers.
    let spec = RegionSpec::new(4 * GIB, 2 << 20);
    let mut hot = s.plug_region(spec, MemAnnounce::SetMemTable).unwrap();
    assert_same(
        &read_via(&mut s, &mut hot, 17, 2048),
        &image_pattern(17 * 512, 2048),
        "read into the hot-plugged region",
    );
    let data = vec![0x9d; 1024];
    write_via(&mut s, &mut hot, 19, &data);
    assert_same(&fx.image_bytes(19 * 512, 1024), &data, "image contents");
    // Unplug it again with another SET_MEM_TABLE; buffers there are now outside guest memory.
    s.unplug_region(4 * GIB, MemAnnounce::SetMemTable).unwrap();
    let st = s.blk(0).alloc_status().unwrap();
    let hdr = s.blk(0).alloc_bytes(&header(blk::T_IN, 17)).unwrap();
    let c = s
        .blk(0)
        .submit_raw(
            &[
                Seg::readable(hdr, 16),
                Seg::writable(4 * GIB, 512),
                Seg::writable(st, 1),
            ],
            &Readback {
                data: vec![],
                status: Some(st),
            },
        )
        .unwrap();
    assert_eq!(c.status(), blk::S_IOERR, "buffer in an unplugged region");
    // The original region (rings included) still works.
    assert_same(
        &s.blk(0).read(21, 512).unwrap().data,
        &image_pattern(21 * 512, 512),
        "read data",
    );
}

#[test]
fn add_and_remove_mem_reg_mid_session() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    let mut steps = Step::negotiate();
    steps.extend(Step::start(1, MemAnnounce::AddMemReg));
    let mut s = fx.session_with(SessionConfig::default(), &steps);
    let mut hot = s
        .plug_region(RegionSpec::new(8 * GIB, 1 << 20), MemAnnounce::AddMemReg)
        .unwrap();
    assert_same(
        &read_via(&mut s, &mut hot, 23, 4096),
        &image_pattern(23 * 512, 4096),
        "read into the hot-plugged region",
    );
    let mut hot2 = s
        .plug_region(RegionSpec::new(2 * GIB, 1 << 20), MemAnnounce::AddMemReg)
        .unwrap();
    assert_same(
        &read_via(&mut s, &mut hot2, 29, 512),
        &image_pattern(29 * 512, 512),
        "read into the hot-plugged region",
    );
    s.unplug_region(8 * GIB, MemAnnounce::AddMemReg).unwrap();
    // The other hot-plugged region and the boot region still work.
    assert_same(
        &read_via(&mut s, &mut hot2, 31, 512),
        &image_pattern(31 * 512, 512),
        "read into the hot-plugged region",
    );
    assert_same(
        &s.blk(0).read(33, 512).unwrap().data,
        &image_pattern(33 * 512, 512),
        "read data",
    );
}

#[test]
fn regions_sharing_one_memfd_at_different_offsets() {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &[]);
    // QEMU's x86 layout: one RAM block split into [0, 16 MiB) and [4 GiB, 4 GiB + 16 MiB),
    // the second at mmap_offset 16 MiB of the same fd.
    let config = SessionConfig {
        memory: vec![
            RegionSpec::new(0, 16 << 20),
            RegionSpec::new(4 * GIB, 16 << 20),
        ],
        shared_memfd: true,
        ..SessionConfig::default()
    };
    for (i, how) in [MemAnnounce::SetMemTable, MemAnnounce::AddMemReg]
        .into_iter()
        .enumerate()
    {
        let base = 1000 * (i as u64 + 1);
        let mut steps = Step::negotiate();
        steps.extend(Step::start(1, how));
        let mut s = fx.session_with(config.clone(), &steps);
        let mut high = Arena::over(RegionSpec::new(4 * GIB, 16 << 20));
        assert_same(
            &read_via(&mut s, &mut high, base, 8192),
            &image_pattern(base * 512, 8192),
            &format!("{how:?}: read into the second region"),
        );
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        write_via(&mut s, &mut high, base + 100, &data);
        assert_same(
            &fx.image_bytes((base + 100) * 512, 4096),
            &data,
            &format!("{how:?}: write from the second region"),
        );
        // And the low region, where the rings live, alongside.
        assert_same(
            &s.blk(0).read(base + 200, 512).unwrap().data,
            &image_pattern((base + 200) * 512, 512),
            &format!("{how:?}: read into the first region"),
        );
    }
}

#[test]
fn connected_fd_is_served_and_exit_is_zero_on_close() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    create_image(&image, 8 * MIB, IMAGE_SEED);
    let args = vec!["--blk-file".to_string(), image.display().to_string()];
    let (mut daemon, stream) = Daemon::with_connected_fd(Path::new(VUBLK), &args).unwrap();
    let mut s = Session::connect(stream, SessionConfig::default(), &Step::qemu(1))
        .unwrap_or_else(|e| panic!("handshake over --fd: {e}\nlog:\n{}", daemon.log()));
    let c = s.blk(0).read(3, 1024).unwrap();
    assert_eq!(c.status(), S_OK);
    assert_same(&c.data, &image_pattern(3 * 512, 1024), "read data");
    assert_eq!(s.blk(0).write(4, &[0x71; 512]).unwrap().status(), S_OK);
    assert_eq!(s.blk(0).flush().unwrap().status(), S_OK);
    assert!(daemon.try_wait().is_none(), "exited while connected");
    s.close();
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running 10 s after the frontend closed"));
    assert!(status.success(), "exit {status}\nlog:\n{}", daemon.log());
    let written = std::fs::read(&image).unwrap();
    assert_eq!(written[4 * 512..5 * 512], [0x71; 512]);
}

#[test]
fn connected_fd_closed_before_any_message_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    create_image(&image, MIB, IMAGE_SEED);
    let args = vec!["--blk-file".to_string(), image.display().to_string()];
    let (mut daemon, stream) = Daemon::with_connected_fd(Path::new(VUBLK), &args).unwrap();
    drop(stream);
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running 10 s after the frontend closed"));
    assert!(status.success(), "exit {status}\nlog:\n{}", daemon.log());
}
