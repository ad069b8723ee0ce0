//! Shared harness for the end-to-end tests: runs `vublk` as a child process and drives it with
//! libblkio's `virtio-blk-vhost-user` driver as the frontend.
//!
//! - [`Daemon`] (vublk_test_support's harness) spawns the binary with a socket in a test's own
//!   temp dir, keeps its stderr in a file (printed when a test fails), and stops it with SIGTERM
//!   on drop, checking that it exits 0 and removes the socket it created.
//! - [`Client`] connects with N queues and hands out one [`Queue`] per virtqueue, each owning a
//!   private slice of one shared memory region (libblkio's vhost-user driver only accepts buffers
//!   inside mapped regions, because the daemon must be able to mmap them).
//! - [`Queue::run`] submits a batch of requests at once (so many are in flight), waits for every
//!   completion and returns the per-request result, indexed like the batch.
//! - Images are filled with the deterministic, position-dependent pattern of
//!   `vublk_test_support::pattern`, so any byte that lands in the wrong place is detected.

#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, Errno, ReqFlags};

/// How long a daemon may take to start listening or to exit after SIGTERM.
pub use vublk_test_support::daemon::DAEMON_TIMEOUT;
/// How long a batch of requests may take to complete before the test gives up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * MIB;

/// The binary under test; `VUBLK_E2E_BIN` overrides it (e.g. to run these tests against another
/// build, or a wrapper around a reference backend to check the tests themselves).
pub fn vublk_bin() -> String {
    std::env::var("VUBLK_E2E_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_vublk").to_string())
}

/// A fresh temp dir for one test.
pub fn test_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vublk-e2e-")
        .tempdir()
        .expect("create temp dir")
}

// The data pattern, the PRNG and the byte comparison every test shares (each test file uses
// some of them).
#[allow(unused_imports)]
pub use vublk_test_support::pattern::{assert_same, create_image, first_difference, pattern, Rng};

// ---------------------------------------------------------------------------------------------
// The daemon: vublk_test_support's harness, started with `Daemon::start(vublk_bin(), ...)`
// ---------------------------------------------------------------------------------------------

#[allow(unused_imports)]
pub use vublk_test_support::daemon::{workers_of, Daemon};
#[allow(unused_imports)]
pub use vublk_test_support::process::{die_with_parent, pass_fd};

/// Runs vublk to completion (for command-line tests) with a timeout.
pub fn run_vublk(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(vublk_bin());
    cmd.args(args);
    vublk_test_support::process::run(cmd, DAEMON_TIMEOUT)
        .unwrap_or_else(|e| panic!("vublk {args:?}: {e}"))
}

/// The counters of the first device `vublk status` reports on `control` once `ready` accepts
/// them (workers report once a second); panics after 10 s with the last answer.
#[allow(dead_code)]
pub fn device_totals(
    control: &Path,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = run_vublk(&[
            "status",
            "--json",
            "--control-socket",
            control.to_str().unwrap(),
        ]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let totals = status["vms"][0]["devices"][0].clone();
        if ready(&totals) {
            return totals;
        }
        assert!(
            Instant::now() < deadline,
            "status never got there: {status}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------------------------
// The libblkio client
// ---------------------------------------------------------------------------------------------

/// Connection options for [`Client`].
#[derive(Clone, Debug)]
pub struct ClientOpts {
    pub num_queues: i32,
    pub read_only: bool,
    pub queue_size: Option<i32>,
    /// Queues libblkio busy-polls, with device notifications suppressed; they come after the
    /// `num_queues` ordinary ones in [`Client::queues`].
    pub num_poll_queues: i32,
    /// Bytes of mapped buffer memory per queue.
    pub buf_per_queue: usize,
}

impl Default for ClientOpts {
    fn default() -> Self {
        ClientOpts {
            num_queues: 1,
            read_only: false,
            queue_size: None,
            num_poll_queues: 0,
            buf_per_queue: 8 * MIB as usize,
        }
    }
}

/// Where setting up a connection failed.
#[derive(Debug)]
pub struct ConnectError {
    pub stage: &'static str,
    pub err: blkio::Error,
}

impl ConnectError {
    pub fn errno(&self) -> Errno {
        self.err.errno()
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} ({:?})", self.stage, self.err, self.err.errno())
    }
}

fn stage<T>(stage: &'static str, r: blkio::Result<T>) -> Result<T, ConnectError> {
    r.map_err(|err| ConnectError { stage, err })
}

/// A started libblkio virtio-blk-vhost-user connection.
pub struct Client {
    /// The libblkio instance, for reading properties.
    pub blkio: Blkio,
    /// One per virtqueue, in queue order.
    pub queues: Vec<Queue>,
}

impl Client {
    /// Connects with `num_queues` queues, panicking on failure.
    pub fn connect(socket: &Path, num_queues: i32) -> Client {
        Client::connect_with(
            socket,
            ClientOpts {
                num_queues,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()))
    }

    /// Connects, retrying while the socket is not accepting yet (up to [`DAEMON_TIMEOUT`]).
    pub fn connect_with(socket: &Path, opts: ClientOpts) -> Result<Client, ConnectError> {
        let path = socket.to_str().expect("socket path is UTF-8");
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        let mut blkio = loop {
            let mut b = stage("blkio_new", Blkio::new("virtio-blk-vhost-user"))?;
            stage("set path", b.set_str("path", path))?;
            stage("set read-only", b.set_bool("read-only", opts.read_only))?;
            match b.connect() {
                Ok(()) => break b,
                Err(e)
                    if (e.errno() == Errno::CONNREFUSED || e.errno() == Errno::NOENT)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(err) => {
                    return Err(ConnectError {
                        stage: "connect",
                        err,
                    })
                }
            }
        };
        stage(
            "set num-queues",
            blkio.set_i32("num-queues", opts.num_queues),
        )?;
        stage(
            "set num-poll-queues",
            blkio.set_i32("num-poll-queues", opts.num_poll_queues),
        )?;
        if let Some(qs) = opts.queue_size {
            stage("set queue-size", blkio.set_i32("queue-size", qs))?;
        }
        let started = stage("start", blkio.start())?;
        let nq = started.queues.len() + started.poll_queues.len();
        assert_eq!(
            nq,
            (opts.num_queues + opts.num_poll_queues) as usize,
            "libblkio started a different number of queues"
        );

        let total = opts.buf_per_queue * nq.max(1);
        let region = stage("alloc_mem_region", blkio.alloc_mem_region(total))?;
        stage("map_mem_region", blkio.map_mem_region(&region))?;

        let queues = started
            .queues
            .into_iter()
            .chain(started.poll_queues)
            .enumerate()
            .map(|(i, q)| Queue {
                q,
                index: i,
                // The region is one contiguous shared mapping; each queue gets a disjoint slice.
                base: (region.addr + i * opts.buf_per_queue) as *mut u8,
                len: opts.buf_per_queue,
            })
            .collect();
        Ok(Client { blkio, queues })
    }

    /// Allocates and maps another memory region (ADD_MEM_REG).
    pub fn add_region(&mut self, len: usize) -> blkio::MemoryRegion {
        let region = self.blkio.alloc_mem_region(len).expect("alloc_mem_region");
        self.blkio.map_mem_region(&region).expect("map_mem_region");
        region
    }

    /// Unmaps a region from the device (REM_MEM_REG); the client's own mapping stays.
    pub fn unmap_region(&mut self, region: &blkio::MemoryRegion) {
        self.blkio.unmap_mem_region(region);
    }

    /// Disk size in bytes as the device reports it.
    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity property")
    }

    pub fn prop_i32(&self, name: &str) -> i32 {
        self.blkio
            .get_i32(name)
            .unwrap_or_else(|e| panic!("property {name}: {e}"))
    }

    pub fn prop_u64(&self, name: &str) -> u64 {
        self.blkio
            .get_u64(name)
            .unwrap_or_else(|e| panic!("property {name}: {e}"))
    }

    pub fn prop_bool(&self, name: &str) -> bool {
        self.blkio
            .get_bool(name)
            .unwrap_or_else(|e| panic!("property {name}: {e}"))
    }

    /// The data-path limits the device advertised.
    pub fn limits(&self) -> Limits {
        Limits {
            max_segments: self.prop_i32("max-segments").max(1) as usize,
            max_segment_len: match self.prop_i32("max-segment-len") {
                0 => usize::MAX,
                n => n as usize,
            },
        }
    }

    pub fn q(&mut self, i: usize) -> &mut Queue {
        &mut self.queues[i]
    }
}

/// Segment limits (SEG_MAX / SIZE_MAX) the device advertised.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_segments: usize,
    pub max_segment_len: usize,
}

/// A piece of a queue's buffer: `len` bytes at `buf_off`.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub buf_off: usize,
    pub len: usize,
}

/// One request of a batch.
#[derive(Clone, Debug)]
pub enum Req {
    Read {
        offset: u64,
        segs: Vec<Seg>,
    },
    Write {
        offset: u64,
        segs: Vec<Seg>,
        fua: bool,
    },
    /// Reads into memory outside the queue's buffer (e.g. a region since unmapped).
    ReadRaw {
        offset: u64,
        addr: usize,
        len: usize,
    },
    /// Writes from memory outside the queue's buffer.
    WriteRaw {
        offset: u64,
        addr: usize,
        len: usize,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        no_unmap: bool,
    },
}

impl Req {
    pub fn read(offset: u64, buf_off: usize, len: usize) -> Req {
        Req::Read {
            offset,
            segs: vec![Seg { buf_off, len }],
        }
    }
    pub fn write(offset: u64, buf_off: usize, len: usize) -> Req {
        Req::Write {
            offset,
            segs: vec![Seg { buf_off, len }],
            fua: false,
        }
    }
}

/// One virtqueue with a private buffer inside the client's mapped memory region.
pub struct Queue {
    q: Blkioq,
    pub index: usize,
    base: *mut u8,
    len: usize,
}

// SAFETY: `base..base+len` is memory no other `Queue` touches, and `Blkioq` is `Send`.
unsafe impl Send for Queue {}

impl Queue {
    /// This queue's buffer: where request data is taken from and read into.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the slice lies inside a region libblkio allocated and keeps mapped until the
        // `Blkio` and every `Blkioq` (including `self.q`) are dropped; no other queue uses this
        // part of it, and `&mut self` means no request of ours is in flight while it is borrowed
        // (`run` only returns once every request has completed).
        unsafe { std::slice::from_raw_parts_mut(self.base, self.len) }
    }

    pub fn buf_len(&self) -> usize {
        self.len
    }

    fn iovecs(&self, segs: &[Seg]) -> Vec<blkio::iovec> {
        segs.iter()
            .map(|s| {
                assert!(
                    s.buf_off
                        .checked_add(s.len)
                        .is_some_and(|end| end <= self.len),
                    "segment {s:?} outside the queue's {} byte buffer",
                    self.len
                );
                blkio::iovec {
                    // SAFETY: in bounds of this queue's buffer, checked above.
                    iov_base: unsafe { self.base.add(s.buf_off) }.cast(),
                    iov_len: s.len,
                }
            })
            .collect()
    }

    /// Submits every request of `reqs` before waiting, then waits for all completions. Returns
    /// each request's result (0 or a negative errno), in the order of `reqs`.
    pub fn run(&mut self, reqs: &[Req]) -> Vec<i32> {
        self.run_within(reqs, IO_TIMEOUT)
    }

    /// [`Queue::run`], waiting up to `timeout` instead of [`IO_TIMEOUT`] (for requests that
    /// wait on purpose, e.g. for a cluster being restarted).
    pub fn run_within(&mut self, reqs: &[Req], timeout: Duration) -> Vec<i32> {
        if reqs.is_empty() {
            return Vec::new();
        }
        // libblkio keeps pointers to these iovec arrays until each request reaches the ring,
        // which may be during do_io() if the ring is full, so they live until the end.
        let iovecs: Vec<Vec<blkio::iovec>> = reqs
            .iter()
            .map(|r| match r {
                Req::Read { segs, .. } | Req::Write { segs, .. } => self.iovecs(segs),
                Req::ReadRaw { addr, len, .. } | Req::WriteRaw { addr, len, .. } => {
                    vec![blkio::iovec {
                        iov_base: *addr as *mut libc::c_void,
                        iov_len: *len,
                    }]
                }
                _ => Vec::new(),
            })
            .collect();
        for (i, (r, iov)) in reqs.iter().zip(&iovecs).enumerate() {
            match r {
                Req::Read { offset, .. } | Req::ReadRaw { offset, .. } => self.q.readv(
                    *offset,
                    iov.as_ptr(),
                    iov.len() as u32,
                    i,
                    ReqFlags::empty(),
                ),
                Req::WriteRaw { offset, .. } => self.q.writev(
                    *offset,
                    iov.as_ptr(),
                    iov.len() as u32,
                    i,
                    ReqFlags::empty(),
                ),
                Req::Write { offset, fua, .. } => {
                    let flags = if *fua {
                        ReqFlags::FUA
                    } else {
                        ReqFlags::empty()
                    };
                    self.q
                        .writev(*offset, iov.as_ptr(), iov.len() as u32, i, flags)
                }
                Req::Flush => self.q.flush(i, ReqFlags::empty()),
                Req::Discard { offset, len } => self.q.discard(*offset, *len, i, ReqFlags::empty()),
                Req::WriteZeroes {
                    offset,
                    len,
                    no_unmap,
                } => {
                    let flags = if *no_unmap {
                        ReqFlags::NO_UNMAP
                    } else {
                        ReqFlags::empty()
                    };
                    self.q.write_zeroes(*offset, *len, i, flags)
                }
            }
        }
        self.wait_all(reqs.len(), timeout)
    }

    fn wait_all(&mut self, n: usize, timeout: Duration) -> Vec<i32> {
        let mut results: Vec<Option<i32>> = vec![None; n];
        let mut done = 0;
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..n.min(1024)).map(|_| MaybeUninit::uninit()).collect();
        let deadline = Instant::now() + timeout;
        while done < n {
            let mut timeout = deadline.saturating_duration_since(Instant::now());
            let got = self
                .q
                .do_io(&mut completions, 1, Some(&mut timeout), None)
                .unwrap_or_else(|e| {
                    panic!(
                        "queue {}: do_io failed ({e}, {:?}) with {done} of {n} requests completed",
                        self.index,
                        e.errno()
                    )
                });
            for c in &completions[..got] {
                // SAFETY: do_io() initialised the first `got` elements.
                let c = unsafe { c.assume_init_read() };
                let slot = results
                    .get_mut(c.user_data)
                    .unwrap_or_else(|| panic!("completion for unknown request {}", c.user_data));
                assert!(slot.is_none(), "request {} completed twice", c.user_data);
                *slot = Some(c.ret);
                done += 1;
            }
        }
        results.into_iter().map(Option::unwrap).collect()
    }

    /// Starts requests and returns without waiting for them (for disconnect-while-busy tests).
    /// The iovec arrays are leaked so they stay valid whatever happens to the queue.
    pub fn submit_and_abandon(&mut self, reqs: &[Req]) {
        for (i, r) in reqs.iter().enumerate() {
            match r {
                Req::Read { offset, segs } => {
                    let iov = Box::leak(self.iovecs(segs).into_boxed_slice());
                    self.q.readv(
                        *offset,
                        iov.as_ptr(),
                        iov.len() as u32,
                        i,
                        ReqFlags::empty(),
                    )
                }
                Req::Write { offset, segs, .. } => {
                    let iov = Box::leak(self.iovecs(segs).into_boxed_slice());
                    self.q.writev(
                        *offset,
                        iov.as_ptr(),
                        iov.len() as u32,
                        i,
                        ReqFlags::empty(),
                    )
                }
                Req::Flush => self.q.flush(i, ReqFlags::empty()),
                _ => unimplemented!("only reads, writes and flushes"),
            }
        }
        // do_io with min_completions 0 kicks the device without waiting.
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..reqs.len()).map(|_| MaybeUninit::uninit()).collect();
        let _ = self.q.do_io(&mut completions, 0, None, None);
    }

    /// Writes `data` at `offset` from the start of this queue's buffer.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> i32 {
        self.buf()[..data.len()].copy_from_slice(data);
        self.run(&[Req::write(offset, 0, data.len())])[0]
    }

    /// Reads `len` bytes at `offset`; `Err(ret)` if the request failed.
    pub fn read_at(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        match self.run(&[Req::read(offset, 0, len)])[0] {
            0 => Ok(self.buf()[..len].to_vec()),
            ret => Err(ret),
        }
    }

    pub fn flush(&mut self) -> i32 {
        self.run(&[Req::Flush])[0]
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> i32 {
        self.run(&[Req::Discard { offset, len }])[0]
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, no_unmap: bool) -> i32 {
        self.run(&[Req::WriteZeroes {
            offset,
            len,
            no_unmap,
        }])[0]
    }

    /// Reads `len` bytes at `offset` in 1 MiB requests, many in flight, panicking on errors.
    pub fn read_range(&mut self, offset: u64, len: u64) -> Vec<u8> {
        const CHUNK: u64 = MIB;
        let per_batch = (self.len as u64 / CHUNK).max(1);
        let mut out = Vec::with_capacity(len as usize);
        let mut pos = offset;
        while pos < offset + len {
            let mut reqs = Vec::new();
            let mut sizes = Vec::new();
            while reqs.len() < per_batch as usize && pos < offset + len {
                let n = CHUNK.min(offset + len - pos).min(self.len as u64);
                reqs.push(Req::read(pos, reqs.len() * CHUNK as usize, n as usize));
                sizes.push(n as usize);
                pos += n;
            }
            let results = self.run(&reqs);
            for (i, (ret, r)) in results.iter().zip(&reqs).enumerate() {
                assert_eq!(*ret, 0, "read_range: request {i} ({r:?}) failed with {ret}");
            }
            for (i, n) in sizes.iter().enumerate() {
                let start = i * CHUNK as usize;
                out.extend_from_slice(&self.buf()[start..start + n]);
            }
        }
        out
    }
}

/// Splits `len` bytes at `buf_off` into 1..=max segments, some of them at byte (not sector)
/// boundaries if `unaligned`, none longer than `limits.max_segment_len`.
pub fn split_segments(
    rng: &mut Rng,
    buf_off: usize,
    len: usize,
    want: usize,
    limits: Limits,
    unaligned: bool,
) -> Vec<Seg> {
    let want = want.clamp(1, limits.max_segments);
    let mut cuts: Vec<usize> = (1..want)
        .map(|_| {
            let c = rng.below(len as u64) as usize;
            if unaligned {
                c
            } else {
                c & !4095
            }
        })
        .filter(|&c| c > 0 && c < len)
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut segs = Vec::new();
    let mut prev = 0;
    for c in cuts.into_iter().chain(std::iter::once(len)) {
        let mut start = prev;
        while start < c {
            let n = (c - start).min(limits.max_segment_len);
            segs.push(Seg {
                buf_off: buf_off + start,
                len: n,
            });
            start += n;
        }
        prev = c;
    }
    assert!(
        segs.len() <= limits.max_segments,
        "cannot split {len} bytes into at most {} segments of at most {} bytes",
        limits.max_segments,
        limits.max_segment_len
    );
    segs
}

/// Errno helper for comparing request results.
pub fn neg(e: Errno) -> i32 {
    -e.raw_os_error()
}
