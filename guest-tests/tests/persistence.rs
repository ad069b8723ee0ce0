//! Data written by a guest survives a reboot: fio random writes with crc32c verification, then a
//! second boot on the same image verifies everything without writing. A third boot after the
//! host corrupts one block must fail verification, which shows the verify pass reads the disk.

use anyhow::ensure;
use guest_tests::fio::WriteVerify;
use guest_tests::{guest_test, sparse_image, start_vublk, write_at, Job, Vm, MIB};

const REGION: u64 = 32 * MIB;

/// The write job.
fn write_verify() -> WriteVerify {
    WriteVerify {
        seed: Some(20251121),
        ..WriteVerify::new("randwrite-verify", REGION)
    }
}

/// The write job, or (`verify_only`) the pass that replays its offsets and only reads.
fn job(verify_only: bool) -> String {
    let job = write_verify();
    if verify_only { job.verify_pass() } else { job }.file()
}

#[test]
fn random_writes_survive_a_reboot_and_corruption_is_caught() {
    guest_test("persistence", |dir| {
        let img = dir.join("disk.img");
        sparse_image(&img, 64 * MIB)?;
        let img_arg = img.to_str().unwrap();
        let mut vublk = start_vublk(dir, "vublk", &["--blk-file", img_arg])?;
        let vm = Vm::default().disk(vublk.socket(), 1);

        // Boot 1: write (and verify along the way, verify_backlog, and at the end).
        let boot = vm.boot(dir, "write", Job::new().fio("write", &job(false)))?;
        let w = boot.fio("write")?;
        write_verify().check_written(&w)?;
        boot.check_kernel(&[])?;

        // Boot 2: a new guest on the same vublk (it accepts the next frontend) reads it all back.
        // (fio counts the writes it replays in verify_only mode as written: compare the image.)
        let written = std::fs::read(&img)?;
        let boot = vm.boot(dir, "verify", Job::new().fio("verify", &job(true)))?;
        let v = boot.fio("verify")?;
        ensure!(
            std::fs::read(&img)? == written,
            "the verify pass changed the image"
        );
        ensure!(
            v.total(|j| j.read.io_bytes) == REGION,
            "the verify pass read {} bytes, not {REGION}",
            v.total(|j| j.read.io_bytes)
        );
        boot.check_kernel(&[])?;

        // Boot 3: one 4 KiB block overwritten behind the guest's back must be reported.
        write_at(&img, 4 * MIB, &[0x5a; 4096])?;
        let boot = vm.boot(dir, "corrupt", Job::new().fio("verify", &job(true)))?;
        let step = boot.step("verify")?;
        ensure!(
            guest_tests::fio::passed(step).is_err(),
            "fio's verify pass did not notice a corrupted block:\n{}\n{}",
            step.stdout,
            boot.report()
        );
        ensure!(
            step.stderr.contains("verify") || step.stderr.contains("bad"),
            "fio failed, but not with a verify error:\n{}",
            step.stderr
        );
        Ok(vublk.try_stop()?)
    });
}
