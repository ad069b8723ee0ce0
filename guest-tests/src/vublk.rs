//! vublk as a child process serving one socket for a test.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::paths;
use crate::process::die_with_parent;

/// How long vublk may take to start listening, and to exit after SIGTERM.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(15);

/// A running `vublk --socket-path <dir>/<name>.sock ...`; its log is `<dir>/<name>.log`.
pub struct Vublk {
    child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Vublk {
    /// Starts vublk with `args` (e.g. `["--blk-file", img, "--num-queues", "2"]`) and waits until
    /// it logs that it is listening.
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Result<Vublk> {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let mut cmd = Command::new(paths::vublk_bin()?);
        cmd.arg("--socket-path").arg(&socket).args(args);
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        cmd.env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        die_with_parent(&mut cmd);
        let child = cmd.spawn().context("spawn vublk")?;
        let mut v = Vublk {
            child: Some(child),
            socket,
            log,
        };
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        // The contract: the socket is listening before vublk logs "listening".
        while !v.log_text().contains("listening") {
            if let Some(status) = v.child.as_mut().unwrap().try_wait()? {
                bail!(
                    "vublk {args:?} exited ({status}) before listening:\n{}",
                    v.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "vublk {args:?} did not listen within {DAEMON_TIMEOUT:?}:\n{}",
                    v.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(v)
    }

    /// `vublk status --control-socket <socket> --json` (vublk must have been started with
    /// `--control-socket <socket>`).
    pub fn status(&self, control_socket: &Path) -> Result<serde_json::Value> {
        let out = Command::new(paths::vublk_bin()?)
            .arg("status")
            .arg("--control-socket")
            .arg(control_socket)
            .arg("--json")
            .stdin(Stdio::null())
            .output()
            .context("run vublk status")?;
        if !out.status.success() {
            bail!(
                "vublk status failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("vublk status --json printed no JSON")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Log lines at ERROR or WARN level: a well-behaved guest causes none.
    pub fn complaints(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
            .map(str::to_string)
            .collect()
    }

    /// SIGTERM, then checks vublk exited 0 within the timeout and logged no complaints.
    pub fn stop(mut self) -> Result<()> {
        let mut child = self.child.take().expect("running");
        let Some(status) = crate::process::terminate(&mut child, DAEMON_TIMEOUT)? else {
            bail!(
                "vublk did not exit within {DAEMON_TIMEOUT:?} of SIGTERM:\n{}",
                self.log_text()
            );
        };
        if !status.success() {
            bail!(
                "vublk exited with {status} after SIGTERM:\n{}",
                self.log_text()
            );
        }
        let complaints = self.complaints();
        if !complaints.is_empty() {
            bail!("vublk logged problems:\n{}", complaints.join("\n"));
        }
        Ok(())
    }
}

impl Drop for Vublk {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
