//! Protocol tests, layer 2: memory tables the backend must refuse, and what a refusal leaves.
//!
//! A refused SET_MEM_TABLE or ADD_MEM_REG (NACKed: the session acks REPLY_ACK and asks for a
//! reply) must leave the table that was there serving, every region of it; and a region whose
//! file is shorter than the range the frontend declares must be refused when it arrives, not
//! found out later by a SIGBUS in the serving process (`--single-process` here, so that would
//! be the daemon itself). A file the frontend truncates *after* its region was accepted must
//! not kill it either: the pages it lost read as zeroes.

use std::os::fd::AsRawFd;

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vublk_test_support::frontend::blk::{self, header, Readback, S_OK};
use vublk_test_support::frontend::fixture::image_pattern;
use vublk_test_support::frontend::{Fixture, RegionSpec, Seg, Session, SessionConfig, Step};
use vublk_test_support::pattern::assert_same;

const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The boot region (rings, headers, status bytes) and a second region the tests read into.
const LOW: RegionSpec = RegionSpec::new(0, 16 << 20);
const HIGH: RegionSpec = RegionSpec::new(4 * GIB, 2 << 20);

fn start() -> (Fixture, Session) {
    let mut fx = Fixture::start(VUBLK, 8 * MIB, &["--single-process"]);
    let config = SessionConfig {
        memory: vec![LOW, HIGH],
        ..SessionConfig::default()
    };
    let s = fx.session_with(config, &Step::qemu(1));
    (fx, s)
}

/// Reads 4 KiB at `sector` into the start of the region at `data` (header and status in the
/// boot region) and checks it arrived.
fn read_into(fx: &Fixture, s: &mut Session, data: u64, sector: u64) {
    let mut b = s.blk(0);
    let hdr = b.alloc_bytes(&header(blk::T_IN, sector)).unwrap();
    let status = b.alloc_status().unwrap();
    let rb = Readback {
        data: vec![(data, 4096)],
        status: Some(status),
    };
    let c = b
        .submit_raw(
            &[
                Seg::readable(hdr, 16),
                Seg::writable(data, 4096),
                Seg::writable(status, 1),
            ],
            &rb,
        )
        .unwrap_or_else(|e| panic!("read into {data:#x}: {e}\nlog:\n{}", fx.daemon.log()));
    assert_eq!(
        c.status(),
        S_OK,
        "read into {data:#x}\nlog:\n{}",
        fx.daemon.log()
    );
    assert_same(&c.data, &image_pattern(sector * 512, 4096), "data read");
}

/// Sends `table` as SET_MEM_TABLE with NEED_REPLY; whether the backend accepted it.
fn set_mem_table(s: &mut Session, table: &[VhostUserMemoryRegionInfo]) -> bool {
    let f = s.frontend();
    f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let result = f.set_mem_table(table);
    f.set_hdr_flags(VhostUserHeaderFlag::empty());
    result.is_ok()
}

/// Sends `region` as ADD_MEM_REG with NEED_REPLY; whether the backend accepted it.
fn add_mem_region(s: &mut Session, region: &VhostUserMemoryRegionInfo) -> bool {
    let f = s.frontend();
    f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let result = f.add_mem_region(region);
    f.set_hdr_flags(VhostUserHeaderFlag::empty());
    result.is_ok()
}

/// A memfd of `len` bytes.
fn memfd(len: u64) -> std::fs::File {
    let fd = rustix::fs::memfd_create("short-region", rustix::fs::MemfdFlags::CLOEXEC)
        .expect("memfd_create");
    let file = std::fs::File::from(fd);
    file.set_len(len).expect("size the memfd");
    file
}

#[test]
fn a_refused_table_leaves_the_old_one_serving() {
    let (fx, mut s) = start();
    read_into(&fx, &mut s, HIGH.guest_addr, 8);
    // The boot region twice (overlapping) and not HIGH: refused as a whole. Before the fix,
    // HIGH was retired before the layout was checked, and every request touching it failed
    // until the frontend disconnected.
    let low = s.mem().region_info(LOW.guest_addr).unwrap();
    assert!(
        !set_mem_table(&mut s, &[low, low]),
        "an overlapping table must be refused"
    );
    read_into(&fx, &mut s, HIGH.guest_addr, 16);
    read_into(&fx, &mut s, LOW.guest_addr + 8 * MIB, 24);
    assert!(
        fx.daemon.log_shows("SET_MEM_TABLE refused"),
        "the refusal is explained\nlog:\n{}",
        fx.daemon.log()
    );
}

#[test]
fn a_refused_region_leaves_the_table_serving() {
    let (fx, mut s) = start();
    // A region overlapping HIGH.
    let mut overlapping = s.mem().region_info(HIGH.guest_addr).unwrap();
    overlapping.guest_phys_addr += MIB;
    assert!(!add_mem_region(&mut s, &overlapping));
    read_into(&fx, &mut s, HIGH.guest_addr, 8);
}

#[test]
fn a_region_longer_than_its_file_is_refused() {
    let (fx, mut s) = start();
    // 2 MiB declared over a 1 MiB memfd: touching the second half would raise SIGBUS.
    let short = memfd(MIB);
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 8 * GIB,
        memory_size: 2 * MIB,
        userspace_addr: 0x7f00_0000_0000,
        mmap_offset: 0,
        mmap_handle: short.as_raw_fd(),
    };
    let mut table = s.mem().region_infos().unwrap();
    table.push(region);
    assert!(
        !set_mem_table(&mut s, &table),
        "a region past the end of its file must be refused\nlog:\n{}",
        fx.daemon.log()
    );
    assert!(!add_mem_region(&mut s, &region));
    // The offset counts too: 1 MiB at offset 512 KiB of the 1 MiB file.
    let offset = VhostUserMemoryRegionInfo {
        memory_size: MIB,
        mmap_offset: MIB / 2,
        ..region
    };
    assert!(!add_mem_region(&mut s, &offset));
    // What was there still serves, and the daemon is alive.
    read_into(&fx, &mut s, HIGH.guest_addr, 8);
    read_into(&fx, &mut s, LOW.guest_addr + 8 * MIB, 16);
    // A region its file covers is taken.
    let fits = VhostUserMemoryRegionInfo {
        memory_size: MIB / 2,
        mmap_offset: MIB / 2,
        ..region
    };
    assert!(add_mem_region(&mut s, &fits), "{}", fx.daemon.log());
}

#[test]
fn a_region_truncated_after_it_was_accepted_does_not_kill_the_daemon() {
    let (mut fx, mut s) = start();
    let file = memfd(2 * MIB);
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 8 * GIB,
        memory_size: 2 * MIB,
        userspace_addr: 0x7f00_0000_0000,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    };
    assert!(add_mem_region(&mut s, &region), "{}", fx.daemon.log());
    file.set_len(0).expect("truncate the region's memfd");
    // GET_ID copies the serial into the buffer on the queue thread itself, so the backend
    // touches the lost page in user space (a read's data would be written by the kernel,
    // which reports EFAULT instead).
    let mut b = s.blk(0);
    let hdr = b.alloc_bytes(&header(blk::T_GET_ID, 0)).unwrap();
    let status = b.alloc_status().unwrap();
    let data = 8 * GIB + MIB;
    let head = s
        .submit(
            0,
            &[
                Seg::readable(hdr, 16),
                Seg::writable(data, 20),
                Seg::writable(status, 1),
            ],
        )
        .unwrap();
    let done = s.wait_head(0, head, std::time::Duration::from_secs(5));
    assert!(
        done.is_ok(),
        "GET_ID into a truncated region never completed: {done:?}\nlog:\n{}",
        fx.daemon.log()
    );
    if let Err(e) = fx.daemon.running() {
        panic!("{e}");
    }
    // Everything else still serves.
    read_into(&fx, &mut s, HIGH.guest_addr, 8);
}
