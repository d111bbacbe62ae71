//! Property tests: random writes and reads of one tensor on each tier agree with a plain
//! `Vec<u8>` model (unit-aligned writes on disk, arbitrary reads everywhere).
mod common;

use common::*;
use proptest::prelude::*;
use std::sync::Arc;
use vlmem_tier::{DiskOptions, DiskTier, TierBackend};

const UNIT: u64 = 64 * 1024;
const LEN: u64 = 5 * UNIT + 1234;

#[derive(Debug, Clone)]
enum Op {
    /// Write units `first..first + count` (clipped at the tensor's end) with `seed` bytes.
    Write { first: u64, count: u64, seed: u64 },
    /// Read `len` bytes at `offset`.
    Read { offset: u64, len: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..6u64, 1..4u64, any::<u64>()).prop_map(|(first, count, seed)| Op::Write {
            first,
            count,
            seed
        }),
        (0..LEN, 1..200_000u64).prop_map(|(offset, len)| Op::Read {
            offset,
            len: len.min(LEN - offset),
        }),
    ]
}

fn run(t: &dyn TierBackend, ops: &[Op]) {
    let r = t.reserve(LEN, "model").unwrap();
    // Start from a fully written tensor so every read is defined.
    let mut model = pattern(LEN as usize, 99);
    t.write(&r, 0, &model).unwrap();
    for o in ops {
        match *o {
            Op::Write { first, count, seed } => {
                let start = first * UNIT;
                let end = ((first + count) * UNIT).min(LEN);
                let data = pattern((end - start) as usize, seed);
                t.write(&r, start, &data).unwrap();
                model[start as usize..end as usize].copy_from_slice(&data);
            }
            Op::Read { offset, len } => {
                let mut got = vec![0u8; len as usize];
                t.read(&r, offset, &mut got).unwrap();
                assert_eq!(&got[..], &model[offset as usize..(offset + len) as usize]);
            }
        }
    }
    assert_eq!(read_all(t, &r), model);
    t.release(r).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn disk_agrees_with_a_vec(ops in proptest::collection::vec(op(), 1..12), encrypt in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let d = DiskTier::new(alloc(MIB), DiskOptions {
            dir: Some(dir.path().to_path_buf()),
            unit_bytes: UNIT,
            encrypt,
            ..DiskOptions::default()
        }).unwrap();
        run(&d, &ops);
    }

    #[test]
    fn memory_tiers_agree_with_a_vec(ops in proptest::collection::vec(op(), 1..12)) {
        run(&*host(MIB), &ops);
        let dev: Arc<dyn TierBackend> = device(MIB, None);
        run(&*dev, &ops);
    }
}
