//! A log-linear latency histogram: fixed memory however long the run, ~1.6% resolution.
//!
//! Values below 128 ns have a bucket each; above, each power of two is split into 64 equal
//! buckets (the scheme of HdrHistogram with 6 bits of mantissa). Recording is a leading-zero
//! count and an increment, cheap enough to do for every request on the load generator's hot path.

/// Sub-buckets per power of two.
const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
/// Buckets for 0..2^64 ns.
const BUCKETS: usize = (64 - SUB_BITS as usize) * SUB + SUB;

#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum_ns: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

fn bucket(v: u64) -> usize {
    if v < 2 * SUB as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS + 1
    let shift = e - SUB_BITS;
    ((shift as usize) << SUB_BITS) + (v >> shift) as usize
}

/// The middle of bucket `i`'s value range.
fn value(i: usize) -> f64 {
    if i < 2 * SUB {
        return i as f64;
    }
    let shift = (i >> SUB_BITS) - 1;
    let m = (i & (SUB - 1)) + SUB;
    let low = (m as u64) << shift;
    low as f64 + ((1u64 << shift) as f64 - 1.0) / 2.0
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            sum_ns: 0,
        }
    }

    pub fn record(&mut self, ns: u64) {
        self.counts[bucket(ns)] += 1;
        self.total += 1;
        self.sum_ns += ns as u128;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum_ns += other.sum_ns;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn mean_ns(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.total as f64
        }
    }

    /// The value at quantile `q` (0..=1) in ns: the smallest recorded value with at least
    /// `q * count` values at or below it. 0 when empty.
    pub fn quantile_ns(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return value(i);
            }
        }
        unreachable!("rank {rank} <= total {}", self.total)
    }

    /// The histogram as JSON for the parent process, which merges the VMs of a cell: the
    /// non-empty buckets as `[index, count]` pairs (a run fills a few hundred of the 3776) and
    /// the exact sum.
    pub fn to_json(&self) -> serde_json::Value {
        let buckets: Vec<[u64; 2]> = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| [i as u64, *c])
            .collect();
        serde_json::json!({ "buckets": buckets, "sum_ns": self.sum_ns.to_string() })
    }

    /// The inverse of [`Histogram::to_json`]; `None` if it is not one.
    pub fn from_json(v: &serde_json::Value) -> Option<Histogram> {
        let mut h = Histogram::new();
        for pair in v["buckets"].as_array()? {
            let (i, c) = (pair[0].as_u64()? as usize, pair[1].as_u64()?);
            *h.counts.get_mut(i)? += c;
            h.total += c;
        }
        h.sum_ns = v["sum_ns"].as_str()?.parse().ok()?;
        Some(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut prev = 0;
        for v in (0..1_000_000u64).chain([u64::MAX / 3, u64::MAX]) {
            let b = bucket(v);
            assert!(b >= prev && b < BUCKETS, "bucket({v}) = {b}");
            prev = b;
            let mid = value(b);
            assert!(
                (mid - v as f64).abs() <= (v as f64 / 64.0).max(0.5),
                "value {v} lands in bucket {b} around {mid}"
            );
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::new();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let within = |got: f64, want: f64| (got - want).abs() <= want / 50.0;
        assert!(
            within(h.quantile_ns(0.5), 500_000.0),
            "{}",
            h.quantile_ns(0.5)
        );
        assert!(
            within(h.quantile_ns(0.99), 990_000.0),
            "{}",
            h.quantile_ns(0.99)
        );
        assert!(
            within(h.quantile_ns(0.999), 999_000.0),
            "{}",
            h.quantile_ns(0.999)
        );
        assert!(within(h.mean_ns(), 500_500.0));
        let mut other = Histogram::new();
        other.record(5);
        h.merge(&other);
        assert_eq!(h.count(), 1001);
        assert_eq!(h.quantile_ns(0.0), 5.0);
    }

    #[test]
    fn json_round_trip() {
        let mut h = Histogram::new();
        for v in [3u64, 3, 900, 45_000, 45_100, u64::MAX / 2] {
            h.record(v);
        }
        let back = Histogram::from_json(&h.to_json()).unwrap();
        assert_eq!(back.counts, h.counts);
        assert_eq!((back.total, back.sum_ns), (h.total, h.sum_ns));
        assert!(Histogram::from_json(&serde_json::json!({"buckets": [[99999, 1]]})).is_none());
    }
}
