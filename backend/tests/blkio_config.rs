//! What the device looks like to a frontend: capacity, block size, queues, cache mode,
//! read-only, and the null backing.

mod common;

use std::path::Path;

use blkio::Errno;
use common::*;

fn connect_opts(socket: &Path, opts: ClientOpts) -> Client {
    Client::connect_with(socket, opts.clone()).unwrap_or_else(|e| panic!("connect {opts:?}: {e}"))
}

/// The access mode vublk opened `image` with, from /proc/PID/fdinfo.
fn open_mode_of(pid: u32, image: &Path) -> Option<i32> {
    let image = image.canonicalize().ok()?;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()? {
        let entry = entry.ok()?;
        if std::fs::read_link(entry.path()).ok().as_deref() == Some(image.as_path()) {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                entry.file_name().to_str()?
            ))
            .ok()?;
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?.trim();
            let flags = i32::from_str_radix(flags, 8).ok()?;
            return Some(flags & libc::O_ACCMODE);
        }
    }
    None
}

/// --read-only: the device says RO (libblkio refuses a read-write start), reads work, writes
/// fail, the image is opened read-only and is unchanged.
///
/// libblkio fails writes on a read-only device itself (EBADF) without sending them, so whether
/// vublk rejects a write it is sent is left to the protocol-level tests.
#[test]
fn read_only_serves_reads_and_refuses_writes() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 4 * MIB;
    let model = create_image(&img, size, 20);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap(), "--read-only"],
    );

    let rw = Client::connect_with(daemon.socket(), ClientOpts::default());
    match rw {
        Ok(_) => {
            panic!("a read-write start succeeded: vublk --read-only does not offer VIRTIO_BLK_F_RO")
        }
        Err(e) => assert_eq!(
            (e.stage, e.errno()),
            ("start", Errno::ROFS),
            "unexpected failure: {e}"
        ),
    }
    daemon.assert_running();

    let mut client = connect_opts(
        daemon.socket(),
        ClientOpts {
            read_only: true,
            ..Default::default()
        },
    );
    assert!(client.prop_bool("read-only"));
    assert_eq!(client.capacity(), size);
    let q = client.q(0);
    assert_same(
        &q.read_range(0, size),
        &model,
        "reads on a read-only device",
    );
    let results = q.run(&[
        Req::write(0, 0, 4096),
        Req::WriteZeroes {
            offset: MIB,
            len: 4096,
            no_unmap: false,
        },
        Req::read(2 * MIB, 8192, 4096),
    ]);
    assert!(results[0] < 0, "write on a read-only device succeeded");
    assert!(
        results[1] < 0,
        "write-zeroes on a read-only device succeeded"
    );
    assert_eq!(results[2], 0, "read next to failed writes");
    assert_same(
        &q.buf()[8192..8192 + 4096],
        &model[2 * MIB as usize..][..4096],
        "read",
    );

    assert_eq!(
        open_mode_of(daemon.serving_pid(), &img),
        Some(libc::O_RDONLY),
        "vublk --read-only should hold the image open O_RDONLY"
    );
    drop(client);
    daemon.stop();
    assert_same(
        &std::fs::read(&img).unwrap(),
        &model,
        "image after --read-only",
    );
}

/// Capacity is the image size, for odd sizes too. A size that is not a whole number of sectors
/// may be rounded down (the tail is unreachable) or up (the tail reads as zeroes, like QEMU).
#[test]
fn capacity_matches_the_image() {
    for (i, size) in [MIB, 5 * MIB + 1536, 3 * MIB + 100].into_iter().enumerate() {
        let dir = test_dir();
        let img = dir.path().join("disk.img");
        let model = create_image(&img, size, 21 + i as u64);
        let mut daemon = Daemon::start(
            vublk_bin(),
            dir.path(),
            &["--blk-file", img.to_str().unwrap()],
        );
        let mut client = Client::connect(daemon.socket(), 1);
        let cap = client.capacity();
        let (down, up) = (size / 512 * 512, size.next_multiple_of(512));
        assert!(
            cap == down || cap == up,
            "capacity {cap} for a {size}-byte image (want {down} or {up})"
        );
        // The last sector is readable and holds the image's data (zero-padded past EOF); the
        // next one is not readable.
        let last = client
            .q(0)
            .read_at(cap - 512, 512)
            .expect("read the last sector");
        let mut want = vec![0u8; 512];
        let have = (size.min(cap) - (cap - 512)) as usize;
        want[..have].copy_from_slice(&model[(cap - 512) as usize..][..have]);
        assert_same(&last, &want, "last sector");
        assert!(
            client.q(0).read_at(cap, 512).is_err(),
            "read past capacity {cap} succeeded"
        );
        drop(client);
        daemon.stop();
    }
}

/// Config space as libblkio reads it: block size, cache mode, queue count, segment limits.
#[test]
fn config_space_reflects_the_options() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 8 * MIB;
    let model = create_image(&img, size, 22);
    let img = img.to_str().unwrap();

    // Defaults: 512-byte blocks, write cache on, one queue.
    {
        let mut daemon = Daemon::start(vublk_bin(), dir.path(), &["--blk-file", img]);
        let client = Client::connect(daemon.socket(), 1);
        assert_eq!(
            client.prop_i32("request-alignment"),
            512,
            "default blk-size"
        );
        assert!(
            client.prop_bool("flush-needed"),
            "default write-cache should be on"
        );
        assert_eq!(client.prop_i32("max-queues"), 1, "default num-queues");
        let limits = client.limits();
        assert!(
            limits.max_segments >= 2,
            "seg_max {} (SEG_MAX offered?)",
            limits.max_segments
        );
        assert!(
            limits.max_segment_len != usize::MAX,
            "size_max not advertised (SIZE_MAX offered?)"
        );
        drop(client);
        daemon.stop();
    }

    // --blk-size 4096 --write-cache off --num-queues 3
    {
        let mut daemon = Daemon::start(
            vublk_bin(),
            dir.path(),
            &[
                "--blk-file",
                img,
                "--blk-size",
                "4096",
                "--write-cache",
                "off",
                "--num-queues",
                "3",
            ],
        );
        let mut client = Client::connect(daemon.socket(), 3);
        assert_eq!(
            client.prop_i32("request-alignment"),
            4096,
            "--blk-size 4096"
        );
        assert_eq!(client.prop_i32("optimal-io-alignment") % 4096, 0);
        assert!(
            !client.prop_bool("flush-needed"),
            "--write-cache off still reports writeback"
        );
        assert_eq!(client.prop_i32("max-queues"), 3, "--num-queues 3");
        assert_eq!(client.capacity(), size);
        for i in 0..3 {
            let q = client.q(i);
            let data = pattern(700 + i as u64, i as u64 * MIB, 16 * KIB as usize);
            assert_eq!(
                q.write_at(i as u64 * MIB, &data),
                0,
                "4K-aligned write on queue {i}"
            );
            assert_eq!(q.read_at(i as u64 * MIB, data.len()).unwrap(), data);
        }
        // Flush must still be accepted when the cache is off.
        assert_eq!(client.q(0).flush(), 0);
        drop(client);
        daemon.stop();
    }
    let _ = model;
}

/// --queue-size is the largest ring a frontend may set up.
#[test]
fn queue_size_limits_the_ring() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    create_image(&img, MIB, 23);
    let img = img.to_str().unwrap();

    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img, "--queue-size", "256"],
    );
    for (qs, ok) in [(256, true), (64, true), (512, false)] {
        let r = Client::connect_with(
            daemon.socket(),
            ClientOpts {
                queue_size: Some(qs),
                ..Default::default()
            },
        );
        match (r, ok) {
            (Ok(mut c), true) => assert_eq!(c.q(0).read_at(0, 4096).map(|_| ()), Ok(())),
            (Err(e), true) => panic!("queue size {qs} refused by --queue-size 256: {e}"),
            (Ok(_), false) => panic!("queue size {qs} accepted by --queue-size 256"),
            (Err(e), false) => assert_eq!(e.stage, "start", "{e}"),
        }
        daemon.assert_running();
    }
    daemon.stop();

    // The default maximum is 1024.
    let mut daemon = Daemon::start(vublk_bin(), dir.path(), &["--blk-file", img]);
    let mut c = connect_opts(
        daemon.socket(),
        ClientOpts {
            queue_size: Some(1024),
            ..Default::default()
        },
    );
    assert!(c.q(0).read_at(0, 4096).is_ok());
    drop(c);
    let r = Client::connect_with(
        daemon.socket(),
        ClientOpts {
            queue_size: Some(2048),
            ..Default::default()
        },
    );
    assert!(
        r.is_err(),
        "queue size 2048 accepted by default vublk (max 1024)"
    );
    daemon.assert_running();
    daemon.stop();
}

/// --null SIZE: capacity SIZE, reads return zeroes, writes succeed and are dropped.
#[test]
fn null_backing_reads_zeroes_and_drops_writes() {
    let dir = test_dir();
    let mut daemon = Daemon::start(vublk_bin(), dir.path(), &["--null", "1G"]);
    let mut client = Client::connect(daemon.socket(), 1);
    let cap = client.capacity();
    assert_eq!(cap, GIB, "--null 1G capacity");
    let q = client.q(0);

    let offsets = [0, 4096, 512 * MIB + 512, cap - MIB];
    let data = pattern(800, 0, MIB as usize);
    for &o in &offsets {
        assert_eq!(q.write_at(o, &data), 0, "write at {o:#x} on null");
    }
    assert_eq!(q.flush(), 0, "flush on null");
    for &o in &offsets {
        q.buf().fill(0xa5);
        let got = q.read_at(o, MIB as usize).expect("read on null");
        assert!(
            got.iter().all(|&b| b == 0),
            "null read at {o:#x} returned non-zero data"
        );
    }
    assert!(
        q.read_at(cap, 512).is_err(),
        "read past the end of null succeeded"
    );
    drop(client);
    daemon.stop();
}

/// SIZE suffixes (powers of 1024), and the null:SIZE spelling of --blk-file.
#[test]
fn null_sizes_and_spellings() {
    let cases: &[(&[&str], u64)] = &[
        (&["--null", "64K"], 64 * KIB),
        (&["--null", "3M"], 3 * MIB),
        (&["--null", "1048576"], MIB),
        (&["--null", "2T"], 2 * 1024 * GIB),
        (&["--blk-file", "null:5M"], 5 * MIB),
    ];
    for (args, want) in cases {
        let dir = test_dir();
        let mut daemon = Daemon::start(vublk_bin(), dir.path(), args);
        let client = Client::connect(daemon.socket(), 1);
        assert_eq!(client.capacity(), *want, "capacity for {args:?}");
        drop(client);
        daemon.stop();
    }
}
