//! Configuration fuzzing: every allocator constructor of this crate (and the tiers'
//! `FirstFitAllocator`) is given arbitrary values, drawn from edge values (0, 1, powers of two
//! and their neighbours, `u32::MAX`, `u64::MAX`, `u64::MAX / 2 + 1`, odd sizes) and ordinary
//! ones. Each case must end, within a watchdog's time, in either a typed error or a working
//! allocator:
//!
//! - the constructor's bookkeeping stays under a bound ([`METADATA_BUDGET_BYTES`] per
//!   allocator, counted by a tracking global allocator on the case's own thread), so a
//!   configuration that would need gigabytes of metadata must be refused with `InvalidConfig`;
//! - a working allocator answers `ZeroSize` for 0 bytes, and for 1 byte, fractions of the
//!   capacity, the capacity, capacity + 1 and `u64::MAX` either a block inside its arena (no
//!   two overlapping) or `OutOfMemory` / `TooLarge` (always `TooLarge` past the capacity);
//! - every block frees, a second free is refused, and usage is back to empty.
//!
//! A case that panics or overflows fails (and shrinks); one that hangs fails on the
//! watchdog. A case whose bookkeeping goes past [`HARD_CAP_BYTES`] cannot be allowed to run
//! on (it would exhaust the machine's memory): the tracking allocator prints the case and
//! aborts the test binary.
//!
//! A last test hands a block of each allocator type to every other type: each must refuse it
//! as `Foreign` and change nothing.
#![cfg(not(vlmem_loom))]
// The tracking global allocator forwards to the system allocator (raw memory).
#![allow(unsafe_code)]

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;
use vlmem_alloc::{
    BinnedAllocator, BinnedConfig, BuddyAllocator, BuddyConfig, PoolConfig, SlabConfig, SlabPool,
    SplitAllocator, Strategy as PoolStrategy, TypedPools,
};
use vlmem_core::{AllocError, ArenaUsage, Block, OffsetAllocator, TensorKind};
use vlmem_tier::FirstFitAllocator;

/// Bookkeeping one allocator may take at construction and first use. The documented limits
/// (at most 2^26 buddy units or slab blocks) keep every allocator of this crate below it.
const METADATA_BUDGET_BYTES: u64 = 1 << 30;
/// Past this much (on top of the case's budget), the case is stopped by aborting: letting it
/// go on would exhaust the machine's memory before the assertion could fail.
const HARD_CAP_BYTES: u64 = 1 << 30;
/// A case that takes longer has hung.
const WATCHDOG: Duration = Duration::from_secs(10);
const CASES: u32 = 192;

// ---------------------------------------------------------------------------------------
// Tracking global allocator: counts the bytes each tracked thread asks for.

struct Tracker;

thread_local! {
    /// Bytes the current case may ask for before the process is aborted (0: untracked).
    static CAP_BYTES: Cell<u64> = const { Cell::new(0) };
    /// Bytes the current case asked for so far (allocations and growth; frees not deducted).
    static ASKED_BYTES: Cell<u64> = const { Cell::new(0) };
    /// The case, printed if it is stopped.
    static LABEL: RefCell<String> = const { RefCell::new(String::new()) };
}

fn note_request(bytes: usize) {
    let Ok(cap) = CAP_BYTES.try_with(Cell::get) else {
        return;
    };
    if cap == 0 {
        return;
    }
    let asked = ASKED_BYTES.with(|a| {
        let n = a.get().saturating_add(bytes as u64);
        a.set(n);
        n
    });
    if asked > cap {
        CAP_BYTES.with(|c| c.set(0));
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(b"\nconfiguration case asked for more than ");
        let _ = err.write_all(cap.to_string().as_bytes());
        let _ = err.write_all(b" bytes of bookkeeping (last request ");
        let _ = err.write_all(bytes.to_string().as_bytes());
        let _ = err.write_all(b" bytes): ");
        let _ = LABEL.try_with(|l| err.write_all(l.borrow().as_bytes()));
        let _ = err.write_all(b"\n");
        drop(err);
        std::process::abort();
    }
}

// SAFETY: every method forwards to `System` with the caller's own arguments; the counting
// beside it touches only const-initialised thread-locals and never allocates on the
// counted path (the abort path stops counting first).
unsafe impl GlobalAlloc for Tracker {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_request(layout.size());
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_request(layout.size());
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_request(new_size.saturating_sub(layout.size()));
        // SAFETY: as in `dealloc`; `new_size` is the caller's, under the same contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Tracker = Tracker;

/// Runs one case on its own thread under the watchdog and the bookkeeping budget of
/// `allocators` allocators.
fn guarded<F>(label: String, allocators: u64, case: F) -> Result<(), TestCaseError>
where
    F: FnOnce() -> Result<(), TestCaseError> + Send + 'static,
{
    guarded_within(label, METADATA_BUDGET_BYTES * allocators.max(1), case)
}

/// As [`guarded`], with a budget in bytes.
fn guarded_within<F>(label: String, budget_bytes: u64, case: F) -> Result<(), TestCaseError>
where
    F: FnOnce() -> Result<(), TestCaseError> + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let thread_label = label.clone();
    std::thread::Builder::new()
        .name("config-case".into())
        .spawn(move || {
            LABEL.with(|l| *l.borrow_mut() = thread_label);
            ASKED_BYTES.with(|a| a.set(0));
            CAP_BYTES.with(|c| c.set(budget_bytes + HARD_CAP_BYTES));
            let result = catch_unwind(AssertUnwindSafe(case));
            CAP_BYTES.with(|c| c.set(0));
            let asked = ASKED_BYTES.with(Cell::get);
            let _ = tx.send((result, asked));
        })
        .map_err(|e| TestCaseError::fail(format!("spawn: {e}")))?;
    match rx.recv_timeout(WATCHDOG) {
        Ok((Ok(result), asked)) => {
            prop_assert!(
                asked <= budget_bytes,
                "{label}: took {asked} bytes of bookkeeping (budget {budget_bytes})"
            );
            result
        }
        Ok((Err(panic), _)) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_default();
            Err(TestCaseError::fail(format!("{label}: panicked: {msg}")))
        }
        Err(_) => Err(TestCaseError::fail(format!(
            "{label}: no answer within {WATCHDOG:?} (hung)"
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// Value strategies.

/// Named edge values of a u64 configuration field.
const EDGES_U64: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    63,
    64,
    65,
    100,
    255,
    256,
    257,
    1000,
    4095,
    4096,
    4097,
    65536,
    (1 << 20) + 3,
    (1 << 26) - 1,
    1 << 26,
    (1 << 26) + 1,
    (1 << 32) - 2,
    (1 << 32) - 1,
    1 << 32,
    (1 << 32) + 1,
    3 << 32,
    1 << 40,
    (1 << 40) + 4096,
    1 << 62,
    (1 << 62) + 1,
    3 << 62,
    1 << 63,
    u64::MAX / 2,
    u64::MAX / 2 + 1,
    u64::MAX - 4096,
    u64::MAX - 1,
    u64::MAX,
];

/// A u64 configuration value: an edge value, a power of two or its neighbour, an ordinary
/// value, or anything.
fn any_size() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => prop::sample::select(EDGES_U64),
        3 => (0u32..64, -1i64..=1).prop_map(|(k, d)| (1u64 << k).wrapping_add_signed(d)),
        2 => 1u64..(1 << 24),
        1 => any::<u64>(),
    ]
}

/// A unit size (granule, smallest block): mostly powers of two, sometimes not.
fn unit_size() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (0u32..64).prop_map(|k| 1u64 << k),
        1 => any_size(),
    ]
}

/// A count of units: edges around the documented limits, small ones, anything.
fn unit_count() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => prop::sample::select(EDGES_U64),
        3 => 1u64..4096,
        1 => any::<u64>(),
    ]
}

/// (capacity, unit): half the time an exact multiple of the unit (the constructor's happy
/// path), otherwise two unrelated values.
fn capacity_and_unit() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        (unit_count(), unit_size()).prop_map(|(n, u)| (n.wrapping_mul(u), u)),
        (any_size(), unit_size()),
    ]
}

fn kind() -> impl Strategy<Value = Option<TensorKind>> {
    prop::option::of(prop::sample::select(&TensorKind::ALL[..]))
}

fn any_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => prop::sample::select(&[
            0u32, 1, 2, 3, 4, 8, 255, 256, 257, 4096, (1 << 26) - 1, 1 << 26, (1 << 26) + 1,
            1 << 31, u32::MAX - 2, u32::MAX - 1, u32::MAX,
        ][..]),
        3 => 0u32..4096,
        1 => any::<u32>(),
    ]
}

fn slab_config() -> impl Strategy<Value = SlabConfig> {
    (any_size(), any_u32(), any_u32(), any_u32(), kind()).prop_map(
        |(block_bytes, capacity_blocks, cache_blocks, caches, kind)| SlabConfig {
            block_bytes,
            capacity_blocks,
            cache_blocks,
            caches,
            kind,
        },
    )
}

/// The two parts of a split arena.
type SplitParts = (SlabPool, Arc<dyn OffsetAllocator>);

/// A slab configuration the pool accepts more often: few blocks (possibly huge ones), a
/// valid number of caches.
fn working_slab_config() -> impl Strategy<Value = SlabConfig> {
    (any_size(), 1u32..4, any_u32(), 1u32..=4, kind()).prop_map(
        |(block_bytes, capacity_blocks, cache_blocks, caches, kind)| SlabConfig {
            block_bytes,
            capacity_blocks,
            cache_blocks,
            caches,
            kind,
        },
    )
}

// ---------------------------------------------------------------------------------------
// What a working allocator must do with its first requests.

fn is_empty(u: ArenaUsage, capacity_bytes: u64) -> bool {
    u.capacity_bytes == capacity_bytes && u.in_use_bytes == 0 && u.free_bytes == capacity_bytes
}

/// Checks one answer to a request of `bytes` from an arena of `capacity_bytes`: a block
/// inside the arena, not overlapping `held`, or a typed refusal.
fn check_answer(
    what: &str,
    bytes: u64,
    capacity_bytes: u64,
    answer: Result<Block, AllocError>,
    held: &mut Vec<Block>,
) -> Result<(), TestCaseError> {
    match answer {
        Ok(b) => {
            prop_assert!(b.len_bytes() >= bytes, "{what}: {b:?} shorter than {bytes}");
            let end = b.offset_bytes().checked_add(b.len_bytes());
            prop_assert!(
                end.is_some_and(|e| e <= capacity_bytes),
                "{what}: {b:?} lies past the arena of {capacity_bytes} bytes"
            );
            for h in held.iter() {
                prop_assert!(
                    b.offset_bytes() >= h.offset_bytes() + h.len_bytes()
                        || h.offset_bytes() >= b.offset_bytes() + b.len_bytes(),
                    "{what}: {b:?} overlaps {h:?}"
                );
            }
            held.push(b);
        }
        Err(AllocError::TooLarge { .. }) => {}
        Err(AllocError::OutOfMemory { .. }) => {
            prop_assert!(
                bytes <= capacity_bytes,
                "{what}: {bytes} bytes from {capacity_bytes} should be TooLarge, not OutOfMemory"
            );
        }
        Err(e) => return Err(TestCaseError::fail(format!("{what}: {bytes} bytes: {e:?}"))),
    }
    Ok(())
}

/// The requests every working allocator gets: 1 byte, fractions of the capacity, the
/// capacity, past it, `u64::MAX`, and `extra`.
fn request_sizes(capacity_bytes: u64, extra: &[u64]) -> Vec<u64> {
    let mut v = vec![
        1,
        capacity_bytes / 3,
        capacity_bytes / 2,
        capacity_bytes / 2,
        capacity_bytes / 2 + 1,
        capacity_bytes,
        capacity_bytes.saturating_add(1),
        u64::MAX / 2 + 1,
        u64::MAX,
    ];
    v.extend_from_slice(extra);
    v.retain(|&b| b > 0);
    v
}

/// Allocates the sizes of [`request_sizes`] (then the largest free run a few times), frees
/// everything, and checks usage is back to empty.
fn exercise(what: &str, a: &dyn OffsetAllocator, extra: &[u64]) -> Result<(), TestCaseError> {
    let capacity_bytes = a.capacity_bytes();
    prop_assert!(
        is_empty(a.usage(), capacity_bytes),
        "{what}: new but {:?}",
        a.usage()
    );
    prop_assert_eq!(a.allocate(0), Err(AllocError::ZeroSize), "{}", what);
    let mut held = Vec::new();
    for bytes in request_sizes(capacity_bytes, extra) {
        check_answer(what, bytes, capacity_bytes, a.allocate(bytes), &mut held)?;
        let u = a.usage();
        prop_assert_eq!(
            u.in_use_bytes.checked_add(u.free_bytes),
            Some(capacity_bytes)
        );
    }
    for _ in 0..4 {
        let largest = a.usage().largest_free_bytes;
        if largest == 0 {
            break;
        }
        check_answer(
            what,
            largest,
            capacity_bytes,
            a.allocate(largest),
            &mut held,
        )?;
    }
    for &b in &held {
        prop_assert_eq!(a.free(b), Ok(()), "{}: free {:?}", what, b);
    }
    for &b in &held {
        prop_assert!(a.free(b).is_err(), "{what}: second free of {b:?} accepted");
    }
    prop_assert!(
        is_empty(a.usage(), capacity_bytes),
        "{what}: after freeing everything: {:?}",
        a.usage()
    );
    Ok(())
}

fn expect_config_error<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, AllocError>,
) -> Result<Option<T>, TestCaseError> {
    match r {
        Ok(a) => Ok(Some(a)),
        Err(AllocError::InvalidConfig(_)) => Ok(None),
        Err(e) => Err(TestCaseError::fail(format!(
            "{what}: constructor failed with {e:?}, not InvalidConfig"
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// One property per constructor.

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn any_buddy_config_builds_a_working_allocator_or_is_refused(
        (capacity_bytes, min_block_bytes) in capacity_and_unit(),
        kind in kind(),
    ) {
        let config = BuddyConfig { capacity_bytes, min_block_bytes, kind };
        let what = format!("{config:?}");
        guarded(what.clone(), 1, move || {
            if let Some(a) = expect_config_error(&what, BuddyAllocator::new(config))? {
                exercise(&what, &a, &[min_block_bytes])?;
                a.audit().map_err(TestCaseError::fail)?;
            }
            Ok(())
        })?;
    }

    #[test]
    fn any_binned_config_builds_a_working_allocator_or_is_refused(
        (capacity_bytes, granule_bytes) in capacity_and_unit(),
        kind in kind(),
    ) {
        let config = BinnedConfig { capacity_bytes, granule_bytes, kind };
        let what = format!("{config:?}");
        guarded(what.clone(), 1, move || {
            if let Some(a) = expect_config_error(&what, BinnedAllocator::new(config))? {
                exercise(&what, &a, &[granule_bytes])?;
                a.audit().map_err(TestCaseError::fail)?;
            }
            Ok(())
        })?;
    }

    #[test]
    fn any_slab_config_builds_a_working_pool_or_is_refused(config in slab_config()) {
        let what = format!("{config:?}");
        guarded(what.clone(), 1, move || {
            if let Some(a) = expect_config_error(&what, SlabPool::new(config))? {
                exercise(&what, &a, &[config.block_bytes, config.block_bytes.saturating_add(1)])?;
                a.audit().map_err(TestCaseError::fail)?;
            }
            Ok(())
        })?;
    }

    #[test]
    fn any_first_fit_config_builds_a_working_allocator_or_is_refused(
        (capacity_bytes, granule_bytes) in capacity_and_unit(),
    ) {
        let what = format!("FirstFitAllocator::new({capacity_bytes}, {granule_bytes})");
        guarded(what.clone(), 1, move || {
            let built = FirstFitAllocator::new(capacity_bytes, granule_bytes);
            if let Some(a) = expect_config_error(&what, built)? {
                exercise(&what, &a, &[granule_bytes])?;
            }
            Ok(())
        })?;
    }

    #[test]
    fn any_split_of_a_slab_and_a_general_allocator_works_or_is_refused(
        slab in prop_oneof![slab_config(), working_slab_config()],
        rest_kind in 0u8..3,
        (rest_capacity_bytes, rest_unit_bytes) in capacity_and_unit(),
    ) {
        let what = format!(
            "split of {slab:?} and rest #{rest_kind} ({rest_capacity_bytes}, {rest_unit_bytes})"
        );
        guarded(what.clone(), 4, move || {
            let parts = || -> Result<Option<SplitParts>, TestCaseError> {
                let Some(slab_pool) = expect_config_error(&what, SlabPool::new(slab))? else {
                    return Ok(None);
                };
                let rest: Result<Arc<dyn OffsetAllocator>, AllocError> = match rest_kind {
                    0 => BinnedAllocator::new(BinnedConfig {
                        capacity_bytes: rest_capacity_bytes,
                        granule_bytes: rest_unit_bytes,
                        kind: None,
                    })
                    .map(|a| Arc::new(a) as _),
                    1 => BuddyAllocator::new(BuddyConfig {
                        capacity_bytes: rest_capacity_bytes,
                        min_block_bytes: rest_unit_bytes,
                        kind: None,
                    })
                    .map(|a| Arc::new(a) as _),
                    _ => FirstFitAllocator::new(rest_capacity_bytes, rest_unit_bytes)
                        .map(|a| Arc::new(a) as _),
                };
                Ok(expect_config_error(&what, rest)?.map(|rest| (slab_pool, rest)))
            };
            let Some((slab_pool, rest)) = parts()? else {
                return Ok(());
            };
            let slab_bytes = slab.block_bytes * u64::from(slab.capacity_blocks);
            let fits = slab_bytes.checked_add(rest.capacity_bytes()).is_some();
            let extra = [slab.block_bytes, slab.block_bytes.saturating_add(1)];
            match SplitAllocator::try_new(slab_pool, rest) {
                Ok(split) => {
                    prop_assert!(fits, "{what}: accepted regions past 2^64 bytes");
                    exercise(&what, &split, &extra)?;
                }
                Err(AllocError::InvalidConfig(_)) => {
                    prop_assert!(!fits, "{what}: refused regions that fit");
                    // The infallible constructor keeps the slab alone.
                    let (slab_pool, rest) = parts()?.expect("built once already");
                    let split = SplitAllocator::new(slab_pool, rest);
                    prop_assert_eq!(split.capacity_bytes(), slab_bytes);
                    exercise(&what, &split, &extra)?;
                }
                Err(e) => return Err(TestCaseError::fail(format!("{what}: {e:?}"))),
            }
            Ok(())
        })?;
    }

    #[test]
    fn any_typed_pools_config_builds_working_pools_or_is_refused(
        pools in prop::collection::vec(
            (
                prop::sample::select(&TensorKind::ALL[..]),
                any_size(),
                any_size(),
                0u8..4,
                unit_size(),
                any_u32(),
                any_u32(),
            ),
            0..=6,
        ),
    ) {
        let configs: Vec<PoolConfig> = pools
            .into_iter()
            .map(|(kind, arena_bytes, budget, strategy, unit, cache_blocks, caches)| {
                // Budgets: the arena, something below it, or anything (possibly above).
                let budget_bytes = match strategy {
                    0 => arena_bytes,
                    1 => budget % arena_bytes.saturating_add(1).max(1),
                    _ => budget,
                };
                let strategy = match strategy {
                    0 | 3 => PoolStrategy::Buddy { min_block_bytes: unit },
                    1 => PoolStrategy::Slab { block_bytes: unit, cache_blocks, caches },
                    _ => PoolStrategy::Binned { granule_bytes: unit },
                };
                PoolConfig { kind, arena_bytes, budget_bytes, strategy }
            })
            .collect();
        let what = format!("{configs:?}");
        let allocators = configs.len() as u64;
        guarded(what.clone(), allocators, move || {
            let Some(p) = expect_config_error(&what, TypedPools::new(&configs))? else {
                return Ok(());
            };
            for c in &configs {
                let arena_bytes = c.arena_bytes;
                let mut held = Vec::new();
                prop_assert_eq!(p.allocate(c.kind, 0), Err(AllocError::ZeroSize));
                for bytes in request_sizes(arena_bytes, &[c.budget_bytes]) {
                    let answer = p.allocate(c.kind, bytes);
                    check_answer(&what, bytes, arena_bytes, answer, &mut held)?;
                }
                for &b in &held {
                    prop_assert_eq!(p.free(b), Ok(()));
                }
                let s = p.stats_all();
                prop_assert_eq!(s.total.in_use_bytes, 0, "{}", what);
                prop_assert_eq!(s.total.live_blocks, 0, "{}", what);
                if let Some(a) = p.allocator(c.kind) {
                    a.audit().map_err(TestCaseError::fail)?;
                }
            }
            Ok(())
        })?;
    }
}

// ---------------------------------------------------------------------------------------
// Foreign blocks.

/// A typed pool seen as one arena (its Weight pool).
#[derive(Debug)]
struct WeightPool(TypedPools);

impl OffsetAllocator for WeightPool {
    fn allocate(&self, bytes: u64) -> Result<Block, AllocError> {
        self.0.allocate(TensorKind::Weight, bytes)
    }
    fn free(&self, block: Block) -> Result<(), AllocError> {
        self.0.free(block)
    }
    fn capacity_bytes(&self) -> u64 {
        self.0
            .config(TensorKind::Weight)
            .map_or(0, |c| c.arena_bytes)
    }
    fn usage(&self) -> ArenaUsage {
        let s = self.0.stats_all().total;
        ArenaUsage {
            capacity_bytes: s.capacity_bytes,
            in_use_bytes: s.in_use_bytes,
            free_bytes: s.free_bytes,
            largest_free_bytes: 0,
        }
    }
}

fn one_of_each() -> Vec<(&'static str, Arc<dyn OffsetAllocator>)> {
    const ARENA: u64 = 1 << 20;
    let slab = || {
        SlabPool::new(SlabConfig {
            block_bytes: 4096,
            capacity_blocks: 64,
            cache_blocks: 4,
            caches: 2,
            kind: None,
        })
        .unwrap()
    };
    let binned = || {
        BinnedAllocator::new(BinnedConfig {
            capacity_bytes: ARENA,
            granule_bytes: 256,
            kind: None,
        })
        .unwrap()
    };
    let buddy = BuddyAllocator::new(BuddyConfig {
        capacity_bytes: ARENA,
        min_block_bytes: 4096,
        kind: None,
    })
    .unwrap();
    let pools = TypedPools::new(&[PoolConfig {
        kind: TensorKind::Weight,
        arena_bytes: ARENA,
        budget_bytes: ARENA,
        strategy: PoolStrategy::Binned {
            granule_bytes: 4096,
        },
    }])
    .unwrap();
    vec![
        ("buddy", Arc::new(buddy) as Arc<dyn OffsetAllocator>),
        ("binned", Arc::new(binned())),
        ("slab", Arc::new(slab())),
        (
            "first-fit",
            Arc::new(FirstFitAllocator::new(ARENA, 4096).unwrap()),
        ),
        (
            "split",
            Arc::new(SplitAllocator::try_new(slab(), Arc::new(binned())).unwrap()),
        ),
        ("typed pools", Arc::new(WeightPool(pools))),
    ]
}

#[test]
fn every_allocator_type_refuses_every_other_types_blocks_as_foreign() {
    let all = one_of_each();
    for (maker_name, maker) in &all {
        // A slab serves only its block size; 4096 bytes suits every allocator here.
        let block = maker.allocate(4096).unwrap();
        for (other_name, other) in &all {
            if Arc::ptr_eq(maker, other) {
                continue;
            }
            let before = other.usage();
            let refused = other.free(block);
            assert!(
                matches!(refused, Err(AllocError::Foreign { .. })),
                "{other_name} answered {refused:?} to a block of {maker_name}"
            );
            assert_eq!(
                other.usage(),
                before,
                "{other_name} changed on a foreign free"
            );
        }
        maker.free(block).unwrap();
        assert_eq!(maker.usage().in_use_bytes, 0, "{maker_name}");
    }
}

// ---------------------------------------------------------------------------------------
// Cases the properties found, kept as plain tests.

fn run_case<F>(label: &str, budget_bytes: u64, case: F)
where
    F: FnOnce() -> Result<(), TestCaseError> + Send + 'static,
{
    if let Err(e) = guarded_within(label.to_string(), budget_bytes, case) {
        panic!("{e}");
    }
}

#[test]
fn a_buddy_arena_near_two_to_the_64_bytes_refuses_a_second_half_instead_of_overflowing() {
    // 3 units of 2^62: a 2^63 block and a 2^62 block. A second 2^63 request once summed
    // in-use and request bytes past 2^64.
    run_case("buddy 3 x 2^62", 1 << 20, || {
        let a = BuddyAllocator::new(BuddyConfig {
            capacity_bytes: 3 << 62,
            min_block_bytes: 1 << 62,
            kind: None,
        })
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let half = a
            .allocate(1 << 63)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let second = a.allocate(1 << 63);
        prop_assert!(
            matches!(second, Err(AllocError::OutOfMemory { .. })),
            "{:?}",
            second
        );
        let quarter = a
            .allocate(1 << 62)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(quarter.offset_bytes(), 1 << 63);
        let full = a.allocate(1);
        prop_assert!(
            matches!(full, Err(AllocError::OutOfMemory { .. })),
            "{:?}",
            full
        );
        a.free(half)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        a.free(quarter)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        exercise("buddy 3 x 2^62", &a, &[])
    });
}

#[test]
fn a_buddy_config_needing_gigabytes_of_bookkeeping_is_refused() {
    run_case("buddy past the unit limit", 1 << 20, || {
        for (capacity_bytes, min_block_bytes) in [
            // 2^32 - 2 units: the old limit, 56 GB of bookkeeping.
            (u64::MAX - (1 << 32) + 1 - (1 << 32), 1 << 32),
            ((BuddyAllocator::MAX_UNITS + 1) * 4096, 4096),
            (1 << 40, 1),
        ] {
            let r = BuddyAllocator::new(BuddyConfig {
                capacity_bytes,
                min_block_bytes,
                kind: None,
            });
            prop_assert!(
                matches!(r, Err(AllocError::InvalidConfig(_))),
                "{capacity_bytes} / {min_block_bytes}: {r:?}"
            );
        }
        Ok(())
    });
}

#[test]
fn a_buddy_at_its_unit_limit_fits_its_bookkeeping_budget() {
    let units = BuddyAllocator::MAX_UNITS;
    run_case(
        "buddy at the unit limit",
        METADATA_BUDGET_BYTES,
        move || {
            let a = BuddyAllocator::new(BuddyConfig {
                capacity_bytes: units * 4096,
                min_block_bytes: 4096,
                kind: None,
            })
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
            exercise("buddy at the unit limit", &a, &[4096])
        },
    );
}

#[test]
fn a_slab_with_a_huge_cache_bound_reserves_no_memory_for_it() {
    // Each cache once reserved its whole bound up front: 3 x 16 GiB here.
    let config = SlabConfig {
        block_bytes: 262_144,
        capacity_blocks: 8,
        cache_blocks: u32::MAX - 2,
        caches: 3,
        kind: None,
    };
    run_case("slab with a huge cache bound", 1 << 20, move || {
        let a = SlabPool::new(config).map_err(|e| TestCaseError::fail(e.to_string()))?;
        exercise("slab with a huge cache bound", &a, &[262_144])
    });
}

#[test]
fn a_slab_refill_moves_at_most_a_caches_share_of_the_pool() {
    // With an unbounded cache, the first allocation moved half the cache bound (here the
    // whole pool) from the shared stack into one cache's list. Bookkeeping: 12 bytes per
    // block, plus a cache's share (a quarter of the pool, 4 bytes per block) at most, plus
    // the audit's one byte per block.
    const BLOCKS: u32 = 1 << 20;
    let config = SlabConfig {
        block_bytes: 1,
        capacity_blocks: BLOCKS,
        cache_blocks: u32::MAX,
        caches: 4,
        kind: None,
    };
    let budget_bytes = 13 * u64::from(BLOCKS) + 4 * u64::from(BLOCKS / 4) + (1 << 16);
    run_case("slab refill", budget_bytes, move || {
        let a = SlabPool::new(config).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let b = a
            .allocate(1)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        a.free(b).map_err(|e| TestCaseError::fail(e.to_string()))?;
        a.audit().map_err(TestCaseError::fail)?;
        Ok(())
    });
}

#[test]
fn a_slab_config_needing_gigabytes_of_bookkeeping_is_refused() {
    for capacity_blocks in [u32::MAX - 1, (SlabPool::MAX_BLOCKS + 1) as u32] {
        let r = SlabPool::new(SlabConfig {
            block_bytes: 1,
            capacity_blocks,
            cache_blocks: 8,
            caches: 4,
            kind: None,
        });
        assert!(
            matches!(r, Err(AllocError::InvalidConfig(_))),
            "{capacity_blocks} blocks: {r:?}"
        );
    }
}

/// A slab of one 2^62-byte block and a first-fit arena of ~1.7 * 10^19 bytes: together
/// past 2^64.
fn regions_past_two_to_the_64() -> (SlabPool, Arc<dyn OffsetAllocator>) {
    let slab = SlabPool::new(SlabConfig {
        block_bytes: 1 << 62,
        capacity_blocks: 1,
        cache_blocks: 0,
        caches: 1,
        kind: None,
    })
    .unwrap();
    let rest = FirstFitAllocator::new(17_031_487_890_808_373_248, 8).unwrap();
    (slab, Arc::new(rest))
}

#[test]
fn a_split_whose_regions_pass_two_to_the_64_bytes_keeps_the_slab_alone() {
    run_case("split past 2^64", 1 << 20, || {
        let (slab, rest) = regions_past_two_to_the_64();
        let split = SplitAllocator::new(slab, rest);
        prop_assert_eq!(split.capacity_bytes(), 1 << 62);
        exercise("split past 2^64", &split, &[1 << 62])
    });
}

#[test]
fn a_split_whose_regions_pass_two_to_the_64_bytes_is_refused_by_try_new() {
    let (slab, rest) = regions_past_two_to_the_64();
    let r = SplitAllocator::try_new(slab, rest);
    assert!(matches!(r, Err(AllocError::InvalidConfig(_))), "{r:?}");
}
