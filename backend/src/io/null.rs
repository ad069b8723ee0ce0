//! The engine of the null disk: reads return zeroes, everything else succeeds, all at once on
//! the queue thread. It still has an io_uring, to watch the queue's eventfds: the queue loop
//! sleeps in it exactly as with a file.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use crate::vhost_user::GuestBuffers;

use super::engine::{Completion, Engine, Event, Operation, Tag};
use super::file::ring_entries;
use super::uring::{self, Reaped, Ring};

pub struct NullEngine {
    ring: Ring,
    cqes: Vec<uring::Completion>,
}

impl NullEngine {
    pub fn new(depth: u16) -> io::Result<NullEngine> {
        Ok(NullEngine {
            ring: Ring::new(ring_entries(depth), None)?,
            cqes: Vec::with_capacity(2),
        })
    }
}

impl Engine for NullEngine {
    fn start(&mut self) -> io::Result<()> {
        self.ring.enable()
    }

    fn submit(
        &mut self,
        tag: Tag,
        operation: Operation<'_>,
        mut buffers: GuestBuffers,
    ) -> Option<Completion> {
        if let Operation::Read { .. } = operation {
            buffers.zero();
        }
        Some(Completion::new(tag, Ok(()), buffers))
    }

    fn cancel(&mut self, _which: &dyn Fn(&GuestBuffers) -> bool) -> io::Result<()> {
        // Nothing is ever in flight.
        Ok(())
    }

    fn watch(&mut self, fd: RawFd, len: u32, token: u32) -> io::Result<()> {
        self.ring.watch(fd, len, token)
    }

    fn unwatch(&mut self, token: u32) -> io::Result<()> {
        self.ring.unwatch(token)
    }

    fn enter(&mut self, wait: bool) -> io::Result<()> {
        self.ring.submit(usize::from(wait)).map(drop)
    }

    fn enter_timeout(&mut self, timeout: Duration) -> io::Result<bool> {
        self.ring.submit_timeout(1, timeout)
    }

    fn has_events(&mut self) -> bool {
        self.ring.has_events()
    }

    fn reap(&mut self, events: &mut Vec<Event>) {
        self.ring.completions(&mut self.cqes);
        for cqe in &self.cqes {
            if let Reaped::Watch(token, result) = self.ring.classify(cqe) {
                events.push(Event::Watch { token, result });
            }
        }
    }
}
