//! A guest on an RBD disk: fio random writes with crc32c verification through vublk's RBD
//! engine on a one-node Ceph cluster (scripts/ceph-dev.sh, started for this test and killed at
//! exit), on two queues; afterwards the image, read by librbd without vublk, holds what the
//! guest's verify pass read. Skipped, saying so, when Ceph is not installed.

use anyhow::ensure;
use guest_tests::fio::WriteVerify;
use guest_tests::{guest_test, start_vublk, Job, Vm, MIB};
use vublk_test_support::ceph;

const SIZE: u64 = 64 * MIB;
const REGION: u64 = 16 * MIB;

#[test]
fn a_guest_writes_and_verifies_an_rbd_disk() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ceph-guest-rbd");
    let Some(cluster) = ceph::cluster(&dir) else {
        eprintln!("skipping: {}", ceph::NOT_INSTALLED);
        return;
    };
    guest_test("rbd", |dir| {
        let image = cluster.create_image("guest", SIZE);
        let conf = cluster.conf();
        let mut vublk = start_vublk(
            dir,
            "vublk",
            &[
                "--blk-file",
                &image,
                "--ceph-conf",
                conf.to_str().unwrap(),
                "--num-queues",
                "2",
            ],
        )?;
        let vm = Vm::default().cpus(2).disk(vublk.socket(), 2);
        let job = WriteVerify {
            backlog: 256,
            ..WriteVerify::new("rbd-verify", REGION)
        };
        let boot = vm.boot(dir, "fio", Job::new().fio("verify", &job.file()))?;
        let report = boot.fio("verify")?;
        job.check_written(&report)?;
        boot.check_kernel(&[])?;
        vublk.stop();
        // Every 4 KiB block the guest wrote carries fio's verify header: none is left zero.
        let data = cluster.export("guest", dir);
        let zero_blocks = data[..REGION as usize]
            .chunks(4096)
            .filter(|b| b.iter().all(|&x| x == 0))
            .count();
        ensure!(
            zero_blocks == 0,
            "{zero_blocks} blocks of the region are still zero in the image"
        );
        Ok(())
    });
}
