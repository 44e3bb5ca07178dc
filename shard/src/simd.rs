//! Plain-Rust kernels compiled again for AVX-512 and for AVX2, chosen at run time.
//!
//! The crate targets baseline x86-64 (SSE2), so that one binary runs on any x86-64
//! processor, and the compiler vectorizes plain loops only 4 lanes wide. The hot loops
//! of the norm, the rotary embedding and sampling are simple enough for the compiler
//! to vectorize 16 lanes wide when AVX-512 is allowed, or 8 with AVX2:
//! [`avx512_variant!`] compiles such a loop again inside functions with those features
//! and calls the widest one the processor has. (The loop must be `#[inline(always)]`: a
//! closure passed to a function with target features is not inlined into it.) Rust never
//! contracts or reorders floating-point operations on its own, so every variant computes
//! the same bits.

/// Whether this x86-64 processor has every listed feature, detected once per call site.
macro_rules! has_features {
    ($($feature:tt),+) => {{
        #[cfg(target_arch = "x86_64")]
        {
            static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            *DETECTED.get_or_init(|| true $(&& std::arch::is_x86_feature_detected!($feature))+)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }};
}

/// Whether this processor has the AVX-512 subsets the kernels are compiled for.
pub fn avx512() -> bool {
    has_features!("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c")
}

/// Whether this processor has AVX2, FMA and F16C (x86-64-v3, without AVX-512): most AMD
/// EPYC before Zen 4 and Intel's client processors.
pub fn avx2() -> bool {
    has_features!("avx2", "fma", "f16c")
}

/// Defines `fn $name(args) -> R` (optionally generic over one parameter) that calls the
/// `#[inline(always)]` function `$body` compiled for AVX-512 when [`avx512`] allows, for
/// AVX2 when [`avx2`] does, and as is otherwise.
#[macro_export]
macro_rules! avx512_variant {
    (
        $vis:vis fn $name:ident $(<$g:ident: $bound:path>)?
        ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:ident
    ) => {
        $vis fn $name $(<$g: $bound>)? ($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
                unsafe fn wide $(<$g: $bound>)? ($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn avx2 $(<$g: $bound>)? ($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if $crate::simd::avx512() {
                    // SAFETY: `avx512` detected every feature `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
                if $crate::simd::avx2() {
                    // SAFETY: `avx2` detected every feature `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

#[cfg(test)]
mod tests {
    #[inline(always)]
    fn total_body(x: &[f32]) -> f32 {
        x.iter().sum()
    }

    crate::avx512_variant!(fn total(x: &[f32]) -> f32 = total_body);

    use crate::element::Element;

    #[inline(always)]
    fn double_body<T: Element>(x: &mut [T]) {
        for v in x.iter_mut() {
            *v = T::narrow(v.widen() * 2.0);
        }
    }

    crate::avx512_variant!(fn double<T: Element>(x: &mut [T]) = double_body);

    #[test]
    fn a_variant_computes_what_its_body_does() {
        let x: Vec<f32> = (0..100).map(|x| x as f32).collect();
        assert_eq!(total(&x), 4950.0);
        assert_eq!(total(&[]), 0.0);
        let mut y = vec![1.0f32, 2.5, -3.0];
        double(&mut y);
        assert_eq!(y, [2.0, 5.0, -6.0]);
    }
}
