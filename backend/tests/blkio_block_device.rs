//! A block device as the backing: a loop device over an image file (CI runs as root, where
//! loop devices are available). Size from BLKGETSIZE64, I/O, flush, write-zeroes and discard
//! through fallocate on the device, and the data on the file underneath.

mod common;

use std::process::Command;

use common::*;

/// A loop device attached to `file`, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &std::path::Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn loop_device_backing_serves_data_and_zeroing() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 8 * MIB;
    let mut model = create_image(&img, size, 31);
    let dev = Loop::attach(&img);
    let mut daemon = Daemon::start(vublk_bin(), dir.path(), &["--blk-file", &dev.0]);
    let mut client = Client::connect(daemon.socket(), 1);
    assert_eq!(client.prop_u64("capacity"), size, "capacity of {}", dev.0);

    let data = pattern(3100, MIB, 256 * KIB as usize);
    let q = client.q(0);
    assert_eq!(q.write_at(MIB, &data), 0, "write");
    model[MIB as usize..MIB as usize + data.len()].copy_from_slice(&data);
    assert_eq!(q.flush(), 0, "flush");
    assert_eq!(q.write_zeroes(4 * MIB, 64 * KIB, true), 0, "write-zeroes");
    model[4 * MIB as usize..(4 * MIB + 64 * KIB) as usize].fill(0);
    // In 1 MiB requests: the device's size_max (max-segment-len) is 1 MiB.
    assert_eq!(q.read_range(0, size), model, "device contents");
    drop(client);
    daemon.stop();
    drop(dev);
    assert_same(
        &std::fs::read(&img).unwrap(),
        &model,
        "image under the loop device",
    );
}
