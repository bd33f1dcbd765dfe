//! `erf` over f32 rows eight lanes at a time, giving the values of candle's CPU `erf` (the `libm`
//! crate's `erff`, a port of FreeBSD's `s_erff.c`), which exact GELU calls once per element in each
//! direction.
//!
//! `erff` picks one of four rational approximations by `|x|` (below 0.84375, below 1.25, below 6,
//! above) and, from 1.25 on, multiplies two `expf` (FreeBSD's `e_expf.c`: argument reduction by
//! `k ln 2`, a rational correction, scaling by `2^k`). The AVX2 path below evaluates every
//! approximation that some lane of the eight needs with the same f32 operations in the same order
//! (no fused multiply-add: the Rust code has none), then picks each lane's: each rounding is the
//! scalar code's, so the values are equal. `equals_candles_erf` checks every 61st f32, and all 4.3
//! billion were compared once in a release build (BENCHMARKS.md, issue 15). Lanes with NaN,
//! infinities or `|x| < 2^-28`, and CPUs without AVX2 (detected at run time), take the scalar
//! function itself.

use candle_core::op::{self, UnaryOpT};

/// `row[i] = erf(row[i])` for every element (candle's `erf`, value for value).
pub fn erf(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { avx2::erf(row) };
        return;
    }
    for v in row {
        *v = op::Erf::f32(*v);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{UnaryOpT, op};

    /// The constants of `s_erff.c` and `e_expf.c`, by their bit patterns (as those files list them).
    const fn f(bits: u32) -> f32 {
        f32::from_bits(bits)
    }

    /// erx: erf(1) to f32 precision.
    const ERX: f32 = f(0x3f58560b);
    /// erf on [0, 0.84375]: `x + x * P(z) / Q(z)`, z = x^2 (coefficients lowest first).
    const PP: [f32; 5] = [f(0x3e0375d4), f(0xbea66beb), f(0xbce9528f), f(0xbbbd1489), f(0xb7c756b1)];
    const QQ: [f32; 6] = [1.0, f(0x3ecbbbce), f(0x3d852a63), f(0x3ba68116), f(0x390aee49), f(0xb684e21a)];
    /// erf on [0.84375, 1.25]: `erx + P(s) / Q(s)`, s = |x| - 1.
    const PA: [f32; 7] = [
        f(0xbb1acdc6),
        f(0x3ed46805),
        f(0xbebe9208),
        f(0x3ea2fe54),
        f(0xbde31cc2),
        f(0x3d1151b3),
        f(0xbb0df9c0),
    ];
    const QA: [f32; 7] =
        [1.0, f(0x3dd9f331), f(0x3f0a5785), f(0x3d931ae7), f(0x3e013307), f(0x3c5f6e13), f(0x3c445aa3)];
    /// erfc on [1.25, 1/0.35]: `exp(-z^2 - 0.5625) exp((z - x)(z + x) + R(s)/S(s)) / x`, s = 1/x^2.
    const RA: [f32; 8] = [
        f(0xbc21a093),
        f(0xbf31a0b7),
        f(0xc128f022),
        f(0xc2798057),
        f(0xc322658c),
        f(0xc3389ae7),
        f(0xc2a2932b),
        f(0xc11d077e),
    ];
    const SA: [f32; 9] = [
        1.0,
        f(0x419d35ce),
        f(0x4309a863),
        f(0x43d9486f),
        f(0x442158c9),
        f(0x43d6810b),
        f(0x42d9451f),
        f(0x40d23f7c),
        f(0xbd777f97),
    ];
    /// erfc on [1/0.35, 6].
    const RB: [f32; 7] = [
        f(0xbc21a092),
        f(0xbf4c9dd4),
        f(0xc18e104b),
        f(0xc320a2ea),
        f(0xc41f6441),
        f(0xc480230b),
        f(0xc3f1c275),
    ];
    const SB: [f32; 8] = [
        1.0,
        f(0x41f2b459),
        f(0x43a2e571),
        f(0x44c01759),
        f(0x4547fdbb),
        f(0x451f90ce),
        f(0x43ed43a7),
        f(0xc1b38712),
    ];
    /// `e_expf.c`: ln 2 split in two, 1 / ln 2, and the rational correction's coefficients.
    const LN2_HI: f32 = f(0x3f317200);
    const LN2_LO: f32 = f(0x35bfbe8e);
    const INV_LN2: f32 = f(0x3fb8aa3b);
    const EXP_P1: f32 = f(0x3e2aaa8f);
    const EXP_P2: f32 = f(0xbb355215);

    /// |x| bounds (as f32 bit patterns) where `erff` and `expf` change approximation.
    const ERF_TINY: u32 = 0x31800000;
    const ERF_SMALL: u32 = 0x3f580000;
    const ERF_MID: u32 = 0x3fa00000;
    const ERF_ERFC_A: u32 = 0x4036db6d;
    const ERF_ONE: u32 = 0x40c00000;
    const EXP_TINY: u32 = 0x39000000;
    const EXP_HALF_LN2: u32 = 0x3eb17218;
    const EXP_ONE_HALF_LN2: u32 = 0x3f851592;

    #[target_feature(enable = "avx2")]
    pub unsafe fn erf(row: &mut [f32]) {
        let mut chunks = row.chunks_exact_mut(8);
        for chunk in &mut chunks {
            // SAFETY: `chunk` holds 8 f32; unaligned loads and stores.
            let x = unsafe { _mm256_loadu_ps(chunk.as_ptr()) };
            let (y, vector) = erf8(x);
            unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), y) };
            let vector = _mm256_movemask_ps(vector);
            if vector != 0xff {
                let scalar = (0..8).filter(|lane| vector & (1 << lane) == 0);
                let mut xs = [0f32; 8];
                unsafe { _mm256_storeu_ps(xs.as_mut_ptr(), x) };
                for lane in scalar {
                    chunk[lane] = op::Erf::f32(xs[lane]);
                }
            }
        }
        for v in chunks.into_remainder() {
            *v = op::Erf::f32(*v);
        }
    }

    /// `erff` of eight lanes, and the mask of lanes whose value it computed (the others, NaN,
    /// infinite or below 2^-28 in size, are left to the scalar function).
    #[target_feature(enable = "avx2")]
    fn erf8(x: __m256) -> (__m256, __m256) {
        let (ax, sign) = abs_and_sign(x);
        let vector = _mm256_and_ps(at_least(ax, ERF_TINY), below(ax, 0x7f800000));
        let small = below(ax, ERF_SMALL);
        let near_zero = if any(small) { erf_small(x) } else { x };
        if all(small) {
            return (near_zero, vector);
        }
        let mid = below(ax, ERF_MID);
        let erfc = match (any(_mm256_andnot_ps(small, mid)), any(_mm256_andnot_ps(mid, below(ax, ERF_ONE)))) {
            (true, true) => _mm256_blendv_ps(erfc_large(ax), erfc_mid(ax), mid),
            (true, false) => erfc_mid(ax),
            (false, _) => erfc_large(ax),
        };
        // 1 - erfc, or 1 - 2^-120 from 6 on; the sign put back.
        let tail = bits(0x03800000);
        let erfc = _mm256_blendv_ps(tail, erfc, below(ax, ERF_ONE));
        let y = _mm256_or_ps(_mm256_sub_ps(_mm256_set1_ps(1.0), erfc), sign);
        (_mm256_blendv_ps(y, near_zero, small), vector)
    }

    /// `x + x * P(x^2) / Q(x^2)` (|x| < 0.84375).
    #[target_feature(enable = "avx2")]
    fn erf_small(x: __m256) -> __m256 {
        let z = _mm256_mul_ps(x, x);
        let y = _mm256_div_ps(horner(z, &PP), horner(z, &QQ));
        _mm256_add_ps(x, _mm256_mul_ps(x, y))
    }

    /// `erfc` for 0.84375 <= |x| < 1.25: `(1 - erx) - P(s) / Q(s)`, s = |x| - 1.
    #[target_feature(enable = "avx2")]
    fn erfc_mid(ax: __m256) -> __m256 {
        let s = _mm256_sub_ps(ax, _mm256_set1_ps(1.0));
        _mm256_sub_ps(_mm256_set1_ps(1.0 - ERX), _mm256_div_ps(horner(s, &PA), horner(s, &QA)))
    }

    /// `erfc` for 1.25 <= |x| < 6.
    #[target_feature(enable = "avx2")]
    fn erfc_large(ax: __m256) -> __m256 {
        let s = _mm256_div_ps(_mm256_set1_ps(1.0), _mm256_mul_ps(ax, ax));
        let near = below(ax, ERF_ERFC_A);
        let (r, big_s) = match (any(near), all(near)) {
            (true, true) => (horner(s, &RA), horner(s, &SA)),
            (false, _) => (horner(s, &RB), horner(s, &SB)),
            (true, false) => (
                _mm256_blendv_ps(horner(s, &RB), horner(s, &RA), near),
                _mm256_blendv_ps(horner(s, &SB), horner(s, &SA), near),
            ),
        };
        let z = _mm256_and_ps(ax, bits(0xffffe000));
        let neg_z = _mm256_xor_ps(z, bits(0x80000000));
        let first = expf8(_mm256_sub_ps(_mm256_mul_ps(neg_z, z), _mm256_set1_ps(0.5625)));
        let product = _mm256_mul_ps(_mm256_sub_ps(z, ax), _mm256_add_ps(z, ax));
        let second = expf8(_mm256_add_ps(product, _mm256_div_ps(r, big_s)));
        _mm256_div_ps(_mm256_mul_ps(first, second), ax)
    }

    /// `e_expf.c` for finite |x| < 80 (the arguments `erfc_large` makes, from -37 to 1): `k`
    /// from `x / ln 2` (or +-1, or 0 by size), `x - k ln 2` in two parts, the rational
    /// correction, then the exact scaling by `2^k`; `1 + x` for |x| <= 2^-14.
    #[target_feature(enable = "avx2")]
    fn expf8(x: __m256) -> __m256 {
        let (ax, sign) = abs_and_sign(x);
        let from_product = _mm256_cvttps_epi32(_mm256_add_ps(
            _mm256_mul_ps(_mm256_set1_ps(INV_LN2), x),
            _mm256_or_ps(_mm256_set1_ps(0.5), sign),
        ));
        // +-1 by the sign of x (x is not zero where this is used).
        let unit = _mm256_sign_epi32(_mm256_set1_epi32(1), _mm256_castps_si256(x));
        let k = _mm256_blendv_epi8(unit, from_product, _mm256_castps_si256(above(ax, EXP_ONE_HALF_LN2)));
        let k = _mm256_and_si256(k, _mm256_castps_si256(above(ax, EXP_HALF_LN2)));
        let kf = _mm256_cvtepi32_ps(k);
        let hi = _mm256_sub_ps(x, _mm256_mul_ps(kf, _mm256_set1_ps(LN2_HI)));
        let lo = _mm256_mul_ps(kf, _mm256_set1_ps(LN2_LO));
        let r = _mm256_sub_ps(hi, lo);
        let rr = _mm256_mul_ps(r, r);
        let correction = _mm256_add_ps(_mm256_set1_ps(EXP_P1), _mm256_mul_ps(rr, _mm256_set1_ps(EXP_P2)));
        let c = _mm256_sub_ps(r, _mm256_mul_ps(rr, correction));
        let ratio = _mm256_div_ps(_mm256_mul_ps(r, c), _mm256_sub_ps(_mm256_set1_ps(2.0), c));
        let y = _mm256_add_ps(_mm256_set1_ps(1.0), _mm256_add_ps(_mm256_sub_ps(ratio, lo), hi));
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(k, _mm256_set1_epi32(127))));
        let y = _mm256_mul_ps(y, scale);
        _mm256_blendv_ps(_mm256_add_ps(_mm256_set1_ps(1.0), x), y, above(ax, EXP_TINY))
    }

    /// `c[0] + s * (c[1] + s * (... + s * c[n]))`, rounded at each step as written.
    #[target_feature(enable = "avx2")]
    fn horner(s: __m256, coefficients: &[f32]) -> __m256 {
        let (last, rest) = coefficients.split_last().expect("a polynomial has a coefficient");
        rest.iter()
            .rev()
            .fold(_mm256_set1_ps(*last), |p, &c| _mm256_add_ps(_mm256_set1_ps(c), _mm256_mul_ps(s, p)))
    }

    /// `|x|` and the sign bit of `x` alone.
    #[target_feature(enable = "avx2")]
    fn abs_and_sign(x: __m256) -> (__m256, __m256) {
        (_mm256_and_ps(x, bits(0x7fffffff)), _mm256_and_ps(x, bits(0x80000000)))
    }

    #[target_feature(enable = "avx2")]
    fn bits(pattern: u32) -> __m256 {
        _mm256_set1_ps(f32::from_bits(pattern))
    }

    /// Lanes of `ax` (no NaN) below the f32 with bit pattern `bound`.
    #[target_feature(enable = "avx2")]
    fn below(ax: __m256, bound: u32) -> __m256 {
        _mm256_cmp_ps::<_CMP_LT_OQ>(ax, bits(bound))
    }

    #[target_feature(enable = "avx2")]
    fn at_least(ax: __m256, bound: u32) -> __m256 {
        _mm256_cmp_ps::<_CMP_GE_OQ>(ax, bits(bound))
    }

    #[target_feature(enable = "avx2")]
    fn above(ax: __m256, bound: u32) -> __m256 {
        _mm256_cmp_ps::<_CMP_GT_OQ>(ax, bits(bound))
    }

    #[target_feature(enable = "avx2")]
    fn any(mask: __m256) -> bool {
        _mm256_movemask_ps(mask) != 0
    }

    #[target_feature(enable = "avx2")]
    fn all(mask: __m256) -> bool {
        _mm256_movemask_ps(mask) == 0xff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `erf` of `xs` in chunks of 37 lanes (so the scalar tail runs too), compared with candle's
    /// `erf` bit for bit.
    fn assert_equal(xs: &[f32]) {
        for chunk in xs.chunks(37) {
            let mut ours = chunk.to_vec();
            erf(&mut ours);
            for (&x, &y) in chunk.iter().zip(&ours) {
                let want = op::Erf::f32(x);
                assert!(
                    y.to_bits() == want.to_bits() || (y.is_nan() && want.is_nan()),
                    "erf({x:e}) = {y:e}, candle {want:e}"
                );
            }
        }
    }

    #[test]
    fn equals_candles_erf() {
        let every_61st: Vec<f32> = (0..=u32::MAX).step_by(61).map(f32::from_bits).collect();
        assert_equal(&every_61st);
        // The bounds between approximations, and their neighbours.
        let bounds = [0x31800000u32, 0x3f580000, 0x3fa00000, 0x4036db6d, 0x40c00000];
        let near: Vec<f32> = bounds
            .iter()
            .flat_map(|&b| (b - 40..b + 40).flat_map(|bits| [f32::from_bits(bits), -f32::from_bits(bits)]))
            .collect();
        assert_equal(&near);
    }

    /// All 2^32 f32 (half a minute in a release build): `cargo test --release --lib verf -- --ignored`.
    #[test]
    #[ignore = "exhaustive; run once in release after changing the kernel"]
    fn equals_candles_erf_everywhere() {
        use rayon::prelude::*;
        (0..1u32 << 12).into_par_iter().for_each(|block| {
            let start = block << 20;
            let xs: Vec<f32> = (start..=start + ((1 << 20) - 1)).map(f32::from_bits).collect();
            assert_equal(&xs);
        });
    }
}
