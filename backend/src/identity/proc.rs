//! Parsers for what /proc says about a process: ids, resource limits, cgroups, mounts. Pure
//! functions over text, so they are tested on fixed input.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// Real, effective, saved and filesystem ids, and supplementary groups (/proc/PID/status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ids {
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
}

pub fn parse_status_ids(status: &str) -> Option<Ids> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| {
                rest.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect::<Vec<u32>>()
            })
    };
    let uid: [u32; 4] = field("Uid:")?.try_into().ok()?;
    let gid: [u32; 4] = field("Gid:")?.try_into().ok()?;
    Some(Ids {
        uid,
        gid,
        groups: field("Groups:")?,
    })
}

/// The start time of a process in clock ticks since boot (field 22 of /proc/PID/stat): with
/// the pid, it names one process for the lifetime of the system.
pub fn parse_stat_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// One resource limit; `None` is unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Limit {
    pub resource: i32,
    pub name: std::borrow::Cow<'static, str>,
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

/// The names /proc/PID/limits uses, and the resource each one is.
const LIMIT_NAMES: [(&str, i32); 16] = [
    ("Max cpu time", libc::RLIMIT_CPU as i32),
    ("Max file size", libc::RLIMIT_FSIZE as i32),
    ("Max data size", libc::RLIMIT_DATA as i32),
    ("Max stack size", libc::RLIMIT_STACK as i32),
    ("Max core file size", libc::RLIMIT_CORE as i32),
    ("Max resident set", libc::RLIMIT_RSS as i32),
    ("Max processes", libc::RLIMIT_NPROC as i32),
    ("Max open files", libc::RLIMIT_NOFILE as i32),
    ("Max locked memory", libc::RLIMIT_MEMLOCK as i32),
    ("Max address space", libc::RLIMIT_AS as i32),
    ("Max file locks", libc::RLIMIT_LOCKS as i32),
    ("Max pending signals", libc::RLIMIT_SIGPENDING as i32),
    ("Max msgqueue size", libc::RLIMIT_MSGQUEUE as i32),
    ("Max nice priority", libc::RLIMIT_NICE as i32),
    ("Max realtime priority", libc::RLIMIT_RTPRIO as i32),
    ("Max realtime timeout", libc::RLIMIT_RTTIME as i32),
];

/// Parses /proc/PID/limits; every limit the kernel knows must be there.
pub fn parse_limits(text: &str) -> Option<Vec<Limit>> {
    let value = |v: &str| {
        if v == "unlimited" {
            Some(None)
        } else {
            v.parse().ok().map(Some)
        }
    };
    LIMIT_NAMES
        .iter()
        .map(|&(name, resource)| {
            let line = text.lines().find(|l| l.starts_with(name))?;
            let mut fields = line[name.len()..].split_whitespace();
            Some(Limit {
                resource,
                name: name.into(),
                soft: value(fields.next()?)?,
                hard: value(fields.next()?)?,
            })
        })
        .collect()
}

/// One line of /proc/PID/cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupMembership {
    /// The v1 controllers (or `name=...`) of the hierarchy; empty for the v2 hierarchy.
    pub controllers: Vec<String>,
    pub path: String,
}

pub fn parse_cgroup(text: &str) -> Vec<CgroupMembership> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some(CgroupMembership {
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(String::from)
                    .collect(),
                path: path.to_string(),
            })
        })
        .collect()
}

/// A mounted cgroup hierarchy (from /proc/self/mountinfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    pub mount_point: PathBuf,
    /// The cgroup path at the mount's root (not "/" inside a cgroup namespace or a bind mount).
    pub root: String,
    /// v1: the controllers or `name=...` in its super options; v2: empty.
    pub controllers: Vec<String>,
    pub v2: bool,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    const V1_OPTIONS: [&str; 4] = ["rw", "ro", "relatime", "noatime"];
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next()?;
            let super_options = right.next().unwrap_or("");
            let (root, mount_point) = (left.get(3)?, left.get(4)?);
            let v2 = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            let controllers = if v2 {
                Vec::new()
            } else {
                super_options
                    .split(',')
                    .filter(|o| {
                        !V1_OPTIONS.contains(o)
                            && !o.starts_with("release_agent")
                            && *o != "clone_children"
                            && *o != "noprefix"
                            && *o != "xattr"
                            && *o != "cpuset_v2_mode"
                            && *o != "nsdelegate"
                            && *o != "memory_recursiveprot"
                            && *o != "favordynmods"
                    })
                    .map(String::from)
                    .collect()
            };
            Some(CgroupMount {
                mount_point: PathBuf::from(unescape(mount_point)),
                root: unescape(root),
                controllers,
                v2,
            })
        })
        .collect()
}

/// Where to write a pid to join `membership`: `<mount>/<path below the mount's root>/cgroup.procs`.
/// `None` when no mounted hierarchy matches (e.g. the VMM's cgroup is outside our namespace).
pub fn cgroup_procs_path(membership: &CgroupMembership, mounts: &[CgroupMount]) -> Option<PathBuf> {
    let mount = mounts.iter().find(|m| {
        if membership.controllers.is_empty() {
            m.v2
        } else {
            !m.v2 && {
                let mut a = m.controllers.clone();
                let mut b = membership.controllers.clone();
                a.sort();
                b.sort();
                a == b
            }
        }
    })?;
    let root = mount.root.trim_end_matches('/');
    // A cgroup outside the mount's root (a container sees only its own subtree) cannot be
    // joined through this mount; nor can `/vmsX` through a mount rooted at `/vms`.
    let below = membership.path.strip_prefix(root)?;
    if !below.is_empty() && !below.starts_with('/') {
        return None;
    }
    let below = below.trim_start_matches('/');
    if Path::new(below)
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return None;
    }
    Some(mount.mount_point.join(below).join("cgroup.procs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_status() {
        let status = "Name:\tqemu\nUid:\t1000\t1001\t1002\t1003\nGid:\t100\t100\t100\t100\nGroups:\t4 24 1000 \n";
        let ids = parse_status_ids(status).unwrap();
        assert_eq!(ids.uid, [1000, 1001, 1002, 1003]);
        assert_eq!(ids.groups, vec![4, 24, 1000]);
        assert!(parse_status_ids("Uid:\t1\n").is_none());
    }

    #[test]
    fn start_time_after_a_name_with_parentheses() {
        let stat = "1234 (qemu (x) 1) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 4 0 987654 1000 50";
        assert_eq!(parse_stat_start_time(stat), Some(987654));
    }

    #[test]
    fn limits_parse_all_sixteen() {
        let text = std::fs::read_to_string("/proc/self/limits").unwrap();
        let limits = parse_limits(&text).unwrap();
        assert_eq!(limits.len(), 16);
        let nofile = limits
            .iter()
            .find(|l| l.resource == libc::RLIMIT_NOFILE as i32)
            .unwrap();
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the local.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
        assert_eq!(nofile.soft, Some(rl.rlim_cur));
        let fixed = "Limit Soft Hard Units\nMax cpu time unlimited unlimited seconds\n";
        assert!(
            parse_limits(fixed).is_none(),
            "missing limits are an error, not a default"
        );
    }

    #[test]
    fn cgroup_paths_on_a_hybrid_host() {
        let mountinfo = "\
30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
31 25 0:27 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu
32 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpuacct,cpu
33 25 0:29 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
34 25 0:30 /vms /mnt/my\\040pids rw - cgroup cgroup rw,pids
35 25 0:31 / /proc rw - proc proc rw";
        let mounts = parse_cgroup_mounts(mountinfo);
        assert_eq!(mounts.len(), 5);
        let cgroup = parse_cgroup("0::/vm1\n4:cpu:/vm1\n5:cpu,cpuacct:/a/b\n6:name=systemd:/user.slice\n7:pids:/vms/vm1\n8:memory:/x\n");
        let paths: Vec<_> = cgroup
            .iter()
            .map(|m| cgroup_procs_path(m, &mounts))
            .collect();
        assert_eq!(
            paths[0].as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified/vm1/cgroup.procs"))
        );
        assert_eq!(
            paths[1].as_deref(),
            Some(Path::new("/sys/fs/cgroup/cpu/vm1/cgroup.procs"))
        );
        assert_eq!(
            paths[2].as_deref(),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct/a/b/cgroup.procs"))
        );
        assert_eq!(
            paths[3].as_deref(),
            Some(Path::new("/sys/fs/cgroup/systemd/user.slice/cgroup.procs"))
        );
        assert_eq!(
            paths[4].as_deref(),
            Some(Path::new("/mnt/my pids/vm1/cgroup.procs"))
        );
        assert_eq!(paths[5], None, "memory is not mounted");
        // Outside the subtree a mount shows (podman's default cgroup mounts): not joinable.
        let outside = parse_cgroup("7:pids:/\n7:pids:/vmsX/vm1\n7:pids:/vms\n");
        let paths: Vec<_> = outside
            .iter()
            .map(|m| cgroup_procs_path(m, &mounts))
            .collect();
        assert_eq!(paths[0], None, "the root above the mount");
        assert_eq!(paths[1], None, "a sibling sharing the mount root's prefix");
        assert_eq!(
            paths[2].as_deref(),
            Some(Path::new("/mnt/my pids/cgroup.procs")),
            "the mount root itself"
        );
    }
}
