//! The load generator: libblkio submitting 4 KiB random I/O at a fixed depth on each queue, and
//! the parent's side of it.
//!
//! It runs in its own process (the bench binary re-executed with a hidden `load` subcommand and
//! the [`LoadSpec`] as JSON), so its CPU, its threads and its memory are its own and it cannot
//! share a core's caches with the parent's bookkeeping. It talks to a vhost-user-blk socket
//! (libblkio's `virtio-blk-vhost-user` driver) or, for the `io_uring` reference, opens the image
//! itself (libblkio's `io_uring` driver).
//!
//! One thread per queue keeps up to `iodepth` requests in flight:
//!
//! - **Closed loop** ([`Rate::Max`]): each completion is timed and its slot resubmitted at once.
//! - **Paced** ([`Rate::Iops`]): request k of a queue is due at `start + k / (rate / queues)` and
//!   goes out when it is due and a slot is free. A queue that falls behind (every slot busy, or
//!   the generator itself descheduled) sends the overdue requests as soon as slots free up, so a
//!   system that keeps up on average completes `rate × duration` requests in the window, and one
//!   that cannot runs closed loop and falls short. Whatever is overdue when the window opens is
//!   dropped, so a stall in the warm-up does not add to the window. An interrupt-driven queue
//!   sleeps in `do_io` until the next request is due or a completion arrives; a polled one spins
//!   on `do_io` without waiting.
//!
//! The `io_uring` driver has no poll queues on these media (`IORING_SETUP_IOPOLL` needs O_DIRECT
//! on a device with poll queues), so its "poll" client spins on `do_io` with no minimum instead:
//! the client never sleeps, as with a vhost-user poll queue.
//!
//! Timeline, announced on stdout so the parent can sample the backend's CPU at the same moments:
//!
//! ```text
//! connect, start, map memory   (wait)    warm-up        measured window        drain, disconnect
//! ---------------------------|---------|--------------|----------------------|------------------
//!                      "ready"   "go" on stdin,      "measure-start"        "measure-end"
//!                                threads start                              "result {json}"
//! ```
//!
//! A cell with several VMs runs a generator process per VM (each a separate client, so vublk
//! gives each a worker). The parent says "go" once all of them are ready, so their windows open
//! together; it sums their completions and merges their latency histograms (sent with the
//! result), and keeps each VM's IOPS for the fairness index.
//!
//! Only completions seen inside the measured window count, for IOPS and for latency (the time
//! from the `read`/`write` call to the `do_io` that returned it; a paced request waiting for a
//! free slot is not timed until it is issued).

use std::io::{BufRead, BufReader, Read, Write};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use blkio::{Blkio, Blkioq, Completion, Errno, ReqFlags};
use serde_json::{json, Value};
use vublk_test_support::process::die_with_parent;

use crate::cpu::{Snapshot, Steal};
use crate::histogram::Histogram;
use crate::{ClientMode, Rate, Rw, BLOCK};

/// How long the load generator keeps retrying to connect while the socket does not accept yet.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A request taking this long means the backend is stuck: the run fails.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// What the load generator drives.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// A vhost-user-blk socket, through libblkio's `virtio-blk-vhost-user` driver.
    VhostUser { socket: PathBuf },
    /// An image file, through libblkio's `io_uring` driver (O_DIRECT if `direct`).
    IoUring { path: PathBuf, direct: bool },
}

impl Target {
    const VHOST_USER: &'static str = "virtio-blk-vhost-user";
    const IO_URING: &'static str = "io_uring";

    fn to_json(&self) -> Value {
        match self {
            Target::VhostUser { socket } => json!({ "driver": Self::VHOST_USER, "path": socket }),
            Target::IoUring { path, direct } => {
                json!({ "driver": Self::IO_URING, "path": path, "direct": direct })
            }
        }
    }

    fn from_json(v: &Value) -> Result<Target> {
        let path = PathBuf::from(v["path"].as_str().context("load target: no path")?);
        Ok(match v["driver"].as_str() {
            Some(Self::VHOST_USER) => Target::VhostUser { socket: path },
            Some(Self::IO_URING) => Target::IoUring {
                path,
                direct: v["direct"].as_bool().context("load target: no direct")?,
            },
            other => bail!("load target: unknown driver {other:?}"),
        })
    }
}

/// What one load generator run does.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadSpec {
    pub target: Target,
    pub rw: Rw,
    /// Requests in flight per queue (at most, when paced).
    pub iodepth: u32,
    pub queues: u16,
    pub client: ClientMode,
    /// Closed loop, or the total IOPS to issue (shared equally by the queues).
    pub rate: Rate,
    pub warmup: Duration,
    pub duration: Duration,
    /// Requests land anywhere in the first `size` bytes of the disk (its capacity if larger).
    pub size: u64,
}

impl LoadSpec {
    pub fn to_json(&self) -> Value {
        json!({
            "target": self.target.to_json(),
            "rate": self.rate.iops(),
            "rw": self.rw.name(),
            "iodepth": self.iodepth,
            "queues": self.queues,
            "client": self.client.name(),
            "warmup_s": self.warmup.as_secs_f64(),
            "duration_s": self.duration.as_secs_f64(),
            "size": self.size,
        })
    }

    pub fn from_json(v: &Value) -> Result<LoadSpec> {
        let s = |k: &str| v[k].as_str().with_context(|| format!("load spec: no {k}"));
        let n = |k: &str| v[k].as_u64().with_context(|| format!("load spec: no {k}"));
        let secs = |k: &str| {
            v[k].as_f64()
                .and_then(|x| Duration::try_from_secs_f64(x).ok())
                .with_context(|| format!("load spec: no {k}"))
        };
        let rate = match &v["rate"] {
            Value::Null => Rate::Max,
            r => Rate::Iops(
                r.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| *n > 0)
                    .context("load spec: bad rate")?,
            ),
        };
        Ok(LoadSpec {
            target: Target::from_json(&v["target"])?,
            rate,
            rw: s("rw")?.parse()?,
            iodepth: u32::try_from(n("iodepth")?)?,
            queues: u16::try_from(n("queues")?)?,
            client: s("client")?.parse()?,
            warmup: secs("warmup_s")?,
            duration: secs("duration_s")?,
            size: n("size")?,
        })
    }
}

/// What one run measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadResult {
    /// Completions in the measured window.
    pub ios: u64,
    pub seconds: f64,
    pub iops: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// CPU seconds of the load generator itself in the window (a polling client spins).
    pub client_cpu_s: f64,
}

impl LoadResult {
    pub fn to_json(&self) -> Value {
        json!({
            "ios": self.ios,
            "seconds": self.seconds,
            "iops": self.iops,
            "mean_us": self.mean_us,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "client_cpu_s": self.client_cpu_s,
        })
    }

    pub fn from_json(v: &Value) -> Result<LoadResult> {
        let f = |k: &str| {
            v[k].as_f64()
                .with_context(|| format!("load result: no {k}"))
        };
        Ok(LoadResult {
            ios: v["ios"].as_u64().context("load result: no ios")?,
            seconds: f("seconds")?,
            iops: f("iops")?,
            mean_us: f("mean_us")?,
            p50_us: f("p50_us")?,
            p99_us: f("p99_us")?,
            p999_us: f("p999_us")?,
            client_cpu_s: f("client_cpu_s")?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The parent's side
// ---------------------------------------------------------------------------------------------

/// A load run as the parent saw it.
pub struct Measured {
    /// All VMs together: their completions, IOPS and client CPU added up, latencies from their
    /// merged histograms, the window the mean of theirs.
    pub load: LoadResult,
    /// Each VM's own figures, in VM order.
    pub per_vm: Vec<LoadResult>,
    /// CPU seconds of `backend_pid`'s process tree over the measured window; `None` without a
    /// backend.
    pub backend_cpu_s: Option<f64>,
    /// The share of the machine's CPU time the hypervisor stole over the measured window.
    pub host_steal: f64,
}

/// What one load generator process said, as its lines arrive.
enum Line {
    /// Connected and set up, waiting for "go" on its stdin.
    Ready,
    MeasureStart,
    MeasureEnd,
    Result(String),
    /// Its stdout closed.
    Gone,
}

/// Runs a load generator (`exe load SPEC`) per spec, one per VM, against a backend whose root
/// process is `backend_pid` (if there is one). They connect and set up first; when all are
/// ready the parent tells them to go, so their warm-ups and measured windows start together.
/// The backend's CPU and the host's steal are sampled when the first of them opens its window
/// and when the first closes it.
pub fn run(exe: &Path, specs: &[LoadSpec], backend_pid: Option<u32>) -> Result<Measured> {
    let spec = specs.first().context("no load to run")?;
    let (tx, rx) = mpsc::channel();
    let mut children = Vec::new();
    for (vm, spec) in specs.iter().enumerate() {
        let mut cmd = Command::new(exe);
        cmd.arg("load")
            .arg(spec.to_json().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("run {}", exe.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let parsed = match line.as_str() {
                    "ready" => Line::Ready,
                    "measure-start" => Line::MeasureStart,
                    "measure-end" => Line::MeasureEnd,
                    _ => match line.strip_prefix("result ") {
                        Some(json) => Line::Result(json.to_string()),
                        None => continue,
                    },
                };
                if tx.send((vm, parsed)).is_err() {
                    return;
                }
            }
            let _ = tx.send((vm, Line::Gone));
        });
        children.push((child, err_reader));
    }
    drop(tx);

    // Connecting takes longer with many VMs on a busy machine (a worker is forked for each).
    let deadline = Instant::now()
        + spec.warmup
        + spec.duration
        + CONNECT_TIMEOUT * specs.len().min(4) as u32
        + IO_TIMEOUT;
    let (mut ready, mut gone) = (0, 0);
    let mut start = None;
    let mut end = None;
    let mut results: Vec<Option<String>> = vec![None; specs.len()];
    let outcome = loop {
        if gone == specs.len() {
            break Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((_, Line::Ready)) => {
                ready += 1;
                if ready == specs.len() {
                    for (child, _) in &mut children {
                        // Dropping stdin after the line: the generator reads no more.
                        if let Some(mut stdin) = child.stdin.take() {
                            let _ = stdin.write_all(b"go\n");
                        }
                    }
                }
            }
            Ok((_, Line::MeasureStart)) if start.is_none() => {
                start = Some((backend_pid.map(Snapshot::take), Steal::take()))
            }
            Ok((_, Line::MeasureEnd)) if end.is_none() => {
                end = Some((backend_pid.map(Snapshot::take), Steal::take()))
            }
            Ok((_, Line::MeasureStart | Line::MeasureEnd)) => {}
            Ok((vm, Line::Result(json))) => results[vm] = Some(json),
            Ok((vm, Line::Gone)) => {
                gone += 1;
                // One that quits before the others are ready would leave them waiting.
                if ready < specs.len() && results[vm].is_none() {
                    break Err(anyhow!("load generator {vm} ended before it was ready"));
                }
            }
            Err(_) => break Err(anyhow!("the load generators did not finish in time")),
        }
    };

    let mut failures = Vec::new();
    let mut per_vm = Vec::new();
    let mut hist = Histogram::new();
    for (vm, (mut child, err_reader)) in children.into_iter().enumerate() {
        if outcome.is_err() {
            let _ = child.kill();
        }
        let status = child.wait()?;
        let errors = err_reader.join().unwrap_or_default();
        let who = if specs.len() == 1 {
            "the load generator".to_string()
        } else {
            format!("load generator {vm}")
        };
        if !status.success() {
            failures.push(format!("{who} failed ({status}): {}", errors.trim()));
            continue;
        }
        let Some(json) = &results[vm] else {
            failures.push(format!("{who} printed no result: {}", errors.trim()));
            continue;
        };
        let doc: Value = serde_json::from_str(json)?;
        per_vm.push(LoadResult::from_json(&doc)?);
        hist.merge(
            &Histogram::from_json(&doc["histogram"])
                .with_context(|| format!("{who}: no latency histogram"))?,
        );
    }
    outcome?;
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    let (Some(start), Some(end)) = (start, end) else {
        bail!("the load generator did not announce its measured window");
    };
    Ok(Measured {
        load: aggregate(&per_vm, &hist),
        per_vm,
        backend_cpu_s: start.0.zip(end.0).map(|(s, e)| s.seconds_until(&e)),
        host_steal: start.1.share_until(&end.1),
    })
}

/// The VMs of a cell as one: completions, IOPS and client CPU added up; latencies from `hist`,
/// their merged histograms.
fn aggregate(per_vm: &[LoadResult], hist: &Histogram) -> LoadResult {
    let n = per_vm.len().max(1) as f64;
    LoadResult {
        ios: per_vm.iter().map(|r| r.ios).sum(),
        seconds: per_vm.iter().map(|r| r.seconds).sum::<f64>() / n,
        iops: per_vm.iter().map(|r| r.iops).sum(),
        mean_us: hist.mean_ns() / 1e3,
        p50_us: hist.quantile_ns(0.5) / 1e3,
        p99_us: hist.quantile_ns(0.99) / 1e3,
        p999_us: hist.quantile_ns(0.999) / 1e3,
        client_cpu_s: per_vm.iter().map(|r| r.client_cpu_s).sum(),
    }
}

// ---------------------------------------------------------------------------------------------
// The load generator process
// ---------------------------------------------------------------------------------------------

/// The `load` subcommand: runs `spec` (JSON), starting when "go" arrives on stdin, and prints
/// the timeline and the result (with its latency histogram) on stdout.
pub fn main(spec: &str) -> Result<()> {
    let spec = LoadSpec::from_json(&serde_json::from_str(spec).context("load spec is not JSON")?)?;
    let (result, hist) = generate(&spec, &mut std::io::stdout(), &mut std::io::stdin().lock())?;
    let mut doc = result.to_json();
    doc["histogram"] = hist.to_json();
    println!("result {doc}");
    Ok(())
}

/// A libblkio instance for `spec`: connected (not started yet), its queues configured.
fn open(spec: &LoadSpec) -> Result<Blkio> {
    Ok(match &spec.target {
        Target::VhostUser { socket } => {
            let mut b = connect(socket)?;
            let (queues, poll_queues) = match spec.client {
                ClientMode::Interrupt => (spec.queues, 0),
                ClientMode::Poll => (0, spec.queues),
            };
            b.set_i32("num-queues", queues.into())?;
            b.set_i32("num-poll-queues", poll_queues.into())?;
            // libblkio's default ring (256) holds any depth up to 256; deeper ones need more.
            if spec.iodepth > 256 {
                b.set_i32("queue-size", spec.iodepth.next_power_of_two() as i32)?;
            }
            b
        }
        Target::IoUring { path, direct } => {
            let path_str = path.to_str().context("image path is not UTF-8")?;
            let mut b = Blkio::new("io_uring")?;
            b.set_str("path", path_str)?;
            b.set_bool("direct", *direct)?;
            b.connect()
                .with_context(|| format!("open {path_str} with io_uring"))?;
            // Regular queues for both client modes (see the module comment on polling).
            b.set_i32("num-queues", spec.queues.into())?;
            b.set_i32("num-poll-queues", 0)?;
            // The default ring (128 entries) would backlog deeper queues inside libblkio.
            if spec.iodepth > 128 {
                b.set_i32("num-entries", spec.iodepth.next_power_of_two() as i32)?;
            }
            b
        }
    })
}

fn connect(socket: &Path) -> Result<Blkio> {
    let path = socket.to_str().context("socket path is not UTF-8")?;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", path)?;
        match b.connect() {
            Ok(()) => return Ok(b),
            Err(e)
                if (e.errno() == Errno::CONNREFUSED || e.errno() == Errno::NOENT)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).with_context(|| format!("connect to {path}")),
        }
    }
}

/// Connects, says "ready" on `out` and waits for "go" on `go`, runs the warm-up and the measured
/// window on every queue, announcing the window on `out`, and returns what the queues measured
/// and their merged latencies.
pub fn generate(
    spec: &LoadSpec,
    out: &mut impl Write,
    go: &mut impl BufRead,
) -> Result<(LoadResult, Histogram)> {
    if spec.iodepth == 0 || spec.queues == 0 {
        bail!("iodepth and queues must be at least 1");
    }
    let mut blkio = open(spec)?;
    let started = blkio.start().context("start the libblkio instance")?;
    let capacity = blkio.get_u64("capacity")?;
    let blocks = spec.size.min(capacity) / BLOCK;
    if blocks == 0 {
        bail!("the disk ({capacity} bytes) is smaller than one block");
    }

    // Each queue's share of the rate, as the time between two of its requests.
    let interval = match spec.rate {
        Rate::Max => None,
        Rate::Iops(n) => Some(Duration::from_secs_f64(
            f64::from(spec.queues) / f64::from(n),
        )),
    };
    // Poll queues wait in libblkio's own busy loop (`do_io` with a minimum of one) unless they
    // must also watch the clock, or the driver's queues are not poll queues (io_uring).
    let spin = spec.client == ClientMode::Poll
        && (interval.is_some() || matches!(spec.target, Target::IoUring { .. }));

    // One shared region (the backend must map it), a private slice of `iodepth` blocks per queue.
    let per_queue = spec.iodepth as usize * BLOCK as usize;
    let align = 2 << 20;
    let total = (per_queue * spec.queues as usize).div_ceil(align) * align;
    let region = blkio.alloc_mem_region(total)?;
    blkio.map_mem_region(&region)?;

    // Every VM of the cell is connected and set up: start together.
    writeln!(out, "ready")?;
    out.flush()?;
    let mut line = String::new();
    go.read_line(&mut line).context("wait for go")?;
    if line.trim() != "go" {
        bail!("the parent went away before saying go");
    }

    let t0 = Instant::now() + spec.warmup;
    let t1 = t0 + spec.duration;
    let threads: Vec<_> = started
        .queues
        .into_iter()
        .chain(started.poll_queues)
        .enumerate()
        .map(|(i, q)| {
            let w = Worker {
                q,
                buf: region.addr + i * per_queue,
                depth: spec.iodepth as usize,
                blocks,
                rw: spec.rw,
                rng: 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1) | 1,
                interval,
                spin,
                t0,
                t1,
            };
            std::thread::Builder::new()
                .name(format!("queue{i}"))
                .spawn(move || w.run())
                .expect("spawn a queue thread")
        })
        .collect();

    let me = std::process::id();
    sleep_until(t0);
    let cpu_start = Snapshot::take(me);
    writeln!(out, "measure-start")?;
    out.flush()?;
    sleep_until(t1);
    writeln!(out, "measure-end")?;
    out.flush()?;
    let cpu_end = Snapshot::take(me);

    // Every thread is joined before any error is returned: the queues must be idle before the
    // instance goes away.
    let outcomes: Vec<_> = threads.into_iter().map(|t| t.join()).collect();
    drop(blkio);
    let mut hist = Histogram::new();
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let h = outcome
            .map_err(|_| anyhow!("queue {i} thread panicked"))?
            .with_context(|| format!("queue {i}"))?;
        hist.merge(&h);
    }

    let seconds = spec.duration.as_secs_f64();
    let result = LoadResult {
        ios: hist.count(),
        seconds,
        iops: hist.count() as f64 / seconds,
        mean_us: hist.mean_ns() / 1e3,
        p50_us: hist.quantile_ns(0.5) / 1e3,
        p99_us: hist.quantile_ns(0.99) / 1e3,
        p999_us: hist.quantile_ns(0.999) / 1e3,
        client_cpu_s: cpu_start.seconds_until(&cpu_end),
    };
    Ok((result, hist))
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// One queue's loop.
struct Worker {
    q: Blkioq,
    /// Address of this queue's `depth` blocks inside the mapped region.
    buf: usize,
    depth: usize,
    /// Requests land on block `0..blocks`.
    blocks: u64,
    rw: Rw,
    rng: u64,
    /// Paced: the time between two requests of this queue. `None`: closed loop.
    interval: Option<Duration>,
    /// Wait for completions by calling `do_io` with no minimum, again and again.
    spin: bool,
    t0: Instant,
    t1: Instant,
}

impl Worker {
    fn next_random(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn submit(&mut self, slot: usize) {
        let r = self.next_random();
        let offset = (r >> 1) % self.blocks * BLOCK;
        let write = match self.rw {
            Rw::RandRead => false,
            Rw::RandWrite => true,
            Rw::RandRw => r & 1 == 1,
        };
        let buf = (self.buf + slot * BLOCK as usize) as *mut u8;
        if write {
            self.q
                .write(offset, buf, BLOCK as usize, slot, ReqFlags::empty());
        } else {
            self.q
                .read(offset, buf, BLOCK as usize, slot, ReqFlags::empty());
        }
    }

    /// Issues requests (as fast as slots free up, or on the pacing schedule) until the window
    /// closes, then drains; returns the latencies of the completions inside the window.
    fn run(mut self) -> Result<Histogram> {
        let mut hist = Histogram::new();
        let mut submitted = vec![Instant::now(); self.depth];
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..self.depth).map(|_| MaybeUninit::uninit()).collect();
        // Slots with no request in flight.
        let mut free: Vec<usize> = (0..self.depth).rev().collect();
        // Paced: when the next request is due.
        let mut due = Instant::now();
        let mut window_open = false;
        // When the last completion arrived (or the first request went out), for IO_TIMEOUT.
        let mut progress = Instant::now();
        loop {
            let now = Instant::now();
            if now < self.t1 {
                if !window_open && now >= self.t0 {
                    // The window gets its own schedule: no backlog from the warm-up.
                    window_open = true;
                    due = due.max(self.t0);
                }
                while let Some(&slot) = free.last() {
                    if let Some(interval) = self.interval {
                        if due > now {
                            break;
                        }
                        due += interval;
                    }
                    free.pop();
                    submitted[slot] = Instant::now();
                    self.submit(slot);
                }
            }
            let in_flight = self.depth - free.len();
            if in_flight == 0 {
                if now >= self.t1 {
                    return Ok(hist);
                }
                // Paced, and nothing is due yet (closed loop never gets here before t1).
                sleep_until(due.min(self.t1));
                progress = Instant::now();
                continue;
            }

            let n = if self.spin {
                let n = self.q.do_io(&mut completions, 0, None, None);
                let n = n.with_context(|| format!("do_io with {in_flight} requests in flight"))?;
                if n == 0 && now.duration_since(progress) > IO_TIMEOUT {
                    bail!("no completion for {IO_TIMEOUT:?} with {in_flight} requests in flight");
                }
                n
            } else {
                // Sleep until a completion arrives, or (paced, with a free slot, in the window)
                // until the next request is due.
                let pacing = self.interval.is_some() && !free.is_empty() && now < self.t1;
                let mut timeout = if pacing {
                    due.min(self.t1)
                        .saturating_duration_since(now)
                        .min(IO_TIMEOUT)
                } else {
                    IO_TIMEOUT
                };
                match self.q.do_io(&mut completions, 1, Some(&mut timeout), None) {
                    Ok(n) => n,
                    Err(e) if pacing && e.errno() == Errno::TIME => 0,
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("do_io with {in_flight} requests in flight"))
                    }
                }
            };
            if n == 0 {
                continue;
            }
            let now = Instant::now();
            progress = now;
            for c in &completions[..n] {
                // SAFETY: do_io() initialised the first `n` elements.
                let c = unsafe { c.assume_init_read() };
                let slot = c.user_data;
                if c.ret != 0 {
                    bail!(
                        "a request failed: {}",
                        std::io::Error::from_raw_os_error(-c.ret)
                    );
                }
                if now >= self.t0 && now < self.t1 {
                    hist.record((now - submitted[slot]).as_nanos() as u64);
                }
                free.push(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_and_result_round_trip_through_json() {
        let mut spec = LoadSpec {
            target: Target::VhostUser {
                socket: "/tmp/x.sock".into(),
            },
            rw: Rw::RandRw,
            iodepth: 32,
            queues: 2,
            client: ClientMode::Poll,
            rate: Rate::Max,
            warmup: Duration::from_millis(250),
            duration: Duration::from_secs(3),
            size: 1 << 30,
        };
        assert_eq!(LoadSpec::from_json(&spec.to_json()).unwrap(), spec);
        spec.target = Target::IoUring {
            path: "/dev/shm/x.img".into(),
            direct: true,
        };
        spec.rate = Rate::Iops(50_000);
        assert_eq!(LoadSpec::from_json(&spec.to_json()).unwrap(), spec);
        let r = LoadResult {
            ios: 12345,
            seconds: 3.0,
            iops: 4115.0,
            mean_us: 10.5,
            p50_us: 9.0,
            p99_us: 30.0,
            p999_us: 80.0,
            client_cpu_s: 1.5,
        };
        assert_eq!(LoadResult::from_json(&r.to_json()).unwrap(), r);
    }

    #[test]
    fn vms_add_up_and_their_latencies_merge() {
        let vm = |ios: u64, cpu: f64| LoadResult {
            ios,
            seconds: 2.0,
            iops: ios as f64 / 2.0,
            client_cpu_s: cpu,
            ..Default::default()
        };
        let mut hist = Histogram::new();
        for ns in [10_000, 10_000, 10_000, 90_000] {
            hist.record(ns);
        }
        let all = aggregate(&[vm(3000, 0.5), vm(1000, 0.25)], &hist);
        assert_eq!((all.ios, all.seconds, all.iops), (4000, 2.0, 2000.0));
        assert_eq!(all.client_cpu_s, 0.75);
        assert!((all.p50_us - 10.0).abs() < 0.2, "{all:?}");
        assert!((all.p99_us - 90.0).abs() < 1.5, "{all:?}");
        assert!((all.mean_us - 30.0).abs() < 1e-9, "{all:?}");
    }
}
