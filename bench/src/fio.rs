//! The `fio` reference: the disk's own limit, measured by the tool everyone knows, on the disk
//! medium's images with nothing of ours in between.
//!
//! One fio run per cell and round, from a job file written here: fio's `io_uring` engine with
//! O_DIRECT, the cell's block size (4 KiB), mix and depth, a job per queue of each VM on that
//! VM's image (so 8 VMs of 1 queue are 8 jobs on 8 images), `ramp_time` for the warm-up and a
//! time-based `runtime` for the window. Paced cells use fio's own pacing (`rate_iops`, the
//! cell's total split over the jobs). All jobs report as one group with reads and writes
//! together (`unified_rw_reporting=mixed`), so the percentiles are over every request, from
//! submission to completion (`lat_percentiles`), as the load generator times them.
//!
//! Next to `io_uring` (libblkio's driver in our load generator, one thread per queue) it checks
//! that the load generator is not what limits the references on the disk, and gives the
//! disk's limit in a figure anyone can reproduce with fio alone.
//!
//! fio announces nothing, so the parent samples its CPU (fio and the job processes it forks) and
//! the host's steal by the clock: the window opens `ramp_time` after the job processes appear
//! and lasts `runtime`; the few milliseconds a job takes to open its file and set up its ring
//! shift it slightly.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use vublk_test_support::process::die_with_parent;

use crate::cpu::{self, Snapshot, Steal};
use crate::load::{LoadResult, Measured};
use crate::media::Prepared;
use crate::{Cell, Rate, Rw, BLOCK};

/// The fio executable; `FIO_BIN` overrides it.
pub fn fio_bin() -> PathBuf {
    std::env::var_os("FIO_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| "fio".into())
}

/// fio's job file for `cell` on `media` (an image per VM).
pub fn job_file(cell: &Cell, media: &Prepared, warmup: Duration, duration: Duration) -> String {
    let mut f = String::new();
    let rw = match cell.rw {
        Rw::RandRead => "randread",
        Rw::RandWrite => "randwrite",
        Rw::RandRw => "randrw\nrwmixread=50",
    };
    let _ = write!(
        f,
        "[global]\n\
         ioengine=io_uring\n\
         direct={}\n\
         bs={BLOCK}\n\
         rw={rw}\n\
         iodepth={}\n\
         size={}\n\
         norandommap=1\n\
         randrepeat=0\n\
         time_based=1\n\
         ramp_time={}ms\n\
         runtime={}ms\n\
         group_reporting=1\n\
         unified_rw_reporting=mixed\n\
         lat_percentiles=1\n\
         percentile_list=50:99:99.9\n",
        u8::from(media.medium.direct()),
        cell.iodepth,
        media.size,
        warmup.as_millis(),
        duration.as_millis(),
    );
    if let Rate::Iops(total) = cell.rate {
        let jobs = u32::from(cell.vms) * u32::from(cell.queues);
        let per_job = (total / jobs).max(1);
        // A single value paces reads and writes each: a mixed job gets half for each.
        let _ = match cell.rw {
            Rw::RandRw => writeln!(f, "rate_iops={0},{0}", (per_job / 2).max(1)),
            _ => writeln!(f, "rate_iops={per_job}"),
        };
    }
    for (vm, image) in media.images.iter().enumerate() {
        let _ = write!(
            f,
            "\n[vm{vm}]\nfilename={}\nnumjobs={}\n",
            // fio splits filename= at ':' (several files); '\:' is a literal colon.
            image.display().to_string().replace(':', "\\:"),
            cell.queues
        );
    }
    f
}

/// Runs fio for `cell` on `media` in `dir`, sampling its CPU and the host's steal over the
/// window.
pub fn run(
    cell: &Cell,
    media: &Prepared,
    warmup: Duration,
    duration: Duration,
    dir: &std::path::Path,
) -> Result<Measured> {
    if media.images.is_empty() {
        bail!("fio needs image files");
    }
    let jobfile = dir.join("fio.job");
    let output = dir.join("fio.json");
    std::fs::write(&jobfile, job_file(cell, media, warmup, duration))?;
    let _ = std::fs::remove_file(&output);
    let mut cmd = Command::new(fio_bin());
    cmd.arg("--output-format=json")
        .arg(format!("--output={}", output.display()))
        .arg(&jobfile)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().context("run fio (Debian package fio)")?;
    let pid = child.id();
    let deadline = Instant::now() + warmup + duration + Duration::from_secs(30);

    // The job processes fio forks mark the start of the ramp.
    while cpu::tree(pid).len() < 2 {
        if child.try_wait()?.is_some() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let ramped = Instant::now() + warmup;
    sleep_until(ramped);
    let start = (Snapshot::take(pid), Steal::take());
    sleep_until(ramped + duration);
    let end = (Snapshot::take(pid), Steal::take());

    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("fio did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut errors = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut errors);
    }
    if !status.success() {
        bail!("fio failed ({status}): {}", errors.trim());
    }
    let text = std::fs::read_to_string(&output).context("fio wrote no report")?;
    let mut load = parse(&text).with_context(|| format!("fio's report {}", output.display()))?;
    load.client_cpu_s = start.0.seconds_until(&end.0);
    Ok(Measured {
        load,
        per_vm: Vec::new(),
        backend_cpu_s: None,
        host_steal: start.1.share_until(&end.1),
    })
}

/// The figures of fio's JSON report (one group, reads and writes together); the client CPU is
/// left at 0 for the caller.
pub fn parse(report: &str) -> Result<LoadResult> {
    // fio may print notes before the JSON document.
    let json = report
        .find('{')
        .map(|i| &report[i..])
        .context("no JSON in fio's report")?;
    let doc: Value = serde_json::from_str(json)?;
    let job = &doc["jobs"][0];
    if job["error"].as_i64().unwrap_or(0) != 0 {
        bail!("fio's job failed with error {}", job["error"]);
    }
    let mixed = &job["mixed"];
    let ios = mixed["total_ios"].as_u64().context("no total_ios")?;
    let runtime_ms = mixed["runtime"].as_f64().context("no runtime")?;
    let lat = &mixed["lat_ns"];
    let pct = |p: &str| -> Result<f64> {
        Ok(lat["percentile"][p]
            .as_f64()
            .with_context(|| format!("no {p} percentile"))?
            / 1e3)
    };
    let seconds = runtime_ms / 1e3;
    Ok(LoadResult {
        ios,
        seconds,
        iops: mixed["iops"].as_f64().context("no iops")?,
        mean_us: lat["mean"].as_f64().unwrap_or(f64::NAN) / 1e3,
        p50_us: pct("50.000000")?,
        p99_us: pct("99.000000")?,
        p999_us: pct("99.900000")?,
        client_cpu_s: 0.0,
    })
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::Medium;
    use crate::ClientMode;

    #[test]
    fn a_job_per_queue_of_each_vm_on_its_own_image() {
        let media = Prepared::for_test(
            Medium::Disk,
            vec!["/var/tmp/a/disk-vm0.img".into(), "/var/tmp/a:b.img".into()],
            64 << 20,
        );
        let mut cell = Cell {
            medium: Medium::Disk,
            rw: Rw::RandRw,
            iodepth: 8,
            queues: 2,
            client: ClientMode::Interrupt,
            rate: Rate::Iops(8000),
            vms: 2,
        };
        let job = job_file(
            &cell,
            &media,
            Duration::from_millis(500),
            Duration::from_secs(4),
        );
        for line in [
            "ioengine=io_uring",
            "direct=1",
            "bs=4096",
            "rw=randrw",
            "rwmixread=50",
            "iodepth=8",
            "size=67108864",
            "ramp_time=500ms",
            "runtime=4000ms",
            // 8000 over 4 jobs, half reads and half writes.
            "rate_iops=1000,1000",
            "[vm0]",
            "filename=/var/tmp/a/disk-vm0.img",
            "filename=/var/tmp/a\\:b.img",
            "numjobs=2",
        ] {
            assert!(job.lines().any(|l| l == line), "no {line:?} in\n{job}");
        }
        cell.rate = Rate::Max;
        cell.rw = Rw::RandRead;
        let job = job_file(&cell, &media, Duration::ZERO, Duration::from_secs(1));
        assert!(!job.contains("rate_iops") && job.contains("rw=randread\n"));
    }

    #[test]
    fn the_report_gives_the_group_figures() {
        let report = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{"fio version": "fio-3.33", "jobs": [{"jobname": "vm0", "error": 0,
  "mixed": {"total_ios": 8000, "iops": 7984.03, "runtime": 1002,
            "lat_ns": {"mean": 151783.3, "percentile": {"50.000000": 171008,
                       "99.000000": 2375680, "99.900000": 5013504}}}}]}"#;
        let r = parse(report).unwrap();
        assert_eq!(r.ios, 8000);
        assert_eq!(r.iops, 7984.03);
        assert_eq!(r.seconds, 1.002);
        assert_eq!(
            (r.p50_us, r.p99_us, r.p999_us),
            (171.008, 2375.68, 5013.504)
        );
        assert!(parse(&report.replace("\"error\": 0", "\"error\": 5")).is_err());
        assert!(parse("fio: no JSON").is_err());
    }
}
