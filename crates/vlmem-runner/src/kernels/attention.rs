//! Fused scaled dot-product attention on the CPU (flash-attention style): for each head and
//! block of query rows ([`BLOCK_Q`], [`BLOCK_Q_AVX512`]), the keys are streamed [`BLOCK_K`]
//! at a time; the scores of one block are computed with vectorized f32 products, folded into
//! a running maximum and sum per row (online softmax), exponentiated with a polynomial
//! [`exp`], and multiplied into the output rows at once. No `[rows, keys]` score matrix
//! exists beyond one small tile per task. Tasks (head, query block) run on
//! [`super::pool::global`]; a thread's consecutive tasks share a head, whose keys and values
//! then stay in its cache.
//!
//! Supports full attention (the vision tower), causal attention after `past` cached keys
//! (query `i` sees keys `0..=past + i`), grouped-query attention (query head `h` reads kv head
//! `h / (heads / kv_heads)`), any head size and any lengths. The operands may be read in
//! place from any rows ([`View`], [`attention_views`]: e.g. q, k and v side by side in one
//! projection's output rows) and the result laid out per head or per row ([`Output`]).
//!
//! The keys are transposed once per call, tile by tile (`[kv_heads, tiles, d, BLOCK_K]`, a
//! tile's 16 KiB contiguous), so a score tile is an outer-product update. Instruction sets,
//! chosen at run time ([`Isa::best`]):
//! - AVX-512 F ([`avx512`], inline assembly): per key tile, 6 query rows x 64 keys of scores
//!   in registers, the softmax step of all the task's rows, then 6 rows x 64 value columns of
//!   output in registers (the values copied once per call to rows that start on a cache
//!   line); each task's rows are padded to whole micro-tiles of 6. (Taking one micro-tile
//!   through all three steps at a time measured 3% slower: the rows' softmax chains overlap
//!   less.)
//! - AVX2 + FMA: 4 rows x 16 keys of scores, 2 rows x 32 columns of output, generic code
//!   over [`Simd`];
//! - a portable scalar loop.
//!
//! Numerics: against exact attention, each score `s = scale * q.k` is an f32 dot product of
//! length `d` whose rounding error is at most `~d u sum|q_c k_c|` (`u = 2^-24`), the same
//! bound as a plain matmul in another order; the exponential is within 2 ulp; the rescaling
//! by `exp(m_old - m_new)` when the running maximum grows adds one rounding per key block
//! (`keys / BLOCK_K` of them); and the output is a convex combination of value rows, so its
//! absolute error is bounded by `max|v| * (|score error| + (keys/BLOCK_K + 4) u)` plus the
//! f32 sum of `keys` products (`keys u max|v|` at worst, far less in practice since the
//! products are summed per block). For unit-sized activations and `d <= 128`, `keys <= 8192`,
//! that is well under `1e-4`, which is what the model-level reference tests require; the
//! unit tests below check `1e-5` against an f64 reference on random data.

#![allow(unsafe_code)]

use crate::error::{Result, RunnerError};

/// Query rows a task owns (AVX2 and scalar).
pub const BLOCK_Q: usize = 64;
/// Keys one score tile covers (a multiple of every ISA's lanes times two).
pub const BLOCK_K: usize = 64;
/// Below this many query rows, scores are plain dot products (no transposed keys).
const MIN_ROWS_TRANSPOSED: usize = 4;

/// Shape of one attention call. Tensors are row-major: `q: [heads, n, d]`,
/// `k: [kv_heads, keys, d]`, `v: [kv_heads, keys, dv]`, output `[heads, n, dv]`.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Query heads (batch folded in).
    pub heads: usize,
    /// Key/value heads; divides `heads`.
    pub kv_heads: usize,
    /// Query rows per head.
    pub n: usize,
    /// Keys per head.
    pub keys: usize,
    /// Query/key size.
    pub d: usize,
    /// Value size.
    pub dv: usize,
    /// Factor of the scores (`1 / sqrt(d)` usually).
    pub scale: f32,
    /// `Some(past)`: causal after `past` keys (`keys == past + n`); `None`: full attention.
    pub past: Option<usize>,
}

/// Instruction set a call runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F (16 lanes, inline assembly: [`avx512`]), with AVX2 + FMA.
    Avx512,
    /// AVX2 + FMA (8 lanes).
    Avx2,
    /// Portable scalar code.
    Scalar,
}

impl Isa {
    /// The widest set this CPU has.
    pub fn best() -> Isa {
        Isa::available()[0]
    }

    /// Every set this CPU can run, widest first (scalar last).
    pub fn available() -> Vec<Isa> {
        let mut out = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if avx512::Kernels::new().is_some() {
                out.push(Isa::Avx512);
            }
            let avx2 =
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            if avx2 {
                out.push(Isa::Avx2);
            }
        }
        out.push(Isa::Scalar);
        out
    }

    /// Its name, for logs and benchmarks.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512f",
            Isa::Avx2 => "avx2+fma",
            Isa::Scalar => "scalar",
        }
    }
}

/// Attention on the best instruction set; returns `[heads, n, dv]`.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], shape: &Shape) -> Result<Vec<f32>> {
    attention_on(Isa::best(), q, k, v, shape)
}

/// Attention on `isa`, which must be one of [`Isa::available`] (else an error); returns
/// `[heads, n, dv]`.
pub fn attention_on(isa: Isa, q: &[f32], k: &[f32], v: &[f32], shape: &Shape) -> Result<Vec<f32>> {
    let s = *shape;
    let want = |what: &str, got: usize, want: Option<usize>| match want {
        Some(w) if w == got => Ok(()),
        _ => Err(RunnerError::BadRequest(format!(
            "attention: {what} has {got} values, the shape {s:?} takes {want:?}"
        ))),
    };
    let prod = |a: usize, b: usize, c: usize| a.checked_mul(b).and_then(|x| x.checked_mul(c));
    check_shape(isa, &s)?;
    want("q", q.len(), prod(s.heads, s.n, s.d))?;
    want("k", k.len(), prod(s.kv_heads, s.keys, s.d))?;
    want("v", v.len(), prod(s.kv_heads, s.keys, s.dv))?;
    attention_views(
        isa,
        View::heads_major(q, s.n, s.d),
        View::heads_major(k, s.keys, s.d),
        View::heads_major(v, s.keys, s.dv),
        &s,
        Output::HeadsMajor,
    )
}

/// Where the rows of one operand sit in a slice: value `c` of row `i` of head `h` at
/// `values[offset + h * head_stride + i * row_stride + c]`. E.g. `q`, `k` and `v` as one
/// projection's output rows `[n, 3, heads, d]` (row stride `3 heads d`, head stride `d`,
/// offsets 0, `heads d`, `2 heads d`), read in place.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    /// The values.
    pub values: &'a [f32],
    /// Index of head 0's row 0.
    pub offset: usize,
    /// Values from one head to the next.
    pub head_stride: usize,
    /// Values from one row to the next.
    pub row_stride: usize,
}

impl<'a> View<'a> {
    /// `[heads, rows, size]`, row-major from the slice's start.
    pub fn heads_major(values: &'a [f32], rows: usize, size: usize) -> View<'a> {
        View {
            values,
            offset: 0,
            head_stride: rows * size,
            row_stride: size,
        }
    }

    /// Index of row `i` of head `h`.
    fn at(&self, h: usize, i: usize) -> usize {
        self.offset + h * self.head_stride + i * self.row_stride
    }

    /// Errors unless every row of `size` values of the `heads x rows` exists.
    fn check(&self, what: &str, heads: usize, rows: usize, size: usize) -> Result<()> {
        if heads == 0 || rows == 0 || size == 0 {
            return Ok(());
        }
        let end = (heads - 1)
            .checked_mul(self.head_stride)
            .zip((rows - 1).checked_mul(self.row_stride))
            .and_then(|(a, b)| a.checked_add(b))
            .and_then(|x| x.checked_add(self.offset))
            .and_then(|x| x.checked_add(size));
        match end {
            Some(end) if end <= self.values.len() => Ok(()),
            _ => Err(RunnerError::BadRequest(format!(
                "attention: {what} ({} values) has no room for {heads} heads of {rows} rows \
                 of {size} at offset {}, head stride {}, row stride {}",
                self.values.len(),
                self.offset,
                self.head_stride,
                self.row_stride
            ))),
        }
    }

    /// The rows as `[heads, rows, size]` from index 0: borrowed where they are laid out so,
    /// else copied.
    fn gathered(&self, heads: usize, rows: usize, size: usize) -> std::borrow::Cow<'a, [f32]> {
        let len = heads * rows * size;
        if self.offset == 0
            && (heads <= 1 || self.head_stride == rows * size)
            && (rows <= 1 || self.row_stride == size)
        {
            return std::borrow::Cow::Borrowed(&self.values[..len]);
        }
        let mut out = Vec::with_capacity(len);
        for h in 0..heads {
            for i in 0..rows {
                out.extend_from_slice(&self.values[self.at(h, i)..][..size]);
            }
        }
        std::borrow::Cow::Owned(out)
    }
}

/// How [`attention_views`] lays out its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// `[heads, n, dv]`.
    HeadsMajor,
    /// `[n, heads, dv]`: each query row's heads side by side, as the output projection
    /// takes them. Each task then owns a block of rows of every head.
    RowsMajor,
}

fn check_shape(isa: Isa, s: &Shape) -> Result<()> {
    let bad = |m: String| Err(RunnerError::BadRequest(format!("attention: {m}")));
    if !Isa::available().contains(&isa) {
        return bad(format!("{} is not available on this CPU", isa.name()));
    }
    if s.kv_heads == 0 || !s.heads.is_multiple_of(s.kv_heads) {
        return bad(format!("{} heads over {} kv heads", s.heads, s.kv_heads));
    }
    if let Some(past) = s.past
        && past + s.n != s.keys
    {
        return bad(format!(
            "causal attention of {} queries after {past} tokens over {} keys",
            s.n, s.keys
        ));
    }
    Ok(())
}

/// Attention on `isa` over operands read in place ([`View`]: `q` has `heads` heads of `n`
/// rows of `d`, `k` and `v` `kv_heads` heads of `keys` rows of `d` and `dv`), the result
/// laid out as `output` says. The AVX-512 path copies each operand into its own blocks as
/// it goes (any layout costs the same); the others first gather an operand not laid out
/// `[heads, rows, size]`.
pub fn attention_views(
    isa: Isa,
    q: View,
    k: View,
    v: View,
    shape: &Shape,
    output: Output,
) -> Result<Vec<f32>> {
    let s = *shape;
    check_shape(isa, &s)?;
    q.check("q", s.heads, s.n, s.d)?;
    k.check("k", s.kv_heads, s.keys, s.d)?;
    v.check("v", s.kv_heads, s.keys, s.dv)?;
    let out_len = s
        .heads
        .checked_mul(s.n)
        .and_then(|x| x.checked_mul(s.dv))
        .ok_or_else(|| RunnerError::BadRequest("attention: output overflows".into()))?;
    let mut out = vec![0f32; out_len];
    if out_len == 0 {
        return Ok(out);
    }
    if s.keys == 0 {
        return Err(RunnerError::BadRequest("attention: no keys".into()));
    }
    // Keys transposed tile by tile, `[kv_heads, keys_pad / BLOCK_K, d, BLOCK_K]` with zero
    // padding, so a score tile is an outer-product update (broadcast a query value, multiply
    // a row of keys) over 16 KiB (d = 64) read in order.
    let keys_pad = s.keys.next_multiple_of(BLOCK_K);
    let tiles = keys_pad / BLOCK_K;
    let transposed = s.n >= MIN_ROWS_TRANSPOSED;
    let kt = if transposed {
        let mut kt = Aligned::zeroed(s.kv_heads * tiles * s.d * BLOCK_K);
        if s.d > 0 {
            super::pool::global().for_each(
                kt.as_mut_slice().chunks_mut(s.d * BLOCK_K).enumerate(),
                |(i, dst)| {
                    let (kvh, t) = (i / tiles, i % tiles);
                    let k0 = t * BLOCK_K;
                    for j in 0..BLOCK_K.min(s.keys - k0) {
                        let row = &k.values[k.at(kvh, k0 + j)..][..s.d];
                        for (c, x) in row.iter().enumerate() {
                            dst[c * BLOCK_K + j] = *x;
                        }
                    }
                },
            );
        }
        kt
    } else {
        Aligned::zeroed(0)
    };
    // The AVX-512 path reads the values from a copy whose rows start on a cache line
    // (`[kv_heads, keys, dvp]`, each row zero-padded to whole vectors), and the queries
    // from where they are; the others read `[heads, rows, size]` operands.
    let wide = isa == Isa::Avx512 && transposed;
    let dvp = if wide {
        s.dv.next_multiple_of(16)
    } else {
        s.dv
    };
    let vp = if wide {
        let mut vp = Aligned::zeroed(s.kv_heads * s.keys * dvp);
        super::pool::global().for_each(
            vp.as_mut_slice().chunks_mut(BLOCK_K * dvp).enumerate(),
            |(i, dst)| {
                for (r, to) in dst.chunks_exact_mut(dvp).enumerate() {
                    let row = i * BLOCK_K + r;
                    let src = &v.values[v.at(row / s.keys, row % s.keys)..][..s.dv];
                    to[..s.dv].copy_from_slice(src);
                }
            },
        );
        vp
    } else {
        Aligned::zeroed(0)
    };
    let (qc, kc, vc) = if wide {
        (q.values.into(), Vec::new().into(), Vec::new().into())
    } else {
        (
            q.gathered(s.heads, s.n, s.d),
            k.gathered(s.kv_heads, s.keys, s.d),
            v.gathered(s.kv_heads, s.keys, s.dv),
        )
    };
    let p = Problem {
        q: &qc,
        q_view: if wide {
            View { values: &[], ..q }
        } else {
            View::heads_major(&[], s.n, s.d)
        },
        k: &kc,
        kt: kt.as_slice(),
        tiles,
        v: &vc,
        vp: vp.as_slice(),
        dvp,
        s,
    };
    let block = block_rows(isa);
    let tasks = (0..s.heads).flat_map(|h| {
        (0..s.n)
            .step_by(block)
            .map(move |q0| (h, q0, block.min(s.n - q0)))
    });
    let pool = super::pool::global();
    match output {
        Output::HeadsMajor => {
            let chunks = out
                .chunks_mut(s.n * s.dv)
                .flat_map(|head| head.chunks_mut(block * s.dv));
            pool.for_each(tasks.zip(chunks), |((h, q0, bq), o)| {
                run_task(isa, &p, h, q0, bq, &mut OutRows::Own(o))
            });
        }
        Output::RowsMajor => {
            // Tasks by head and block of rows as above (a thread's consecutive tasks share
            // a head's keys and values in its cache), each writing its rows' columns of that
            // head into the shared rows.
            let shared = SharedOut::new(&mut out);
            let pitch = s.heads * s.dv;
            pool.for_each(tasks, |(h, q0, bq)| {
                let mut rows = OutRows::Shared {
                    out: &shared,
                    first: q0 * pitch + h * s.dv,
                    pitch,
                };
                run_task(isa, &p, h, q0, bq, &mut rows)
            });
        }
    }
    Ok(out)
}

/// Query rows a task owns on `isa`: on AVX-512 a multiple of [`avx512::ROWS`].
fn block_rows(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => BLOCK_Q_AVX512,
        _ => BLOCK_Q,
    }
}

/// Query rows a task owns on AVX-512.
pub const BLOCK_Q_AVX512: usize = 60;

/// A zeroed f32 buffer whose first value starts a 64-byte cache line (a 16-lane vector load
/// from a row of 16 values then never spans two lines).
struct Aligned {
    buf: Vec<f32>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn zeroed(len: usize) -> Aligned {
        let buf = vec![0f32; len + 15];
        let start = buf.as_ptr().align_offset(64).min(15);
        Aligned { buf, start, len }
    }

    fn as_slice(&self) -> &[f32] {
        &self.buf[self.start..][..self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.buf[self.start..][..self.len]
    }
}

struct Problem<'a> {
    /// The queries: `[heads, n, d]` except on the AVX-512 path, which reads them through
    /// `q_view` (its `values` empty: they are `q`).
    q: &'a [f32],
    q_view: View<'a>,
    /// `[kv_heads, keys, d]`, except on the AVX-512 path (empty).
    k: &'a [f32],
    /// Keys transposed tile by tile (`[kv_heads, tiles, d, BLOCK_K]`), where `n` is at least
    /// [`MIN_ROWS_TRANSPOSED`].
    kt: &'a [f32],
    tiles: usize,
    /// `[kv_heads, keys, dv]`, except on the AVX-512 path (empty).
    v: &'a [f32],
    /// The AVX-512 path's values, `[kv_heads, keys, dvp]` from a cache line.
    vp: &'a [f32],
    dvp: usize,
    s: Shape,
}

/// The output rows of `[heads, n, dv]` (heads-major) that a task owns.
enum OutRows<'a, 'b> {
    /// Row `i` at `[i * dv..]` of the task's own chunk (zeroed).
    Own(&'a mut [f32]),
    /// Row `i` at `[first + i * pitch..][..dv]` of rows its task shares with others
    /// (rows-major: each task writes one head's columns of its rows).
    Shared {
        out: &'a SharedOut<'b>,
        first: usize,
        pitch: usize,
    },
}

impl OutRows<'_, '_> {
    /// `f` on row `i` (`dv` values).
    fn with_row(&mut self, i: usize, dv: usize, f: impl FnOnce(&mut [f32])) {
        match self {
            OutRows::Own(out) => f(&mut out[i * dv..][..dv]),
            OutRows::Shared { out, first, pitch } => out.with_range(*first + i * *pitch, dv, f),
        }
    }
}

/// An output buffer that the tasks of one call write in disjoint pieces
/// ([`Output::RowsMajor`]: task `(h, q0)` writes columns `h dv .. (h + 1) dv` of rows
/// `q0 .. q0 + bq`, and no two tasks share a head and a row).
struct SharedOut<'a> {
    ptr: *mut f32,
    len: usize,
    _buf: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: `SharedOut` hands out only ranges inside the buffer it borrows mutably for its
// whole life, and the tasks that share it write disjoint ranges (see the type's doc), so no
// element is written twice at once and none is read through it while they run.
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    fn new(buf: &'a mut [f32]) -> Self {
        SharedOut {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: std::marker::PhantomData,
        }
    }

    /// `f` on `[start..start + len]`, which only the calling task writes.
    fn with_range(&self, start: usize, len: usize, f: impl FnOnce(&mut [f32])) {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "attention output out of bounds"
        );
        // SAFETY: the range lies inside the borrowed buffer (asserted), and no other task
        // writes or reads it (the type's doc); the slice does not outlive this call.
        f(unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) })
    }
}

/// Rows `q0 .. q0 + bq` of head `h` into `out`.
fn run_task(isa: Isa, p: &Problem, h: usize, q0: usize, bq: usize, out: &mut OutRows) {
    let dv = p.s.dv;
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && p.s.n >= MIN_ROWS_TRANSPOSED {
        let kern = avx512::Kernels::new()
            .expect("attention_views accepts Avx512 only where AVX-512 was detected");
        return task_avx512(kern, p, h, q0, bq, out);
    }
    let rows = |out: &mut [f32]| match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            // SAFETY: `attention_views` accepts `Avx2` only when AVX2 and FMA were detected,
            // and `Avx512` only where AVX2 and FMA were too (`avx512::Kernels::new`).
            unsafe { x86::task_avx2(p, h, q0, out) }
        }
        _ => task(Scalar, p, h, q0, out),
    };
    match out {
        OutRows::Own(o) => rows(&mut o[..bq * dv]),
        OutRows::Shared { .. } => {
            let mut tmp = vec![0f32; bq * dv];
            rows(&mut tmp);
            for (i, row) in tmp.chunks_exact(dv).enumerate() {
                out.with_row(i, dv, |o| o.copy_from_slice(row));
            }
        }
    }
}

/// One task on AVX-512: query rows `q0 .. q0 + out.len() / dv` of head `h`, into `out`.
/// The rows are copied to a block padded to whole micro-tiles of [`avx512::ROWS`] (zero
/// queries, whose results are dropped), whose scores, outputs and running sums sit in
/// buffers starting on cache lines.
#[cfg(target_arch = "x86_64")]
fn task_avx512(
    kern: avx512::Kernels,
    p: &Problem,
    h: usize,
    q0: usize,
    bq: usize,
    out: &mut OutRows,
) {
    use avx512::{ROWS, SUM_LANES, TILE};
    let Shape {
        heads,
        kv_heads,
        n: _,
        keys,
        d,
        dv,
        scale,
        past,
    } = p.s;
    let dvp = p.dvp;
    let rows = bq.next_multiple_of(ROWS);
    let kvh = h / (heads / kv_heads);
    let mut qb = Aligned::zeroed(rows * d);
    let qb = qb.as_mut_slice();
    for (i, row) in qb.chunks_exact_mut(d.max(1)).take(bq).enumerate() {
        row.copy_from_slice(&p.q[p.q_view.at(h, q0 + i)..][..d]);
    }
    let mut sc = Aligned::zeroed(rows * TILE);
    let sc = sc.as_mut_slice();
    let mut o = Aligned::zeroed(rows * dvp);
    let o = o.as_mut_slice();
    let mut l = Aligned::zeroed(rows * SUM_LANES);
    let l = l.as_mut_slice();
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut alpha = vec![0f32; rows.next_multiple_of(SUM_LANES)];
    // Keys the block's last row sees; later tiles are masked for every row.
    let limit = past.map_or(keys, |past| (past + q0 + bq).min(keys));
    let v = &p.vp[kvh * keys * dvp..][..keys * dvp];
    for t in 0..limit.div_ceil(TILE) {
        let k0 = t * TILE;
        let nk = TILE.min(keys - k0);
        let kt = &p.kt[(kvh * p.tiles + t) * d * TILE..][..d * TILE];
        for g in (0..rows).step_by(ROWS) {
            kern.scores(&qb[g * d..], d, kt, d, scale, &mut sc[g * TILE..]);
        }
        // Keys past the last one (the tile's zero padding) and, causal, past each row's.
        let first_sees = past.map_or(keys, |past| past + q0 + 1);
        if nk < TILE || first_sees < k0 + TILE {
            for (i, row) in sc.chunks_exact_mut(TILE).enumerate() {
                let valid = past.map_or(nk, |past| (past + q0 + i + 1).saturating_sub(k0).min(nk));
                row[valid..].fill(f32::NEG_INFINITY);
            }
        }
        // The softmax step of every row at once: its rows' chains overlap.
        kern.softmax(sc, rows, &mut m, l, &mut alpha);
        let vt = &v[k0 * dvp..][..nk * dvp];
        for g in (0..rows).step_by(ROWS) {
            let (p_g, a_g) = (&sc[g * TILE..], &alpha[g..]);
            let o_g = &mut o[g * dvp..];
            let mut c0 = 0;
            while c0 + TILE <= dvp {
                kern.pv(true, p_g, &vt[c0..], dvp, nk, a_g, &mut o_g[c0..], dvp);
                c0 += TILE;
            }
            while c0 < dvp {
                kern.pv(false, p_g, &vt[c0..], dvp, nk, a_g, &mut o_g[c0..], dvp);
                c0 += SUM_LANES;
            }
        }
    }
    for (i, (src, z)) in o
        .chunks_exact(dvp)
        .zip(l.chunks_exact(SUM_LANES))
        .take(bq)
        .enumerate()
    {
        let inv = 1.0 / z.iter().sum::<f32>();
        out.with_row(i, dv, |row| {
            for (y, x) in row.iter_mut().zip(src) {
                *y = x * inv;
            }
        });
    }
}

/// The vector operations the kernel (and [`super::gelu`]) is written in. Implementations are
/// zero-sized tokens that exist only where their instructions run (see [`run_task`]).
pub(in crate::kernels) trait Simd: Copy {
    const LANES: usize;
    type V: Copy;
    fn zero(self) -> Self::V;
    fn splat(self, x: f32) -> Self::V;
    /// Loads `LANES` values from the start of `x` (panics if shorter).
    fn load(self, x: &[f32]) -> Self::V;
    /// Stores `LANES` values to the start of `x` (panics if shorter).
    fn store(self, x: &mut [f32], v: Self::V);
    /// `a * b + c`.
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn div(self, a: Self::V, b: Self::V) -> Self::V;
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    fn hsum(self, v: Self::V) -> f32;
    fn hmax(self, v: Self::V) -> f32;
    /// [`exp`] of each lane.
    fn exp(self, x: Self::V) -> Self::V;
}

// Cephes' single-precision exp: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two so the
// reduction is exact to f32), exp(r) by a degree-7 polynomial in r (1 + r + r^2 P5(r)),
// times 2^n built in the exponent bits.
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P0: f32 = 1.987_569_1e-4;
const P1: f32 = 1.398_199_9e-3;
const P2: f32 = 8.333_452e-3;
const P3: f32 = 4.166_579_6e-2;
const P4: f32 = 1.666_666_5e-1;
const P5: f32 = 0.5;
/// Inputs below this give 0 (exp would be subnormal, below 1.7e-38).
const EXP_LO: f32 = -87.0;
/// Inputs above this are clamped (softmax never passes 0).
const EXP_HI: f32 = 88.0;

/// `e^x` to within 2 ulp for `EXP_LO <= x <= EXP_HI`, 0 below (and for -inf).
pub fn exp(x: f32) -> f32 {
    if x.is_nan() || x < EXP_LO {
        return 0.0;
    }
    let x = x.min(EXP_HI);
    let n = (x * LOG2E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = P0;
    p = p * r + P1;
    p = p * r + P2;
    p = p * r + P3;
    p = p * r + P4;
    p = p * r + P5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[derive(Clone, Copy)]
pub(in crate::kernels) struct Scalar;

impl Simd for Scalar {
    const LANES: usize = 1;
    type V = f32;
    #[inline(always)]
    fn zero(self) -> f32 {
        0.0
    }
    #[inline(always)]
    fn splat(self, x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn load(self, x: &[f32]) -> f32 {
        x[0]
    }
    #[inline(always)]
    fn store(self, x: &mut [f32], v: f32) {
        x[0] = v;
    }
    #[inline(always)]
    fn fma(self, a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
    #[inline(always)]
    fn mul(self, a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    fn add(self, a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    fn sub(self, a: f32, b: f32) -> f32 {
        a - b
    }
    #[inline(always)]
    fn div(self, a: f32, b: f32) -> f32 {
        a / b
    }
    #[inline(always)]
    fn max(self, a: f32, b: f32) -> f32 {
        a.max(b)
    }
    #[inline(always)]
    fn hsum(self, v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn hmax(self, v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn exp(self, x: f32) -> f32 {
        exp(x)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(target_arch = "x86_64")]
pub(in crate::kernels) mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// AVX2 + FMA; made only in functions that enable them and run only where they exist
    /// ([`task_avx2`], [`super::super::gelu`]'s).
    #[derive(Clone, Copy)]
    pub(in crate::kernels) struct Avx2(pub(in crate::kernels) ());

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn task_avx2(p: &Problem, h: usize, q0: usize, out: &mut [f32]) {
        task(Avx2(()), p, h, q0, out)
    }

    impl Simd for Avx2 {
        const LANES: usize = 8;
        type V = __m256;
        #[inline(always)]
        fn zero(self) -> __m256 {
            // SAFETY: an `Avx2` token exists only where AVX2 + FMA were detected.
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        fn splat(self, x: f32) -> __m256 {
            // SAFETY: as for `zero`.
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        fn load(self, x: &[f32]) -> __m256 {
            let x = &x[..8];
            // SAFETY: AVX2 as for `zero`; `x` has the 8 values read (checked above).
            unsafe { _mm256_loadu_ps(x.as_ptr()) }
        }
        #[inline(always)]
        fn store(self, x: &mut [f32], v: __m256) {
            let x = &mut x[..8];
            // SAFETY: AVX2 as for `zero`; `x` has room for the 8 values (checked above).
            unsafe { _mm256_storeu_ps(x.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            // SAFETY: as for `zero`.
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: as for `zero`.
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: as for `zero`.
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: as for `zero`.
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        fn div(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: as for `zero`.
            unsafe { _mm256_div_ps(a, b) }
        }
        #[inline(always)]
        fn max(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: as for `zero`.
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        fn hsum(self, v: __m256) -> f32 {
            // SAFETY: as for `zero`.
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        fn hmax(self, v: __m256) -> f32 {
            // SAFETY: as for `zero`.
            unsafe {
                let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_max_ss(s, _mm_shuffle_ps::<1>(s, s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        fn exp(self, x: __m256) -> __m256 {
            // SAFETY: as for `zero`. Same steps as the scalar `exp`.
            unsafe {
                let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(EXP_LO));
                let x = _mm256_min_ps(
                    _mm256_max_ps(x, _mm256_set1_ps(EXP_LO)),
                    _mm256_set1_ps(EXP_HI),
                );
                let ni = _mm256_cvtps_epi32(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)));
                let n = _mm256_cvtepi32_ps(ni);
                let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
                let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
                let mut p = _mm256_set1_ps(P0);
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P1));
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P2));
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P3));
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P4));
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P5));
                let y = _mm256_fmadd_ps(
                    _mm256_mul_ps(p, r),
                    r,
                    _mm256_add_ps(r, _mm256_set1_ps(1.0)),
                );
                let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                    ni,
                    _mm256_set1_epi32(127),
                )));
                _mm256_and_ps(_mm256_mul_ps(y, pow2), keep)
            }
        }
    }
}

/// Dot product of `a` and `b` (same length).
#[inline(always)]
fn dot<S: Simd>(s: S, a: &[f32], b: &[f32]) -> f32 {
    let l = S::LANES;
    let whole = a.len() / (2 * l) * (2 * l);
    let (mut x0, mut x1) = (s.zero(), s.zero());
    let mut c = 0;
    while c < whole {
        x0 = s.fma(s.load(&a[c..]), s.load(&b[c..]), x0);
        x1 = s.fma(s.load(&a[c + l..]), s.load(&b[c + l..]), x1);
        c += 2 * l;
    }
    let mut acc = s.hsum(s.add(x0, x1));
    for (x, y) in a[whole..].iter().zip(&b[whole..]) {
        acc += x * y;
    }
    acc
}

/// Scores of `R` query rows (`q`, rows of `d`) against one key tile of the transposed keys
/// (`kt` from the tile's first key, rows of `stride`): `sc[r * BLOCK_K + j]`, scaled.
#[inline(always)]
fn score_tile<S: Simd, const R: usize>(
    s: S,
    q: &[f32],
    d: usize,
    kt: &[f32],
    stride: usize,
    scale: f32,
    sc: &mut [f32],
) {
    let l = S::LANES;
    let mut j = 0;
    while j < BLOCK_K {
        let mut acc = [[s.zero(); 2]; R];
        for c in 0..d {
            let krow = &kt[c * stride + j..];
            let (k0, k1) = (s.load(krow), s.load(&krow[l..]));
            for (r, a) in acc.iter_mut().enumerate() {
                let qb = s.splat(q[r * d + c]);
                a[0] = s.fma(qb, k0, a[0]);
                a[1] = s.fma(qb, k1, a[1]);
            }
        }
        let sv = s.splat(scale);
        for (r, a) in acc.iter().enumerate() {
            s.store(&mut sc[r * BLOCK_K + j..], s.mul(a[0], sv));
            s.store(&mut sc[r * BLOCK_K + j + l..], s.mul(a[1], sv));
        }
        j += 2 * l;
    }
}

/// `o[r] += p[r] V` for `R` rows over `nk` value rows, columns `c0 .. c0 + NV * LANES`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pv_tile<S: Simd, const R: usize, const NV: usize>(
    s: S,
    p: &[f32],
    v: &[f32],
    nk: usize,
    dv: usize,
    c0: usize,
    o: &mut [f32],
) {
    let l = S::LANES;
    let mut acc = [[s.zero(); NV]; R];
    for (r, a) in acc.iter_mut().enumerate() {
        for (t, x) in a.iter_mut().enumerate() {
            *x = s.load(&o[r * dv + c0 + t * l..]);
        }
    }
    for j in 0..nk {
        let vrow = &v[j * dv + c0..];
        let mut vv = [s.zero(); NV];
        for (t, x) in vv.iter_mut().enumerate() {
            *x = s.load(&vrow[t * l..]);
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let pb = s.splat(p[r * BLOCK_K + j]);
            for (x, y) in a.iter_mut().zip(&vv) {
                *x = s.fma(pb, *y, *x);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (t, x) in a.iter().enumerate() {
            s.store(&mut o[r * dv + c0 + t * l..], *x);
        }
    }
}

/// `o[r] += p[r] V` for `R` rows, all `dv` columns.
#[inline(always)]
fn pv_rows<S: Simd, const R: usize>(
    s: S,
    p: &[f32],
    v: &[f32],
    nk: usize,
    dv: usize,
    o: &mut [f32],
) {
    let l = S::LANES;
    let mut c0 = 0;
    while c0 + 4 * l <= dv {
        pv_tile::<S, R, 4>(s, p, v, nk, dv, c0, o);
        c0 += 4 * l;
    }
    while c0 + l <= dv {
        pv_tile::<S, R, 1>(s, p, v, nk, dv, c0, o);
        c0 += l;
    }
    for c in c0..dv {
        for r in 0..R {
            let mut acc = o[r * dv + c];
            for j in 0..nk {
                acc += p[r * BLOCK_K + j] * v[j * dv + c];
            }
            o[r * dv + c] = acc;
        }
    }
}

/// One task: query rows `q0 .. q0 + out.len() / dv` of head `h`, into `out` (zeroed).
#[inline(always)]
fn task<S: Simd>(s: S, p: &Problem, h: usize, q0: usize, out: &mut [f32]) {
    let Shape {
        heads,
        kv_heads,
        n,
        keys,
        d,
        dv,
        scale,
        past,
    } = p.s;
    let l = S::LANES;
    let bq = out.len() / dv.max(1);
    let kvh = h / (heads / kv_heads);
    let q = &p.q[(h * n + q0) * d..][..bq * d];
    let k = &p.k[kvh * keys * d..][..keys * d];
    let v = &p.v[kvh * keys * dv..][..keys * dv];
    // Keys the block's last row sees; later tiles are masked for every row.
    let limit = past.map_or(keys, |past| (past + q0 + bq).min(keys));
    let mut m = vec![f32::NEG_INFINITY; bq];
    let mut sum = vec![0f32; bq];
    let mut sc = vec![0f32; bq * BLOCK_K];
    let mut k0 = 0;
    while k0 < limit {
        let nk = BLOCK_K.min(limit - k0);
        // Scores of the tile.
        if n >= MIN_ROWS_TRANSPOSED {
            let kt = &p.kt[(kvh * p.tiles + k0 / BLOCK_K) * d * BLOCK_K..];
            let mut i = 0;
            while i + 4 <= bq {
                score_tile::<S, 4>(
                    s,
                    &q[i * d..],
                    d,
                    kt,
                    BLOCK_K,
                    scale,
                    &mut sc[i * BLOCK_K..],
                );
                i += 4;
            }
            while i < bq {
                score_tile::<S, 1>(
                    s,
                    &q[i * d..],
                    d,
                    kt,
                    BLOCK_K,
                    scale,
                    &mut sc[i * BLOCK_K..],
                );
                i += 1;
            }
        } else {
            for i in 0..bq {
                let qi = &q[i * d..][..d];
                for j in 0..nk {
                    sc[i * BLOCK_K + j] = dot(s, qi, &k[(k0 + j) * d..][..d]) * scale;
                }
            }
        }
        // Online softmax: fold the tile into each row's maximum and sum, rescale its output.
        for i in 0..bq {
            let row = &mut sc[i * BLOCK_K..][..BLOCK_K];
            let valid = past.map_or(nk, |past| (past + q0 + i + 1).saturating_sub(k0).min(nk));
            if valid == 0 {
                row.fill(0.0);
                continue;
            }
            row[valid..].fill(f32::NEG_INFINITY);
            let mut mx = s.splat(f32::NEG_INFINITY);
            for c in (0..BLOCK_K).step_by(l) {
                mx = s.max(mx, s.load(&row[c..]));
            }
            let m_new = m[i].max(s.hmax(mx));
            let alpha = exp(m[i] - m_new);
            let mv = s.splat(m_new);
            let mut acc = s.zero();
            for c in (0..BLOCK_K).step_by(l) {
                let e = s.exp(s.sub(s.load(&row[c..]), mv));
                s.store(&mut row[c..], e);
                acc = s.add(acc, e);
            }
            sum[i] = sum[i] * alpha + s.hsum(acc);
            m[i] = m_new;
            if alpha != 1.0 {
                out[i * dv..][..dv].iter_mut().for_each(|x| *x *= alpha);
            }
        }
        // Output += P V for the tile's values.
        let vt = &v[k0 * dv..][..nk * dv];
        let mut i = 0;
        while i + 2 <= bq {
            pv_rows::<S, 2>(s, &sc[i * BLOCK_K..], vt, nk, dv, &mut out[i * dv..]);
            i += 2;
        }
        if i < bq {
            pv_rows::<S, 1>(s, &sc[i * BLOCK_K..], vt, nk, dv, &mut out[i * dv..]);
        }
        k0 += BLOCK_K;
    }
    for (row, z) in out.chunks_exact_mut(dv.max(1)).zip(&sum) {
        let inv = 1.0 / z;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                let x = i
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(97))
                    >> 8;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Scores, softmax, then P V, all in f64 on the whole score matrix.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: &Shape) -> Vec<f64> {
        let mut out = vec![0f64; s.heads * s.n * s.dv];
        let groups = s.heads / s.kv_heads;
        for h in 0..s.heads {
            let kvh = h / groups;
            for i in 0..s.n {
                let seen = s.past.map_or(s.keys, |p| p + i + 1);
                let qi = &q[(h * s.n + i) * s.d..][..s.d];
                let sc: Vec<f64> = (0..seen)
                    .map(|j| {
                        let kj = &k[(kvh * s.keys + j) * s.d..][..s.d];
                        let dot: f64 = qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum();
                        dot * s.scale as f64
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                for c in 0..s.dv {
                    out[(h * s.n + i) * s.dv + c] = (0..seen)
                        .map(|j| (sc[j] - mx).exp() / z * v[(kvh * s.keys + j) * s.dv + c] as f64)
                        .sum();
                }
            }
        }
        out
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0f64;
        let steps = 2_000_000;
        for i in 0..=steps {
            let x = EXP_LO * i as f32 / steps as f32;
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            let ulp = (want as f32).abs() * f32::EPSILON;
            worst = worst.max((got - want).abs() / ulp as f64);
        }
        assert!(worst <= 2.0, "scalar exp: {worst} ulp");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    /// The vector exps against f64 through the kernel's own lanes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_within_two_ulp_of_f64() {
        #[target_feature(enable = "avx2,fma")]
        fn avx2(xs: &[f32], ys: &mut [f32]) {
            let s = x86::Avx2(());
            for (x, y) in xs.chunks_exact(8).zip(ys.chunks_exact_mut(8)) {
                s.store(y, s.exp(s.load(x)));
            }
        }
        let steps = 1 << 21;
        let mut xs: Vec<f32> = (0..steps)
            .map(|i| EXP_LO * i as f32 / steps as f32)
            .collect();
        xs.extend([
            0.0,
            -0.0,
            f32::NEG_INFINITY,
            -90.0,
            -87.5,
            -1e-8,
            -0.346,
            -0.347,
        ]);
        xs.resize(xs.len().next_multiple_of(avx512::TILE), -1.0);
        for isa in Isa::available() {
            let mut ys = vec![f32::NAN; xs.len()];
            match isa {
                // The softmax step with a running maximum of 0 over arguments <= 0 leaves
                // `exp(x - 0)` in place of each score.
                Isa::Avx512 => {
                    let kern = avx512::Kernels::new().unwrap();
                    let rows = xs.len() / avx512::TILE;
                    ys.copy_from_slice(&xs);
                    let lanes = avx512::SUM_LANES;
                    let mut m = vec![0f32; rows];
                    let mut alpha = vec![f32::NAN; rows.next_multiple_of(lanes)];
                    let mut l = vec![0f32; rows * lanes];
                    kern.softmax(&mut ys, rows, &mut m, &mut l, &mut alpha);
                    assert!(m.iter().all(|m| *m == 0.0) && alpha[..rows].iter().all(|a| *a == 1.0));
                }
                // SAFETY: `Isa::available` detected the features `avx2` enables.
                Isa::Avx2 => unsafe { avx2(&xs, &mut ys) },
                Isa::Scalar => xs.iter().zip(&mut ys).for_each(|(x, y)| *y = exp(*x)),
            }
            let mut worst = 0f64;
            for (x, y) in xs.iter().zip(&ys) {
                if *x < EXP_LO {
                    assert_eq!(*y, 0.0, "{}: exp({x})", isa.name());
                    continue;
                }
                let want = (*x as f64).exp();
                let ulp = (want as f32).abs() * f32::EPSILON;
                worst = worst.max((*y as f64 - want).abs() / ulp as f64);
            }
            assert!(worst <= 2.0, "{}: {worst} ulp", isa.name());
        }
    }

    #[test]
    fn matches_f64_reference_on_every_isa() {
        let mut cases = 0;
        for &(n, keys_full) in &[
            (1, 1),
            (3, 3),
            (17, 17),
            (100, 100),
            (257, 257),
            (3, 100),
            (100, 17),
        ] {
            for d in [64, 128] {
                for (heads, groups) in [(1, 1), (3, 1), (2, 2), (6, 2)] {
                    for past in [None, Some(0), Some(5)] {
                        let keys = match past {
                            Some(p) => p + n,
                            None => keys_full,
                        };
                        let kv_heads = heads / groups;
                        let s = Shape {
                            heads,
                            kv_heads,
                            n,
                            keys,
                            d,
                            dv: d,
                            scale: (d as f32).powf(-0.5) * 2.0,
                            past,
                        };
                        let q = values(heads * n * d, 1);
                        let k = values(kv_heads * keys * d, 2);
                        let v = values(kv_heads * keys * d, 3);
                        let want = reference(&q, &k, &v, &s);
                        for isa in Isa::available() {
                            let got = attention_on(isa, &q, &k, &v, &s).unwrap();
                            let err = got
                                .iter()
                                .zip(&want)
                                .map(|(a, b)| (*a as f64 - b).abs())
                                .fold(0f64, f64::max);
                            assert!(err < 1e-5, "{} {s:?}: max-abs {err}", isa.name());
                        }
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 7 * 2 * 4 * 3);
    }

    #[test]
    fn odd_head_sizes_and_one_key() {
        for d in [1, 7, 24, 72, 100] {
            for (n, keys, past) in [
                (5, 1, None),
                (9, 130, None),
                (4, 4, Some(0)),
                (2, 9, Some(7)),
            ] {
                let s = Shape {
                    heads: 2,
                    kv_heads: 1,
                    n,
                    keys,
                    d,
                    dv: d + 3,
                    scale: 0.3,
                    past,
                };
                let q = values(2 * n * d, 4);
                let k = values(keys * d, 5);
                let v = values(keys * (d + 3), 6);
                let want = reference(&q, &k, &v, &s);
                for isa in Isa::available() {
                    let got = attention_on(isa, &q, &k, &v, &s).unwrap();
                    for (a, b) in got.iter().zip(&want) {
                        assert!(
                            (*a as f64 - b).abs() < 1e-5,
                            "{} {s:?}: {a} vs {b}",
                            isa.name()
                        );
                    }
                }
            }
        }
    }

    /// Random odd shapes (any head sizes, query and key counts around the tiles' edges,
    /// grouped heads, full and causal), the operands laid out `[heads, rows, size]` or read
    /// in place from one projection's output rows (`[n, q heads | k heads | v heads]`
    /// with a gap), each output layout, on every instruction set, against f64.
    #[test]
    fn views_and_output_layouts_match_f64_on_random_shapes() {
        let mut rng = crate::kernels::test_util::Rng(42);
        let pick = |rng: &mut crate::kernels::test_util::Rng, xs: &[usize]| xs[rng.below(xs.len())];
        for case in 0..48 {
            let groups = pick(&mut rng, &[1, 1, 2, 3]);
            let kv_heads = 1 + rng.below(3);
            let heads = kv_heads * groups;
            let d = pick(&mut rng, &[1, 5, 16, 17, 33, 64, 80, 128]);
            let dv = if rng.below(2) == 0 {
                d
            } else {
                1 + rng.below(90)
            };
            let n = pick(&mut rng, &[1, 3, 4, 5, 6, 7, 59, 60, 61, 64, 65, 121, 200]);
            let past = match rng.below(3) {
                0 => None,
                1 => Some(0),
                _ => Some(rng.below(70)),
            };
            let keys = past.map_or_else(
                || pick(&mut rng, &[1, 2, 63, 64, 65, 127, 129, 190]),
                |p| p + n,
            );
            let s = Shape {
                heads,
                kv_heads,
                n,
                keys,
                d,
                dv,
                scale: (d as f32).powf(-0.5) * (0.5 + rng.uniform().abs() * 2.0),
                past,
            };
            // The reference's contiguous operands.
            let q = rng.values(heads * n * d);
            let k = rng.values(kv_heads * keys * d);
            let v = rng.values(kv_heads * keys * dv);
            let want = reference(&q, &k, &v, &s);
            // The same values in one buffer of rows: queries, keys and values side by side
            // (the keys and values padded to `n` rows when there are fewer).
            let rows = n.max(keys);
            let (qw, kw, vw) = (heads * d, kv_heads * d, kv_heads * dv);
            let gap = 3;
            let pitch = gap + qw + kw + vw + 2;
            let mut fused = rng.values(rows * pitch);
            for h in 0..heads {
                for i in 0..n {
                    let at = i * pitch + gap + h * d;
                    fused[at..at + d].copy_from_slice(&q[(h * n + i) * d..][..d]);
                }
            }
            for h in 0..kv_heads {
                for j in 0..keys {
                    let at = j * pitch + gap + qw + h * d;
                    fused[at..at + d].copy_from_slice(&k[(h * keys + j) * d..][..d]);
                    let at = j * pitch + gap + qw + kw + h * dv;
                    fused[at..at + dv].copy_from_slice(&v[(h * keys + j) * dv..][..dv]);
                }
            }
            let in_rows = |offset: usize, size: usize| View {
                values: &fused,
                offset: gap + offset,
                head_stride: size,
                row_stride: pitch,
            };
            let layouts = [
                (
                    View::heads_major(&q, n, d),
                    View::heads_major(&k, keys, d),
                    View::heads_major(&v, keys, dv),
                ),
                (in_rows(0, d), in_rows(qw, d), in_rows(qw + kw, dv)),
            ];
            for (li, (qv, kv, vv)) in layouts.iter().enumerate() {
                for output in [Output::HeadsMajor, Output::RowsMajor] {
                    for isa in Isa::available() {
                        let got = attention_views(isa, *qv, *kv, *vv, &s, output).unwrap();
                        let mut worst = 0f64;
                        for h in 0..heads {
                            for i in 0..n {
                                let at = match output {
                                    Output::HeadsMajor => (h * n + i) * dv,
                                    Output::RowsMajor => (i * heads + h) * dv,
                                };
                                for c in 0..dv {
                                    let e = got[at + c] as f64 - want[(h * n + i) * dv + c];
                                    worst = worst.max(e.abs());
                                }
                            }
                        }
                        assert!(
                            worst < 1e-5,
                            "case {case} layout {li} {output:?} {}: {s:?}: max-abs {worst}",
                            isa.name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn views_out_of_range_are_rejected() {
        let s = Shape {
            heads: 2,
            kv_heads: 1,
            n: 3,
            keys: 3,
            d: 4,
            dv: 4,
            scale: 1.0,
            past: None,
        };
        let buf = vec![0f32; 40];
        let ok = View {
            values: &buf,
            offset: 0,
            head_stride: 4,
            row_stride: 8,
        };
        let isa = Isa::best();
        assert!(attention_views(isa, ok, ok, ok, &s, Output::RowsMajor).is_ok());
        let short = View {
            values: &buf[..19],
            ..ok
        };
        let err = attention_views(isa, short, ok, ok, &s, Output::RowsMajor).unwrap_err();
        assert!(
            err.to_string().contains("q (19 values) has no room"),
            "{err}"
        );
        let far = View { offset: 33, ..ok };
        assert!(attention_views(isa, ok, far, ok, &s, Output::HeadsMajor).is_err());
        let huge = View {
            row_stride: usize::MAX / 2,
            ..ok
        };
        assert!(attention_views(isa, ok, ok, huge, &s, Output::HeadsMajor).is_err());
    }

    #[test]
    fn rejects_bad_shapes() {
        let s = Shape {
            heads: 3,
            kv_heads: 2,
            n: 1,
            keys: 1,
            d: 1,
            dv: 1,
            scale: 1.0,
            past: None,
        };
        assert!(attention(&[0.0; 3], &[0.0; 2], &[0.0; 2], &s).is_err());
        let s = Shape {
            kv_heads: 1,
            past: Some(1),
            ..s
        };
        let err = attention(&[0.0; 3], &[0.0; 1], &[0.0; 1], &s).unwrap_err();
        assert!(
            err.to_string()
                .contains("1 queries after 1 tokens over 1 keys"),
            "{err}"
        );
        let s = Shape { past: None, ..s };
        assert!(attention(&[0.0; 2], &[0.0; 1], &[0.0; 1], &s).is_err());
    }
}
