//! I/O on the backing: one io_uring per queue thread, and the reads and writes a queue thread
//! may do itself first.

pub mod inline;
pub mod mapped;
pub mod uring;
