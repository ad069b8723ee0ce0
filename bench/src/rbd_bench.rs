//! The `rbd-bench` reference: librbd's own benchmark, `rbd bench`, on the rbd medium's image, with
//! nothing of ours (no vhost-user, no virtio, no load generator) in between. What the cluster
//! gives a librbd client at the cell's depth, in a figure anyone can reproduce with the `rbd`
//! tool alone.
//!
//! One run per cell and round: `rbd bench --io-type read|write|readwrite --io-pattern rand
//! --io-size 4096 --io-threads DEPTH` with librbd's cache off (`--rbd-cache=false`, as vublk and
//! QSD have it), DEPTH being the cell's iodepth times its queues (`--io-threads` is the number
//! of requests librbd keeps in flight, from one thread). It has no time limit, only a byte
//! count, so it gets far more bytes than it can do and is stopped (SIGTERM) at the end of the
//! window.
//!
//! It prints a line a second with the operations done so far:
//!
//! ```text
//! bench  type read io_size 4096 io_threads 32 bytes 1099511627776 pattern random
//!   SEC       OPS   OPS/SEC   BYTES/SEC
//!     1     16318   16346.3    64 MiB/s
//! ```
//!
//! The warm-up starts at the first line (the image is open, the I/O starts); the window opens at
//! the first progress line after the warm-up, when the parent also samples the CPU of the `rbd`
//! process and the host's steal, and closes at the first line `duration` later:
//! IOPS are the operations between the two lines over the time between them on the parent's
//! clock. rbd bench reports no latencies: the mean is Little's law (depth ÷ IOPS), the
//! percentiles are left out.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vublk_test_support::process::die_with_parent;

use crate::cpu::{Snapshot, Steal};
use crate::load::{LoadResult, Measured};
use crate::media::Prepared;
use crate::{Cell, Rw, BLOCK};

/// The `rbd` executable; `RBD_BIN` overrides it.
pub fn rbd_bin() -> PathBuf {
    std::env::var_os("RBD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| "rbd".into())
}

/// Bytes rbd bench is asked for: more than any run does (it is killed when the window closes).
const ENOUGH: &str = "1T";

/// How long past its window a run may take before it is given up.
const SLACK: Duration = Duration::from_secs(30);

/// How long rbd bench may take to close the image after SIGTERM.
const STOP: Duration = Duration::from_secs(15);

/// The arguments of `rbd` for `cell` on `media` (the first VM's image).
pub fn args(cell: &Cell, media: &Prepared) -> Result<Vec<String>> {
    let conf = media
        .ceph_conf
        .as_deref()
        .and_then(|p| p.to_str())
        .context("the medium has no Ceph configuration (or it is not UTF-8)")?;
    let image = media
        .image_str(0)
        .and_then(|i| i.strip_prefix("rbd:"))
        .context("rbd bench needs an rbd:POOL/IMAGE image")?;
    let mut args: Vec<String> = [
        "-c",
        conf,
        "--id",
        "admin",
        "bench",
        "--rbd-cache=false",
        "--io-pattern",
        "rand",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let io_type = match cell.rw {
        Rw::RandRead => "read",
        Rw::RandWrite => "write",
        Rw::RandRw => "readwrite",
    };
    args.extend(["--io-type".into(), io_type.into()]);
    if cell.rw == Rw::RandRw {
        args.extend(["--rw-mix-read".into(), "50".into()]);
    }
    args.extend([
        "--io-size".into(),
        BLOCK.to_string(),
        "--io-threads".into(),
        (cell.iodepth * u32::from(cell.queues)).to_string(),
        "--io-total".into(),
        ENOUGH.into(),
        image.into(),
    ]);
    Ok(args)
}

/// The operations done so far, from one of rbd bench's progress lines (`SEC OPS OPS/SEC ...`).
pub fn progress(line: &str) -> Option<u64> {
    let mut fields = line.split_whitespace();
    fields.next()?.parse::<u64>().ok()?;
    let ops = fields.next()?.parse().ok()?;
    // The third field (OPS/SEC) is a number too; the header's are words.
    fields.next()?.parse::<f64>().ok()?;
    Some(ops)
}

/// Runs rbd bench for `cell` on `media`, sampling its CPU and the host's steal over the window.
pub fn run(
    cell: &Cell,
    media: &Prepared,
    warmup: Duration,
    duration: Duration,
) -> Result<Measured> {
    let mut cmd = Command::new(rbd_bin());
    cmd.args(args(cell, media)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .context("run rbd bench (Debian package ceph-common)")?;
    let pid = child.id();
    let stdout = child.stdout.take().context("rbd bench's stdout")?;
    // The header (as 0 operations: the image is open, the I/O starts) and the progress lines,
    // stamped when they arrive.
    let (tx, rx) = mpsc::channel::<(Instant, u64)>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let ops = if line.starts_with("bench ") {
                Some(0)
            } else {
                progress(&line)
            };
            if let Some(ops) = ops {
                if tx.send((Instant::now(), ops)).is_err() {
                    break;
                }
            }
        }
    });
    let deadline = Instant::now() + warmup + duration + SLACK;
    let outcome = window(&rx, warmup, duration, deadline, pid);
    let status = stop(&mut child)?;
    let _ = reader.join();
    let (start, end) = match outcome {
        Ok(window) => window,
        Err(e) => {
            let mut errors = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ = err.read_to_string(&mut errors);
            }
            return Err(e.context(format!("rbd bench ({status}): {}", errors.trim())));
        }
    };
    let ios = end.ops - start.ops;
    let seconds = (end.at - start.at).as_secs_f64();
    let iops = ios as f64 / seconds;
    let depth = f64::from(cell.iodepth * u32::from(cell.queues));
    Ok(Measured {
        load: LoadResult {
            ios,
            seconds,
            iops,
            mean_us: depth / iops * 1e6,
            p50_us: f64::NAN,
            p99_us: f64::NAN,
            p999_us: f64::NAN,
            client_cpu_s: start.cpu.seconds_until(&end.cpu),
        },
        per_vm: Vec::new(),
        backend_cpu_s: None,
        host_steal: start.steal.share_until(&end.steal),
    })
}

/// Stops rbd bench with SIGTERM, on which it closes the image: killed, it would leave the
/// image's exclusive lock to a dead owner, and the next system's first write would wait for the
/// cluster to notice (its watch timeout, 30 s). SIGKILL if it does not end within [`STOP`].
fn stop(child: &mut Child) -> Result<ExitStatus> {
    let pid = libc::pid_t::try_from(child.id()).context("rbd bench's pid")?;
    // SAFETY: kill(2) on our own child, which has not been reaped (so the pid is still its).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + STOP;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Ok(child.wait()?);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One end of the measured window.
struct Mark {
    at: Instant,
    ops: u64,
    cpu: Snapshot,
    steal: Steal,
}

/// Waits for the header, then for the first progress line `warmup` after it (the window
/// opens), then for the first one `duration` after that (it closes).
fn window(
    rx: &mpsc::Receiver<(Instant, u64)>,
    warmup: Duration,
    duration: Duration,
    deadline: Instant,
    pid: u32,
) -> Result<(Mark, Mark)> {
    // The first line there is at or after `t` (`None`: the first line there is).
    let next_after = |t: Option<Instant>| -> Result<Mark> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (at, ops) = match rx.recv_timeout(left) {
                Ok(x) => x,
                Err(mpsc::RecvTimeoutError::Timeout) => bail!("no progress in time"),
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("it ended early"),
            };
            if t.is_none_or(|t| at >= t) {
                return Ok(Mark {
                    at,
                    ops,
                    cpu: Snapshot::take(pid),
                    steal: Steal::take(),
                });
            }
        }
    };
    let header = next_after(None)?;
    let start = next_after(Some(header.at + warmup))?;
    // A line comes about once a second: allow for its jitter.
    let end = next_after(Some(
        start.at + duration.saturating_sub(Duration::from_millis(100)),
    ))?;
    Ok((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::Medium;
    use crate::{ClientMode, Rate};

    #[test]
    fn arguments_for_a_cell() {
        let mut media = Prepared::for_test(Medium::Rbd, vec!["rbd:rbd/bench-vm0".into()], 1 << 28);
        media.ceph_conf = Some("/tmp/c/ceph.conf".into());
        let cell = Cell {
            medium: Medium::Rbd,
            rw: Rw::RandWrite,
            iodepth: 16,
            queues: 2,
            client: ClientMode::Interrupt,
            rate: Rate::Max,
            vms: 1,
        };
        let args = args(&cell, &media).unwrap().join(" ");
        assert_eq!(
            args,
            "-c /tmp/c/ceph.conf --id admin bench --rbd-cache=false --io-pattern rand \
             --io-type write --io-size 4096 --io-threads 32 --io-total 1T rbd/bench-vm0"
        );
        media.ceph_conf = None;
        assert!(super::args(&cell, &media).is_err());
    }

    #[test]
    fn progress_lines() {
        assert_eq!(
            progress("    1     16318   16346.3    64 MiB/s"),
            Some(16318)
        );
        assert_eq!(
            progress("   12    180224   15011.9    59 MiB/s"),
            Some(180224)
        );
        assert_eq!(progress("  SEC       OPS   OPS/SEC   BYTES/SEC"), None);
        assert_eq!(
            progress("bench  type read io_size 4096 io_threads 32 bytes 1 pattern random"),
            None
        );
        assert_eq!(progress("elapsed: 2   ops: 16384   ops/sec: 7301.25"), None);
    }
}
