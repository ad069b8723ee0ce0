//! End-to-end data-path tests: libblkio writes and reads through vublk, and the backing file is
//! checked afterwards. Every comparison is against a model of the disk built from the writes the
//! test made, so a misplaced, lost, or stale sector shows up.

mod common;

use std::path::Path;

use common::*;

/// Request sizes from one sector to 1 MiB, including sizes that are not a power of two.
const SIZES: &[usize] = &[
    512,
    1024,
    1536,
    4096,
    7680,
    8192,
    12 * 1024 + 512,
    65536,
    65536 + 512,
    131072,
    262144,
    524288 - 512,
    1 << 20,
];

/// One batch of non-overlapping writes (so their order does not matter), submitted in a shuffled
/// order with up to `in_flight` at once; returns the requests and the data each one carries.
fn random_writes(
    rng: &mut Rng,
    q: &mut Queue,
    limits: Limits,
    region: (u64, u64),
    count: usize,
    seed: u64,
    unaligned_segments: bool,
) -> Vec<(Req, u64, Vec<u8>)> {
    let (region_start, region_len) = region;
    let mut out = Vec::new();
    let mut cursor = region_start;
    let mut buf_off = 0usize;
    for n in 0..count {
        let len = rng.pick(SIZES);
        let gap = rng.below(64) * 512;
        let offset = cursor + gap;
        if offset + len as u64 > region_start + region_len {
            break;
        }
        cursor = offset + len as u64;
        if buf_off + len > q.buf_len() {
            break;
        }
        // Page-align each request's buffer start when segments must stay aligned.
        let data = pattern(seed ^ ((n as u64) << 32), offset, len);
        q.buf()[buf_off..buf_off + len].copy_from_slice(&data);
        let nsegs = 1 + rng.below(4) as usize;
        let segs = split_segments(rng, buf_off, len, nsegs, limits, unaligned_segments);
        let fua = rng.below(8) == 0;
        out.push((Req::Write { offset, segs, fua }, offset, data));
        buf_off = (buf_off + len + 4095) & !4095;
    }
    rng.shuffle(&mut out);
    out
}

/// Reads scattered ranges (many sizes, multi-segment, all in flight together) and compares them
/// with `model`.
fn verify_random_reads(rng: &mut Rng, q: &mut Queue, limits: Limits, model: &[u8], count: usize) {
    let capacity = model.len() as u64;
    let mut reqs = Vec::new();
    let mut buf_off = 0usize;
    for _ in 0..count {
        let len = rng.pick(SIZES);
        if buf_off + len > q.buf_len() {
            break;
        }
        let offset = rng.below((capacity - len as u64) / 512 + 1) * 512;
        let nsegs = 1 + rng.below(4) as usize;
        let segs = split_segments(rng, buf_off, len, nsegs, limits, true);
        reqs.push(Req::Read { offset, segs });
        buf_off = (buf_off + len + 4095) & !4095;
    }
    // Poison the buffer so a read that "succeeds" without transferring data is caught.
    q.buf().fill(0xa5);
    let results = q.run(&reqs);
    let buf = q.buf().to_vec();
    for (i, (ret, r)) in results.iter().zip(&reqs).enumerate() {
        let Req::Read { offset, segs } = r else {
            unreachable!()
        };
        assert_eq!(*ret, 0, "read {i} ({r:?}) failed");
        let mut got = Vec::new();
        for s in segs {
            got.extend_from_slice(&buf[s.buf_off..s.buf_off + s.len]);
        }
        let o = *offset as usize;
        assert_same(
            &got,
            &model[o..o + got.len()],
            &format!("read {i} at {offset:#x}"),
        );
    }
}

/// Writes, reads back and compares (see the tests below); the image lives in `image_dir` (a
/// fresh temp dir when `None`). `check` sees the daemon and its temp dir while the client is still connected.
fn write_read_verify(
    image_dir: Option<&Path>,
    extra_args: &[&str],
    unaligned_segments: bool,
    check: impl FnOnce(&Daemon, &Path),
) {
    let dir = test_dir();
    let image_dir = tempfile::Builder::new()
        .prefix("vublk-e2e-")
        .tempdir_in(image_dir.unwrap_or(dir.path()))
        .expect("image dir");
    let img = image_dir.path().join("disk.img");
    let size = 32 * MIB;
    let mut model = create_image(&img, size, 1);
    let mut args = vec!["--blk-file", img.to_str().unwrap()];
    args.extend_from_slice(extra_args);
    let mut daemon = Daemon::start(vublk_bin(), dir.path(), &args);

    let mut client = Client::connect_with(
        daemon.socket(),
        ClientOpts {
            buf_per_queue: 32 * MIB as usize,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("connect: {e}"));
    assert_eq!(client.capacity(), size, "capacity");
    let limits = client.limits();
    let mut rng = Rng::new(7);
    let q = client.q(0);

    for round in 0..3u64 {
        let writes = random_writes(
            &mut rng,
            q,
            limits,
            (0, size),
            64,
            100 + round,
            unaligned_segments,
        );
        assert!(writes.len() >= 32, "only {} writes fit", writes.len());
        let reqs: Vec<Req> = writes.iter().map(|(r, _, _)| r.clone()).collect();
        let results = q.run(&reqs);
        for (i, (ret, r)) in results.iter().zip(&reqs).enumerate() {
            assert_eq!(*ret, 0, "round {round}: write {i} ({r:?}) failed");
        }
        assert_eq!(q.flush(), 0, "flush after round {round}");
        for (_, offset, data) in &writes {
            model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
        verify_random_reads(&mut rng, q, limits, &model, 64);
    }

    let whole = q.read_range(0, size);
    assert_same(&whole, &model, "whole disk read back through vublk");
    check(&daemon, dir.path());
    drop(client);

    daemon.stop();
    let on_disk = std::fs::read(&img).expect("read image");
    assert_same(&on_disk, &model, "image file after vublk stopped");
}

/// Many sizes, offsets and segment layouts (including segments split at arbitrary bytes), 64
/// requests in flight, FUA on some; read back through vublk and from the file.
#[test]
fn writes_of_many_shapes_read_back_and_reach_the_file() {
    write_read_verify(None, &[], true, |_, _| {});
}

/// The same with the image on tmpfs, which has no non-blocking mode: the queue thread reads
/// and writes it itself instead of letting io_uring punt every request to a worker thread.
#[test]
fn images_in_memory_are_read_and_written_by_the_queue_thread() {
    let control = std::env::temp_dir().join(format!("vublk-inline-{}.sock", std::process::id()));
    let control_arg = control.to_str().unwrap().to_string();
    write_read_verify(
        Some(Path::new("/dev/shm")),
        &["--control-socket", &control_arg],
        true,
        |_, _| {
            // 3 rounds of at least 32 writes and 64 reads, then the whole disk.
            let totals = device_totals(&control, |t| t["inline"].as_u64().unwrap_or(0) >= 3 * 96);
            assert!(
                totals["inline"].as_u64() <= totals["requests"].as_u64(),
                "{totals}"
            );
        },
    );
}

/// The same through O_DIRECT, with page-aligned segments (what a real guest's page cache sends).
#[test]
fn direct_io_writes_read_back_and_reach_the_file() {
    let control = std::env::temp_dir().join(format!("vublk-direct-{}.sock", std::process::id()));
    let control_arg = control.to_str().unwrap().to_string();
    write_read_verify(
        None,
        &["--direct", "--control-socket", &control_arg],
        false,
        |_, _| {
            // A synchronous O_DIRECT request would wait for the device on the queue thread.
            let totals = device_totals(&control, |t| t["requests"].as_u64().unwrap_or(0) >= 3 * 96);
            assert_eq!(
                totals["inline"].as_u64(),
                Some(0),
                "O_DIRECT requests done inline: {totals}"
            );
        },
    );
}

/// A driver waiting on each request (iodepth 1, closed loop) gives the queue thread's polling
/// policy epochs to judge: it polls first, then tries sleeping, and `vublk status` counts both.
/// The try ends even when sleeping serves fewer requests in 5 ms than it needs for a verdict.
#[test]
fn the_polling_policy_measures_both_modes_and_reports_its_epochs() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    create_image(&img, 4 * MIB, 3);
    let control = dir.path().join("control.sock");
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &[
            "--blk-file",
            img.to_str().unwrap(),
            "--control-socket",
            control.to_str().unwrap(),
        ],
    );
    daemon.wait_for(&control);
    let mut client = Client::connect(daemon.socket(), 1);
    let q = client.q(0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut offset = 0;
    loop {
        let busy_until = std::time::Instant::now() + std::time::Duration::from_millis(300);
        while std::time::Instant::now() < busy_until {
            assert!(q.read_at(offset, 4096).is_ok(), "read at {offset}");
            offset = (offset + 4096) % (4 * MIB);
        }
        let totals = device_totals(&control, |_| true);
        let count = |k: &str| totals[k].as_u64().unwrap_or(0);
        if count("polling_epochs") >= 2 && count("sleeping_epochs") >= 1 {
            // Epochs last 25 ms (a try 5 ms) or until they have served enough to judge.
            assert!(count("polling_epoch_ns") >= 2 * 25_000_000, "{totals}");
            assert!(count("sleeping_epoch_ns") >= 5_000_000, "{totals}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no epochs of both modes after 20 s: {totals}"
        );
    }
    drop(client);
    daemon.stop();
}

/// Write-zeroes (with and without unmap) and discard zero exactly their range and nothing else.
#[test]
fn write_zeroes_and_discard_zero_exactly_their_range() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 16 * MIB;
    let mut model = create_image(&img, size, 2);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap()],
    );
    let mut client = Client::connect(daemon.socket(), 1);

    let max_wz = client.prop_u64("max-write-zeroes-len");
    let max_discard = client.prop_u64("max-discard-len");
    let discard_align = client.prop_i32("discard-alignment") as u64;
    assert!(
        max_wz > 0,
        "vublk does not offer WRITE_ZEROES (max-write-zeroes-len 0) for a regular file"
    );

    // (offset, len, no_unmap): unaligned to 4 KiB on purpose, one crossing a 1 MiB boundary.
    let wz = [
        (MIB + 512, 300 * KIB, false),
        (3 * MIB - 4096, 12 * KIB + 512, true),
        (5 * MIB, 512, false),
        (size - 64 * KIB, 64 * KIB, false),
    ];
    let q = client.q(0);
    let reqs: Vec<Req> = wz
        .iter()
        .map(|&(offset, len, no_unmap)| Req::WriteZeroes {
            offset,
            len: len.min(max_wz),
            no_unmap,
        })
        .collect();
    let results = q.run(&reqs);
    for (i, (ret, r)) in results.iter().zip(&reqs).enumerate() {
        assert_eq!(*ret, 0, "write-zeroes {i} ({r:?}) failed");
        let Req::WriteZeroes { offset, len, .. } = r else {
            unreachable!()
        };
        model[*offset as usize..(*offset + *len) as usize].fill(0);
    }

    if max_discard > 0 {
        let align = discard_align.max(512);
        let offset = (9 * MIB).next_multiple_of(align);
        let len = (256 * KIB).next_multiple_of(align).min(max_discard);
        assert_eq!(q.discard(offset, len), 0, "discard {offset:#x}+{len:#x}");
        model[offset as usize..(offset + len) as usize].fill(0);
    } else {
        eprintln!("note: vublk does not offer DISCARD here; discard not tested");
    }
    assert_eq!(q.flush(), 0, "flush");

    let whole = q.read_range(0, size);
    assert_same(&whole, &model, "disk after write-zeroes/discard");
    drop(client);
    daemon.stop();
    let on_disk = std::fs::read(&img).expect("read image");
    assert_eq!(on_disk.len() as u64, size, "image size changed");
    assert_same(&on_disk, &model, "image file after write-zeroes/discard");
}

/// Requests beyond the end fail; ones that straddle it fail without writing the in-range part;
/// none of it disturbs requests in the same batch or later ones on the same queue.
#[test]
fn out_of_range_requests_fail_and_the_queue_keeps_working() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 4 * MIB;
    let model = create_image(&img, size, 3);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap()],
    );
    let mut client = Client::connect(daemon.socket(), 1);
    let cap = client.capacity();
    assert_eq!(cap, size);
    let q = client.q(0);
    q.buf().fill(0xee);

    let huge = !511u64; // sector 2^55-1: sector * 512 + len overflows u64
    let reqs = vec![
        Req::read(0, 0, 4096),               // 0 ok
        Req::read(cap, 8192, 512),           // 1 starts at the end
        Req::read(cap - 512, 16384, 1024),   // 2 straddles the end
        Req::read(cap - 4096, 32768, 4096),  // 3 ok, last 4 KiB
        Req::read(cap + GIB, 65536, 512),    // 4 far beyond
        Req::read(huge, 131072, 1024),       // 5 arithmetic overflow
        Req::write(cap, 262144, 512),        // 6 write at the end
        Req::write(cap - 512, 262144, 1024), // 7 write straddling the end
        Req::write(huge, 262144, 512),       // 8 write at overflow
        Req::read(cap - 512, 524288, 512),   // 9 ok, last sector
        Req::WriteZeroes {
            offset: cap - 512,
            len: 1024,
            no_unmap: false,
        }, // 10 straddles
        Req::WriteZeroes {
            offset: cap,
            len: 512,
            no_unmap: true,
        }, // 11 beyond
    ];
    let results = q.run(&reqs);
    let ok = [0usize, 3, 9];
    for (i, (ret, r)) in results.iter().zip(&reqs).enumerate() {
        if ok.contains(&i) {
            assert_eq!(*ret, 0, "in-range request {i} ({r:?}) failed");
        } else {
            assert!(*ret < 0, "out-of-range request {i} ({r:?}) succeeded");
        }
    }
    let buf = q.buf().to_vec();
    assert_same(&buf[..4096], &model[..4096], "read 0");
    let end = cap as usize;
    assert_same(&buf[32768..32768 + 4096], &model[end - 4096..], "read 3");
    assert_same(&buf[524288..524288 + 512], &model[end - 512..], "read 9");
    // A straddling write or write-zeroes must not have changed the in-range part.
    let tail = q.read_at(cap - 4096, 4096).expect("read the last 4 KiB");
    assert_same(
        &tail,
        &model[end - 4096..],
        "last 4 KiB after failed straddling writes",
    );

    // The same queue still works for reads and writes after the failures.
    for round in 0..3u64 {
        let data = pattern(50 + round, cap - 4096, 4096);
        assert_eq!(
            q.write_at(cap - 4096, &data),
            0,
            "write of the last 4 KiB, round {round}"
        );
        assert_eq!(
            q.read_at(cap - 4096, 4096).expect("read back last 4 KiB"),
            data
        );
        assert!(
            q.read_at(cap, 512).is_err(),
            "read past the end succeeded, round {round}"
        );
    }
    let last = pattern(52, cap - 4096, 4096);
    let mut expected = model.clone();
    expected[end - 4096..].copy_from_slice(&last);
    assert_eq!(q.flush(), 0);
    assert_same(
        &q.read_range(0, cap),
        &expected,
        "disk after out-of-range requests",
    );
    drop(client);
    daemon.stop();

    let on_disk = std::fs::read(&img).expect("read image");
    assert_eq!(
        on_disk.len() as u64,
        size,
        "a write beyond the end changed the image size"
    );
    assert_same(
        &on_disk,
        &expected,
        "image file after out-of-range requests",
    );
}

/// Each thread drives its own queue over its own part of the disk, concurrently; afterwards every
/// queue sees every other queue's data.
fn parallel_queues(num_queues: usize) {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 32 * MIB;
    let model = create_image(&img, size, 4);
    let nq = num_queues.to_string();
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap(), "--num-queues", &nq],
    );

    // More queues than offered must be refused.
    let too_many = Client::connect_with(
        daemon.socket(),
        ClientOpts {
            num_queues: num_queues as i32 + 1,
            ..Default::default()
        },
    );
    match too_many {
        Ok(_) => panic!(
            "libblkio started {} queues on a {num_queues}-queue vublk",
            num_queues + 1
        ),
        Err(e) => assert_eq!(e.stage, "start", "unexpected failure: {e}"),
    }

    let mut client = Client::connect_with(
        daemon.socket(),
        ClientOpts {
            num_queues: num_queues as i32,
            buf_per_queue: 24 * MIB as usize,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("connect with {num_queues} queues: {e}"));
    assert_eq!(
        client.prop_i32("max-queues"),
        num_queues as i32,
        "max-queues"
    );
    let limits = client.limits();
    let part = size / num_queues as u64;

    let models: Vec<(u64, Vec<u8>)> = std::thread::scope(|s| {
        let handles: Vec<_> = client
            .queues
            .iter_mut()
            .enumerate()
            .map(|(i, q)| {
                let start = i as u64 * part;
                let mut part_model = model[start as usize..(start + part) as usize].to_vec();
                s.spawn(move || {
                    let mut rng = Rng::new(1000 + i as u64);
                    for round in 0..3u64 {
                        let writes = random_writes(
                            &mut rng,
                            q,
                            limits,
                            (start, part),
                            32,
                            (i as u64) << 8 | round,
                            true,
                        );
                        let reqs: Vec<Req> = writes.iter().map(|(r, _, _)| r.clone()).collect();
                        for (j, ret) in q.run(&reqs).iter().enumerate() {
                            assert_eq!(*ret, 0, "queue {i} round {round} write {j} failed");
                        }
                        assert_eq!(q.flush(), 0, "queue {i} flush");
                        for (_, offset, data) in &writes {
                            let o = (*offset - start) as usize;
                            part_model[o..o + data.len()].copy_from_slice(data);
                        }
                        let got = q.read_range(start, part);
                        assert_same(&got, &part_model, &format!("queue {i} round {round}"));
                    }
                    (start, part_model)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let mut whole_model = vec![0u8; size as usize];
    for (start, m) in &models {
        whole_model[*start as usize..*start as usize + m.len()].copy_from_slice(m);
    }
    for i in 0..num_queues {
        let got = client.q(i).read_range(0, size);
        assert_same(&got, &whole_model, &format!("whole disk through queue {i}"));
    }
    drop(client);
    daemon.stop();
    let on_disk = std::fs::read(&img).expect("read image");
    assert_same(&on_disk, &whole_model, "image file after parallel queues");
}

#[test]
fn two_queues_in_parallel() {
    parallel_queues(2);
}

#[test]
fn four_queues_in_parallel() {
    parallel_queues(4);
}

/// Requests at the advertised limits: as many segments as SEG_MAX allows (of uneven lengths,
/// split differently for the write and the read) and segments as long as SIZE_MAX allows.
#[test]
fn requests_at_the_segment_limits() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 16 * MIB;
    let mut model = create_image(&img, size, 5);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap()],
    );
    let mut client = Client::connect_with(
        daemon.socket(),
        ClientOpts {
            queue_size: Some(1024),
            buf_per_queue: 16 * MIB as usize,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("connect: {e}"));
    let limits = client.limits();
    // A request also needs a header and a status descriptor, and libblkio does not use indirect
    // descriptors, so stay within the ring too.
    let nsegs = limits.max_segments.min(1024 - 2);
    assert!(nsegs >= 2, "seg_max {nsegs}");
    let mut rng = Rng::new(77);
    let q = client.q(0);

    // nsegs segments of 1..=1024 bytes, adding up to whole sectors.
    let mut lens: Vec<usize> = (0..nsegs).map(|_| 1 + rng.below(1024) as usize).collect();
    let total: usize = lens.iter().sum();
    *lens.last_mut().unwrap() += total.next_multiple_of(512) - total;
    let total: usize = lens.iter().sum();
    let offset = 3 * MIB + 512;
    let data = pattern(1500, offset, total);
    let mut segs = Vec::new();
    let mut pos = 0;
    for (i, len) in lens.iter().enumerate() {
        // Scatter the segments over the buffer in reverse order, 2 KiB apart.
        let buf_off = (nsegs - 1 - i) * 2048;
        q.buf()[buf_off..buf_off + len].copy_from_slice(&data[pos..pos + len]);
        segs.push(Seg { buf_off, len: *len });
        pos += len;
    }
    let ret = q.run(&[Req::Write {
        offset,
        segs,
        fua: false,
    }]);
    assert_eq!(ret, [0], "write with {nsegs} segments");
    model[offset as usize..offset as usize + total].copy_from_slice(&data);

    // Read it back in nsegs segments split at other places.
    let read_segs = split_segments(&mut rng, 4 * MIB as usize, total, nsegs, limits, true);
    q.buf().fill(0x5a);
    assert_eq!(
        q.run(&[Req::Read {
            offset,
            segs: read_segs.clone()
        }]),
        [0],
        "read with {} segments",
        read_segs.len()
    );
    let mut got = Vec::new();
    for s in &read_segs {
        got.extend_from_slice(&q.buf()[s.buf_off..s.buf_off + s.len]);
    }
    assert_same(&got, &data, "many-segment read");

    // Two segments of SIZE_MAX bytes each.
    let seg_len = limits.max_segment_len.min(4 * MIB as usize);
    let offset = 8 * MIB;
    let data = pattern(1501, offset, 2 * seg_len);
    q.buf()[..2 * seg_len].copy_from_slice(&data);
    let segs = vec![
        Seg {
            buf_off: seg_len,
            len: seg_len,
        },
        Seg {
            buf_off: 0,
            len: seg_len,
        },
    ];
    let written: Vec<u8> = [&data[seg_len..], &data[..seg_len]].concat();
    assert_eq!(
        q.run(&[Req::Write {
            offset,
            segs,
            fua: true
        }]),
        [0],
        "write of two {seg_len}-byte segments"
    );
    model[offset as usize..offset as usize + written.len()].copy_from_slice(&written);

    assert_eq!(q.flush(), 0);
    assert_same(
        &q.read_range(0, size),
        &model,
        "disk after limit-sized requests",
    );
    drop(client);
    daemon.stop();
    assert_same(&std::fs::read(&img).unwrap(), &model, "image file");
}

/// Requests a well-behaved driver never sends: no data at all, and data that is not a whole
/// number of sectors. A zero-length request may succeed or fail, but the daemon must survive it;
/// a write of a partial sector must fail (as QEMU's virtio-blk fails it) and change nothing.
#[test]
fn malformed_lengths_fail_without_harm() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 4 * MIB;
    let model = create_image(&img, size, 6);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap()],
    );
    let mut client = Client::connect(daemon.socket(), 1);
    let q = client.q(0);
    q.buf().fill(0x11);

    let results = q.run(&[
        Req::read(MIB, 0, 0),
        Req::write(MIB, 0, 0),
        Req::write(2 * MIB, 4096, 1000),
        Req::read(2 * MIB, 8192, 1000),
    ]);
    daemon.assert_running();
    assert!(
        results[2] < 0,
        "a 1000-byte write succeeded (results {results:?})"
    );

    assert_eq!(q.flush(), 0);
    assert_same(
        &q.read_range(0, size),
        &model,
        "disk after malformed requests",
    );
    drop(client);
    daemon.stop();
    assert_same(&std::fs::read(&img).unwrap(), &model, "image file");
}

/// More than 65536 requests on one queue, so the 16-bit avail and used indexes wrap (and, with
/// a 64-entry ring, the descriptor table wraps a thousand times), with data checked throughout.
#[test]
fn ring_indexes_wrap_around() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    let size = 4 * MIB;
    let mut model = create_image(&img, size, 8);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap()],
    );
    let mut client = Client::connect_with(
        daemon.socket(),
        ClientOpts {
            queue_size: Some(64),
            buf_per_queue: MIB as usize,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("connect: {e}"));
    let q = client.q(0);
    let mut rng = Rng::new(88);
    const BATCH: usize = 256; // more than the ring holds, so libblkio's backlog refills it
    let sectors = size / 512;
    let mut total = 0usize;
    let mut batch_no = 0u64;
    while total < 70_000 {
        // Half writes of one sector, half reads of one sector elsewhere; distinct sectors per
        // batch so completion order does not matter.
        let mut used = std::collections::HashSet::new();
        let mut reqs = Vec::with_capacity(BATCH);
        let mut writes = Vec::new();
        for i in 0..BATCH {
            let sector = loop {
                let s = rng.below(sectors);
                if used.insert(s) {
                    break s;
                }
            };
            let offset = sector * 512;
            if i % 2 == 0 {
                let data = pattern(batch_no << 16 | i as u64, offset, 512);
                q.buf()[i * 512..(i + 1) * 512].copy_from_slice(&data);
                reqs.push(Req::write(offset, i * 512, 512));
                writes.push((offset, data));
            } else {
                reqs.push(Req::read(offset, i * 512, 512));
            }
        }
        let results = q.run(&reqs);
        let buf = q.buf()[..BATCH * 512].to_vec();
        for (i, (ret, r)) in results.iter().zip(&reqs).enumerate() {
            assert_eq!(*ret, 0, "request {} ({r:?}) failed", total + i);
            if let Req::Read { offset, .. } = r {
                let o = *offset as usize;
                assert_same(
                    &buf[i * 512..(i + 1) * 512],
                    &model[o..o + 512],
                    &format!("read {} at {offset:#x}", total + i),
                );
            }
        }
        for (offset, data) in writes {
            model[offset as usize..offset as usize + 512].copy_from_slice(&data);
        }
        total += BATCH;
        batch_no += 1;
    }
    assert_eq!(q.flush(), 0);
    assert_same(&q.read_range(0, size), &model, "disk after 70000 requests");
    drop(client);
    daemon.stop();
    assert_same(&std::fs::read(&img).unwrap(), &model, "image file");
}

/// An image on tmpfs is served through a mapping (io/mapped.rs). If its owner truncates it under
/// vublk, touching the lost pages must fail those requests, not kill the process serving them;
/// what is still in the file stays readable and writable.
#[test]
fn a_mapped_image_truncated_under_vublk_fails_requests_not_the_daemon() {
    let dir = test_dir();
    let image_dir = tempfile::Builder::new()
        .prefix("vublk-e2e-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let img = image_dir.path().join("disk.img");
    let size = 4 * MIB;
    let model = create_image(&img, size, 3);
    let mut daemon = Daemon::start(
        vublk_bin(),
        dir.path(),
        &["--blk-file", img.to_str().unwrap()],
    );
    let mut client = Client::connect(daemon.socket(), 1);
    let q = client.q(0);
    assert_same(
        &q.read_at(3 * MIB, 4096).unwrap(),
        &model[3 * MIB as usize..][..4096],
        "before truncation",
    );

    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    assert!(
        q.read_at(3 * MIB, 4096).is_err(),
        "a read of a page the file no longer has succeeded"
    );
    assert!(
        q.read_at(2 * MIB, 4096).is_err(),
        "a read past the new end succeeded"
    );
    assert_same(
        &q.read_at(4096, 4096).unwrap(),
        &model[4096..8192],
        "inside the file after truncation",
    );
    daemon.assert_running();
    let worker = daemon.serving_pid();
    assert!(
        std::path::Path::new(&format!("/proc/{worker}")).exists(),
        "the worker died"
    );
    drop(client);
    daemon.stop();
}
