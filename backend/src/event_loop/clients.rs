//! The bounded table of short-lived clients that the supervisor's sockets serve from its event
//! loop (the metrics endpoint's HTTP connections, the control socket's clients): each sends one
//! request and takes one answer, and none can hold the loop.
//!
//! Sockets are non-blocking; a request is read up to a bound the protocol gives; at most
//! `max` clients are open at once, and a new one past that closes the oldest (so idle clients
//! cannot lock others out); a client past its deadline (`timeout` after it was accepted, or
//! later if the protocol [`extend`](Clients::extend)s it for a request whose answer takes
//! longer) is for the loop to close. What a request means and what its answer says is the protocol's.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A client's connection: read, written, and shut down when the client is forgotten.
pub trait Stream: Read + Write {
    /// Shuts both directions down (never blocks: no SO_LINGER).
    fn shutdown_both(&self);
}

impl Stream for TcpStream {
    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl Stream for UnixStream {
    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

/// How reading a request stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// The protocol's `complete` holds for what was read.
    Complete,
    /// The bound was reached before that.
    Full,
    /// The peer stopped sending.
    Ended,
    /// Nothing more waits for now.
    Pending,
    /// The connection failed (or the client is not known).
    Broken,
}

/// How writing an answer stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Flush {
    /// All of it is written.
    Done,
    /// There is no room for now: wait until the client can take more.
    Blocked,
    /// The connection failed, or the client has no answer (or is not known).
    Broken,
}

struct Client<S> {
    stream: S,
    request: Vec<u8>,
    /// The answer and how much of it was written.
    answer: Option<(Vec<u8>, usize)>,
    deadline: Instant,
}

/// The clients open now, by id; ids grow with time, from 1.
pub struct Clients<S> {
    clients: HashMap<u64, Client<S>>,
    next_id: u64,
    max: usize,
    timeout: Duration,
}

impl<S: Stream> Clients<S> {
    /// At most `max` clients at once, each with `timeout` to send its request and take its
    /// answer.
    pub fn new(max: usize, timeout: Duration) -> Clients<S> {
        Clients {
            clients: HashMap::new(),
            next_id: 0,
            max,
            timeout,
        }
    }

    /// Adds a client accepted at `now`; returns its id, and the id of the oldest client if it
    /// was closed to make room.
    pub fn insert(&mut self, stream: S, now: Instant) -> (u64, Option<u64>) {
        let mut evicted = None;
        if self.clients.len() >= self.max {
            // Ids grow with time: the smallest is the oldest.
            if let Some(&oldest) = self.clients.keys().min() {
                self.close(oldest);
                evicted = Some(oldest);
            }
        }
        self.next_id += 1;
        let id = self.next_id;
        self.clients.insert(
            id,
            Client {
                stream,
                request: Vec::new(),
                answer: None,
                deadline: now + self.timeout,
            },
        );
        (id, evicted)
    }

    /// The stream of client `id`, to change how it is watched.
    pub fn stream(&self, id: u64) -> Option<&S> {
        self.clients.get(&id).map(|c| &c.stream)
    }

    /// Whether client `id` has its answer (and so is past reading).
    pub fn answered(&self, id: u64) -> bool {
        self.clients.get(&id).is_some_and(|c| c.answer.is_some())
    }

    /// Reads what client `id` sent, at most `limit` bytes in all, until `complete` holds for
    /// them, the bound is reached, the peer stops sending or nothing more waits.
    pub fn read(&mut self, id: u64, limit: usize, complete: impl Fn(&[u8]) -> bool) -> Fill {
        let Some(client) = self.clients.get_mut(&id) else {
            return Fill::Broken;
        };
        let mut buf = [0u8; 4096];
        loop {
            if complete(&client.request) {
                return Fill::Complete;
            }
            if client.request.len() >= limit {
                return Fill::Full;
            }
            let room = (limit - client.request.len()).min(buf.len());
            match client.stream.read(&mut buf[..room]) {
                Ok(0) => return Fill::Ended,
                Ok(n) => client.request.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Fill::Pending,
                Err(_) => return Fill::Broken,
            }
        }
    }

    /// What client `id` sent so far, taken out.
    pub fn take_request(&mut self, id: u64) -> Vec<u8> {
        self.clients
            .get_mut(&id)
            .map(|c| std::mem::take(&mut c.request))
            .unwrap_or_default()
    }

    /// Gives client `id` its answer, to be written by [`write`](Clients::write).
    pub fn set_answer(&mut self, id: u64, answer: Vec<u8>) {
        if let Some(client) = self.clients.get_mut(&id) {
            client.answer = Some((answer, 0));
        }
    }

    /// Writes what fits of client `id`'s answer.
    pub fn write(&mut self, id: u64) -> Flush {
        let Some(Client {
            stream,
            answer: Some((answer, written)),
            ..
        }) = self.clients.get_mut(&id)
        else {
            return Flush::Broken;
        };
        while *written < answer.len() {
            match stream.write(&answer[*written..]) {
                Ok(0) => return Flush::Broken,
                Ok(n) => *written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flush::Blocked,
                Err(_) => return Flush::Broken,
            }
        }
        Flush::Done
    }

    /// Keeps client `id` until `deadline` if that is later than its own: its answer takes longer
    /// to come. The caller bounds `deadline`.
    pub fn extend(&mut self, id: u64, deadline: Instant) {
        if let Some(client) = self.clients.get_mut(&id) {
            client.deadline = client.deadline.max(deadline);
        }
    }

    /// Forgets client `id`, shutting its stream down.
    pub fn close(&mut self, id: u64) {
        if let Some(client) = self.clients.remove(&id) {
            client.stream.shutdown_both();
        }
    }

    /// Clients past their deadline at `now`.
    pub fn overdue(&self, now: Instant) -> Vec<u64> {
        self.clients
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The earliest deadline of a client.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients.values().map(|c| c.deadline).min()
    }

    /// How many clients are open.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether client `id` is open.
    #[cfg(test)]
    pub fn contains(&self, id: u64) -> bool {
        self.clients.contains_key(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// A client's end and the table's end of a new connection.
    fn pair() -> (UnixStream, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        (ours, theirs)
    }

    /// Idle clients cannot lock others out: past the limit the oldest goes, and every client
    /// goes at its deadline.
    #[test]
    fn the_oldest_makes_room_and_deadlines_come() {
        let mut clients = Clients::new(3, TIMEOUT);
        let now = Instant::now();
        let mut peers = Vec::new();
        let mut evicted = Vec::new();
        for _ in 0..4 {
            let (peer, stream) = pair();
            peers.push(peer);
            evicted.push(clients.insert(stream, now));
        }
        assert_eq!(
            evicted,
            [(1, None), (2, None), (3, None), (4, Some(1))],
            "ids from 1; the oldest is closed"
        );
        assert_eq!(clients.len(), 3);
        assert!(!clients.contains(1));
        // The closed one's peer sees its end.
        let mut buf = [0u8; 1];
        assert_eq!(peers[0].read(&mut buf).unwrap(), 0);
        assert!(clients.overdue(now).is_empty());
        let mut overdue = clients.overdue(now + TIMEOUT);
        overdue.sort();
        assert_eq!(overdue, [2, 3, 4]);
        assert_eq!(clients.next_deadline(), Some(now + TIMEOUT));
    }

    /// A client whose answer takes longer is kept past the timeout, until the later deadline
    /// it was given, and never closed earlier for it.
    #[test]
    fn an_extended_client_stays_until_its_new_deadline() {
        let mut clients = Clients::new(4, TIMEOUT);
        let now = Instant::now();
        let (_peer, stream) = pair();
        let (id, _) = clients.insert(stream, now);
        let (_other_peer, other) = pair();
        let (other, _) = clients.insert(other, now);
        clients.extend(id, now + 2 * TIMEOUT);
        clients.extend(other, now + TIMEOUT / 2);
        assert_eq!(clients.overdue(now + TIMEOUT), [other]);
        assert_eq!(clients.overdue(now + 2 * TIMEOUT).len(), 2);
        clients.close(other);
        assert_eq!(clients.next_deadline(), Some(now + 2 * TIMEOUT));
        clients.extend(7, now + 3 * TIMEOUT);
        assert!(!clients.contains(7), "unknown");
    }

    #[test]
    fn a_request_is_read_until_complete_full_or_ended() {
        let mut clients = Clients::new(4, TIMEOUT);
        let now = Instant::now();
        let (mut peer, stream) = pair();
        let (id, _) = clients.insert(stream, now);
        assert_eq!(clients.read(id, 16, |r| r.ends_with(b"!")), Fill::Pending);
        peer.write_all(b"hello!").unwrap();
        assert_eq!(clients.read(id, 16, |r| r.ends_with(b"!")), Fill::Complete);
        assert_eq!(clients.take_request(id), b"hello!");

        // Never more than the bound is read.
        peer.write_all(&[b'a'; 40]).unwrap();
        assert_eq!(clients.read(id, 16, |_| false), Fill::Full);
        assert_eq!(clients.take_request(id).len(), 16);

        peer.shutdown(Shutdown::Write).unwrap();
        assert_eq!(clients.read(id, 1000, |_| false), Fill::Ended);
        assert_eq!(clients.take_request(id).len(), 24);
        assert_eq!(clients.read(7, 16, |_| false), Fill::Broken, "unknown");
    }

    #[test]
    fn an_answer_is_written_without_blocking() {
        let mut clients = Clients::new(4, TIMEOUT);
        let (mut peer, stream) = pair();
        let (id, _) = clients.insert(stream, Instant::now());
        assert_eq!(clients.write(id), Flush::Broken, "no answer yet");
        assert!(!clients.answered(id));
        // More than a socket buffer holds.
        let answer = vec![7u8; 4 << 20];
        clients.set_answer(id, answer.clone());
        assert!(clients.answered(id));
        assert_eq!(clients.write(id), Flush::Blocked);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).unwrap();
            got
        });
        while clients.write(id) == Flush::Blocked {
            std::thread::yield_now();
        }
        clients.close(id);
        assert_eq!(reader.join().unwrap(), answer);
    }
}
