//! Multiqueue: a disk with two virtqueues in a two-vCPU guest, fio with two jobs (one per vCPU,
//! each on its own region) doing mixed random reads and writes with verification. The interrupt
//! counts of the two request queues show vublk completed requests on both.

use anyhow::ensure;
use guest_tests::{guest_test, sparse_image, start_vublk, Job, Vm, MIB};

const JOB: &str = "[global]
filename=/dev/vda
ioengine=libaio
direct=1
bs=4k
iodepth=16
numjobs=2
size=16m
offset_increment=16m
rw=randrw
rwmixread=50
verify=crc32c
verify_backlog=256
cpus_allowed=0-1
cpus_allowed_policy=split
[mq-randrw]
";

/// The interrupts of vda's request queues (MSI-X vectors `virtioN-req.Q`), summed over CPUs:
/// "<name> <count>" per queue.
const INTERRUPTS: &str = "grep -- '-req\\.' /proc/interrupts | while read irq counts; do
    n=0
    for c in $counts; do
        case $c in *[!0-9]*) name=$c ;; *) n=$((n + c)) ;; esac
    done
    echo \"$name $n\"
done
";

#[test]
fn two_queues_two_jobs_randrw_verify() {
    guest_test("multiqueue", |dir| {
        let img = dir.join("disk.img");
        sparse_image(&img, 64 * MIB)?;
        let mut vublk = start_vublk(
            dir,
            "vublk",
            &["--blk-file", img.to_str().unwrap(), "--num-queues", "2"],
        )?;
        let vm = Vm::default().cpus(2).disk(vublk.socket(), 2);
        let boot = vm.boot(
            dir,
            "mq",
            Job::new()
                .sh("mq", "ls /sys/block/vda/mq")
                .fio("fio", JOB)
                .sh("interrupts", INTERRUPTS),
        )?;
        let mq: Vec<&str> = boot.ok("mq")?.split_whitespace().collect();
        ensure!(mq == ["0", "1"], "the guest sees queues {mq:?}, not [0, 1]");

        let report = boot.fio("fio")?;
        ensure!(
            report.jobs.len() == 2,
            "fio ran {} jobs, not 2",
            report.jobs.len()
        );
        for j in &report.jobs {
            ensure!(
                j.write.io_bytes > 0 && j.read.io_bytes > 0,
                "job {} did not both read and write: {:?} {:?}",
                j.name,
                j.read,
                j.write
            );
        }

        // Each job does 4096 requests on its own vCPU, so its own queue.
        let irqs = boot.ok("interrupts")?;
        let counts: Vec<u64> = irqs
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .collect();
        ensure!(
            counts.len() == 2 && counts.iter().all(|&n| n > 100),
            "both queues should have completed the I/O of one job each:\n{irqs}"
        );
        boot.check_kernel(&[])?;
        Ok(vublk.try_stop()?)
    });
}
