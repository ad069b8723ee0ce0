//! Protocol tests, layer 2: a write-through device makes writes, discards and write-zeroes
//! durable before it completes them.
//!
//! Durability is seen from below: the image is a loop device, whose `stat` in sysfs counts the
//! flush requests it received (the 16th field); an `fdatasync` of a block device with a
//! write-back cache, or a write with `RWF_DSYNC`, sends one. The loop device is ours alone, so
//! a count that moves was moved by the request. Needs root (losetup); without a free loop
//! device a test says so and passes.
//!
//! A device is write-through when the write cache is off (`--write-cache off`, or the driver
//! chose it through the `writeback` config field), and for a driver that did not negotiate
//! VIRTIO_BLK_F_FLUSH, which has no other way to make data durable.

use std::path::{Path, PathBuf};
use std::process::Command;

use vublk_test_support::frontend::blk::{Range, S_OK};
use vublk_test_support::frontend::{BlkConfig, Session, SessionConfig, Step};
use vublk_test_support::Daemon;

const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");
const MIB: u64 = 1 << 20;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;

/// A loop device over a file in a temp dir, detached when dropped.
struct LoopDevice {
    device: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    fn new() -> Option<LoopDevice> {
        let dir = tempfile::Builder::new()
            .prefix("vublk-loop-")
            .tempdir()
            .expect("create temp dir");
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(16 * MIB))
            .expect("create the image");
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "no loop device ({}); skipped",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(LoopDevice { device, _dir: dir })
    }

    /// Flush requests the device has completed.
    fn flushes(&self) -> u64 {
        let name = self.device.file_name().unwrap().to_string_lossy();
        let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
        let fields: Vec<u64> = stat
            .split_whitespace()
            .map(|f| f.parse().unwrap())
            .collect();
        assert!(fields.len() >= 17, "no flush counts in {stat:?}");
        fields[15]
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// vublk serving `device` with `args`, and a session with QEMU's handshake acking `features`.
fn serve(device: &Path, args: &[&str], features: u64) -> (Daemon, Session, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost.sock");
    let mut all = vec![
        "--single-process".to_string(),
        "--blk-file".to_string(),
        device.display().to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let mut daemon = Daemon::listen(Path::new(VUBLK), &socket, &all).unwrap();
    let stream = daemon.connect(std::time::Duration::from_secs(10)).unwrap();
    let config = SessionConfig {
        features: SessionConfig::default().features & features,
        ..SessionConfig::default()
    };
    let s = Session::connect(stream, config, &Step::qemu(1)).unwrap();
    (daemon, s, dir)
}

#[test]
fn write_cache_off_makes_discard_and_write_zeroes_durable() {
    let Some(dev) = LoopDevice::new() else { return };
    let (daemon, mut s, _dir) = serve(&dev.device, &["--write-cache", "off"], u64::MAX);
    let discard = s.acked_features() & VIRTIO_BLK_F_DISCARD != 0;
    assert_eq!(BlkConfig::parse(s.last_config().unwrap()).writeback, 0);

    let before = dev.flushes();
    let c = s.blk(0).write_zeroes(&[Range::new(8, 8)]).unwrap();
    assert_eq!(c.status(), S_OK, "{}", daemon.log());
    let after = dev.flushes();
    assert!(after > before, "WRITE_ZEROES was not made durable");
    if discard {
        let c = s.blk(0).discard(&[Range::new(64, 8)]).unwrap();
        assert_eq!(c.status(), S_OK, "{}", daemon.log());
        assert!(dev.flushes() > after, "DISCARD was not made durable");
    } else {
        eprintln!("the loop device has no discard; only write-zeroes checked");
    }
    let before = dev.flushes();
    assert_eq!(s.blk(0).write(128, &[7; 4096]).unwrap().status(), S_OK);
    assert!(dev.flushes() > before, "a write was not made durable");
}

#[test]
fn a_driver_without_flush_gets_write_through() {
    let Some(dev) = LoopDevice::new() else { return };
    let (daemon, mut s, _dir) = serve(&dev.device, &[], !VIRTIO_BLK_F_FLUSH);
    assert_eq!(s.acked_features() & VIRTIO_BLK_F_FLUSH, 0);
    let before = dev.flushes();
    assert_eq!(s.blk(0).write(128, &[7; 4096]).unwrap().status(), S_OK);
    let after = dev.flushes();
    assert!(
        after > before,
        "a write from a driver that cannot flush was left in the cache\n{}",
        daemon.log()
    );
    let c = s.blk(0).write_zeroes(&[Range::new(8, 8)]).unwrap();
    assert_eq!(c.status(), S_OK);
    assert!(dev.flushes() > after, "WRITE_ZEROES was not made durable");
}

#[test]
fn write_back_leaves_durability_to_flushes() {
    let Some(dev) = LoopDevice::new() else { return };
    let (daemon, mut s, _dir) = serve(&dev.device, &[], u64::MAX);
    assert_ne!(s.acked_features() & VIRTIO_BLK_F_FLUSH, 0);
    let before = dev.flushes();
    assert_eq!(s.blk(0).write(128, &[7; 4096]).unwrap().status(), S_OK);
    let c = s.blk(0).write_zeroes(&[Range::new(8, 8)]).unwrap();
    assert_eq!(c.status(), S_OK, "{}", daemon.log());
    assert_eq!(dev.flushes(), before, "write-back: nothing flushed yet");
    assert_eq!(s.blk(0).flush().unwrap().status(), S_OK);
    assert!(dev.flushes() > before, "FLUSH reaches the device");
}
