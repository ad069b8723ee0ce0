//! What the supervisor allows each tenant, and how it keeps a tenant from costing anyone else:
//! limits on connections per VMM and VMs per uid, a backoff for VMMs whose workers fail to
//! start, and a log budget per uid for every line a tenant can provoke.
//!
//! Pure bookkeeping with injected clocks, so it is tested without processes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::ratelimit::RateLimit;

/// Per-tenant limits (`--max-connections-per-vmm`, `--max-vms-per-uid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantLimits {
    /// Connections one VMM (pid and start time) may have open at once, served or waiting.
    pub connections_per_vmm: usize,
    /// VMs (workers) one uid may have at once.
    pub vms_per_uid: usize,
}

impl Default for TenantLimits {
    fn default() -> TenantLimits {
        TenantLimits {
            connections_per_vmm: DEFAULT_CONNECTIONS_PER_VMM,
            vms_per_uid: DEFAULT_VMS_PER_UID,
        }
    }
}

/// A VM has one connection per vhost-user device; 64 disks is far more than a VMM attaches.
pub const DEFAULT_CONNECTIONS_PER_VMM: usize = 64;
/// libvirt runs every VM of a host as one uid (`qemu`), so this must be generous.
pub const DEFAULT_VMS_PER_UID: usize = 1024;

/// The wait after a second failure in a row (the first is retried at once); it doubles with
/// each further failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// After this many failed starts in a row, the VMM's connections are closed for [`GIVE_UP`].
pub const MAX_FAILED_STARTS: u32 = 5;
/// How long a VMM whose workers keep failing is refused before one more try.
pub const GIVE_UP: Duration = Duration::from_secs(60);
/// A failure this long after the previous one starts a new count.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Most VMMs remembered; past it the ones that failed longest ago are forgotten.
const MAX_REMEMBERED: usize = 4096;

/// Whether a VMM may have a worker started now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Start,
    /// Backing off after a failure: refuse until then.
    Wait(Instant),
    /// Too many failures: refuse until then.
    GivenUp(Instant),
}

/// Failed starts of one VMM.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

impl Failures {
    fn verdict(&self, now: Instant) -> Verdict {
        let (until, given_up) = if self.count >= MAX_FAILED_STARTS {
            (self.last + GIVE_UP, true)
        } else {
            // The first failure is retried at once: a VMM whose worker crashed reconnects
            // straight away, and must be served.
            let wait = match self.count {
                0 | 1 => Duration::ZERO,
                n => FIRST_BACKOFF * 2u32.pow(n - 2),
            };
            (self.last + wait, false)
        };
        match (now < until, given_up) {
            (false, _) => Verdict::Start,
            (true, false) => Verdict::Wait(until),
            (true, true) => Verdict::GivenUp(until),
        }
    }
}

/// Failed worker starts per VMM (pid, start time), with exponential backoff.
#[derive(Default)]
pub struct StartBackoff {
    vmms: HashMap<(i32, u64), Failures>,
}

impl StartBackoff {
    pub fn check(&self, vmm: (i32, u64), now: Instant) -> Verdict {
        self.vmms
            .get(&vmm)
            .map_or(Verdict::Start, |f| f.verdict(now))
    }

    /// Forgets VMM `vmm`'s failures (its worker ran long enough to count as a success).
    pub fn forget(&mut self, vmm: (i32, u64)) {
        self.vmms.remove(&vmm);
    }

    /// Records a failed start; returns the count in a row and what follows.
    pub fn failed(&mut self, vmm: (i32, u64), now: Instant) -> (u32, Verdict) {
        if self.vmms.len() >= MAX_REMEMBERED && !self.vmms.contains_key(&vmm) {
            self.vmms
                .retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
            if self.vmms.len() >= MAX_REMEMBERED {
                // Still full: forget the oldest.
                if let Some(oldest) = self
                    .vmms
                    .iter()
                    .min_by_key(|(_, f)| f.last)
                    .map(|(k, _)| *k)
                {
                    self.vmms.remove(&oldest);
                }
            }
        }
        let failures = self.vmms.entry(vmm).or_insert(Failures {
            count: 0,
            last: now,
        });
        if failures.count > 0 && now.duration_since(failures.last) >= FORGET_AFTER {
            failures.count = 0;
        }
        failures.count += 1;
        failures.last = now;
        (failures.count, failures.verdict(now))
    }
}

/// A log budget per uid and kind of line ("connection-cap", "handed-over", ...): a burst of
/// lines, then one line saying how many were left out. Each kind has its own budget, so one
/// reason to refuse a tenant (or its routine lines) cannot hide another.
#[derive(Default)]
pub struct TenantLog {
    per_uid: HashMap<(u32, &'static str), RateLimit>,
}

/// Lines a uid may cause per [`LOG_INTERVAL`] before they are counted instead of written.
const LOG_BURST: u32 = 5;
/// The same for the lines its workers write on their stderr (`worker-log`): they say what each
/// worker serves, so there are more of them.
const WORKER_LOG_BURST: u32 = 50;
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Most (uid, kind) budgets tracked at once (uids are few; a user namespace's unmapped ids are
/// one uid).
const MAX_UIDS: usize = 16384;

impl TenantLog {
    /// Whether a line of `kind` caused by `uid` may be written now: `Some(n)` with the number
    /// of lines of its kind left out since the last one written, `None` to leave this one out.
    pub fn admit(&mut self, uid: u32, kind: &'static str, now: Instant) -> Option<u64> {
        let key = (uid, kind);
        if self.per_uid.len() >= MAX_UIDS && !self.per_uid.contains_key(&key) {
            // Forget the budgets with nothing to remember; if none, the new key shares the
            // first one's (a flood of uids cannot reset everyone's budget).
            self.per_uid.retain(|_, limit| !limit.idle(now));
            if self.per_uid.len() >= MAX_UIDS {
                let shared = *self.per_uid.keys().next().expect("full");
                return self.per_uid.get_mut(&shared).expect("exists").check(now);
            }
        }
        self.per_uid
            .entry(key)
            .or_insert_with(|| {
                let burst = if kind == "worker-log" {
                    WORKER_LOG_BURST
                } else {
                    LOG_BURST
                };
                RateLimit::new(burst, LOG_INTERVAL)
            })
            .check(now)
    }
}

/// " (N similar lines from uid U left out)" after a line, when lines were left out.
pub fn left_out(suppressed: u64, uid: u32) -> String {
    if suppressed == 0 {
        String::new()
    } else {
        format!(" ({suppressed} earlier line(s) like it caused by uid {uid} left out)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMM: (i32, u64) = (100, 5);

    #[test]
    fn backoff_doubles_then_gives_up_then_tries_once_more() {
        let mut b = StartBackoff::default();
        let t0 = Instant::now();
        assert_eq!(b.check(VMM, t0), Verdict::Start);
        let ms = Duration::from_millis;
        // The first failure is retried at once (a crashed worker's VMM reconnects at once).
        assert_eq!(b.failed(VMM, t0), (1, Verdict::Start));
        assert_eq!(b.failed(VMM, t0), (2, Verdict::Wait(t0 + ms(250))));
        assert_eq!(b.check(VMM, t0 + ms(249)), Verdict::Wait(t0 + ms(250)));
        assert_eq!(b.check(VMM, t0 + ms(250)), Verdict::Start);
        let t1 = t0 + ms(300);
        assert_eq!(b.failed(VMM, t1), (3, Verdict::Wait(t1 + ms(500))));
        let t2 = t1 + ms(600);
        assert_eq!(b.failed(VMM, t2), (4, Verdict::Wait(t2 + ms(1000))));
        let t3 = t2 + ms(1100);
        assert_eq!(b.failed(VMM, t3), (5, Verdict::GivenUp(t3 + GIVE_UP)));
        assert_eq!(
            b.check(VMM, t3 + ms(59_999)),
            Verdict::GivenUp(t3 + GIVE_UP)
        );
        // One more try after the pause; failing again gives up again at once.
        assert_eq!(b.check(VMM, t3 + GIVE_UP), Verdict::Start);
        let t4 = t3 + GIVE_UP + ms(1);
        assert_eq!(b.failed(VMM, t4), (6, Verdict::GivenUp(t4 + GIVE_UP)));
        // Other VMMs are not affected.
        assert_eq!(b.check((100, 6), t4), Verdict::Start);
        // A worker that ran long enough wipes the slate.
        b.forget(VMM);
        assert_eq!(b.failed(VMM, t4), (1, Verdict::Start));
    }

    #[test]
    fn a_failure_long_after_the_last_starts_a_new_count() {
        let mut b = StartBackoff::default();
        let t0 = Instant::now();
        b.failed(VMM, t0);
        b.failed(VMM, t0 + Duration::from_secs(1));
        let later = t0 + Duration::from_secs(1) + FORGET_AFTER;
        assert_eq!(b.failed(VMM, later).0, 1);
    }

    #[test]
    fn remembers_a_bounded_number_of_vmms() {
        let mut b = StartBackoff::default();
        let t0 = Instant::now();
        for pid in 0..(MAX_REMEMBERED as i32 + 10) {
            b.failed((pid, 1), t0 + Duration::from_micros(pid as u64));
        }
        assert!(b.vmms.len() <= MAX_REMEMBERED);
        // The newest is remembered, the oldest forgotten.
        assert_ne!(b.check((MAX_REMEMBERED as i32 + 9, 1), t0), Verdict::Start);
        assert_eq!(b.check((0, 1), t0), Verdict::Start);
    }

    #[test]
    fn each_uid_and_kind_of_line_has_its_own_log_budget() {
        let mut log = TenantLog::default();
        let t0 = Instant::now();
        for _ in 0..LOG_BURST {
            assert_eq!(log.admit(1000, "handed-over", t0), Some(0));
        }
        assert_eq!(log.admit(1000, "handed-over", t0), None);
        assert_eq!(log.admit(1000, "handed-over", t0), None);
        assert_eq!(
            log.admit(1000, "connection-cap", t0),
            Some(0),
            "routine lines do not use up another kind's budget"
        );
        assert_eq!(
            log.admit(2000, "handed-over", t0),
            Some(0),
            "another uid's lines are not held back"
        );
        assert_eq!(log.admit(1000, "handed-over", t0 + LOG_INTERVAL), Some(2));
        assert_eq!(
            left_out(2, 1000),
            " (2 earlier line(s) like it caused by uid 1000 left out)"
        );
        assert_eq!(left_out(0, 1000), "");
    }
}
