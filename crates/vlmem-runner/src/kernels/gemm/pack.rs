//! Packing for [`super`]: `X` into the kernels' lanes once per chunk of rows (f32, bf16
//! pairs, the exact path's three bf16 parts, Q8 blocks), and micro-panels of weight rows
//! widened or rearranged into the lanes a few KiB at a time.

#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{Lanes, Path, Q8_BLOCK, Q8_BLOCK_BYTES, Weights};
use crate::error::Result;
use crate::kernels::{WeightFormat, pool, q8_0};

/// A buffer of 64-byte lines (so a 64-byte load or tile row of it never splits a cache
/// line), viewed as the lanes' element types.
pub(super) struct Aligned {
    pub(super) lines: Vec<Line>,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Line(pub(super) [u8; 64]);

impl Aligned {
    pub(super) fn zeroed(bytes: usize) -> Self {
        Aligned::reuse(Vec::new(), bytes)
    }

    /// At least `bytes`, in the lines of `lines` (an earlier buffer, whose bytes stay as
    /// they were) and zeroed lines past them.
    pub(super) fn reuse(mut lines: Vec<Line>, bytes: usize) -> Self {
        let want = bytes.div_ceil(64);
        if lines.len() < want {
            lines.resize(want, Line([0; 64]));
        }
        Aligned { lines }
    }

    pub(super) fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is 64 plain bytes with no padding (`repr(C)`, size 64), so the
        // vector's lines are `len * 64` initialised bytes, borrowed for the same lifetime.
        unsafe {
            std::slice::from_raw_parts(self.lines.as_ptr() as *const u8, self.lines.len() * 64)
        }
    }

    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed mutably and exclusively.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.lines.as_mut_ptr() as *mut u8,
                self.lines.len() * 64,
            )
        }
    }

    pub(super) fn f32s_mut(&mut self) -> &mut [f32] {
        bytemuck::cast_slice_mut(self.bytes_mut())
    }

    pub(super) fn u32s_mut(&mut self) -> &mut [u32] {
        bytemuck::cast_slice_mut(self.bytes_mut())
    }
}

/// `X` packed for a path: per part (`part_bytes` apart), tile `t`'s lane group `g` of row
/// `r` at lane `t * groups * rm + Lanes::x_at(..)` (4-byte lanes); for Q8 lanes, per tile
/// and block the `rm` input scales and (quads) corrections `-128 * sum(q)`.
pub(super) struct PackedX {
    pub(super) buf: Aligned,
    pub(super) groups: usize,
    pub(super) blocks: usize,
    pub(super) part_bytes: usize,
    pub(super) dx: Vec<f32>,
    pub(super) corr: Vec<i32>,
}

/// The three bf16 parts of `v` that sum to it exactly: its top 8 significant bits, the
/// next 8, and the rest (at most 8 bits, so exact), each cut by truncation (none
/// overflows). A part below bf16's normal range is flushed by the AMX unit: an error under
/// `2^-126`. A value that is not finite keeps its bits in the first part.
pub(super) fn split3(v: f32) -> [u16; 3] {
    if !v.is_finite() {
        return [(v.to_bits() >> 16) as u16, 0, 0];
    }
    let h = v.to_bits() & 0xFFFF_0000;
    let r = v - f32::from_bits(h);
    let m = r.to_bits() & 0xFFFF_0000;
    let l = r - f32::from_bits(m);
    [
        (h >> 16) as u16,
        (m >> 16) as u16,
        (l.to_bits() >> 16) as u16,
    ]
}

/// `v` rounded to bf16 (to nearest, ties to even).
pub(super) fn bf16_bits(v: f32) -> u32 {
    u32::from(half::bf16::from_f32(v).to_bits())
}

thread_local! {
    /// The packed `X` of this thread's last product, reused by the next (grow-only): a
    /// prompt's products each reuse the same memory instead of faulting in fresh pages.
    pub(super) static X_SCRATCH: std::cell::RefCell<Vec<Line>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Scratch kept per thread at most; a larger one (a huge image's chunk) is given back.
pub(super) const X_SCRATCH_KEEP_BYTES: usize = 64 << 20;

/// Packs input rows `row0..` (`tiles` tiles of the path's `rm`; rows past `n` are zeros)
/// of `x` (`n x cols`) into the path's lanes, in `scratch`'s memory, tile by tile across the
/// kernels' pool.
#[allow(clippy::too_many_arguments)]
pub(super) fn pack_x(
    path: Path,
    x: &[f32],
    n: usize,
    cols: usize,
    row0: usize,
    tiles: usize,
    scratch: Vec<Line>,
) -> PackedX {
    let lanes = path.lanes();
    let (rm, _) = path.tile();
    let groups = lanes.groups(cols);
    let blocks = if lanes.quantized() {
        cols / Q8_BLOCK
    } else {
        0
    };
    let tile_lanes = groups * rm;
    let part_bytes = tiles * tile_lanes * 4;
    let parts = path.parts();
    let mut buf = Aligned::reuse(scratch, parts * part_bytes);
    let per_tile = blocks * rm;
    let mut dx = vec![0f32; tiles * per_tile];
    let mut corr = vec![
        0i32;
        if lanes == Lanes::Q8Quads {
            tiles * per_tile
        } else {
            0
        }
    ];
    {
        let all = &mut buf.u32s_mut()[..parts * tiles * tile_lanes];
        // Lanes past `cols` (a row that is not whole steps) must read zeros, whatever an
        // earlier product left; every other lane of a row is written below.
        if cols < groups * lanes.group() {
            all.fill(0);
        }
        let mut by_part: Vec<_> = all
            .chunks_exact_mut(tiles * tile_lanes)
            .map(|part| part.chunks_exact_mut(tile_lanes))
            .collect();
        let mut dx_tiles = dx.chunks_mut(per_tile.max(1));
        let mut corr_tiles = corr.chunks_mut(per_tile.max(1));
        let items: Vec<_> = (0..tiles)
            .map(|t| {
                let tile: Vec<&mut [u32]> = by_part.iter_mut().filter_map(Iterator::next).collect();
                let dx = dx_tiles.next().unwrap_or_default();
                let corr = corr_tiles.next().unwrap_or_default();
                (t, tile, dx, corr)
            })
            .collect();
        pool::global().for_each(items, |(t, mut tile, dx, corr)| {
            // Rows past `n` keep whatever an earlier product left: a row of `X` only
            // reaches its own row of the tile's sums, and those rows are never stored.
            // A chunk of values at a time for all the tile's rows, so the lanes written
            // (a few KiB) stay in L1 until they are whole.
            let first = row0 + t * rm;
            let rows = rm.min(n.saturating_sub(first));
            let row = |r: usize| &x[(first + r) * cols..(first + r + 1) * cols];
            // Values packed for every row by the vector path (AMX lanes: whole blocks of 8
            // rows x 32 values; the rest row by row).
            let mut done = 0;
            #[cfg(target_arch = "x86_64")]
            if lanes == Lanes::AmxPairs && x86::has_avx2_fma() {
                done = cols / 32 * 32;
                for k0 in (0..done).step_by(32) {
                    for r0 in (0..rows).step_by(8) {
                        if r0 + 8 <= rows {
                            let block = std::array::from_fn(|i| &row(r0 + i)[k0..k0 + 32]);
                            let base = lanes.x_at(groups, rm, k0 / 2, r0);
                            // SAFETY: the CPU has AVX2 (checked); the function checks the
                            // lengths it reads and writes.
                            unsafe { x86::pack_amx_8x32(block, &mut tile, base) };
                        } else {
                            for r in r0..rows {
                                let xr = &row(r)[k0..k0 + 32];
                                pack_row(path, groups, r, k0, xr, &mut tile, dx, corr);
                            }
                        }
                    }
                }
            }
            for k0 in (done..cols).step_by(PACK_CHUNK) {
                let k1 = (k0 + PACK_CHUNK).min(cols);
                for r in 0..rows {
                    pack_row(path, groups, r, k0, &row(r)[k0..k1], &mut tile, dx, corr);
                }
            }
        });
    }
    PackedX {
        buf,
        groups,
        blocks,
        part_bytes,
        dx,
        corr,
    }
}

/// Values of a row packed at a time: a multiple of every lane group, of the AMX step (32)
/// and of the Q8 block (32).
pub(super) const PACK_CHUNK: usize = 64;

/// Packs values `k0..k0 + xr.len()` of one input row (row `r` of its tile, `groups` lane
/// groups per row; `k0` a multiple of [`PACK_CHUNK`]) into the tile's parts and, for Q8
/// lanes, the blocks' scales and corrections (`rm` per block; each block is quantized on
/// its own, so a chunk of whole blocks quantizes as the whole row would).
#[allow(clippy::too_many_arguments)]
pub(super) fn pack_row(
    path: Path,
    groups: usize,
    r: usize,
    k0: usize,
    xr: &[f32],
    parts: &mut [&mut [u32]],
    dx: &mut [f32],
    corr: &mut [i32],
) {
    let lanes = path.lanes();
    let (rm, _) = path.tile();
    let g0 = k0 / lanes.group();
    let at = |g: usize| lanes.x_at(groups, rm, g0 + g, r);
    match lanes {
        Lanes::F32 => {
            for (k, &v) in xr.iter().enumerate() {
                parts[0][at(k)] = v.to_bits();
            }
        }
        Lanes::AmxPairs => {
            for (g, pair) in xr.chunks(2).enumerate() {
                let at = at(g);
                let (lo, hi) = (pair[0], pair.get(1).copied().unwrap_or(0.0));
                if let [p0, p1, p2] = parts {
                    let (lo, hi) = (split3(lo), split3(hi));
                    p0[at] = u32::from(lo[0]) | u32::from(hi[0]) << 16;
                    p1[at] = u32::from(lo[1]) | u32::from(hi[1]) << 16;
                    p2[at] = u32::from(lo[2]) | u32::from(hi[2]) << 16;
                } else {
                    parts[0][at] = bf16_bits(lo) | bf16_bits(hi) << 16;
                }
            }
        }
        Lanes::Bf16Pairs => {
            for (g, pair) in xr.chunks(2).enumerate() {
                let hi = pair.get(1).map_or(0, |&v| bf16_bits(v));
                parts[0][at(g)] = bf16_bits(pair[0]) | hi << 16;
            }
        }
        Lanes::Q8Quads | Lanes::Q8Pairs => {
            let xq = q8_0::Q8Input::new(xr);
            let b0 = k0 / Q8_BLOCK;
            for (b, quants) in xq.q.chunks_exact(Q8_BLOCK).enumerate() {
                dx[(b0 + b) * rm + r] = xq.d[b];
                if lanes == Lanes::Q8Quads {
                    let sum: i32 = quants.iter().map(|&q| i32::from(q)).sum();
                    corr[(b0 + b) * rm + r] = -128 * sum;
                }
            }
            let len = xr.len();
            if lanes == Lanes::Q8Quads {
                for (g, quad) in xq.q[..len].chunks_exact(4).enumerate() {
                    parts[0][at(g)] = u32::from_le_bytes([
                        quad[0] as u8,
                        quad[1] as u8,
                        quad[2] as u8,
                        quad[3] as u8,
                    ]);
                }
            } else {
                for (g, pair) in xq.q[..len].chunks_exact(2).enumerate() {
                    let lo = u32::from(i16::from(pair[0]) as u16);
                    let hi = u32::from(i16::from(pair[1]) as u16);
                    parts[0][at(g)] = lo | hi << 16;
                }
            }
        }
    }
}

/// Widens values `k0..k0 + out.len()` of one stored row of `ty` into `out`; for a block
/// format `k0` and the length are whole blocks.
pub(super) fn widen_segment(
    ty: WeightFormat,
    row: &[u8],
    k0: usize,
    out: &mut [f32],
) -> Result<()> {
    let len = out.len();
    match ty {
        WeightFormat::Bf16 => {
            for (o, b) in out
                .iter_mut()
                .zip(row[2 * k0..2 * (k0 + len)].chunks_exact(2))
            {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
            }
        }
        WeightFormat::F16 => {
            for (o, b) in out
                .iter_mut()
                .zip(row[2 * k0..2 * (k0 + len)].chunks_exact(2))
            {
                *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        WeightFormat::F32 => {
            for (o, b) in out
                .iter_mut()
                .zip(row[4 * k0..4 * (k0 + len)].chunks_exact(4))
            {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        #[allow(unreachable_patterns)]
        _ => {
            let (be, bb) = (ty.block_elems() as usize, ty.block_bytes() as usize);
            let bytes = &row[k0 / be * bb..(k0 + len) / be * bb];
            crate::weights::widen_format_into("gemm", ty, bytes, out)?;
        }
    }
    Ok(())
}

/// One packed micro-panel of weights: `rn` outputs x one k block, in the path's lanes
/// (lane group `g`, output `j` at `(g * rn + j) * 4` bytes), and for Q8 the `rn` weight
/// scales per block.
pub(super) struct Panel {
    pub(super) buf: Aligned,
    pub(super) dw: Vec<f32>,
    row: Vec<f32>,
}

impl Panel {
    pub(super) fn new(path: Path, kc: usize) -> Self {
        let (_, rn) = path.tile();
        Panel {
            buf: Aligned::zeroed(path.lanes().groups(kc) * rn * 4),
            dw: vec![0f32; kc / Q8_BLOCK * rn],
            row: vec![0f32; kc],
        }
    }

    /// Packs weight rows `j0..j0 + rn` (rows past the matrix as zeros) x values
    /// `k0..k0 + klen` (lane groups past them as zeros, to whole steps).
    pub(super) fn pack(
        &mut self,
        path: Path,
        wt: Weights<'_>,
        j0: usize,
        k0: usize,
        klen: usize,
    ) -> Result<()> {
        let (_, rn) = path.tile();
        let lanes = path.lanes();
        let groups = lanes.groups(klen);
        for j in 0..rn {
            let row = (j0 + j < wt.rows)
                .then(|| &wt.w[(j0 + j) * wt.row_bytes..(j0 + j + 1) * wt.row_bytes]);
            match lanes {
                Lanes::F32 => {
                    let vals = &mut self.row[..klen];
                    match row {
                        Some(row) => widen_segment(wt.ty, row, k0, vals)?,
                        None => vals.fill(0.0),
                    }
                    let buf = self.buf.f32s_mut();
                    for (g, &v) in vals.iter().enumerate() {
                        buf[lanes.w_at(rn, groups, g, j)] = v;
                    }
                }
                Lanes::Bf16Pairs | Lanes::AmxPairs => {
                    let buf = self.buf.u32s_mut();
                    let seg = row.map_or(&[][..], |row| &row[2 * k0..2 * (k0 + klen)]);
                    let half = |i: usize| {
                        seg.get(2 * i..2 * i + 2)
                            .map_or(0, |b| u32::from(u16::from_le_bytes([b[0], b[1]])))
                    };
                    for g in 0..groups {
                        buf[lanes.w_at(rn, groups, g, j)] = half(2 * g) | half(2 * g + 1) << 16;
                    }
                }
                Lanes::Q8Quads | Lanes::Q8Pairs => {
                    let blocks = klen / Q8_BLOCK;
                    let b0 = k0 / Q8_BLOCK;
                    for b in 0..blocks {
                        let blk = row.map(|row| {
                            &row[(b0 + b) * Q8_BLOCK_BYTES..(b0 + b + 1) * Q8_BLOCK_BYTES]
                        });
                        self.dw[b * rn + j] = blk.map_or(0.0, |blk| {
                            half::f16::from_le_bytes([blk[0], blk[1]]).to_f32()
                        });
                        let quants = blk.map(|blk| &blk[2..]);
                        if lanes == Lanes::Q8Quads {
                            let buf = self.buf.bytes_mut();
                            for g in 0..Q8_BLOCK / 4 {
                                let at = lanes.w_at(rn, groups, b * 8 + g, j) * 4;
                                for i in 0..4 {
                                    buf[at + i] = quants.map_or(0, |q| q[4 * g + i]) ^ 0x80;
                                }
                            }
                        } else {
                            let buf = self.buf.u32s_mut();
                            for g in 0..Q8_BLOCK / 2 {
                                let pair =
                                    quants.map_or([0, 0], |q| [q[2 * g] as i8, q[2 * g + 1] as i8]);
                                let lo = u32::from(i16::from(pair[0]) as u16);
                                let hi = u32::from(i16::from(pair[1]) as u16);
                                buf[lanes.w_at(rn, groups, b * 16 + g, j)] = lo | hi << 16;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
