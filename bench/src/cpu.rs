//! CPU time of a process tree, from /proc/PID/stat.
//!
//! A backend is its whole process tree: vublk's supervisor and the per-VM worker it forks, or
//! QSD with its threads. A process's `utime + stime` counts all its threads; `cutime + cstime`
//! counts the children it has reaped. A snapshot records both for the root and every descendant;
//! the CPU spent between two snapshots is the sum of the differences, plus the whole total of
//! processes that appeared in between. Processes that exit between the snapshots lose the time
//! after the first one unless their parent reaps them first (the benchmark's backends keep their
//! workers for the whole measured window, so this does not arise).
//!
//! Resolution is one clock tick (10 ms with the usual USER_HZ of 100). What matters is the tick
//! against the CPU measured, not against the window: a backend busy for a few seconds is
//! measured to well under 1%, but one paced at 2k IOPS for 4 s uses about 0.16 s, and a tick
//! is 6% of that. Paced runs at low rates want a longer `--duration`.
//!
//! [`Steal`] is the machine's side: the share of its CPU time the hypervisor gave to someone
//! else (the `steal` column of /proc/stat). On a shared host it comes in spells of 10-40% that
//! last tens of seconds, and a run inside one measures the host, not the backend.

use std::collections::HashMap;

/// CPU ticks of each process of a tree at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    ticks: HashMap<u32, u64>,
}

/// Fields 14-17 of /proc/PID/stat (utime, stime, cutime, cstime) summed, and field 4 (ppid).
fn read_stat(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; the fields after it start
    // after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so field N is fields[N - 3].
    let ppid = fields.get(1)?.parse().ok()?;
    let mut ticks = 0u64;
    for f in &fields[11..15] {
        ticks += f.parse::<i64>().ok()?.max(0) as u64;
    }
    Some((ppid, ticks))
}

/// `root` and all its descendants.
pub fn tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some((ppid, _)) = read_stat(pid) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c);
        }
        i += 1;
    }
    out
}

impl Snapshot {
    /// The CPU ticks of `root` and every descendant now.
    pub fn take(root: u32) -> Snapshot {
        let ticks = tree(root)
            .into_iter()
            .filter_map(|pid| Some((pid, read_stat(pid)?.1)))
            .collect();
        Snapshot { ticks }
    }

    /// CPU seconds the tree spent from `self` to `later`.
    pub fn seconds_until(&self, later: &Snapshot) -> f64 {
        let ticks: u64 = later
            .ticks
            .iter()
            .map(|(pid, t)| t.saturating_sub(self.ticks.get(pid).copied().unwrap_or(0)))
            .sum();
        ticks as f64 / clock_ticks_per_second()
    }

    /// How many processes the tree had.
    pub fn processes(&self) -> usize {
        self.ticks.len()
    }
}

/// The machine's CPU ticks at one moment, all CPUs together: the total and the stolen part.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Steal {
    total: u64,
    stolen: u64,
}

impl Steal {
    /// Now, from the first line of /proc/stat (zeros if it cannot be read).
    pub fn take() -> Steal {
        std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| Steal::parse(stat.lines().next()?))
            .unwrap_or_default()
    }

    /// `cpu  user nice system idle iowait irq softirq steal guest guest_nice`: guest time is
    /// already in user and nice, so the total is the first eight.
    fn parse(line: &str) -> Option<Steal> {
        let mut fields = line.split_whitespace();
        if fields.next()? != "cpu" {
            return None;
        }
        let ticks: Vec<u64> = fields
            .take(8)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        Some(Steal {
            total: ticks.iter().sum(),
            stolen: *ticks.get(7)?,
        })
    }

    /// The share of the machine's CPU time stolen from `self` to `later` (0 to 1; 0 when no
    /// time passed or /proc/stat was unreadable).
    pub fn share_until(&self, later: &Steal) -> f64 {
        let total = later.total.saturating_sub(self.total);
        if total == 0 {
            0.0
        } else {
            later.stolen.saturating_sub(self.stolen) as f64 / total as f64
        }
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf(3) only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_the_eighth_column_of_the_cpu_line() {
        let before = Steal::parse("cpu  100 0 50 800 20 0 5 25 0 0").unwrap();
        let after = Steal::parse("cpu  200 0 100 1500 20 0 5 175 10 0").unwrap();
        assert_eq!(
            before,
            Steal {
                total: 1000,
                stolen: 25
            }
        );
        assert_eq!(before.share_until(&after), 150.0 / 1000.0);
        assert_eq!(after.share_until(&after), 0.0);
        assert_eq!(Steal::parse("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(Steal::parse("cpu 1 2 3"), None);
        let now = Steal::take();
        assert!(now.total > 0, "/proc/stat has a cpu line");
    }

    #[test]
    fn a_busy_child_is_counted() {
        let me = std::process::id();
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        assert!(tree(me).contains(&child.id()), "the child is in the tree");
        let before = Snapshot::take(me);
        std::thread::sleep(std::time::Duration::from_millis(500));
        let after = Snapshot::take(me);
        child.kill().unwrap();
        child.wait().unwrap();
        // The child spins on a core for 0.5 s; even on a loaded machine it gets a good part.
        let spent = before.seconds_until(&after);
        assert!(
            spent >= 0.1,
            "only {spent} s of CPU seen for a spinning child"
        );
        assert!(after.processes() >= 2);
    }
}
