//! Connection lifecycle: reconnecting after a frontend goes away (cleanly or with requests in
//! flight), and serving sockets handed over with `--fd` (listening and already connected).

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::Duration;

use common::*;

/// Successive clients (with different queue counts) see what the previous ones wrote, flushed
/// or not, and the daemon keeps serving the same socket.
#[test]
fn a_new_client_sees_the_previous_clients_data() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 8 * MIB;
    let mut model = create_image(&img, size, 10);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap(), "--num-queues", "2"],
    );

    let region = MIB;
    for (cycle, nq) in [2, 1, 2, 1].into_iter().enumerate() {
        let mut client = Client::connect(daemon.socket(), nq);
        assert_eq!(client.capacity(), size, "capacity on connection {cycle}");
        // Everything written so far is visible, through the last queue of this connection.
        let last = nq as usize - 1;
        let got = client.q(last).read_range(0, size);
        assert_same(
            &got,
            &model,
            &format!("disk at the start of connection {cycle}"),
        );

        let offset = cycle as u64 * region + 4096;
        let data = pattern(200 + cycle as u64, offset, region as usize);
        assert_eq!(
            client.q(last).write_at(offset, &data),
            0,
            "write on connection {cycle}"
        );
        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        if cycle % 2 == 0 {
            assert_eq!(client.q(0).flush(), 0, "flush on connection {cycle}");
        }
        drop(client);
        daemon.assert_running();
    }
    let mut client = Client::connect(daemon.socket(), 1);
    assert_same(
        &client.q(0).read_range(0, size),
        &model,
        "disk on the last connection",
    );
    drop(client);
    daemon.stop();
    assert_same(&std::fs::read(&img).unwrap(), &model, "image file");
}

/// A frontend that disappears with many requests in flight must not take the daemon down or
/// corrupt anything outside the ranges it was writing; the next client works normally.
#[test]
fn disconnect_with_requests_in_flight_leaves_the_daemon_serving() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 48 * MIB;
    let model = create_image(&img, size, 11);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap()],
    );

    // The abandoned writes all go to the first 32 MiB; the rest must stay untouched.
    let busy = 32 * MIB;
    for attempt in 0..3u64 {
        let mut client = Client::connect_with(
            daemon.socket(),
            ClientOpts {
                buf_per_queue: 32 * MIB as usize,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("connect {attempt}: {e}"));
        let q = client.q(0);
        let data = pattern(300 + attempt, 0, busy as usize);
        q.buf()[..busy as usize].copy_from_slice(&data);
        let mut reqs = Vec::new();
        for i in 0..32u64 {
            reqs.push(Req::write(i * MIB, (i * MIB) as usize, MIB as usize));
            if i % 4 == 0 {
                reqs.push(Req::read(busy + i * 4096, (i * MIB) as usize, 4096));
            }
        }
        reqs.push(Req::Flush);
        q.submit_and_abandon(&reqs);
        drop(client);
        daemon.assert_running();
    }

    let mut client = Client::connect(daemon.socket(), 1);
    let q = client.q(0);
    let got = q.read_range(busy, size - busy);
    assert_same(
        &got,
        &model[busy as usize..],
        "the range no abandoned request touched",
    );
    let data = pattern(400, 0, MIB as usize); // one segment: size_max is 1 MiB
    assert_eq!(q.write_at(0, &data), 0, "write after abandoned connections");
    assert_eq!(q.flush(), 0);
    assert_eq!(q.read_at(0, data.len()).expect("read back"), data);
    drop(client);
    daemon.stop();
}

/// `--fd N` with a listening socket: vublk accepts on it (more than once) and, not having
/// created it, leaves the socket file in place when it stops.
#[test]
fn fd_with_a_listening_socket() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 4 * MIB;
    let mut model = create_image(&img, size, 12);
    let socket = dir.path().join("inherited.sock");
    let listener = UnixListener::bind(&socket).expect("bind");

    let mut cmd = Command::new(vublk_bin());
    cmd.args(["--fd", "3", "--blk-file", img.to_str().unwrap()]);
    pass_fd(&mut cmd, listener.as_raw_fd(), 3);
    let mut daemon = Daemon::spawn(cmd, dir.path(), socket.clone(), false);
    drop(listener); // only vublk's copy remains

    for cycle in 0..2u64 {
        let mut client = Client::connect(&socket, 1);
        assert_eq!(client.capacity(), size);
        let q = client.q(0);
        let data = pattern(500 + cycle, cycle * MIB, 64 * KIB as usize);
        assert_eq!(
            q.write_at(cycle * MIB, &data),
            0,
            "write on connection {cycle}"
        );
        model[(cycle * MIB) as usize..(cycle * MIB) as usize + data.len()].copy_from_slice(&data);
        assert_same(
            &q.read_range(0, size),
            &model,
            &format!("connection {cycle}"),
        );
        drop(client);
        daemon.assert_running();
    }
    // stop() checks the exit status and that the socket file is still there.
    daemon.stop();
    assert_same(&std::fs::read(&img).unwrap(), &model, "image file");
}

/// `--fd N` with an already-connected socket: vublk serves that one connection and exits 0 when
/// it ends. libblkio 0.5.1 cannot use a connected fd for vhost-user (its "fd" property is
/// vhost-vdpa only), so the test relays between a path libblkio connects to and one end of a
/// socketpair whose other end vublk inherits, passing SCM_RIGHTS fds along.
#[test]
fn fd_with_a_connected_socket_serves_one_connection_then_exits_0() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 4 * MIB;
    let mut model = create_image(&img, size, 13);
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let relay_path = dir.path().join("relay.sock");
    let listener = UnixListener::bind(&relay_path).expect("bind relay");

    let mut cmd = Command::new(vublk_bin());
    cmd.args(["--fd", "3", "--blk-file", img.to_str().unwrap()]);
    pass_fd(&mut cmd, theirs.as_raw_fd(), 3);
    let mut daemon = Daemon::spawn(cmd, dir.path(), relay_path.clone(), false);
    drop(theirs);

    let relay = std::thread::spawn(move || {
        let (frontend, _) = listener.accept().expect("accept libblkio");
        let a = frontend.try_clone().unwrap();
        let b = ours.try_clone().unwrap();
        let to_vublk = std::thread::spawn(move || relay_one_way(&a, &b));
        relay_one_way(&ours, &frontend);
        to_vublk.join().unwrap();
    });

    let mut client = Client::connect(&relay_path, 1);
    assert_eq!(client.capacity(), size);
    let q = client.q(0);
    let data = pattern(600, MIB, 256 * KIB as usize);
    assert_eq!(
        q.write_at(MIB, &data),
        0,
        "write over the inherited connection"
    );
    assert_eq!(q.flush(), 0);
    model[MIB as usize..MIB as usize + data.len()].copy_from_slice(&data);
    assert_same(
        &q.read_range(0, size),
        &model,
        "disk over the inherited connection",
    );
    drop(client);

    let status = daemon.wait_exit(DAEMON_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "vublk --fd (connected) still running {DAEMON_TIMEOUT:?} after its connection ended; log:\n{}",
            daemon.log()
        )
    });
    daemon.check_clean_exit(status, "after its inherited connection ended");
    relay.join().expect("relay thread");
    assert_same(&std::fs::read(&img).unwrap(), &model, "image file");
}

/// Copies bytes and SCM_RIGHTS fds from `from` to `to` until EOF, then shuts `to` down for
/// writing so the peer sees the end too. vhost-user frontends wait for each reply before sending
/// a message with fds, so a message never shares a read with another's fds.
fn relay_one_way(from: &UnixStream, to: &UnixStream) {
    const MAX_FDS: usize = 16;
    let (from, to) = (from.as_raw_fd(), to.as_raw_fd());
    let mut buf = vec![0u8; 1 << 16];
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut cmsg_buf = [0u64; 64];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: all-zero is a valid msghdr.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg_buf) as _;
        // SAFETY: msg points at `iov`, `buf` and `cmsg_buf`, all live and large enough.
        let n = unsafe { libc::recvmsg(from, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            break;
        }
        let mut fds: Vec<RawFd> = Vec::new();
        // SAFETY: walking the control buffer recvmsg just filled, with the libc macros.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                        / std::mem::size_of::<RawFd>();
                    for i in 0..count {
                        fds.push(data.add(i).read_unaligned());
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        assert!(fds.len() <= MAX_FDS);
        if !send_with_fds(to, &buf[..n as usize], &fds) {
            break;
        }
        for fd in fds {
            // SAFETY: the fds came to us with the message and have been sent on; we own them.
            unsafe { libc::close(fd) };
        }
    }
    // SAFETY: shutdown(2) on a socket we own.
    unsafe { libc::shutdown(to, libc::SHUT_WR) };
}

fn send_with_fds(to: RawFd, mut data: &[u8], fds: &[RawFd]) -> bool {
    let mut first = true;
    while !data.is_empty() {
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut _,
            iov_len: data.len(),
        };
        let mut cmsg_buf = [0u64; 64];
        // SAFETY: all-zero is a valid msghdr.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if first && !fds.is_empty() {
            let payload = std::mem::size_of_val(fds);
            // SAFETY: cmsg_buf (512 bytes) holds one header plus up to 16 fds; the macros only
            // compute offsets into it.
            unsafe {
                msg.msg_control = cmsg_buf.as_mut_ptr().cast();
                msg.msg_controllen = libc::CMSG_SPACE(payload as u32) as _;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(c),
                    payload,
                );
            }
        }
        // SAFETY: msg points at live buffers set up above.
        let n = unsafe { libc::sendmsg(to, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        first = false;
        data = &data[n as usize..];
    }
    true
}

/// The daemon survives a client that connects and goes away without a word, and one that
/// fails to start (asks for too many queues).
#[test]
fn idle_and_failed_connections_do_not_disturb_the_daemon() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let model = create_image(&img, 2 * MIB, 14);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap()],
    );
    let deadline = std::time::Instant::now() + DAEMON_TIMEOUT;
    loop {
        match UnixStream::connect(daemon.socket()) {
            Ok(s) => {
                drop(s);
                break;
            }
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("connect: {e}"),
        }
    }
    let bad = Client::connect_with(
        daemon.socket(),
        ClientOpts {
            num_queues: 2,
            ..Default::default()
        },
    );
    assert!(bad.is_err(), "two queues started on a one-queue vublk");
    daemon.assert_running();
    let mut client = Client::connect(daemon.socket(), 1);
    assert_same(&client.q(0).read_range(0, 2 * MIB), &model, "disk");
    drop(client);
    daemon.stop();
}

/// What a process holds that a connection could leak: open fds, threads, and mappings of the
/// frontend's memfds (libblkio names them "libblkio-buf" and "virtio-ring").
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Footprint {
    fds: usize,
    threads: usize,
    guest_mappings: usize,
}

fn footprint(pid: u32) -> Footprint {
    let count = |dir: String| std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    Footprint {
        fds: count(format!("/proc/{pid}/fd")),
        threads: count(format!("/proc/{pid}/task")),
        guest_mappings: maps
            .lines()
            .filter(|l| l.contains("libblkio-buf") || l.contains("virtio-ring"))
            .count(),
    }
}

/// Waits (up to 5 s) for the daemon to get back to `baseline` after a disconnect.
fn wait_for_footprint(daemon: &mut Daemon, pid: u32, baseline: Footprint, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        daemon.assert_running();
        let now = footprint(pid);
        if now.fds <= baseline.fds
            && now.threads <= baseline.threads
            && now.guest_mappings <= baseline.guest_mappings
        {
            return;
        }
        if std::time::Instant::now() >= deadline {
            panic!("{what}: daemon still holds {now:?}, baseline {baseline:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connections come and go (with different queue counts, including a busy-polled queue) without
/// leaving fds, threads or mappings of the frontend's memory behind, in the supervisor or in the
/// VM's worker, which serves every connection of this VMM (the test process) and stays while
/// the VMM lives.
#[test]
fn connections_release_fds_threads_and_guest_memory() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 4 * MIB;
    let mut model = create_image(&img, size, 15);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap(), "--num-queues", "4"],
    );

    // Warm up once (lazily created resources are not leaks), then take the baselines.
    let first = Client::connect(daemon.socket(), 1);
    let worker = daemon.serving_pid();
    drop(first);
    let supervisor = daemon.pid();
    let supervisor_baseline = footprint(supervisor);
    assert_eq!(
        supervisor_baseline.guest_mappings, 0,
        "the supervisor never maps guest memory"
    );
    let start = footprint(worker);
    wait_for_footprint(
        &mut daemon,
        worker,
        Footprint {
            guest_mappings: 0,
            ..start
        },
        "after the first connection",
    );
    let baseline = footprint(worker);
    assert_eq!(baseline.guest_mappings, 0);

    for cycle in 0..8u64 {
        let nq = 1 + (cycle % 4) as i32;
        let poll = if nq < 4 && cycle % 2 == 1 { 1 } else { 0 };
        let mut client = Client::connect_with(
            daemon.socket(),
            ClientOpts {
                num_queues: nq,
                num_poll_queues: poll,
                buf_per_queue: MIB as usize,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("connection {cycle}: {e}"));
        assert_eq!(
            daemon.serving_pid(),
            worker,
            "one worker serves every connection of a VMM"
        );
        let during = footprint(worker);
        assert!(
            during.guest_mappings > 0,
            "connection {cycle}: the worker does not map the frontend's memory? {during:?}"
        );
        for (i, q) in client.queues.iter_mut().enumerate() {
            let offset = (i as u64) * MIB + cycle * 64 * KIB;
            let data = pattern(1600 + cycle * 8 + i as u64, offset, 64 * KIB as usize);
            assert_eq!(
                q.write_at(offset, &data),
                0,
                "connection {cycle} queue {i} write"
            );
            assert_eq!(q.read_at(offset, data.len()).unwrap(), data);
            model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
        drop(client);
        wait_for_footprint(
            &mut daemon,
            worker,
            baseline,
            &format!("worker after connection {cycle}"),
        );
        wait_for_footprint(
            &mut daemon,
            supervisor,
            supervisor_baseline,
            &format!("supervisor after connection {cycle}"),
        );
    }
    let mut client = Client::connect(daemon.socket(), 1);
    assert_same(&client.q(0).read_range(0, size), &model, "disk");
    drop(client);
    daemon.stop();
}

/// The client's view of a region it allocated. Only used between requests, never while the
/// device may be writing it.
fn region_mem(region: &mut blkio::MemoryRegion) -> &mut [u8] {
    // SAFETY: libblkio mapped `region.len` bytes at `region.addr` for this client and keeps them
    // until the `Blkio` is dropped (the test holds it); the caller touches them only while no
    // request using them is in flight.
    unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) }
}

/// Memory regions added and removed while the device runs (ADD_MEM_REG / REM_MEM_REG): I/O into
/// a new region works, I/O naming a removed region fails without touching the disk, and the
/// daemon drops its mapping of it.
#[test]
fn memory_regions_come_and_go_while_running() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 4 * MIB;
    let mut model = create_image(&img, size, 16);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap()],
    );
    let mut client = Client::connect(daemon.socket(), 1);
    let worker = daemon.serving_pid();
    let mapped_before = footprint(worker).guest_mappings;

    let len = MIB as usize;
    let mut region = client.add_region(len);
    let data = pattern(1700, MIB, len);
    region_mem(&mut region).copy_from_slice(&data);
    let q = client.q(0);
    let ret = q.run(&[Req::WriteRaw {
        offset: MIB,
        addr: region.addr,
        len,
    }]);
    assert_eq!(ret, [0], "write from an added region");
    model[MIB as usize..MIB as usize + len].copy_from_slice(&data);
    region_mem(&mut region).fill(0);
    let ret = q.run(&[Req::ReadRaw {
        offset: MIB,
        addr: region.addr,
        len,
    }]);
    assert_eq!(ret, [0], "read into an added region");
    assert_same(region_mem(&mut region), &data, "read into an added region");

    client.unmap_region(&region);
    // The client still has the memory, but the device must no longer accept it.
    region_mem(&mut region).copy_from_slice(&pattern(1701, 2 * MIB, len));
    let q = client.q(0);
    let ret = q.run(&[
        Req::WriteRaw {
            offset: 2 * MIB,
            addr: region.addr,
            len,
        },
        Req::ReadRaw {
            offset: 0,
            addr: region.addr,
            len: 4096,
        },
    ]);
    daemon.assert_running();
    assert!(ret[0] < 0, "write from a removed region succeeded");
    assert!(ret[1] < 0, "read into a removed region succeeded");

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while footprint(worker).guest_mappings > mapped_before {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker still maps a removed region: {:?} (before adding: {mapped_before})",
            footprint(worker)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A fresh region works, and so does the original buffer.
    let mut region2 = client.add_region(len);
    let q = client.q(0);
    let ret = q.run(&[Req::ReadRaw {
        offset: MIB,
        addr: region2.addr,
        len,
    }]);
    assert_eq!(ret, [0], "read into a second added region");
    assert_same(
        region_mem(&mut region2),
        &data,
        "read into a second added region",
    );
    assert_same(&q.read_range(0, size), &model, "disk");
    drop(client);
    daemon.stop();
    assert_same(&std::fs::read(&img).unwrap(), &model, "image file");
}

/// `--single-process` serves from the daemon itself (no worker process), and still takes the
/// next frontend after one disconnects.
#[test]
fn single_process_mode_serves_without_workers() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    create_image(&img, 4 * MIB, 17);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap(), "--single-process"],
    );
    let data = pattern(1800, MIB, 64 * KIB as usize);
    {
        let mut client = Client::connect(daemon.socket(), 1);
        assert_eq!(client.q(0).write_at(MIB, &data), 0);
        assert_eq!(daemon.serving_pid(), daemon.pid());
        assert!(
            workers_of(daemon.pid()).is_empty(),
            "--single-process started a worker"
        );
    }
    let mut client = Client::connect(daemon.socket(), 1);
    assert_eq!(client.q(0).read_at(MIB, data.len()).unwrap(), data);
    drop(client);
    daemon.stop();
}
