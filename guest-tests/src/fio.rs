//! fio's JSON report (`--output-format=json`): finding it in a step's output and deciding whether
//! the run passed.
//!
//! A run passes only when fio exited 0, every job's `error` is 0 and fio printed no error or
//! verify complaint on stderr. fio reports a verify failure all three ways (exit 1, EILSEQ in the
//! job, "verify: bad header ..." on stderr), but each check alone has gaps across fio versions.

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::console::Step;

/// A fio job file of random 4 KiB O_DIRECT writes on the guest's `/dev/vda` with crc32c
/// verification (along the way, and of everything at the end), or its `verify_only` pass,
/// which replays the same offsets (same seed) and only reads.
#[derive(Clone, Debug)]
pub struct WriteVerify {
    /// The job's name in fio's report.
    pub name: &'static str,
    /// Bytes from the start of the disk the job covers.
    pub size: u64,
    /// fio's random seed: a verify pass must use the writing job's.
    pub seed: Option<u64>,
    /// A pace (`rate_iops`), for a job that must still run when something happens to it.
    pub rate_iops: Option<u32>,
    /// Writes verified along the way (`verify_backlog`); none in a verify pass: fio 3.33 with
    /// both verifies nothing.
    pub backlog: u32,
    pub verify_only: bool,
}

impl WriteVerify {
    pub fn new(name: &'static str, size: u64) -> WriteVerify {
        WriteVerify {
            name,
            size,
            seed: None,
            rate_iops: None,
            backlog: 512,
            verify_only: false,
        }
    }

    /// The pass that reads back what this job wrote.
    pub fn verify_pass(&self) -> WriteVerify {
        WriteVerify {
            verify_only: true,
            ..self.clone()
        }
    }

    /// Whether `report`, of this job's writing run, wrote the whole region and read at least
    /// as much back to verify it.
    pub fn check_written(&self, report: &Report) -> Result<()> {
        let (written, read) = (
            report.total(|j| j.write.io_bytes),
            report.total(|j| j.read.io_bytes),
        );
        if written != self.size {
            bail!("wrote {written} bytes, not {}", self.size);
        }
        if read < self.size {
            bail!("verified only {read} bytes");
        }
        Ok(())
    }

    /// The job file.
    pub fn file(&self) -> String {
        let mut extra = String::new();
        if let Some(seed) = self.seed {
            extra += &format!("randseed={seed}\n");
        }
        if let Some(iops) = self.rate_iops {
            extra += &format!("rate_iops={iops}\n");
        }
        if self.verify_only {
            extra += "verify_only=1\n";
        } else {
            extra += &format!("verify_backlog={}\n", self.backlog);
        }
        format!(
            "[global]
filename=/dev/vda
ioengine=libaio
direct=1
bs=4k
iodepth=16
size={}
rw=randwrite
randrepeat=1
verify=crc32c
{extra}[{}]
",
            self.size, self.name
        )
    }
}

/// Bytes and operations of one direction (`read`, `write`, `trim`) of one job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dir {
    pub io_bytes: u64,
    pub total_ios: u64,
}

/// One job of a fio report.
#[derive(Clone, Debug)]
pub struct Job {
    pub name: String,
    pub error: i64,
    pub read: Dir,
    pub write: Dir,
    pub trim: Dir,
    /// fsync/fdatasync calls (`fsync=N` jobs).
    pub syncs: u64,
}

/// A parsed fio report.
#[derive(Clone, Debug)]
pub struct Report {
    pub jobs: Vec<Job>,
    pub json: Value,
}

impl Report {
    /// Total over all jobs.
    pub fn total(&self, f: impl Fn(&Job) -> u64) -> u64 {
        self.jobs.iter().map(f).sum()
    }
}

/// Parses the JSON object in `text` (fio may print notes before it).
pub fn parse(text: &str) -> Result<Report> {
    let start = text
        .find("\n{")
        .map(|i| i + 1)
        .or_else(|| text.starts_with('{').then_some(0))
        .context("no JSON object in fio's output")?;
    let mut stream = serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
    let json = stream
        .next()
        .context("no JSON object in fio's output")?
        .context("fio's JSON does not parse")?;
    let jobs = json["jobs"]
        .as_array()
        .context("fio's JSON has no jobs array")?
        .iter()
        .map(|j| {
            let dir = |d: &str| Dir {
                io_bytes: j[d]["io_bytes"].as_u64().unwrap_or(0),
                total_ios: j[d]["total_ios"].as_u64().unwrap_or(0),
            };
            Ok(Job {
                name: j["jobname"].as_str().unwrap_or("?").to_string(),
                error: j["error"]
                    .as_i64()
                    .context("a fio job without an error field")?,
                read: dir("read"),
                write: dir("write"),
                trim: dir("trim"),
                syncs: j["sync"]["total_ios"].as_u64().unwrap_or(0),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if jobs.is_empty() {
        bail!("fio ran no jobs");
    }
    Ok(Report { jobs, json })
}

/// The report of a fio step that must have passed.
pub fn passed(step: &Step) -> Result<Report> {
    let report = parse(&step.stdout)
        .with_context(|| format!("fio printed:\n{}\nstderr:\n{}", step.stdout, step.stderr))?;
    let mut problems = Vec::new();
    if step.rc != Some(0) {
        problems.push(format!("fio exited with {:?}", step.rc));
    }
    for j in &report.jobs {
        if j.error != 0 {
            problems.push(format!("job {} failed with error {}", j.name, j.error));
        }
    }
    for line in step.stderr.lines() {
        if line.contains("fio:") || line.contains("verify") || line.contains("error") {
            problems.push(format!("fio said: {line}"));
        }
    }
    if !problems.is_empty() {
        bail!("{}\nfio stderr:\n{}", problems.join("\n"), step.stderr);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verify_pass_replays_the_writes_and_only_reads() {
        let job = WriteVerify {
            seed: Some(7),
            rate_iops: Some(100),
            ..WriteVerify::new("w", 16 << 20)
        };
        let write = job.file();
        assert!(write.contains("size=16777216\n") && write.contains("randseed=7\n"));
        assert!(write.contains("rate_iops=100\n") && write.contains("verify_backlog=512\n"));
        assert!(!write.contains("verify_only"));
        let verify = job.verify_pass().file();
        assert!(verify.contains("verify_only=1\n") && verify.contains("randseed=7\n"));
        // fio 3.33 verifies nothing with both.
        assert!(!verify.contains("verify_backlog"));
        assert!(verify.ends_with("[w]\n"));
    }

    fn step(stdout: &str, stderr: &str, rc: i32) -> Step {
        Step {
            stdout: stdout.into(),
            stderr: stderr.into(),
            rc: Some(rc),
        }
    }

    const OK: &str = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{
  "fio version" : "fio-3.33",
  "jobs" : [ { "jobname" : "w", "error" : 0,
      "read" : { "io_bytes" : 4096, "total_ios" : 1 },
      "write" : { "io_bytes" : 8192, "total_ios" : 2 },
      "trim" : { "io_bytes" : 0, "total_ios" : 0 },
      "sync" : { "total_ios" : 2 } } ]
}"#;

    #[test]
    fn a_clean_run_passes_with_its_numbers() {
        let r = passed(&step(OK, "", 0)).unwrap();
        assert_eq!(
            r.jobs[0].write,
            Dir {
                io_bytes: 8192,
                total_ios: 2
            }
        );
        assert_eq!(r.jobs[0].syncs, 2);
        assert_eq!(r.total(|j| j.read.io_bytes), 4096);
    }

    #[test]
    fn job_errors_exit_codes_and_verify_complaints_fail() {
        let failed_job = OK.replace("\"error\" : 0", "\"error\" : 84");
        assert!(passed(&step(&failed_job, "", 0)).is_err());
        assert!(passed(&step(OK, "", 1)).is_err());
        let verify = "verify: bad magic header 0, wanted acca at file /dev/vda offset 4096";
        assert!(passed(&step(OK, verify, 0)).is_err());
        assert!(passed(&step("fio: no JSON here", "", 0)).is_err());
        assert!(passed(&step(r#"{"jobs": []}"#, "", 0)).is_err());
    }
}
