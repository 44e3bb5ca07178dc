//! The floating-point element types of the CPU kernels (f32, bf16, f16), widened to f32
//! for arithmetic and narrowed back with round-to-nearest-even.

use half::{bf16, f16};

/// A tensor element the CPU kernels compute on in f32.
pub trait Element: Copy + Send + Sync {
    fn widen(self) -> f32;
    fn narrow(value: f32) -> Self;
    /// `value` rounded to this type, as f32.
    #[inline(always)]
    fn rounded(value: f32) -> f32 {
        Self::narrow(value).widen()
    }
}

impl Element for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(value: f32) -> Self {
        value
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn narrow(value: f32) -> Self {
        bf16::from_f32(value)
    }
}

impl Element for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn narrow(value: f32) -> Self {
        f16::from_f32(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowing_rounds_to_nearest_even() {
        assert_eq!(bf16::rounded(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(bf16::rounded(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(f16::rounded(65504.0), 65504.0);
        assert_eq!(<f32 as Element>::rounded(0.1), 0.1);
        assert_eq!(bf16::from_f32(-2.5).widen(), -2.5);
    }
}
