//! vublk-bench: vublk and qemu-storage-daemon side by side under the same load (issue 7).
//!
//! Every measurement is one backend process serving one medium, driven by one load generator
//! process (libblkio's `virtio-blk-vhost-user` driver, 4 KiB random I/O at a fixed iodepth per
//! queue) for a warm-up and then a measured window. The systems alternate (A B A B ...) within
//! each cell of the matrix, and each cell's figures are the medians of its repetitions.
//!
//! Three references have no vhost-user in between: `io_uring`, where the load generator opens
//! the image itself with libblkio's `io_uring` driver, `fio` (the disk's own limit, on the disk
//! medium), fio's io_uring engine with O_DIRECT, and `rbd-bench` (what the cluster gives a
//! librbd client, on the rbd medium), Ceph's `rbd bench`. There is no backend process and the
//! client's own CPU is the whole cost.
//!
//! A cell may have several VMs (`--vms`): as many load generator processes, each a VM with an
//! export (and image) of its own on one daemon, measured over a common window; the cell reports
//! their total IOPS and how evenly they were served (Jain's index over the per-VM IOPS).
//!
//! ```text
//! media.rs    the backing: filled images on tmpfs, filled images on the real disk (O_DIRECT), null
//!             or filled RBD images on a throwaway one-node Ceph cluster
//! systems.rs  the system under test: vublk (supervisor + a worker per VM, or --single-process)
//!             or qemu-storage-daemon as a child process serving an export per VM, or a
//!             reference without a backend (io_uring, fio, rbd-bench)
//! load.rs     the load generator (runs in its own process, one per VM), closed loop or paced
//!             at a fixed rate, and the parent's side of it
//! fio.rs      the fio reference: its job file, the run, its JSON report
//! rbd_bench.rs  the rbd-bench reference: librbd's `rbd bench` on the rbd medium, its progress
//! histogram.rs  per-request latencies in fixed memory, for p50/p99/p99.9
//! cpu.rs      CPU seconds of the backend's process tree over the measured window, from /proc
//! report.rs   medians, the Markdown tables with the ratios to QSD and io_uring, the JSON document
//! svg.rs      the chart: median IOPS and CPU per I/O per cell, a bar per system
//! ```
//!
//! The binary (`src/main.rs`) holds the command line and the loop over the matrix. Backends
//! run on the tests' process harness and the media are filled with their data pattern
//! (`vublk-test-support`).

pub mod cpu;
pub mod fio;
pub mod histogram;
pub mod load;
pub mod media;
pub mod rbd_bench;
pub mod report;
pub mod svg;
pub mod systems;

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Error};

/// Bytes per request: every request of the benchmark is one 4 KiB block.
pub const BLOCK: u64 = 4096;

/// The request mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rw {
    RandRead,
    RandWrite,
    /// Half reads, half writes, chosen per request.
    RandRw,
}

impl Rw {
    pub fn name(self) -> &'static str {
        match self {
            Rw::RandRead => "randread",
            Rw::RandWrite => "randwrite",
            Rw::RandRw => "randrw",
        }
    }
}

impl FromStr for Rw {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "randread" => Rw::RandRead,
            "randwrite" => Rw::RandWrite,
            "randrw" => Rw::RandRw,
            _ => bail!("unknown rw {s:?} (randread, randwrite, randrw)"),
        })
    }
}

impl fmt::Display for Rw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the load generator waits for completions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientMode {
    /// libblkio queues with a completion fd: the backend signals (the call eventfd), the client
    /// sleeps in ppoll(2). What a guest with interrupts sees.
    Interrupt,
    /// libblkio poll queues: the client busy-polls the used ring and the backend's call is
    /// suppressed. What a polling guest driver (or SPDK-style client) sees.
    Poll,
}

impl ClientMode {
    pub fn name(self) -> &'static str {
        match self {
            ClientMode::Interrupt => "interrupt",
            ClientMode::Poll => "poll",
        }
    }
}

impl FromStr for ClientMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "interrupt" | "irq" => ClientMode::Interrupt,
            "poll" | "polled" => ClientMode::Poll,
            _ => bail!("unknown client mode {s:?} (interrupt, poll)"),
        })
    }
}

impl fmt::Display for ClientMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How fast the load generator issues requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rate {
    /// Closed loop: every completion is resubmitted at once, `iodepth` always in flight.
    Max,
    /// Paced: this many requests per second in total over all queues (each queue gets an equal
    /// share), never more than `iodepth` in flight per queue. Every system then does the same
    /// work, so their CPU per I/O compares at equal load.
    Iops(u32),
}

impl Rate {
    pub fn iops(self) -> Option<u32> {
        match self {
            Rate::Max => None,
            Rate::Iops(n) => Some(n),
        }
    }
}

impl FromStr for Rate {
    type Err = Error;
    /// `max`, or IOPS as a number with an optional `k` (thousands) or `M` (millions) suffix.
    fn from_str(s: &str) -> Result<Self, Error> {
        if s == "max" {
            return Ok(Rate::Max);
        }
        let (digits, unit) = match s.strip_suffix(['k', 'K']) {
            Some(d) => (d, 1e3),
            None => match s.strip_suffix('M') {
                Some(d) => (d, 1e6),
                None => (s, 1.0),
            },
        };
        let n = digits
            .parse::<f64>()
            .ok()
            .map(|x| (x * unit).round())
            .filter(|x| *x >= 1.0 && *x <= f64::from(u32::MAX));
        match n {
            Some(n) => Ok(Rate::Iops(n as u32)),
            None => bail!("bad rate {s:?} (max, or IOPS such as 20000 or 20k)"),
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::Max => f.write_str("max"),
            Rate::Iops(n) => write!(f, "{n}"),
        }
    }
}

/// One cell of the matrix: everything about a measurement except the system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cell {
    pub medium: media::Medium,
    pub rw: Rw,
    /// Per queue of each VM.
    pub iodepth: u32,
    /// Per VM.
    pub queues: u16,
    pub client: ClientMode,
    /// Over all VMs and queues.
    pub rate: Rate,
    /// VMs on the one backend: load generator processes, each with an export of its own.
    pub vms: u16,
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} iodepth {} queues {} {}",
            self.medium, self.rw, self.iodepth, self.queues, self.client
        )?;
        if self.vms > 1 {
            write!(f, " {} VMs", self.vms)?;
        }
        if let Rate::Iops(n) = self.rate {
            write!(f, " at {n} IOPS")?;
        }
        Ok(())
    }
}

/// Jain's fairness index of `values` (per-VM IOPS): (Σx)² ÷ (n·Σx²), 1 when all are equal, 1/n
/// when one gets everything. NaN for fewer than two values (nothing to share) or all zero.
pub fn jain(values: &[f64]) -> f64 {
    if values.len() < 2 {
        return f64::NAN;
    }
    let sum: f64 = values.iter().sum();
    let squares: f64 = values.iter().map(|x| x * x).sum();
    if squares == 0.0 {
        return f64::NAN;
    }
    sum * sum / (values.len() as f64 * squares)
}

/// The median of `values` (the mean of the two middle ones for an even count); 0 when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn names_round_trip() {
        for rw in [Rw::RandRead, Rw::RandWrite, Rw::RandRw] {
            assert_eq!(rw.name().parse::<Rw>().unwrap(), rw);
        }
        for m in [ClientMode::Interrupt, ClientMode::Poll] {
            assert_eq!(m.name().parse::<ClientMode>().unwrap(), m);
        }
        assert!("seqread".parse::<Rw>().is_err());
    }

    #[test]
    fn jain_index() {
        assert_eq!(jain(&[5.0, 5.0, 5.0, 5.0]), 1.0);
        assert!((jain(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
        // Two VMs, one with twice the other's IOPS: 9 / (2 × 5) = 0.9.
        assert!((jain(&[2.0, 1.0]) - 0.9).abs() < 1e-12);
        assert!(jain(&[7.0]).is_nan());
        assert!(jain(&[0.0, 0.0]).is_nan());
    }

    #[test]
    fn rates_parse() {
        assert_eq!("max".parse::<Rate>().unwrap(), Rate::Max);
        assert_eq!("20000".parse::<Rate>().unwrap(), Rate::Iops(20000));
        assert_eq!("20k".parse::<Rate>().unwrap(), Rate::Iops(20000));
        assert_eq!("1.5M".parse::<Rate>().unwrap(), Rate::Iops(1_500_000));
        assert_eq!(
            Rate::Iops(20000).to_string().parse::<Rate>().unwrap(),
            Rate::Iops(20000)
        );
        for bad in ["0", "-5", "fast", "", "1e12"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?}");
        }
    }
}
