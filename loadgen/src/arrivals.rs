//! Poisson arrivals: exponentially distributed gaps between request starts.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;

/// Yields the gaps between consecutive arrivals of a Poisson process.
#[derive(Debug)]
pub struct PoissonArrivals {
    rng: ChaCha8Rng,
    rate_per_s: f64,
}

impl PoissonArrivals {
    /// `rate_per_s` must be positive and finite (the CLI checks it).
    pub fn new(rate_per_s: f64, seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            rate_per_s,
        }
    }

    /// The next inter-arrival time in seconds, drawn by inversion: -ln(U)/rate.
    pub fn next_gap_secs(&mut self) -> f64 {
        // random::<f64>() is in [0, 1); 1 - u is in (0, 1], so ln is finite.
        let u: f64 = self.rng.random();
        -(1.0 - u).ln() / self.rate_per_s
    }

    pub fn next_gap(&mut self) -> Duration {
        Duration::from_secs_f64(self.next_gap_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_gap_is_one_over_rate() {
        let mut arrivals = PoissonArrivals::new(4.0, 42);
        let n = 200_000;
        let gaps: Vec<f64> = (0..n).map(|_| arrivals.next_gap_secs()).collect();
        let mean = gaps.iter().sum::<f64>() / n as f64;
        assert!((mean - 0.25).abs() < 0.25 * 0.01, "mean {mean}");
        // Exponential: the standard deviation equals the mean.
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            (var.sqrt() - 0.25).abs() < 0.25 * 0.02,
            "std {}",
            var.sqrt()
        );
        assert!(gaps.iter().all(|g| g.is_finite() && *g >= 0.0));
    }

    #[test]
    fn same_seed_same_schedule() {
        let mut a = PoissonArrivals::new(10.0, 3);
        let mut b = PoissonArrivals::new(10.0, 3);
        for _ in 0..100 {
            assert_eq!(a.next_gap(), b.next_gap());
        }
    }
}
