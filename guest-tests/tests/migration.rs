//! Live migration: a guest writing with fio moves from one QEMU to another on the same host, both
//! attached to the same vublk export, and its data verifies on the destination.
//!
//! The source boots the job; the destination starts with `-incoming` and connects to vublk at
//! once (the supervisor gives it a worker of its own, next to the source's). Once the guest's fio
//! job is writing, the source is told to migrate (QMP `migrate`), which needs vublk's dirty log:
//! without it QEMU refuses ("vhost-user backend lacks VHOST_USER_PROTOCOL_F_LOG_SHMFD"). The fio
//! job must end on the destination, and a second pass there reads back everything it wrote.
//!
//! It runs on a file: on the installed QEMU (10.0) and on Debian 12's QEMU 7.2 (source and
//! destination both 7.2), unpacked beside it by scripts/prereqs.sh; and on an RBD image (QEMU
//! 10.0) of a one-node Ceph cluster (scripts/ceph-dev.sh, started for that test and killed at
//! exit; skipped, saying so, without Ceph). Each QEMU is served by a worker of its own, which
//! opens the disk itself (on RBD, librbd moves the image's exclusive lock to the destination's
//! worker at its first write).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use guest_tests::fio::WriteVerify;
use guest_tests::qemu::{Launch, Qemu, Running};
use guest_tests::qmp::Qmp;
use guest_tests::{guest_test, sparse_image, start_vublk, Boot, Job, Vm, MIB};
use serde_json::{json, Value};
use vublk_test_support::ceph;

const REGION: u64 = 128 * MIB;
/// How long the guest writes on the source before the migration starts.
const BEFORE_MIGRATING: Duration = Duration::from_secs(2);
/// How long the boot up to the fio job, and the migration itself, may take under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(150);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// The write job (random 4 KiB writes with crc32c, verified along the way and at the end), or
/// (`verify_only`) the pass that replays its offsets and only reads.
fn job(verify_only: bool) -> String {
    let job = WriteVerify {
        seed: Some(20251207),
        ..WriteVerify::new("migrate-verify", REGION)
    };
    if verify_only { job.verify_pass() } else { job }.file()
}

/// Waits until the console at `path` contains `needle`; fails if QEMU exits first.
fn wait_console(qemu: &mut Running, path: &Path, needle: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        if std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(needle)
        {
            return Ok(());
        }
        if qemu.exited() {
            bail!("QEMU exited before its console showed {needle:?}");
        }
        if start.elapsed() > timeout {
            bail!("the console did not show {needle:?} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `query-migrate` until the migration completed; returns its last answer.
fn wait_migrated(qmp: &mut Qmp) -> Result<Value> {
    let start = Instant::now();
    loop {
        let info = qmp.execute("query-migrate", Value::Null)?;
        match info["status"].as_str() {
            Some("completed") => return Ok(info),
            Some("failed" | "cancelled") => bail!("the migration failed: {info}"),
            _ => {}
        }
        if start.elapsed() > MIGRATION_TIMEOUT {
            bail!("the migration did not complete within {MIGRATION_TIMEOUT:?}: {info}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn fio_verify_runs_across_a_live_migration() {
    guest_test("migration", |dir| {
        migrate(dir, Qemu::Installed, &file_disk(dir)?)
    });
}

#[test]
fn fio_verify_runs_across_a_live_migration_on_qemu_7_2() {
    guest_test("migration-qemu-7.2", |dir| {
        migrate(dir, Qemu::Debian72, &file_disk(dir)?)
    });
}

#[test]
fn fio_verify_runs_across_a_live_migration_on_rbd() {
    let cluster_dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ceph-migration");
    let Some(cluster) = ceph::cluster(&cluster_dir) else {
        eprintln!("skipping: {}", ceph::NOT_INSTALLED);
        return;
    };
    guest_test("migration-rbd", |dir| {
        let image = cluster.create_image("migrate", 2 * REGION);
        let conf = cluster.conf();
        let conf = conf.to_str().context("a UTF-8 temp path")?;
        migrate(
            dir,
            Qemu::Installed,
            &[
                "--blk-file".into(),
                image,
                "--ceph-conf".into(),
                conf.into(),
            ],
        )
    });
}

/// vublk's options for a sparse file in `dir` twice the region's size.
fn file_disk(dir: &Path) -> Result<Vec<String>> {
    let img = dir.join("disk.img");
    sparse_image(&img, 2 * REGION)?;
    let img = img.to_str().context("a UTF-8 temp path")?;
    Ok(vec!["--blk-file".into(), img.into()])
}

/// The test on `qemu` (the source and the destination are both that QEMU), with vublk serving
/// the disk `disk` (its options).
fn migrate(dir: &Path, qemu: Qemu, disk: &[String]) -> Result<()> {
    {
        let disk: Vec<&str> = disk.iter().map(String::as_str).collect();
        let mut vublk = start_vublk(dir, "vublk", &disk)?;
        let vm = Vm::default().disk(vublk.socket(), 1).qemu(qemu);
        let mut guest_job = Job::new();
        guest_job
            .sh("writing", "true")
            .fio("write", &job(false))
            .fio("verify", &job(true));
        let prepared = vm.prepare(dir, "guest", &guest_job)?;

        let (src_console, dst_console) = (dir.join("source.console"), dir.join("dest.console"));
        let (src_qmp, dst_qmp) = (dir.join("source.qmp"), dir.join("dest.qmp"));
        let uri = format!("unix:{}", dir.join("migration.sock").display());
        let mut source = vm.spawn(
            &prepared,
            &src_console,
            &Launch {
                qmp: Some(src_qmp.clone()),
                incoming: None,
            },
        )?;
        let dest = vm.spawn(
            &prepared,
            &dst_console,
            &Launch {
                qmp: Some(dst_qmp.clone()),
                incoming: Some(uri.clone()),
            },
        )?;
        // The destination listens for the migration once its monitor answers.
        let mut dst = Qmp::connect(&dst_qmp, Duration::from_secs(30))?;
        let status = dst.execute("query-status", Value::Null)?;
        ensure!(
            status["status"] == "inmigrate",
            "the destination is not waiting for a migration: {status}"
        );
        // Postcopy needs VHOST_USER_PROTOCOL_F_PAGEFAULT, which vublk does not offer: the
        // destination refuses the capability. QEMU 10.0 answers why; QEMU 7.2 answers
        // "Postcopy is not supported" and prints why on its stderr (checked once it has ended).
        let postcopy = dst.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "postcopy-ram", "state": true }] }),
        );
        let mut why_postcopy_on_stderr = false;
        match postcopy {
            Err(e) if e.to_string().contains("vhost-user") => {
                eprintln!("migration: postcopy refused: {e}")
            }
            Err(e) if e.to_string().contains("Postcopy is not supported") => {
                why_postcopy_on_stderr = true
            }
            Err(e) => bail!("postcopy was refused, but not for the vhost-user disk: {e}"),
            Ok(_) => bail!("the destination accepted postcopy with a vublk disk"),
        }

        // The step before fio has ended: fio is starting.
        wait_console(
            &mut source,
            &src_console,
            "@@VUBLK@@ RC writing 0",
            BOOT_TIMEOUT,
        )?;
        std::thread::sleep(BEFORE_MIGRATING);
        let mut src = Qmp::connect(&src_qmp, Duration::from_secs(10))?;
        src.execute("migrate", json!({ "uri": uri }))?;
        let info = wait_migrated(&mut src)?;
        let downtime = info["downtime"].as_u64().unwrap_or(0);
        let total = info["total-time"].as_u64().unwrap_or(0);
        let dirty_syncs = info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
        eprintln!(
            "migration: completed in {total} ms, downtime {downtime} ms, {dirty_syncs} dirty \
             bitmap syncs ({:?}, {})",
            prepared.accel,
            qemu.version()
        );
        // The source stays paused (postmigrate) until told to quit.
        let _ = src.execute("quit", Value::Null);
        let source_end = source.wait();
        if let Some(failure) = &source_end.failure {
            bail!("the source QEMU failed: {failure}");
        }

        let boot = Boot::new(&[src_console.clone(), dst_console.clone()], dest.wait());
        boot.check_init()?;
        if why_postcopy_on_stderr {
            let why = boot
                .qemu_output
                .lines()
                .find(|l| l.contains("postcopy") || l.contains("Postcopy"))
                .unwrap_or_default();
            ensure!(
                why.contains("vhost-user"),
                "postcopy was refused, but not for the vhost-user disk: {why:?}\n{}",
                boot.report()
            );
            eprintln!("migration: postcopy refused: {why}");
        }
        let before = std::fs::read_to_string(&src_console)?;
        let after = std::fs::read_to_string(&dst_console)?;
        ensure!(
            !before.contains("@@VUBLK@@ OUT write") && after.contains("@@VUBLK@@ OUT write"),
            "fio did not run across the switchover (it must end on the destination): make the \
             job longer\n{}",
            boot.report()
        );
        let w = boot.fio("write")?;
        ensure!(
            w.total(|j| j.write.io_bytes) == REGION,
            "wrote {} bytes, not {REGION}",
            w.total(|j| j.write.io_bytes)
        );
        let v = boot.fio("verify")?;
        ensure!(
            v.total(|j| j.read.io_bytes) == REGION,
            "the verify pass read {} bytes, not {REGION}",
            v.total(|j| j.read.io_bytes)
        );
        boot.check_kernel(&[])?;
        // Each QEMU had a worker of its own.
        let log = vublk.log();
        let workers: BTreeSet<&str> = log
            .lines()
            .filter_map(|l| {
                l.split_once("handed to worker pid ")
                    .map(|(_, pid)| pid.trim())
            })
            .collect();
        ensure!(
            workers.len() == 2,
            "the source and the destination were not served by two workers: {workers:?}\n{log}"
        );
        drop(prepared);
        Ok(vublk.try_stop()?)
    }
}
