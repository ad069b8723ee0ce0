//! Flush, discard and write-zeroes as a guest issues them.

use anyhow::ensure;
use guest_tests::{guest_test, read_at, sparse_image, start_vublk, write_at, Job, Vm, MIB};
use vublk_test_support::pattern::pattern;

const FSYNC_JOB: &str = "[global]
filename=/dev/vda
ioengine=psync
direct=1
bs=4k
size=4m
rw=randwrite
fsync=1
verify=crc32c
[fsync-randwrite]
";

/// fsync after every write: with a write-back cache the guest sends a FLUSH for each, and every
/// one must succeed.
#[test]
fn fsync_writes_flush() {
    guest_test("flush", |dir| {
        let img = dir.join("disk.img");
        sparse_image(&img, 32 * MIB)?;
        let mut vublk = start_vublk(dir, "vublk", &["--blk-file", img.to_str().unwrap()])?;
        let boot = Vm::default().disk(vublk.socket(), 1).boot(
            dir,
            "flush",
            Job::new()
                .sh("cache", "cat /sys/block/vda/queue/write_cache")
                .fio("fio", FSYNC_JOB),
        )?;
        // With write-through the block layer drops the flushes before they reach the device.
        ensure!(
            boot.ok("cache")? == "write back",
            "the guest sees a '{}' cache, so it sends no flushes",
            boot.ok("cache")?
        );
        let r = boot.fio("fio")?;
        let writes = r.total(|j| j.write.total_ios);
        ensure!(writes == 1024, "fio wrote {writes} blocks, not 1024");
        // fio does not count the fsync after its last write.
        ensure!(
            r.total(|j| j.syncs) >= writes - 1,
            "fio issued {} fsyncs for {writes} writes",
            r.total(|j| j.syncs)
        );
        boot.check_kernel(&[])?;
        Ok(vublk.try_stop()?)
    });
}

/// The guest-side check: limits advertised, then discard 4-8 MiB and write-zeroes 8-12 MiB of a
/// disk the host filled with a pattern, and read both back as zeroes (bypassing the page cache).
const DISCARD: &str = "set -e
echo discard_max_bytes $(cat /sys/block/vda/queue/discard_max_bytes)
echo write_zeroes_max_bytes $(cat /sys/block/vda/queue/write_zeroes_max_bytes)
/usr/bin/blkdiscard -f -o $((4 << 20)) -l $((4 << 20)) /dev/vda
/usr/bin/blkdiscard -f -z -o $((8 << 20)) -l $((4 << 20)) /dev/vda
dd if=/dev/vda of=/tmp/back bs=1M skip=4 count=8 iflag=direct 2>/dev/null
cmp -n $((8 << 20)) /tmp/back /dev/zero
echo zeroes
";

#[test]
fn discard_and_write_zeroes_read_back_as_zeroes() {
    guest_test("discard", |dir| {
        let img = dir.join("disk.img");
        sparse_image(&img, 32 * MIB)?;
        let data = pattern(7, 0, 16 * MIB as usize);
        write_at(&img, 0, &data)?;
        let mut vublk = start_vublk(dir, "vublk", &["--blk-file", img.to_str().unwrap()])?;
        let boot = Vm::default().disk(vublk.socket(), 1).boot(
            dir,
            "discard",
            Job::new().sh("discard", DISCARD),
        )?;
        let out = boot.ok("discard")?;
        // Without these limits the guest would not send the requests: blkdiscard would fail, and
        // `-z` would quietly write zero pages instead.
        for limit in ["discard_max_bytes", "write_zeroes_max_bytes"] {
            let v: u64 = out
                .lines()
                .find_map(|l| l.strip_prefix(limit)?.trim().parse().ok())
                .unwrap_or(0);
            ensure!(v > 0, "the guest sees {limit} = {v}:\n{out}");
        }
        ensure!(
            out.ends_with("zeroes"),
            "the guest did not read zeroes back:\n{out}"
        );

        // The host's view: the two ranges are zero, the rest of the pattern is untouched.
        let now = read_at(&img, 0, 16 * MIB as usize)?;
        let (a, b) = ((4 * MIB) as usize, (12 * MIB) as usize);
        ensure!(
            now[a..b].iter().all(|&x| x == 0),
            "the image is not zero at 4-12 MiB"
        );
        ensure!(now[..a] == data[..a], "discard changed data before 4 MiB");
        ensure!(
            now[b..] == data[b..],
            "write-zeroes changed data after 12 MiB"
        );
        boot.check_kernel(&[])?;
        Ok(vublk.try_stop()?)
    });
}
