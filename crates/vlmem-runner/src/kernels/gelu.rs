//! GELU's tanh approximation (`gelu_pytorch_tanh`, the vision blocks' MLP) in place, on the
//! kernels' pool, with the attention kernel's vector exponential (AVX2 + FMA where the CPU
//! has them, else the same steps one value at a time).
//!
//! `0.5 x (1 + tanh(u))` with `u = sqrt(2/pi) (x + 0.044715 x^3)` equals `x / (1 + e^(-2u))`
//! (as `1 + tanh(u) = 2 / (1 + e^(-2u))`): one exponential ([`super::attention::exp`], within
//! 2 ulp) and one division, where the tanh form loses the low bits of `1 + tanh(u)` for
//! negative `u`. Against f64, the result is within a few ulp of `|x|`: the tests check
//! `4e-7 max(1, |x|)`. Where `e^(-2u)` passes f32's range (`x < -9.4` or so) the exponential
//! is clamped at `e^88`, which leaves `x / (1 + e^88)`, below `1e-37` in magnitude (the f64
//! value is smaller still); above `x = 9.3` or so it is 0 and the result is `x`.

#![allow(unsafe_code)]

use super::attention::{Scalar, Simd};

/// Values per parallel task.
const CHUNK: usize = 1 << 16;

/// `-2 sqrt(2/pi)`.
const A: f32 = -1.595_769;
/// `-2 sqrt(2/pi) 0.044715`.
const B: f32 = -0.071_354_816;

/// GELU (tanh approximation) of every value of `x`, in place, on the pool.
pub fn gelu_tanh_in_place(x: &mut [f32]) {
    if x.len() <= CHUNK {
        return gelu_tanh_on_this_thread(x);
    }
    super::pool::global().for_each(x.chunks_mut(CHUNK), gelu_tanh_on_this_thread);
}

/// [`gelu_tanh_in_place`] on the calling thread alone (e.g. inside a pool task).
pub fn gelu_tanh_on_this_thread(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::bf16::has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { gelu_avx2(x) };
    }
    gelu(Scalar, x)
}

/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_avx2(x: &mut [f32]) {
    gelu(super::attention::x86::Avx2(()), x)
}

#[inline(always)]
fn gelu<S: Simd>(s: S, x: &mut [f32]) {
    let l = S::LANES;
    let whole = x.len() / l * l;
    let (a, b, one) = (s.splat(A), s.splat(B), s.splat(1.0));
    let mut i = 0;
    while i < whole {
        let v = s.load(&x[i..]);
        // -2u = v (A + B v^2)
        let t = s.mul(v, s.fma(s.mul(v, v), b, a));
        let y = s.div(v, s.add(one, s.exp(t)));
        s.store(&mut x[i..], y);
        i += l;
    }
    for v in &mut x[whole..] {
        let t = *v * (*v * *v * B + A);
        *v /= 1.0 + super::attention::exp(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::Rng;

    fn reference(x: f32) -> f64 {
        let x = x as f64;
        let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
        0.5 * x * (1.0 + u.tanh())
    }

    fn check(xs: &[f32], ys: &[f32], what: &str) {
        for (x, y) in xs.iter().zip(ys) {
            let want = reference(*x);
            let err = (*y as f64 - want).abs();
            assert!(
                err <= 4e-7 * (x.abs() as f64).max(1.0),
                "{what}: gelu({x}) = {y}, want {want} (error {err:e})"
            );
        }
    }

    #[test]
    fn matches_f64_on_every_path_and_length() {
        let mut rng = Rng(7);
        let mut xs: Vec<f32> = (0..20_000).map(|_| rng.uniform() * 12.0).collect();
        xs.extend((0..4_000).map(|i| -20.0 + i as f32 * 0.01));
        xs.extend([
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            50.0,
            -50.0,
            1e4,
            -1e4,
            f32::MIN_POSITIVE,
        ]);
        // The vector path with every tail length, the scalar path, the parallel split.
        for len in [xs.len(), xs.len() - 1, xs.len() - 7, 5, 0] {
            let mut ys = xs[..len].to_vec();
            gelu_tanh_on_this_thread(&mut ys);
            check(&xs[..len], &ys, "chunk");
        }
        let mut ys = xs.clone();
        gelu(Scalar, &mut ys);
        check(&xs, &ys, "scalar");
        let big: Vec<f32> = (0..3 * CHUNK + 11).map(|_| rng.uniform() * 8.0).collect();
        let mut ys = big.clone();
        gelu_tanh_in_place(&mut ys);
        check(&big, &ys, "pool");
    }

    #[test]
    fn close_to_candles_gelu() {
        let mut rng = Rng(11);
        let xs: Vec<f32> = (0..10_000).map(|_| rng.uniform() * 10.0).collect();
        let t = candle_core::Tensor::from_slice(&xs, xs.len(), &candle_core::Device::Cpu).unwrap();
        let want = t.gelu().unwrap().to_vec1::<f32>().unwrap();
        let mut ys = xs.clone();
        gelu_tanh_in_place(&mut ys);
        for ((x, y), w) in xs.iter().zip(&ys).zip(&want) {
            assert!(
                (y - w).abs() <= 2e-6 * x.abs().max(1.0),
                "gelu({x}): {y} vs {w}"
            );
        }
    }
}
