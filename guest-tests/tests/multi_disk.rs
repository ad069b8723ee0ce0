//! More than one disk: two disks in one VM, and two VMs side by side, all served by one vublk
//! with two exports. Every guest writes and verifies its disks at the same time and stamps each
//! disk with its name; the host finds each stamp in the right image, so no request crossed over.
//! While the guests run, `vublk status` is polled: the two disks of one VM are served by one
//! per-VM worker, and two VMs get a worker each.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Result};
use guest_tests::{guest_test, read_at, sparse_image, start_vublk, Boot, Daemon, Job, Vm, MIB};
use serde_json::Value;

/// Where the stamps go: after the region fio uses.
const STAMP_AT: u64 = 48 * MIB;

/// `/tmp/<serial>` → the guest's device with that serial, for each serial given, and a stamp.
fn link_by_serial(serials: &[&str]) -> String {
    let mut s = String::from("set -e\n");
    for serial in serials {
        s.push_str(&format!(
            "for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = {serial} ] && ln -s /dev/${{d##*/}} /tmp/{serial}; done
ls -l /tmp/{serial}
echo {serial} | dd of=/tmp/{serial} bs=512 seek={} conv=notrunc,fsync 2>/dev/null
",
            STAMP_AT / 512
        ));
    }
    s
}

fn fio_job(serials: &[&str]) -> String {
    let mut s = String::from(
        "[global]
ioengine=libaio
direct=1
bs=4k
iodepth=8
size=16m
rw=randwrite
verify=crc32c
verify_backlog=256
",
    );
    for serial in serials {
        s.push_str(&format!("[{serial}]\nfilename=/tmp/{serial}\n"));
    }
    s
}

fn job(serials: &[&str]) -> Job {
    let mut job = Job::new();
    job.sh("link", &link_by_serial(serials))
        .fio("fio", &fio_job(serials));
    job
}

/// One vublk with two exports (serials `a` and `b`) and a control socket:
/// (vublk, [(serial, socket, image); 2], control socket).
type Exports<'a> = [(&'a str, PathBuf, PathBuf); 2];

fn two_exports<'a>(dir: &Path, a: &'a str, b: &'a str) -> Result<(Daemon, Exports<'a>, PathBuf)> {
    let (img_a, img_b) = (dir.join(format!("{a}.img")), dir.join(format!("{b}.img")));
    sparse_image(&img_a, 64 * MIB)?;
    sparse_image(&img_b, 64 * MIB)?;
    let (sock_b, control) = (dir.join(format!("{b}.sock")), dir.join("control.sock"));
    let export_b = format!(
        "socket-path={},blk-file={},serial={b}",
        sock_b.display(),
        img_b.display()
    );
    let v = start_vublk(
        dir,
        "vublk",
        &[
            "--blk-file",
            img_a.to_str().unwrap(),
            "--serial",
            a,
            "--export",
            &export_b,
            "--control-socket",
            control.to_str().unwrap(),
        ],
    )?;
    let sock_a = v.socket().to_path_buf();
    Ok((v, [(a, sock_a, img_a), (b, sock_b, img_b)], control))
}

/// Runs `guests` while polling `vublk status`; returns their boots and every status snapshot
/// that showed a VM.
fn with_status<T: Send>(
    vublk: &Daemon,
    control: &Path,
    guests: impl FnOnce() -> T + Send,
) -> Result<(T, Vec<Value>)> {
    let mut snapshots = Vec::new();
    let result = std::thread::scope(|s| -> Result<T> {
        let t = s.spawn(guests);
        while !t.is_finished() {
            let st = vublk.status(control)?;
            if st["vms"].as_array().is_some_and(|v| !v.is_empty()) {
                snapshots.push(st);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(t.join().expect("guest thread"))
    })?;
    Ok((result, snapshots))
}

/// Per VM in a snapshot: (vmm pid, worker pid, the exports of its devices, sorted).
fn vms(snapshot: &Value) -> Vec<(u64, u64, Vec<String>)> {
    snapshot["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|vm| {
            let mut exports: Vec<String> = vm["devices"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d["export"].as_str().map(str::to_string))
                .collect();
            exports.sort();
            (
                vm["vmm_pid"].as_u64().unwrap_or(0),
                vm["worker_pid"].as_u64().unwrap_or(0),
                exports,
            )
        })
        .collect()
}

fn check(boot: &Boot, disks: &[&(&str, PathBuf, PathBuf)]) -> Result<()> {
    let report = boot.fio("fio")?;
    ensure!(
        report.jobs.len() == disks.len(),
        "fio ran {} jobs",
        report.jobs.len()
    );
    for j in &report.jobs {
        ensure!(
            j.write.io_bytes == 16 * MIB,
            "job {} wrote {:?}",
            j.name,
            j.write
        );
    }
    boot.ok("link")?;
    boot.check_kernel(&[])?;
    for (serial, _, img) in disks {
        let stamp = read_at(img, STAMP_AT, serial.len() + 1)?;
        ensure!(
            stamp == format!("{serial}\n").as_bytes(),
            "{} does not hold the stamp {serial}: {:?}",
            img.display(),
            String::from_utf8_lossy(&stamp)
        );
    }
    Ok(())
}

fn sock(e: &(&str, PathBuf, PathBuf)) -> String {
    e.1.display().to_string()
}

#[test]
fn two_disks_in_one_vm_share_a_worker() {
    guest_test("two-disks", |dir| {
        let (mut vublk, exports, control) = two_exports(dir, "disk-a", "disk-b")?;
        let vm = Vm::default().disk(&exports[0].1, 1).disk(&exports[1].1, 1);
        let (boot, snapshots) = with_status(&vublk, &control, || {
            vm.boot(dir, "vm", &job(&["disk-a", "disk-b"]))
        })?;
        let boot = boot?;
        check(&boot, &[&exports[0], &exports[1]])?;

        let mut both = vec![sock(&exports[0]), sock(&exports[1])];
        both.sort();
        ensure!(
            snapshots.iter().all(|s| vms(s).len() == 1),
            "one VM showed up as several: {snapshots:#?}"
        );
        ensure!(
            snapshots.iter().any(|s| vms(s)[0].2 == both),
            "no status showed one worker serving both disks: {snapshots:#?}"
        );
        Ok(vublk.try_stop()?)
    });
}

#[test]
fn two_vms_side_by_side_get_a_worker_each() {
    guest_test("two-vms", |dir| {
        let (mut vublk, exports, control) = two_exports(dir, "vm1-disk", "vm2-disk")?;
        let run = |i: usize| {
            let e = &exports[i];
            Vm::default()
                .disk(&e.1, 1)
                .boot(dir, &format!("vm{}", i + 1), &job(&[e.0]))
        };
        // Both guests run at the same time.
        let ((b1, b2), snapshots) = with_status(&vublk, &control, || {
            std::thread::scope(|s| {
                let t1 = s.spawn(|| run(0));
                let t2 = s.spawn(|| run(1));
                (
                    t1.join().expect("vm1 thread"),
                    t2.join().expect("vm2 thread"),
                )
            })
        })?;
        check(&b1?, &[&exports[0]])?;
        check(&b2?, &[&exports[1]])?;

        // A snapshot with both VMs connected: two VMMs, two workers, one export each.
        let together = snapshots
            .iter()
            .map(vms)
            .find(|v| v.len() == 2 && v.iter().all(|vm| vm.2.len() == 1));
        let Some(v) = together else {
            anyhow::bail!("no status showed both VMs with their disk: {snapshots:#?}");
        };
        ensure!(v[0].0 != v[1].0, "the two VMs have one VMM pid: {v:?}");
        ensure!(
            v[0].1 != v[1].1,
            "the two VMs share worker {}: {v:?}",
            v[0].1
        );
        ensure!(
            v[0].2 != v[1].2,
            "the two VMs were given the same export: {v:?}"
        );
        Ok(vublk.try_stop()?)
    });
}
