//! The test I/O gate (`--test-io-gate FIFO`, hidden): a wrapper engine that holds every request
//! until it has read one byte from a FIFO, then hands it to the engine it wraps. The protocol
//! tests use it to keep requests in flight for as long as they like (docs/memory.md): a held
//! request owns its pinned buffers, and its pending read is a real io_uring operation the
//! queue's retirement bound can cancel.
//!
//! With `--test-io-gate-offset BYTES` only reads and writes starting at that byte wait; every
//! other request goes straight through. The guest tests use it to hold one request in flight
//! while the guest's later requests complete (an out-of-order completion, as io_uring makes).
//!
//! Being a wrapper, it costs the engines it does not wrap nothing.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use crate::vhost_user::GuestBuffers;

use super::engine::{Completion, Engine, Event, Operation, Publisher, Segment, Tag};

/// Watch tokens of the gate's reads: this plus the request's tag, above the queue loop's own.
const GATE: u32 = 1 << 16;

#[derive(Debug, Clone, Copy)]
enum Held {
    Read { offset: u64 },
    Write { offset: u64, dsync: bool },
    Flush,
    Discard { dsync: bool },
    WriteZeroes { dsync: bool },
}

/// A request waiting for its byte.
struct Waiting {
    held: Held,
    /// Discard and write-zeroes ranges (the vector is reused).
    segments: Vec<Segment>,
    buffers: Option<GuestBuffers>,
}

/// What the gate holds: every request, or the reads and writes at one byte offset.
#[derive(Debug)]
pub struct TestGate {
    pub fifo: File,
    pub offset: Option<u64>,
}

/// Whether `operation` waits for a byte when the gate holds `only` (None: everything).
fn holds(only: Option<u64>, operation: &Operation<'_>) -> bool {
    match (only, operation) {
        (None, _) => true,
        (Some(at), Operation::Read { offset } | Operation::Write { offset, .. }) => *offset == at,
        (Some(_), _) => false,
    }
}

pub struct Gated<E> {
    inner: E,
    fifo: File,
    /// Only reads and writes at this byte offset wait (None: everything).
    only: Option<u64>,
    waiting: Vec<Waiting>,
    scratch: Vec<Event>,
}

impl<E: Engine> Gated<E> {
    /// Holds each request of `inner` (serving up to `depth` at once) that `gate` holds for a
    /// byte of its FIFO.
    pub fn new(inner: E, gate: &TestGate, depth: u16) -> io::Result<Gated<E>> {
        Ok(Gated {
            inner,
            fifo: gate.fifo.try_clone()?,
            only: gate.offset,
            waiting: (0..depth)
                .map(|_| Waiting {
                    held: Held::Flush,
                    segments: Vec::new(),
                    buffers: None,
                })
                .collect(),
            scratch: Vec::new(),
        })
    }

    /// The byte for `tag` came (`result` >= 0) or its read failed: pass the request on, or
    /// fail it.
    fn open(&mut self, tag: Tag, result: i32) -> Option<Completion> {
        let waiting = self.waiting.get_mut(usize::from(tag))?;
        let buffers = waiting.buffers.take()?;
        if result < 0 {
            let error = io::Error::from_raw_os_error(-result);
            return Some(Completion::new(tag, Err(error), buffers));
        }
        let operation = match waiting.held {
            Held::Read { offset } => Operation::Read { offset },
            Held::Write { offset, dsync } => Operation::Write { offset, dsync },
            Held::Flush => Operation::Flush,
            Held::Discard { dsync } => Operation::Discard {
                segments: &waiting.segments,
                dsync,
            },
            Held::WriteZeroes { dsync } => Operation::WriteZeroes {
                segments: &waiting.segments,
                dsync,
            },
        };
        self.inner.submit(tag, operation, buffers)
    }
}

impl<E: Engine> Engine for Gated<E> {
    fn start(&mut self) -> io::Result<()> {
        self.inner.start()
    }

    fn submit(
        &mut self,
        tag: Tag,
        operation: Operation<'_>,
        buffers: GuestBuffers,
    ) -> Option<Completion> {
        if !holds(self.only, &operation) {
            return self.inner.submit(tag, operation, buffers);
        }
        let Some(waiting) = self
            .waiting
            .get_mut(usize::from(tag))
            .filter(|w| w.buffers.is_none())
        else {
            let error = io::Error::from_raw_os_error(libc::EINVAL);
            return Some(Completion::new(tag, Err(error), buffers));
        };
        waiting.segments.clear();
        waiting.held = match operation {
            Operation::Read { offset } => Held::Read { offset },
            Operation::Write { offset, dsync } => Held::Write { offset, dsync },
            Operation::Flush => Held::Flush,
            Operation::Discard { segments, dsync } => {
                waiting.segments.extend_from_slice(segments);
                Held::Discard { dsync }
            }
            Operation::WriteZeroes { segments, dsync } => {
                waiting.segments.extend_from_slice(segments);
                Held::WriteZeroes { dsync }
            }
        };
        match self
            .inner
            .watch(self.fifo.as_raw_fd(), 1, GATE + u32::from(tag))
        {
            Ok(()) => {
                waiting.buffers = Some(buffers);
                None
            }
            Err(e) => Some(Completion::new(tag, Err(e), buffers)),
        }
    }

    fn cancel(&mut self, which: &dyn Fn(&GuestBuffers) -> bool) -> io::Result<()> {
        for (tag, waiting) in self.waiting.iter().enumerate() {
            if waiting.buffers.as_ref().is_some_and(which) {
                self.inner.unwatch(GATE + tag as u32)?;
            }
        }
        self.inner.cancel(which)
    }

    fn watch(&mut self, fd: RawFd, len: u32, token: u32) -> io::Result<()> {
        debug_assert!(token < GATE, "watch token {token} is the gate's");
        self.inner.watch(fd, len, token)
    }

    fn unwatch(&mut self, token: u32) -> io::Result<()> {
        self.inner.unwatch(token)
    }

    fn enter(&mut self, wait: bool) -> io::Result<()> {
        self.inner.enter(wait)
    }

    fn enter_timeout(&mut self, timeout: Duration) -> io::Result<bool> {
        self.inner.enter_timeout(timeout)
    }

    fn has_events(&mut self) -> bool {
        self.inner.has_events()
    }

    fn reap(&mut self, events: &mut Vec<Event>) {
        let mut inner = std::mem::take(&mut self.scratch);
        self.inner.reap(&mut inner);
        for event in inner.drain(..) {
            match event {
                Event::Watch { token, result } if token >= GATE => {
                    if let Some(done) = self.open((token - GATE) as Tag, result) {
                        events.push(Event::Completed(done));
                    }
                }
                other => events.push(other),
            }
        }
        self.scratch = inner;
    }

    fn may_poll(&self) -> bool {
        self.inner.may_poll()
    }

    fn publish_with(&mut self, publisher: std::sync::Arc<dyn Publisher>) -> bool {
        self.inner.publish_with(publisher)
    }
}
