//! A read-only export: the guest sees a read-only disk, reads it, and its writes are refused by
//! the guest's own block layer (EPERM), so they never reach vublk. The image stays as it was.

use anyhow::ensure;
use guest_tests::{guest_test, sparse_image, start_vublk, write_at, Job, Vm, MIB};
use vublk_test_support::pattern::pattern;

const SIGNATURE: &[u8] = b"vublk read-only export";

const SCRIPT: &str = "echo ro $(cat /sys/block/vda/ro)
echo signature $(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 22)
dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct 2>/tmp/dd.err
echo dd rc $?
cat /tmp/dd.err
/usr/bin/blkdiscard -f -o 0 -l 1048576 /dev/vda 2>/tmp/discard.err
echo discard rc $?
cat /tmp/discard.err
";

#[test]
fn guest_sees_read_only_disk_and_cannot_write() {
    guest_test("read-only", |dir| {
        let img = dir.join("disk.img");
        sparse_image(&img, 16 * MIB)?;
        write_at(&img, 0, SIGNATURE)?;
        write_at(&img, MIB, &pattern(3, 0, MIB as usize))?;
        let before = std::fs::read(&img)?;
        let mut vublk = start_vublk(
            dir,
            "vublk",
            &["--blk-file", img.to_str().unwrap(), "--read-only"],
        )?;
        let boot =
            Vm::default()
                .disk(vublk.socket(), 1)
                .boot(dir, "ro", Job::new().sh("ro", SCRIPT))?;
        let out = boot.ok("ro")?;
        let line = |key: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(key).map(str::trim))
                .unwrap_or("")
                .to_string()
        };
        ensure!(
            line("ro") == "1",
            "the guest's /sys/block/vda/ro is not 1:\n{out}"
        );
        ensure!(
            line("signature ").as_bytes() == SIGNATURE,
            "the guest read the wrong data:\n{out}"
        );
        ensure!(
            line("dd rc") != "0",
            "a write to the read-only disk succeeded:\n{out}"
        );
        ensure!(
            out.contains("Operation not permitted") || out.contains("Read-only"),
            "the write did not fail in the guest's block layer (EPERM):\n{out}"
        );
        ensure!(
            line("discard rc") != "0",
            "a discard of the read-only disk succeeded:\n{out}"
        );
        // An I/O error would mean the write reached vublk and was failed there.
        boot.check_kernel(&[])?;
        ensure!(
            std::fs::read(&img)? == before,
            "the read-only image changed"
        );
        Ok(vublk.try_stop()?)
    });
}
