//! `exp` over f32 rows eight lanes at a time, giving the values of the C library's `expf`, which
//! is what candle's CPU `exp` calls one element at a time (softmax and log-softmax spend most of
//! their time there).
//!
//! glibc's `expf` (since 2.27, from Arm's optimized-routines) evaluates `2^(k/32) * 2^(r/32)` in
//! double precision: `k` and `r` from `x * 32 / ln 2`, the first factor from a 32-entry table,
//! the second from a cubic, the product rounded once to f32. The AVX2 path below does the same
//! double-precision steps on four lanes at a time with the same table and coefficients and the
//! fused multiply-add that glibc's FMA build (the one it picks on CPUs with FMA) contracts, so it
//! rounds to the same f32: `equals_the_c_library_expf` checks every 97th f32 of the range, and
//! all 2.2 billion of them were compared once in a release build (BENCHMARKS.md, issue 15).
//! Lanes outside that range (over- and underflow, NaN) and CPUs without AVX2 and FMA (detected at
//! run time) take the C library function itself. With another C library (musl) the values are
//! glibc's, not that library's.

/// `row[i] = exp(row[i] - shift)` for every element.
pub fn exp_shifted(row: &mut [f32], shift: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe { avx2::exp_shifted(row, shift) };
        return;
    }
    for v in row {
        *v = (*v - shift).exp();
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Bits of 2^(i/32) rounded to the nearest double, minus `i << 47` (so that adding `k << 47`
    /// for `k = i mod 32` gives 2^(k/32)); computed with 60-digit decimal arithmetic.
    static TABLE: [u64; 32] = [
        0x3ff0000000000000,
        0x3fefd9b0d3158574,
        0x3fefb5586cf9890f,
        0x3fef9301d0125b51,
        0x3fef72b83c7d517b,
        0x3fef54873168b9aa,
        0x3fef387a6e756238,
        0x3fef1e9df51fdee1,
        0x3fef06fe0a31b715,
        0x3feef1a7373aa9cb,
        0x3feedea64c123422,
        0x3feece086061892d,
        0x3feebfdad5362a27,
        0x3feeb42b569d4f82,
        0x3feeab07dd485429,
        0x3feea47eb03a5585,
        0x3feea09e667f3bcd,
        0x3fee9f75e8ec5f74,
        0x3feea11473eb0187,
        0x3feea589994cce13,
        0x3feeace5422aa0db,
        0x3feeb737b0cdc5e5,
        0x3feec49182a3f090,
        0x3feed503b23e255d,
        0x3feee89f995ad3ad,
        0x3feeff76f2fb5e47,
        0x3fef199bdd85529c,
        0x3fef3720dcef9069,
        0x3fef5818dcfba487,
        0x3fef7c97337b9b5f,
        0x3fefa4afa2a490da,
        0x3fefd0765b6e4540,
    ];
    /// 32 / ln 2.
    const INV_LN2_32: u64 = 0x40471547652b82fe;
    /// 1.5 * 2^52: adding it rounds a double to an integer (in the low mantissa bits).
    const SHIFT: u64 = 0x4338000000000000;
    /// The cubic for 2^(r/32), r in [-1/2, 1/2]: `C0 r^3 + C1 r^2 + C2 r + 1`.
    const C0: u64 = 0x3ebc6af84b912394;
    const C1: u64 = 0x3f2ebfce50fac4f3;
    const C2: u64 = 0x3f962e42ff0c52d6;
    /// The range the double-precision steps cover: from log(2^-150) to log(2^128).
    const LOWEST: u32 = 0xc2cff1b4;
    const HIGHEST: u32 = 0x42b17217;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted(row: &mut [f32], shift: f32) {
        let shifts = _mm256_set1_ps(shift);
        let (low, high) = (_mm256_set1_ps(f32::from_bits(LOWEST)), _mm256_set1_ps(f32::from_bits(HIGHEST)));
        let mut chunks = row.chunks_exact_mut(8);
        for chunk in &mut chunks {
            // SAFETY: `chunk` holds 8 f32; unaligned loads and stores.
            let x = _mm256_sub_ps(unsafe { _mm256_loadu_ps(chunk.as_ptr()) }, shifts);
            let inside = _mm256_and_ps(_mm256_cmp_ps(x, low, _CMP_GE_OQ), _mm256_cmp_ps(x, high, _CMP_LE_OQ));
            if _mm256_movemask_ps(inside) == 0xff {
                let lower = exp4(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
                let upper = exp4(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
                let y = _mm256_set_m128(_mm256_cvtpd_ps(upper), _mm256_cvtpd_ps(lower));
                unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), y) };
            } else {
                unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), x) };
                for v in chunk.iter_mut() {
                    *v = v.exp();
                }
            }
        }
        let rest = chunks.into_remainder();
        for v in rest {
            *v = (*v - shift).exp();
        }
    }

    /// `exp` of four doubles holding f32 values inside [LOWEST, HIGHEST], before rounding to f32.
    #[target_feature(enable = "avx2,fma")]
    fn exp4(x: __m256d) -> __m256d {
        let constant = |bits: u64| _mm256_set1_pd(f64::from_bits(bits));
        let shift = constant(SHIFT);
        let z = _mm256_mul_pd(constant(INV_LN2_32), x);
        let rounded = _mm256_add_pd(z, shift);
        let k = _mm256_castpd_si256(rounded);
        // `x * 32 / ln 2 - k` as one fused multiply-add, as the FMA build of glibc contracts it.
        let r = _mm256_fmsub_pd(constant(INV_LN2_32), x, _mm256_sub_pd(rounded, shift));
        let index = _mm256_and_si256(k, _mm256_set1_epi64x(31));
        // SAFETY: every index is in 0..32 (masked just above), inside TABLE.
        let entry = unsafe { _mm256_i64gather_epi64::<8>(TABLE.as_ptr().cast(), index) };
        let scale = _mm256_castsi256_pd(_mm256_add_epi64(entry, _mm256_slli_epi64::<47>(k)));
        let cubic_top = _mm256_fmadd_pd(constant(C0), r, constant(C1));
        let linear = _mm256_fmadd_pd(constant(C2), r, _mm256_set1_pd(1.0));
        let poly = _mm256_fmadd_pd(cubic_top, _mm256_mul_pd(r, r), linear);
        _mm256_mul_pd(poly, scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f32 values from `from` to `to` (same sign, |from| <= |to|), every `step`-th bit pattern.
    fn patterns(from: f32, to: f32, step: usize) -> impl Iterator<Item = f32> {
        (from.to_bits()..=to.to_bits()).step_by(step).map(f32::from_bits)
    }

    #[test]
    fn equals_the_c_library_expf() {
        // Every 97th f32 from 0 to past the overflow and from -0 to past the underflow, plus
        // the special values; in chunks of 37 so the scalar tail runs too.
        let positive = patterns(0.0, 89.0, 97);
        let negative = patterns(-0.0, -105.0, 97);
        let special = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MAX, f32::MIN, 1e-45, -1e-45];
        let xs: Vec<f32> = positive.chain(negative).chain(special).collect();
        for chunk in xs.chunks(37) {
            let mut ours = chunk.to_vec();
            exp_shifted(&mut ours, 0.0);
            for (&x, &y) in chunk.iter().zip(&ours) {
                let want = x.exp();
                assert!(
                    y.to_bits() == want.to_bits() || (y.is_nan() && want.is_nan()),
                    "exp({x:e}): {y:e} vs {want:e}"
                );
            }
        }
    }

    #[test]
    fn subtracts_the_shift_first_as_the_composition_does() {
        let xs: Vec<f32> = (0..50).map(|i| i as f32 * 0.37 - 9.0).collect();
        let mut ours = xs.clone();
        exp_shifted(&mut ours, 3.25);
        let want: Vec<f32> = xs.iter().map(|&x| (x - 3.25).exp()).collect();
        assert_eq!(ours, want);
    }
}
