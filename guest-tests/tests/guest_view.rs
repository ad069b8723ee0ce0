//! The guest's view of a disk matches what vublk exports: size, logical block size, number of
//! queues, serial, cache mode, read-only flag, segment limits, for two differently configured
//! disks in one VM.

use anyhow::ensure;
use guest_tests::{guest_test, sparse_image, start_vublk, Job, Vm, MIB};

const SCRIPT: &str = "for d in /sys/block/vd*; do
    echo \"$(cat $d/serial)|$(cat $d/size)|$(cat $d/queue/logical_block_size)|$(ls $d/mq | wc -l)|$(cat $d/ro)|$(cat $d/queue/write_cache)|$(cat $d/queue/max_segments)|$(cat $d/queue/max_segment_size)\"
done
";

#[test]
fn guest_sees_size_block_size_queues_and_serial() {
    guest_test("guest-view", |dir| {
        // A: 4 KiB blocks, two queues, write-through. B: the defaults, on an image whose size is
        // an odd number of sectors, with a serial of the full 20 bytes.
        let img_a = dir.join("a.img");
        sparse_image(&img_a, 80 * MIB)?;
        let img_b = dir.join("b.img");
        let size_b = 33 * MIB + 3 * 512;
        sparse_image(&img_b, size_b)?;
        let serial_b = "ABCDEFGHIJ0123456789";
        let mut a = start_vublk(
            dir,
            "a",
            &[
                "--blk-file",
                img_a.to_str().unwrap(),
                "--blk-size",
                "4096",
                "--num-queues",
                "2",
                "--serial",
                "vublk-view-a",
                "--write-cache",
                "off",
            ],
        )?;
        let mut b = start_vublk(
            dir,
            "b",
            &["--blk-file", img_b.to_str().unwrap(), "--serial", serial_b],
        )?;
        let boot = Vm::default()
            .cpus(2)
            .disk(a.socket(), 2)
            .disk(b.socket(), 1)
            .boot(dir, "view", Job::new().sh("view", SCRIPT))?;
        let out = boot.ok("view")?;
        let mut seen: Vec<&str> = out.lines().map(str::trim).collect();
        seen.sort();
        // seg_max is sized for QEMU's 128-entry rings (126 segments plus header and status);
        // size_max is 1 MiB.
        let want_a = format!(
            "vublk-view-a|{}|4096|2|0|write through|126|1048576",
            80 * MIB / 512
        );
        let want_b = format!("{serial_b}|{}|512|1|0|write back|126|1048576", size_b / 512);
        let mut want = vec![want_a.as_str(), want_b.as_str()];
        want.sort();
        ensure!(
            seen == want,
            "serial|sectors|block size|queues|ro|cache|max segments|max segment size\n\
             guest: {seen:#?}\nexport: {want:#?}"
        );
        boot.check_kernel(&[])?;
        a.try_stop()?;
        Ok(b.try_stop()?)
    });
}
