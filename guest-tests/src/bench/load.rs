//! The load generator: libblkio submitting 4 KiB random I/O at a fixed depth on each queue, and
//! the parent's side of it.
//!
//! It runs in its own process (the bench binary re-executed with a hidden `load` subcommand and
//! the [`LoadSpec`] as JSON), so its CPU, its threads and its memory are its own and it cannot
//! share a core's caches with the parent's bookkeeping. One thread per queue keeps `iodepth`
//! requests in flight: each completion is timed and its slot resubmitted at once.
//!
//! Timeline, announced on stdout so the parent can sample the backend's CPU at the same moments:
//!
//! ```text
//! connect, start, map memory   warm-up            measured window        drain, disconnect
//! ---------------------------|------------------|----------------------|------------------
//!                            threads start      "measure-start"        "measure-end"  "result {json}"
//! ```
//!
//! Only completions seen inside the measured window count, for IOPS and for latency (the time
//! from the `read`/`write` call to the `do_io` that returned it).

use std::io::{BufRead, BufReader, Read, Write};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use blkio::{Blkio, Blkioq, Completion, Errno, ReqFlags};
use serde_json::{json, Value};

use super::cpu::Snapshot;
use super::histogram::Histogram;
use super::{ClientMode, Rw, BLOCK};
use crate::process::die_with_parent;

/// How long the load generator keeps retrying to connect while the socket does not accept yet.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A request taking this long means the backend is stuck: the run fails.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// What one load generator run does.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadSpec {
    /// The vhost-user-blk socket.
    pub socket: PathBuf,
    pub rw: Rw,
    /// Requests in flight per queue.
    pub iodepth: u32,
    pub queues: u16,
    pub client: ClientMode,
    pub warmup: Duration,
    pub duration: Duration,
    /// Requests land anywhere in the first `size` bytes of the disk (its capacity if larger).
    pub size: u64,
}

impl LoadSpec {
    pub fn to_json(&self) -> Value {
        json!({
            "socket": self.socket,
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
        Ok(LoadSpec {
            socket: PathBuf::from(s("socket")?),
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
    pub load: LoadResult,
    /// CPU seconds of `backend_pid`'s process tree over the measured window.
    pub backend_cpu_s: f64,
}

/// Runs the load generator (`exe load SPEC`) against a backend whose root process is
/// `backend_pid`, sampling the backend's CPU when the generator opens and closes its window.
pub fn run(exe: &Path, spec: &LoadSpec, backend_pid: u32) -> Result<Measured> {
    let mut cmd = Command::new(exe);
    cmd.arg("load")
        .arg(spec.to_json().to_string())
        .stdin(Stdio::null())
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
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = Instant::now() + spec.warmup + spec.duration + CONNECT_TIMEOUT + IO_TIMEOUT;
    let mut start = None;
    let mut end = None;
    let mut result = None;
    while result.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line == "measure-start" => start = Some(Snapshot::take(backend_pid)),
            Ok(line) if line == "measure-end" => end = Some(Snapshot::take(backend_pid)),
            Ok(line) => {
                if let Some(json) = line.strip_prefix("result ") {
                    result = Some(json.to_string());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the load generator did not finish in time");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait()?;
    let errors = err_reader.join().unwrap_or_default();
    if !status.success() {
        bail!("the load generator failed ({status}): {}", errors.trim());
    }
    let result =
        result.ok_or_else(|| anyhow!("the load generator printed no result: {}", errors.trim()))?;
    let (Some(start), Some(end)) = (start, end) else {
        bail!("the load generator did not announce its measured window");
    };
    Ok(Measured {
        load: LoadResult::from_json(&serde_json::from_str(&result)?)?,
        backend_cpu_s: start.seconds_until(&end),
    })
}

// ---------------------------------------------------------------------------------------------
// The load generator process
// ---------------------------------------------------------------------------------------------

/// The `load` subcommand: runs `spec` (JSON) and prints the timeline and the result on stdout.
pub fn main(spec: &str) -> Result<()> {
    let spec = LoadSpec::from_json(&serde_json::from_str(spec).context("load spec is not JSON")?)?;
    let result = generate(&spec, &mut std::io::stdout())?;
    println!("result {}", result.to_json());
    Ok(())
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

/// Connects, runs the warm-up and the measured window on every queue, announcing the window on
/// `out`, and returns what the queues measured.
pub fn generate(spec: &LoadSpec, out: &mut impl Write) -> Result<LoadResult> {
    if spec.iodepth == 0 || spec.queues == 0 {
        bail!("iodepth and queues must be at least 1");
    }
    let mut blkio = connect(&spec.socket)?;
    let (queues, poll_queues) = match spec.client {
        ClientMode::Interrupt => (spec.queues, 0),
        ClientMode::Poll => (0, spec.queues),
    };
    blkio.set_i32("num-queues", queues.into())?;
    blkio.set_i32("num-poll-queues", poll_queues.into())?;
    // libblkio's default ring (256) holds any depth up to 256; deeper ones need a bigger ring.
    if spec.iodepth > 256 {
        blkio.set_i32("queue-size", spec.iodepth.next_power_of_two() as i32)?;
    }
    let started = blkio.start().context("start the libblkio instance")?;
    let capacity = blkio.get_u64("capacity")?;
    let blocks = spec.size.min(capacity) / BLOCK;
    if blocks == 0 {
        bail!("the disk ({capacity} bytes) is smaller than one block");
    }

    // One shared region (the backend must map it), a private slice of `iodepth` blocks per queue.
    let per_queue = spec.iodepth as usize * BLOCK as usize;
    let align = 2 << 20;
    let total = (per_queue * spec.queues as usize).div_ceil(align) * align;
    let region = blkio.alloc_mem_region(total)?;
    blkio.map_mem_region(&region)?;

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
    Ok(LoadResult {
        ios: hist.count(),
        seconds,
        iops: hist.count() as f64 / seconds,
        mean_us: hist.mean_ns() / 1e3,
        p50_us: hist.quantile_ns(0.5) / 1e3,
        p99_us: hist.quantile_ns(0.99) / 1e3,
        p999_us: hist.quantile_ns(0.999) / 1e3,
        client_cpu_s: cpu_start.seconds_until(&cpu_end),
    })
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

    /// Keeps `depth` requests in flight until the window closes, then drains; returns the
    /// latencies of the completions inside the window.
    fn run(mut self) -> Result<Histogram> {
        let mut hist = Histogram::new();
        let mut submitted = vec![Instant::now(); self.depth];
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..self.depth).map(|_| MaybeUninit::uninit()).collect();
        for (slot, at) in submitted.iter_mut().enumerate() {
            *at = Instant::now();
            self.submit(slot);
        }
        let mut in_flight = self.depth;
        while in_flight > 0 {
            let mut timeout = IO_TIMEOUT;
            let n = self
                .q
                .do_io(&mut completions, 1, Some(&mut timeout), None)
                .with_context(|| format!("do_io with {in_flight} requests in flight"))?;
            let now = Instant::now();
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
                if now < self.t1 {
                    submitted[slot] = Instant::now();
                    self.submit(slot);
                } else {
                    in_flight -= 1;
                }
            }
        }
        Ok(hist)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_and_result_round_trip_through_json() {
        let spec = LoadSpec {
            socket: "/tmp/x.sock".into(),
            rw: Rw::RandRw,
            iodepth: 32,
            queues: 2,
            client: ClientMode::Poll,
            warmup: Duration::from_millis(250),
            duration: Duration::from_secs(3),
            size: 1 << 30,
        };
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
}
