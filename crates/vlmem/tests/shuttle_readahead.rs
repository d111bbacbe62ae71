//! Shuttle: the weight read-ahead (its scheduler, its reader pool, the staging area and a
//! real manager reading a checkpoint file in place) under randomized and PCT schedules,
//! with a consumer that takes pieces through two cursors switching unit by unit, each at
//! its own place in the cycle. Every schedule ends with the ledger: every tensor's bytes
//! (taken pieces and the rest read on demand) equal the file's, every fill begun was
//! finished exactly once, and once the cursors are gone and the facility stopped, the area
//! holds nothing.
//!
//! Run: `RUSTFLAGS="--cfg vlmem_shuttle" CARGO_TARGET_DIR=target/shuttle cargo test --release
//! -p vlmem --test shuttle_readahead`.
#![cfg(vlmem_shuttle)]

use vlmem::readahead::{Cursor, Need, Plan, ReadAhead};
use vlmem::{ManagerConfig, MemoryManager, TensorKind, Tier};

const KIB: u64 = 1 << 10;
/// Tensors per unit (the first kept, the others streamed) and units.
const PER_UNIT: usize = 3;
const UNITS: usize = 3;

fn config() -> ManagerConfig {
    let mut c = ManagerConfig::with_capacities(0, 2 << 20, 2 << 20);
    c.shards = 2;
    c.engine.workers = 2;
    c.disk.direct_io = false;
    c.disk.preallocate = false;
    c.disk.unit_bytes = 64 * KIB;
    c
}

/// Tensor `i`'s length: kept ones small, streamed ones of two or three 4 KiB pieces.
fn len_of(i: usize) -> usize {
    if i.is_multiple_of(PER_UNIT) {
        3_000
    } else {
        5_000 + (i * 1_777) % 6_000
    }
}

/// What a request does with unit `u`: moves its cursor there, takes each streamed
/// tensor's pieces (reading the rest itself) and checks the bytes; returns the bytes that
/// came from the area.
fn compute_unit(m: &MemoryManager, file: &[u8], ra: &ReadAhead, cursor: &Cursor, u: usize) -> u64 {
    cursor.begin_unit(u);
    let mut from_area = 0;
    for need in &ra.units()[u] {
        let (off, len) = (need.file_offset_bytes as usize, need.len_bytes as usize);
        let mut got = vec![0u8; len];
        let mut covered = 0usize;
        if need.streamed {
            let rest = cursor
                .take_pieces(need.handle, |start, bytes| {
                    assert_eq!(start, covered, "pieces come in order");
                    got[start..start + bytes.len()].copy_from_slice(bytes);
                    covered += bytes.len();
                    from_area += bytes.len() as u64;
                    Ok::<(), vlmem::ManagerError>(())
                })
                .expect("take");
            if let Some(start) = rest {
                assert_eq!(start, covered);
                m.read(need.handle, start as u64, &mut got[start..])
                    .expect("read the rest");
                covered = len;
            }
        } else {
            m.read(need.handle, 0, &mut got).expect("read kept");
            covered = len;
        }
        assert_eq!(covered, len, "every byte of tensor {:?}", need.handle);
        assert!(
            got == file[off..off + len],
            "tensor {:?} bytes",
            need.handle
        );
    }
    from_area
}

fn harness() {
    let m = MemoryManager::new(config()).expect("manager");
    let dir = tempfile::tempdir().expect("dir");
    let lens: Vec<usize> = (0..PER_UNIT * UNITS).map(len_of).collect();
    let total: usize = lens.iter().map(|l| l + 321).sum();
    let file: Vec<u8> = (0..total).map(|i| (i * 13 + i / 4096 + 7) as u8).collect();
    let path = dir.path().join("checkpoint.bin");
    std::fs::write(&path, &file).expect("checkpoint");
    let mut offset = 0u64;
    let needs: Vec<Need> = lens
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            offset += 321;
            let handle = m
                .register_extent(&path, offset, len as u64, TensorKind::Weight, i as u64)
                .expect("extent");
            let need = Need {
                handle,
                len_bytes: len as u64,
                file_offset_bytes: offset,
                streamed: !i.is_multiple_of(PER_UNIT),
            };
            offset += len as u64;
            need
        })
        .collect();
    let plan = Plan {
        units: needs.chunks(PER_UNIT).map(|c| c.to_vec()).collect(),
        // Two buffers of 12 KiB: pieces of 4 KiB, and fills often wait for room.
        area_bytes: 24 * KIB,
        budget_bytes: 1 << 20,
    };
    let ra = ReadAhead::new(m.clone(), Tier::Host, plan, 1).expect("read-ahead");
    ra.set_readers(2);
    assert_eq!(ra.buffer_bytes(), 12 * KIB as usize);
    let (a, b) = (ra.cursor(), ra.cursor());
    for step in 0..UNITS + 1 {
        compute_unit(&m, &file, &ra, &a, step % UNITS);
        compute_unit(&m, &file, &ra, &b, (step + 1) % UNITS);
    }
    drop(a);
    drop(b);
    ra.stop();
    let s = ra.stats();
    assert_eq!(
        s.fills_begun, s.fills_finished,
        "every fill finished once: {s:?}"
    );
    assert_eq!(s.held_bytes, 0, "the area's room is back: {s:?}");
    assert!(s.area.filled <= s.fills_begun, "{s:?}");
    // Reads on demand still work once stopped; the pieces are simply not read ahead.
    let c = ra.cursor();
    compute_unit(&m, &file, &ra, &c, 0);
    drop(c);
    assert_eq!(ra.stats().held_bytes, 0);
    drop(ra);
    assert_eq!(m.stats().pins, 0);
}

#[test]
fn shuttle_readahead_random() {
    shuttle::check_random(harness, 300);
}

#[test]
fn shuttle_readahead_pct() {
    shuttle::check_pct(harness, 200, 3);
}
