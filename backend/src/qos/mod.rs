//! Quality of service per export: limits on the operations and bytes per second a device
//! serves (`iops-limit=`, `bps-limit=`, `iops-burst=`, `bps-burst=`), after QEMU's throttling
//! (its docs/throttle.txt): leaky buckets that drain at the average rate, a burst rate allowed
//! for about a second, and no request refused for being larger than a bucket.
//!
//! | File | Job |
//! |---|---|
//! | `mod.rs` | [`QosLimits`]: the four numbers, how they are written and which combinations are valid |
//! | `bucket.rs` | [`Buckets`]: the leaky-bucket arithmetic, on a clock the caller passes in |
//! | `throttle.rs` | [`Throttle`]: a device's buckets, shared by its queue threads, changeable at run time |

mod bucket;
mod throttle;

use serde::{Deserialize, Serialize};

pub use bucket::Buckets;
pub use throttle::{Quota, Throttle};

/// The largest rate accepted (QEMU's `THROTTLE_VALUE_MAX`): far beyond any device, and small
/// enough that the bucket arithmetic stays exact in an `f64`.
pub const MAX_RATE: u64 = 1_000_000_000_000_000;

/// An export's limits; 0 means none. `*_burst` is a rate above `*_limit` allowed for a while
/// (QEMU's `*-max` with `*-max-length=1`), and needs its limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QosLimits {
    /// Requests per second.
    pub iops_limit: u64,
    pub iops_burst: u64,
    /// Bytes read or written per second.
    pub bps_limit: u64,
    pub bps_burst: u64,
}

/// How a key's value is read.
type Parser = fn(&str) -> Result<u64, String>;

/// The keys, as `--export` and `vublk export set` spell them.
pub const KEYS: [&str; 4] = ["iops-limit", "iops-burst", "bps-limit", "bps-burst"];

impl QosLimits {
    /// No limit at all: the queue loop does not look at the throttle.
    pub fn is_unlimited(&self) -> bool {
        self.iops_limit == 0 && self.bps_limit == 0
    }

    /// Checks a combination: a burst needs its limit and is not below it.
    pub fn check(&self) -> Result<(), String> {
        for (name, limit, burst) in [
            ("iops", self.iops_limit, self.iops_burst),
            ("bps", self.bps_limit, self.bps_burst),
        ] {
            if burst != 0 && limit == 0 {
                return Err(format!(
                    "{name}-burst={burst} needs {name}-limit= (to remove both: \
                     {name}-limit=none,{name}-burst=none)"
                ));
            }
            if burst != 0 && burst < limit {
                return Err(format!(
                    "{name}-burst={burst} is below {name}-limit={limit}: a burst is a higher rate"
                ));
            }
        }
        Ok(())
    }

    /// Sets one key (of [`KEYS`]) from its text; `none` or 0 removes it. The combination is
    /// not checked: see [`QosLimits::check`].
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let (field, parse): (&mut u64, Parser) = match key {
            "iops-limit" => (&mut self.iops_limit, parse_iops),
            "iops-burst" => (&mut self.iops_burst, parse_iops),
            "bps-limit" => (&mut self.bps_limit, parse_bps),
            "bps-burst" => (&mut self.bps_burst, parse_bps),
            _ => {
                return Err(format!(
                    "unknown QoS key '{key}' (one of {})",
                    KEYS.join(", ")
                ))
            }
        };
        *field = parse(value).map_err(|e| format!("{key}: {e}"))?;
        Ok(())
    }

    /// These limits with `changes` applied: `KEY=VALUE` items separated by `,` or spaces. The
    /// keys not named keep their values; the result is checked. `Err` leaves `self` as it was.
    pub fn with_changes(&self, changes: &str) -> Result<QosLimits, String> {
        let mut next = *self;
        let mut any = false;
        for item in changes
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|i| !i.is_empty())
        {
            let Some((key, value)) = item.split_once('=') else {
                return Err(format!("'{item}' is not KEY=VALUE"));
            };
            next.set(key, value)?;
            any = true;
        }
        if !any {
            return Err(format!("nothing to set (give {}=N)", KEYS.join("=N, ")));
        }
        next.check()?;
        Ok(next)
    }

    /// `iops-limit=1000,bps-limit=...` with only the keys set, or `none`.
    pub fn describe(&self) -> String {
        let set: Vec<String> = [
            ("iops-limit", self.iops_limit),
            ("iops-burst", self.iops_burst),
            ("bps-limit", self.bps_limit),
            ("bps-burst", self.bps_burst),
        ]
        .iter()
        .filter(|(_, v)| *v != 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
        if set.is_empty() {
            "none".into()
        } else {
            set.join(",")
        }
    }
}

/// Requests per second: a number, or `none`.
pub fn parse_iops(s: &str) -> Result<u64, String> {
    if s == "none" {
        return Ok(0);
    }
    let n: u64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of requests per second (or none)"))?;
    in_range(n)
}

/// Bytes per second: a size (suffixes K, M, G, T, powers of 1024), or `none`.
pub fn parse_bps(s: &str) -> Result<u64, String> {
    if s == "none" {
        return Ok(0);
    }
    let n = crate::cli::parse_size(s)
        .map_err(|e| format!("{e} (bytes per second, suffixes K, M, G, T; or none)"))?;
    in_range(n)
}

fn in_range(n: u64) -> Result<u64, String> {
    if n > MAX_RATE {
        return Err(format!("{n} is above the largest rate, {MAX_RATE}"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_and_bad_ones_say_why() {
        assert_eq!(parse_iops("1000"), Ok(1000));
        assert_eq!(parse_iops("none"), Ok(0));
        assert_eq!(parse_iops("0"), Ok(0));
        assert_eq!(parse_bps("10M"), Ok(10 << 20));
        assert_eq!(parse_bps("4096"), Ok(4096));
        assert!(parse_iops("1k").unwrap_err().contains("not a number"));
        assert!(parse_iops("-5").is_err());
        assert!(parse_iops("").is_err());
        assert!(parse_bps("fast").is_err());
        assert!(parse_bps("2000000T").unwrap_err().contains("largest rate"));
        assert!(parse_iops("1000000000000001")
            .unwrap_err()
            .contains("largest rate"));
    }

    #[test]
    fn changes_apply_to_the_keys_named_and_are_checked_whole() {
        let base = QosLimits {
            iops_limit: 100,
            iops_burst: 200,
            ..Default::default()
        };
        let next = base.with_changes("bps-limit=1M iops-limit=150").unwrap();
        assert_eq!(
            next,
            QosLimits {
                iops_limit: 150,
                iops_burst: 200,
                bps_limit: 1 << 20,
                bps_burst: 0
            }
        );
        assert_eq!(
            next.describe(),
            "iops-limit=150,iops-burst=200,bps-limit=1048576"
        );
        assert!(base
            .with_changes("iops-limit=none,iops-burst=0")
            .unwrap()
            .is_unlimited());
        for (bad, why) in [
            ("iops-limit=none", "needs iops-limit="),
            ("iops-limit=300", "below iops-limit=300"),
            ("bps-burst=1M", "needs bps-limit="),
            ("iops-limt=5", "unknown QoS key 'iops-limt'"),
            ("iops-limit", "not KEY=VALUE"),
            ("iops-limit=many", "iops-limit: 'many' is not a number"),
            ("", "nothing to set"),
        ] {
            let err = base.with_changes(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert_eq!(QosLimits::default().describe(), "none");
    }
}
