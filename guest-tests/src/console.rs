//! Reading the guest's serial console: the steps init printed between markers (see init.sh), and
//! the kernel's complaints.

use std::collections::BTreeMap;

/// The marker init prints at the start of its lines.
pub const MARKER: &str = "@@VUBLK@@";

/// One step the guest ran: what it printed and how it exited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub stdout: String,
    pub stderr: String,
    /// None when the step's RC line never came (the guest died during it).
    pub rc: Option<i32>,
}

/// What the console says.
#[derive(Clone, Debug, Default)]
pub struct Parsed {
    /// Steps by name, in the order they ran.
    pub steps: Vec<(String, Step)>,
    /// Init printed its last line.
    pub done: bool,
    /// Seconds since the guest kernel started, when init started.
    pub booted_at: Option<f64>,
}

impl Parsed {
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }
}

pub fn parse(console: &str) -> Parsed {
    enum In {
        None,
        Out(String),
        Err(String),
    }
    let mut parsed = Parsed::default();
    let mut steps: BTreeMap<String, Step> = BTreeMap::new();
    let mut order = Vec::new();
    let mut state = In::None;
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix(MARKER) {
            let mut f = rest.split_whitespace();
            match (f.next(), f.next(), f.next()) {
                (Some("OUT"), Some(name), _) => {
                    if !steps.contains_key(name) {
                        order.push(name.to_string());
                    }
                    steps.insert(name.to_string(), Step::default());
                    state = In::Out(name.to_string());
                }
                (Some("ERR"), Some(name), _) => state = In::Err(name.to_string()),
                (Some("RC"), Some(name), Some(rc)) => {
                    if let Some(s) = steps.get_mut(name) {
                        s.rc = rc.parse().ok();
                    }
                    state = In::None;
                }
                (Some("BOOTED"), t, _) => parsed.booted_at = t.and_then(|t| t.parse().ok()),
                (Some("DONE"), _, _) => parsed.done = true,
                _ => {}
            }
            continue;
        }
        let (name, is_out) = match &state {
            In::None => continue,
            In::Out(n) => (n, true),
            In::Err(n) => (n, false),
        };
        let step = steps.get_mut(name).expect("step inserted at OUT");
        let buf = if is_out {
            &mut step.stdout
        } else {
            &mut step.stderr
        };
        buf.push_str(line);
        buf.push('\n');
    }
    for s in steps.values_mut() {
        // init prints an extra newline after each stream.
        let trim = |s: &mut String| {
            let t = s.trim_end().len();
            s.truncate(t);
        };
        trim(&mut s.stdout);
        trim(&mut s.stderr);
    }
    parsed.steps = order
        .into_iter()
        .map(|n| {
            let s = steps.remove(&n).unwrap_or_default();
            (n, s)
        })
        .collect();
    parsed
}

/// Kernel log lines that mean something went wrong with I/O or the kernel itself.
const KERNEL_ERRORS: &[&str] = &[
    "I/O error",
    "blk_update_request",
    "critical medium error",
    "critical target error",
    "virtio_blk",
    "Buffer I/O",
    "BUG:",
    "Oops",
    "Call Trace",
    "WARNING:",
    "Kernel panic",
    "blocked for more than",
    "timed out",
    "segfault",
];

/// Lines of `log` (dmesg or the console) that match [`KERNEL_ERRORS`], except those containing
/// any of `allowed`. virtio_blk lines that merely announce a disk are fine.
pub fn kernel_errors(log: &str, allowed: &[&str]) -> Vec<String> {
    log.lines()
        .filter(|l| !l.starts_with(MARKER))
        .filter(|l| KERNEL_ERRORS.iter().any(|e| l.contains(e)))
        .filter(|l| !(l.contains("virtio_blk") && is_disk_announcement(l)))
        .filter(|l| !allowed.iter().any(|a| l.contains(a)))
        .map(|l| l.trim_end().to_string())
        .collect()
}

/// "virtio_blk virtio1: \[vda\] 131072 512-byte logical blocks (67.1 MB/64.0 MiB)" and the like.
fn is_disk_announcement(line: &str) -> bool {
    ["logical blocks", "queues", "write cache", "[vd"]
        .iter()
        .any(|s| line.contains(s))
        && !line.contains("error")
        && !line.contains("fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_split_and_kernel_noise_outside_steps_ignored() {
        let console = "\
[    1.0] some kernel line\r
@@VUBLK@@ BOOTED 1.52\r
@@VUBLK@@ OUT modules\r
\r
@@VUBLK@@ ERR modules\r
\r
@@VUBLK@@ RC modules 0\r
@@VUBLK@@ OUT fio\r
{\"a\": 1}\r
\r
@@VUBLK@@ ERR fio\r
fio: something\r
\r
@@VUBLK@@ RC fio 1\r
@@VUBLK@@ OUT dmesg\r
half";
        let p = parse(console);
        assert!(!p.done);
        assert_eq!(p.booted_at, Some(1.52));
        assert_eq!(p.step("modules").unwrap().rc, Some(0));
        let fio = p.step("fio").unwrap();
        assert_eq!(fio.stdout, "{\"a\": 1}");
        assert_eq!(fio.stderr, "fio: something");
        assert_eq!(fio.rc, Some(1));
        let dmesg = p.step("dmesg").unwrap();
        assert_eq!(dmesg.stdout, "half");
        assert_eq!(dmesg.rc, None, "a step cut short has no exit code");
    }

    #[test]
    fn io_errors_are_found_and_disk_announcements_are_not() {
        let log = "\
[    1.1] virtio_blk virtio1: [vda] 131072 512-byte logical blocks (67.1 MB/64.0 MiB)
[    1.2] virtio_blk virtio1: 2/0/0 default/read/poll queues
[    2.0] I/O error, dev vda, sector 8 op 0x1:(WRITE) flags 0x8800 phys_seg 1 prio class 2
[    2.1] Buffer I/O error on dev vda, logical block 1, lost async page write";
        let errs = kernel_errors(log, &[]);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(kernel_errors(log, &["dev vda"]).is_empty());
    }
}
