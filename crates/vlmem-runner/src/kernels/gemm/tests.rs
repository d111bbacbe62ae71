//! The tiled product against an f64 reference on every path this CPU has.

use super::pack::*;
use super::*;
use crate::kernels::q8_0;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn values(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.uniform()).collect()
    }
}

/// A `rows x cols` matrix stored in `ty`, placed `offset` bytes into its buffer (so the
/// packers read misaligned bytes), and the exact values those bytes hold. Rows get
/// varied magnitudes so block scales differ.
fn matrix(
    rng: &mut Rng,
    ty: WeightFormat,
    rows: usize,
    cols: usize,
    offset: usize,
) -> (Vec<u8>, Vec<f64>) {
    let mut buf = vec![0u8; offset];
    for r in 0..rows {
        let scale = [1.0f32, 0.03, 4.0][r % 3];
        let vals: Vec<f32> = (0..cols).map(|_| rng.uniform() * scale).collect();
        match ty {
            WeightFormat::Bf16 => vals
                .iter()
                .for_each(|&v| buf.extend(half::bf16::from_f32(v).to_le_bytes())),
            WeightFormat::F16 => vals
                .iter()
                .for_each(|&v| buf.extend(half::f16::from_f32(v).to_le_bytes())),
            WeightFormat::F32 => vals.iter().for_each(|&v| buf.extend(v.to_le_bytes())),
            WeightFormat::Q8_0 => {
                buf.extend(vlmem_qwen3vl::format::q8_0::quantize_row(&vals).unwrap())
            }
            WeightFormat::Q4_K => {
                buf.extend(vlmem_qwen3vl::format::q4_k::quantize_row(&vals).unwrap())
            }
        }
    }
    let values = crate::weights::widen_format_to_f32("w", ty, &buf[offset..], rows * cols)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    (buf, values)
}

/// The exact product (in f64) of the stored weights and the inputs as `path` multiplies
/// them (Q8 lanes: each row quantized; bf16 pairs: each value rounded to bf16), plus the
/// bias, and the bound on the result's distance from it: f32 accumulation of `cols`
/// terms (`(cols + 4) 2^-24` of the sum of magnitudes, the scalar path's separate
/// multiply and add included, and the bias's rounding), for Q8 `(blocks + 5) 2^-23` of it
/// (the decode kernel's bound: one rounding per block sum); for bf16 inputs, where the
/// inputs are taken unrounded, `2^-8` of it on top (bf16 keeps 8 significant bits).
fn reference(
    path: Path,
    wv: &[f64],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> (Vec<f64>, Vec<f64>) {
    let mut want = vec![0f64; n * rows];
    let mut bound = vec![0f64; n * rows];
    for t in 0..n {
        let xr = &x[t * cols..(t + 1) * cols];
        let xs: Vec<f64> = match path.lanes() {
            Lanes::Q8Pairs | Lanes::Q8Quads => {
                let q = q8_0::Q8Input::new(xr);
                (0..cols).map(|c| q.value(c)).collect()
            }
            Lanes::F32 | Lanes::Bf16Pairs | Lanes::AmxPairs => {
                xr.iter().map(|&v| f64::from(v)).collect()
            }
        };
        for j in 0..rows {
            let w = &wv[j * cols..(j + 1) * cols];
            let dot: f64 = w.iter().zip(&xs).map(|(a, b)| a * b).sum();
            let mag: f64 = w.iter().zip(&xs).map(|(a, b)| (a * b).abs()).sum();
            let b = bias.map_or(0.0, |b| f64::from(b[j]));
            let eps = f64::from(f32::EPSILON);
            let acc = match path.lanes() {
                Lanes::Q8Pairs | Lanes::Q8Quads => (cols / Q8_BLOCK) as f64 + 5.0,
                Lanes::F32 | Lanes::Bf16Pairs | Lanes::AmxPairs => {
                    (path.parts() as f64 * cols as f64 + 4.0) / 2.0
                }
            } * eps;
            let rounding = if path.rounds_inputs() {
                2f64.powi(-8)
            } else {
                0.0
            };
            want[t * rows + j] = dot + b;
            bound[t * rows + j] = (acc + rounding) * (mag + b.abs()) + 1e-30;
        }
    }
    (want, bound)
}

fn assert_within(what: &str, got: &[f32], want: &[f64], bound: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let err = (f64::from(g) - w).abs();
        assert!(err <= b, "{what} [{i}]: {g} vs {w} (err {err:e} > {b:e})");
    }
}

const NS: [usize; 11] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 33];

fn available(ty: WeightFormat) -> Vec<Path> {
    Path::ALL
        .into_iter()
        .filter(|p| p.available() && p.reads(ty))
        .collect()
}

/// Every path this CPU has, for every format it reads, against the f64 reference over
/// n = 1..=9, 17, 33 and weights whose rows and columns are not multiples of any tile
/// or k block (two or more k blocks), on misaligned weight bytes and inputs.
#[test]
fn every_path_matches_the_f64_reference_on_odd_shapes() {
    let mut rng = Rng(1);
    let plain: &[(usize, usize)] = &[
        (1, 1),
        (3, 5),
        (31, 17),
        (33, 64),
        (37, 203),
        (70, 300),
        (47, 1031),
    ];
    let blocked: &[(usize, usize)] =
        &[(1, 32), (3, 64), (33, 96), (37, 288), (70, 544), (45, 1056)];
    let q4k: &[(usize, usize)] = &[(3, 256), (37, 512), (33, 768)];
    for ty in WeightFormat::ALL {
        let shapes = match ty {
            WeightFormat::Q8_0 => blocked,
            WeightFormat::Q4_K => q4k,
            _ => plain,
        };
        let paths = available(ty);
        eprintln!(
            "{ty}: {:?}",
            paths.iter().map(|p| p.name()).collect::<Vec<_>>()
        );
        for (s, &(rows, cols)) in shapes.iter().enumerate() {
            let offset = s % 4;
            let (buf, wv) = matrix(&mut rng, ty, rows, cols, offset);
            let w = &buf[offset..];
            for n in NS {
                // Inputs one value into their buffer: not 64-byte aligned.
                let xbuf = rng.values(n * cols + 1);
                let x = &xbuf[1..];
                let bias = (s % 2 == 1).then(|| rng.values(rows));
                for &path in &paths {
                    let got = gemm_on(path, w, ty, rows, cols, x, n, bias.as_deref()).unwrap();
                    let (want, bound) = reference(path, &wv, rows, cols, x, n, bias.as_deref());
                    assert_within(
                        &format!("{} {ty} {rows}x{cols} n {n}", path.name()),
                        &got,
                        &want,
                        &bound,
                    );
                }
            }
        }
    }
}

/// A product large enough for several row chunks, several k blocks and many tasks.
#[test]
fn large_products_span_chunks_blocks_and_tasks() {
    let mut rng = Rng(2);
    let (rows, cols, n) = (301, 700, CHUNK_ROWS + 77);
    for ty in [WeightFormat::Bf16, WeightFormat::Q8_0] {
        let cols = if ty == WeightFormat::Q8_0 { 704 } else { cols };
        let (w, wv) = matrix(&mut rng, ty, rows, cols, 0);
        let x = rng.values(n * cols);
        let bias = rng.values(rows);
        for path in available(ty)
            .into_iter()
            .filter(|p| *p != Path::F32Scalar && *p != Path::Q8Scalar)
        {
            let got = gemm_on(path, &w, ty, rows, cols, &x, n, Some(&bias)).unwrap();
            let (want, bound) = reference(path, &wv, rows, cols, &x, n, Some(&bias));
            assert_within(path.name(), &got, &want, &bound);
        }
    }
}

/// The vector paths give the portable path's results within twice the bound apart, and
/// `gemm` (its own choice of path) is one of them.
#[test]
fn the_chosen_path_is_available_and_reads_the_format() {
    for ty in WeightFormat::ALL {
        for p in [Precision::Exact, Precision::Bf16Input] {
            let path = path_for(ty, p);
            assert!(path.available() && path.reads(ty), "{ty} {p:?}: {path:?}");
            if p == Precision::Exact {
                assert_ne!(path, Path::Bf16Avx512, "exact never rounds inputs");
            }
        }
    }
    let mut rng = Rng(3);
    let (rows, cols, n) = (45, 320, 13);
    let (w, wv) = matrix(&mut rng, WeightFormat::Bf16, rows, cols, 0);
    let x = rng.values(n * cols);
    let got = gemm(&w, WeightFormat::Bf16, rows, cols, &x, n, None).unwrap();
    let (want, bound) = reference(
        path_for(WeightFormat::Bf16, precision()),
        &wv,
        rows,
        cols,
        &x,
        n,
        None,
    );
    assert_within("gemm", &got, &want, &bound);
}

/// Rows of the weight multiplied block by block into their columns give the whole
/// product bit for bit (a streamed weight's pieces), and leave the other columns alone.
#[test]
fn column_blocks_equal_the_whole_product() {
    let mut rng = Rng(4);
    let (rows, cols, n) = (77, 160, 9);
    for ty in [WeightFormat::Bf16, WeightFormat::Q8_0, WeightFormat::F32] {
        let (w, _) = matrix(&mut rng, ty, rows, cols, 0);
        let rb = crate::kernels::row_bytes(ty, cols).unwrap();
        let x = rng.values(n * cols);
        let bias = rng.values(rows);
        let whole = gemm(&w, ty, rows, cols, &x, n, Some(&bias)).unwrap();
        let mut y = vec![f32::NAN; n * (rows + 3)];
        let mut r0 = 0;
        for len in [5usize, 33, 1, 38] {
            let wb = &w[r0 * rb..(r0 + len) * rb];
            gemm_cols_into(
                wb,
                ty,
                len,
                cols,
                &x,
                n,
                Some(&bias[r0..r0 + len]),
                &mut y,
                rows + 3,
                r0,
            )
            .unwrap();
            r0 += len;
        }
        assert_eq!(r0, rows);
        for t in 0..n {
            assert_eq!(
                &y[t * (rows + 3)..t * (rows + 3) + rows],
                &whole[t * rows..(t + 1) * rows],
                "{ty}"
            );
            assert!(
                y[t * (rows + 3) + rows..(t + 1) * (rows + 3)]
                    .iter()
                    .all(|v| v.is_nan())
            );
        }
    }
}

/// Up to `ROWS_PATH_MAX_N` rows, each row equals `matvec` of its input bit for bit.
#[test]
fn few_rows_equal_matvec() {
    let mut rng = Rng(5);
    for ty in WeightFormat::ALL {
        let (rows, cols) = (1030, 512);
        let (w, _) = matrix(&mut rng, ty, rows, cols, 0);
        for n in 1..=ROWS_PATH_MAX_N {
            let x = rng.values(n * cols);
            let y = gemm(&w, ty, rows, cols, &x, n, None).unwrap();
            for t in 0..n {
                let want = crate::kernels::matvec(&w, ty, rows, cols, &x[t * cols..(t + 1) * cols])
                    .unwrap();
                assert_eq!(&y[t * rows..(t + 1) * rows], &want[..], "{ty} n {n}");
            }
        }
    }
}

/// Empty products, and the output is overwritten whatever it held.
#[test]
fn edges_and_overwrite() {
    let x = vec![1.0f32; 6];
    for path in available(WeightFormat::Bf16) {
        assert!(
            gemm_on(path, &[], WeightFormat::Bf16, 0, 3, &x, 2, None)
                .unwrap()
                .is_empty()
        );
        assert!(
            gemm_on(path, &[0; 12], WeightFormat::Bf16, 2, 3, &[], 0, None)
                .unwrap()
                .is_empty()
        );
        let y = gemm_on(
            path,
            &[],
            WeightFormat::Bf16,
            2,
            0,
            &[],
            4,
            Some(&[1.5, -2.0]),
        )
        .unwrap();
        assert_eq!(y, [1.5, -2.0].repeat(4), "{}", path.name());
    }
    let mut rng = Rng(6);
    let (w, _) = matrix(&mut rng, WeightFormat::Bf16, 40, 64, 0);
    let xs = rng.values(20 * 64);
    let want = gemm(&w, WeightFormat::Bf16, 40, 64, &xs, 20, None).unwrap();
    let mut y = vec![f32::NAN; 20 * 40];
    gemm_into(&w, WeightFormat::Bf16, 40, 64, &xs, 20, None, &mut y).unwrap();
    assert_eq!(y, want);
}

/// Sizes that disagree are typed errors, never panics.
#[test]
fn bad_sizes_are_errors() {
    let w = vec![0u8; 2 * 3 * 4];
    let bad = |r: Result<Vec<f32>>| assert!(matches!(r, Err(RunnerError::BadRequest(_))), "{r:?}");
    bad(gemm(&w, WeightFormat::Bf16, 3, 4, &[0.0; 7], 2, None));
    bad(gemm(&w, WeightFormat::Bf16, 4, 4, &[0.0; 8], 2, None));
    bad(gemm(
        &w,
        WeightFormat::Bf16,
        3,
        4,
        &[0.0; 8],
        usize::MAX,
        None,
    ));
    bad(gemm(
        &w,
        WeightFormat::Bf16,
        3,
        4,
        &[0.0; 8],
        2,
        Some(&[0.0; 2]),
    ));
    bad(gemm(&w, WeightFormat::Q8_0, 1, 33, &[0.0; 66], 2, None));
    bad(gemm_on(
        Path::Q8Scalar,
        &w,
        WeightFormat::Bf16,
        3,
        4,
        &[0.0; 8],
        2,
        None,
    ));
    let mut y = vec![0f32; 5];
    assert!(gemm_into(&w, WeightFormat::Bf16, 3, 4, &[0.0; 8], 2, None, &mut y).is_err());
    let mut y = vec![0f32; 8];
    assert!(
        gemm_cols_into(
            &w,
            WeightFormat::Bf16,
            3,
            4,
            &[0.0; 8],
            2,
            None,
            &mut y,
            4,
            2
        )
        .is_err()
    );
    assert!(
        gemm_cols_into(
            &w,
            WeightFormat::Bf16,
            3,
            4,
            &[0.0; 8],
            2,
            None,
            &mut y,
            4,
            usize::MAX
        )
        .is_err()
    );
}

/// The paths that round inputs to bf16 do so: on inputs that bf16 cannot hold their
/// results move past f32 accumulation of the exact product, and stay inside their bound;
/// the exact AMX path (three parts) stays inside f32 accumulation on the same inputs.
#[test]
fn bf16_inputs_are_rounded_within_their_bound() {
    let mut rng = Rng(7);
    let (rows, cols, n) = (64, 1024, 24);
    let (w, wv) = matrix(&mut rng, WeightFormat::Bf16, rows, cols, 0);
    let x = rng.values(n * cols);
    let (want, exact_bound) = reference(Path::F32Scalar, &wv, rows, cols, &x, n, None);
    let mut checked = 0;
    for path in available(WeightFormat::Bf16) {
        let got = gemm_on(path, &w, WeightFormat::Bf16, rows, cols, &x, n, None).unwrap();
        let (_, bound) = reference(path, &wv, rows, cols, &x, n, None);
        assert_within(path.name(), &got, &want, &bound);
        let worst = got
            .iter()
            .zip(&want)
            .zip(&exact_bound)
            .map(|((&g, &w), &b)| (f64::from(g) - w).abs() / b)
            .fold(0f64, f64::max);
        if path.rounds_inputs() {
            checked += 1;
            assert!(worst > 1.0, "{}: inputs not rounded ({worst})", path.name());
        } else {
            assert!(worst <= 3.0, "{}: {worst}", path.name());
        }
    }
    eprintln!("paths rounding inputs checked: {checked}");
}

/// The vector packer of the AMX lanes writes the scalar packer's bits exactly (three
/// parts and one), on values with ties, NaNs, infinities, subnormals and huge ones.
#[cfg(target_arch = "x86_64")]
#[test]
fn vector_packing_equals_scalar_packing() {
    if !x86::has_avx2_fma() {
        eprintln!("no AVX2 here: skipped");
        return;
    }
    let mut rng = Rng(9);
    let specials = [
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7F80_0001),
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN,
        f32::from_bits(1),
        -f32::MIN_POSITIVE,
        0.0,
        -0.0,
        f32::from_bits(0x3F80_8000),
        f32::from_bits(0x3F81_8000),
        f32::from_bits(0x3F80_7FFF),
    ];
    let (rows, cols) = (8, 32);
    let x: Vec<f32> = (0..rows * cols)
        .map(|i| match i % 5 {
            0 => specials[i / 5 % specials.len()],
            _ => rng.uniform() * 2f32.powi((i % 60) as i32 - 30),
        })
        .collect();
    for path in [Path::AmxExact, Path::AmxBf16] {
        let (rm, _) = path.tile();
        let groups = path.lanes().groups(cols);
        let tile_lanes = groups * rm;
        let mut vector = vec![vec![0u32; tile_lanes]; path.parts()];
        let mut scalar = vector.clone();
        let block = std::array::from_fn(|i| &x[i * cols..(i + 1) * cols]);
        let mut parts: Vec<&mut [u32]> = vector.iter_mut().map(|p| &mut p[..]).collect();
        // SAFETY: AVX2 was detected above; the function checks its lengths.
        unsafe { x86::pack_amx_8x32(block, &mut parts, 0) };
        let mut parts: Vec<&mut [u32]> = scalar.iter_mut().map(|p| &mut p[..]).collect();
        for r in 0..rows {
            let xr = &x[r * cols..(r + 1) * cols];
            pack_row(path, groups, r, 0, xr, &mut parts, &mut [], &mut []);
        }
        assert_eq!(vector, scalar, "{}", path.name());
    }
}

/// The three bf16 parts of an f32 sum to it exactly, over magnitudes from 2^-100 to
/// 2^100, ties and the extremes; each part is a bf16 (its low 16 bits zero in f32).
#[test]
fn split_parts_sum_exactly() {
    let mut rng = Rng(8);
    let mut values: Vec<f32> = (0..20000)
        .map(|i| rng.uniform() * 2f32.powi((i % 201) - 100))
        .collect();
    values.extend([
        0.0,
        -0.0,
        1.0,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        f32::from_bits(0x3F80_8000),
        f32::from_bits(0x3F80_FFFF),
        f32::from_bits(0xBF7F_FFFF),
    ]);
    for v in values {
        let parts = split3(v);
        let sum: f64 = parts
            .iter()
            .map(|&b| f64::from(f32::from_bits(u32::from(b) << 16)))
            .sum();
        assert_eq!(sum, f64::from(v), "{v:e} ({:#x}): {parts:x?}", v.to_bits());
    }
    assert!(f32::from_bits(u32::from(split3(f32::INFINITY)[0]) << 16).is_infinite());
    assert!(f32::from_bits(u32::from(split3(f32::NAN)[0]) << 16).is_nan());
}
