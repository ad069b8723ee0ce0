//! Asynchronous I/O on the backing: one io_uring per queue thread.

pub mod uring;
