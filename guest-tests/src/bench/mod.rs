//! vublk-bench: vublk and qemu-storage-daemon side by side under the same load (issue 7).
//!
//! Every measurement is one backend process serving one medium, driven by one load generator
//! process (libblkio's `virtio-blk-vhost-user` driver, 4 KiB random I/O at a fixed iodepth per
//! queue) for a warm-up and then a measured window. The systems alternate (A B A B ...) within
//! each cell of the matrix, and each cell's figures are the medians of its repetitions.
//!
//! ```text
//! media.rs    the backing: a filled image on tmpfs, a filled image on the real disk (O_DIRECT), null
//! systems.rs  the backend under test as a child process: vublk (supervisor + worker, or
//!             --single-process) or qemu-storage-daemon, serving one socket
//! load.rs     the load generator (runs in its own process) and the parent's side of it
//! histogram.rs  per-request latencies in fixed memory, for p50/p99/p99.9
//! cpu.rs      CPU seconds of the backend's process tree over the measured window, from /proc
//! report.rs   medians, the Markdown table with the vublk/QSD ratios, the JSON document
//! ```
//!
//! The binary (`src/bin/vublk-bench.rs`) holds the command line and the loop over the matrix.

pub mod cpu;
pub mod histogram;
pub mod load;
pub mod media;
pub mod report;
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

/// One cell of the matrix: everything about a measurement except the system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cell {
    pub medium: media::Medium,
    pub rw: Rw,
    pub iodepth: u32,
    pub queues: u16,
    pub client: ClientMode,
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} iodepth {} queues {} {}",
            self.medium, self.rw, self.iodepth, self.queues, self.client
        )
    }
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
}
