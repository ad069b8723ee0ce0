//! Layer 2: the worker is not dumpable. exec made it dumpable again (it runs as its tenant, who
//! could then ptrace it, read guest memory from it, or take its descriptors with
//! `pidfd_getfd`), so this comes first after exec. A tracer that attached in the moment between
//! exec and now stays attached: a worker that finds one refuses to serve.

use std::io;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum DumpableError {
    #[error("cannot make the worker non-dumpable")]
    Set(#[source] io::Error),
    #[error("the worker is traced by pid {0} (its tenant attached before it became non-dumpable); it will not serve")]
    Traced(u32),
}

/// Makes the process non-dumpable and checks that nobody traces it.
pub fn forbid() -> Result<(), DumpableError> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| DumpableError::Set(e.into()))?;
    match tracer_of_self() {
        Some(tracer) => Err(DumpableError::Traced(tracer)),
        None => Ok(()),
    }
}

/// Whether the process is dumpable now.
pub fn is_dumpable() -> bool {
    // SAFETY: prctl with scalar arguments.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 }
}

/// The pid tracing this process, if any (`TracerPid` of /proc/self/status).
fn tracer_of_self() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let tracer: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))?
        .trim()
        .parse()
        .ok()?;
    (tracer != 0).then_some(tracer)
}
