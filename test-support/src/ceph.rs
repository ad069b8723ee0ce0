//! A throwaway Ceph cluster for the tests of the RBD backing: `scripts/ceph-dev.sh` started once
//! per process (the first [`cluster`] call) in a directory of the caller's choosing, and killed
//! when the process exits. `None` when Ceph is not installed, so a test can skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// A running cluster: its directory holds `ceph.conf` and the keyring.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub dir: PathBuf,
}

/// What [`cluster`] says when Ceph is missing.
pub const NOT_INSTALLED: &str = "Ceph is not installed (ceph-mon, ceph-mgr, ceph-osd, \
     ceph-common; `. scripts/prereqs.sh && vublk_prereqs rbd` installs them)";

impl Cluster {
    pub fn conf(&self) -> PathBuf {
        self.dir.join("ceph.conf")
    }

    /// Runs `rbd` on the cluster, panicking with its output on failure.
    pub fn rbd(&self, args: &[&str]) -> Output {
        let out = self.rbd_unchecked(args);
        assert!(
            out.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn rbd_unchecked(&self, args: &[&str]) -> Output {
        Command::new("rbd")
            .arg("-c")
            .arg(self.conf())
            .args(args)
            .output()
            .expect("run rbd")
    }

    /// Runs `ceph` on the cluster as client.admin, panicking with its output on failure.
    pub fn ceph(&self, args: &[&str]) -> Output {
        let out = Command::new("ceph")
            .arg("-c")
            .arg(self.conf())
            .args(args)
            .output()
            .expect("run ceph");
        assert!(
            out.status.success(),
            "ceph {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// A pool for RBD images named `name` (one replica, like `rbd`), if there is none yet.
    pub fn create_pool(&self, name: &str) {
        self.ceph(&["osd", "pool", "create", name, "8", "8"]);
        self.rbd(&["pool", "init", name]);
    }

    /// A Ceph client `client.ID` with `caps` (`["mon", "profile rbd", "osd", ...]`), its key
    /// written to the keyring `keyring` (`ceph auth get-or-create`: the same key if it exists).
    pub fn create_client(&self, id: &str, caps: &[&str], keyring: &Path) {
        let entity = format!("client.{id}");
        let mut args = vec!["auth", "get-or-create", &entity];
        args.extend_from_slice(caps);
        args.extend_from_slice(&["-o", keyring.to_str().expect("a UTF-8 path")]);
        self.ceph(&args);
    }

    /// A new image `name` of `size` bytes in the pool `rbd` (one of that name is removed
    /// first), holding zeroes; returns its `rbd:rbd/NAME` spec.
    pub fn create_image(&self, name: &str, size: u64) -> String {
        self.create_image_in("rbd", name, size)
    }

    /// [`Cluster::create_image`] in `pool`; returns its `rbd:POOL/NAME` spec.
    pub fn create_image_in(&self, pool: &str, name: &str, size: u64) -> String {
        let _ = self.rbd_unchecked(&["rm", &format!("{pool}/{name}")]);
        self.rbd(&[
            "create",
            "--size",
            &format!("{}K", size / 1024),
            &format!("{pool}/{name}"),
        ]);
        format!("rbd:{pool}/{name}")
    }

    /// A new image `name` holding the file `from`.
    pub fn import_image(&self, name: &str, from: &Path) -> String {
        let _ = self.rbd_unchecked(&["rm", &format!("rbd/{name}")]);
        self.rbd(&["import", from.to_str().unwrap(), &format!("rbd/{name}")]);
        format!("rbd:rbd/{name}")
    }

    /// The image's contents, read by librbd through the `rbd` tool (via a file in `dir`).
    pub fn export(&self, name: &str, dir: &Path) -> Vec<u8> {
        self.export_from("rbd", name, dir)
    }

    /// [`Cluster::export`] of an image in `pool`.
    pub fn export_from(&self, pool: &str, name: &str, dir: &Path) -> Vec<u8> {
        let file = dir.join(format!("{pool}.{name}.export"));
        let _ = std::fs::remove_file(&file);
        self.rbd(&["export", &format!("{pool}/{name}"), file.to_str().unwrap()]);
        let data = std::fs::read(&file).expect("read the export");
        let _ = std::fs::remove_file(&file);
        data
    }

    /// Sends `signal` to the OSD (SIGSTOP: the cluster stops answering; SIGCONT: it is back).
    pub fn signal_osd(&self, signal: libc::c_int) {
        let pid: i32 = std::fs::read_to_string(self.dir.join("run/osd.0.pid"))
            .expect("the OSD's pid file")
            .trim()
            .parse()
            .expect("a pid");
        // SAFETY: kill(2) on the OSD this process started.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill the OSD");
    }

    /// Stops the whole cluster cleanly (`scripts/ceph-dev.sh halt`: the OSD, which writes its
    /// store to disk, then the manager and the monitor) and waits until its daemons have exited.
    /// It starts again, on the same data, with [`Halted::resume`], or when the guard is dropped
    /// (also when a test fails, so the tests after it find a cluster).
    pub fn halt(&self) -> Halted<'_> {
        self.script("halt");
        Halted {
            cluster: self,
            resumed: false,
        }
    }

    /// Runs scripts/ceph-dev.sh `command` on this cluster, panicking if it fails.
    fn script(&self, command: &str) {
        let status = Command::new(script())
            .arg(command)
            .arg(&self.dir)
            .status()
            .expect("run scripts/ceph-dev.sh");
        assert!(
            status.success(),
            "scripts/ceph-dev.sh {command} {} failed",
            self.dir.display()
        );
    }

    /// Stops the OSD until the guard is dropped (also when a test fails, so the tests after it
    /// find a cluster that answers).
    pub fn stop_osd(&self) -> impl Drop + '_ {
        struct Resume<'a>(&'a Cluster);
        impl Drop for Resume<'_> {
            fn drop(&mut self) {
                self.0.signal_osd(libc::SIGCONT);
            }
        }
        self.signal_osd(libc::SIGSTOP);
        self.wait_until_osd_stopped();
        Resume(self)
    }

    /// Waits until every thread of the OSD is stopped: SIGSTOP takes effect in each thread when
    /// it next runs, and a thread that has not stopped yet may still answer a request.
    fn wait_until_osd_stopped(&self) {
        let pid = std::fs::read_to_string(self.dir.join("run/osd.0.pid")).expect("pid file");
        let tasks = PathBuf::from(format!("/proc/{}/task", pid.trim()));
        let all_stopped = || {
            std::fs::read_dir(&tasks)
                .expect("the OSD's threads")
                .all(|task| {
                    let stat = std::fs::read_to_string(task.unwrap().path().join("stat"))
                        .unwrap_or_default();
                    // The state follows the parenthesised name.
                    stat.rsplit_once(") ")
                        .is_some_and(|(_, rest)| rest.starts_with('T'))
                })
        };
        for _ in 0..1000 {
            if all_stopped() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the OSD did not stop within 10 s of SIGSTOP");
    }
}

/// A cluster stopped by [`Cluster::halt`].
pub struct Halted<'a> {
    cluster: &'a Cluster,
    resumed: bool,
}

impl Halted<'_> {
    /// Starts the cluster's daemons again and waits until it is healthy.
    pub fn resume(mut self) {
        self.resumed = true;
        self.cluster.script("resume");
    }
}

impl Drop for Halted<'_> {
    fn drop(&mut self) {
        if !self.resumed {
            self.resumed = true;
            self.cluster.script("resume");
        }
    }
}

/// scripts/ceph-dev.sh of this workspace.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-dev.sh")
}

/// Whether the Ceph daemons and the `rbd` tool are installed.
pub fn installed() -> bool {
    ["ceph-mon", "ceph-osd", "ceph-mgr", "rbd"]
        .iter()
        .all(|tool| {
            Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// The directory of the cluster to stop at exit.
static STARTED: Mutex<Option<PathBuf>> = Mutex::new(None);

extern "C" fn stop_at_exit() {
    let dir = STARTED.lock().ok().and_then(|d| d.clone());
    if let Some(dir) = dir {
        let _ = Command::new(script()).arg("stop").arg(dir).status();
    }
}

/// The process's cluster, started in `dir` at the first call (a cluster left there by an
/// earlier run is killed first); `None` when Ceph is not installed. Panics if it does not come
/// up.
pub fn cluster(dir: &Path) -> Option<&'static Cluster> {
    static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
    CLUSTER
        .get_or_init(|| {
            if !installed() {
                return None;
            }
            *STARTED.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir.to_owned());
            // SAFETY: registers a plain function to run at exit; it only runs the stop script.
            unsafe { libc::atexit(stop_at_exit) };
            let status = Command::new(script())
                .arg("start")
                .arg(dir)
                .status()
                .expect("run scripts/ceph-dev.sh");
            assert!(
                status.success(),
                "scripts/ceph-dev.sh start {} failed",
                dir.display()
            );
            Some(Cluster {
                dir: dir.to_owned(),
            })
        })
        .as_ref()
}
