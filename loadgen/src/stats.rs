//! Percentiles over latency samples.

use serde::Serialize;

/// p50/p90/p99 and mean of one metric, in milliseconds; `None` without samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    pub count: usize,
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Self {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let mean = if sorted.is_empty() {
            None
        } else {
            Some(sorted.iter().sum::<f64>() / sorted.len() as f64)
        };
        Self {
            count: sorted.len(),
            mean,
            p50: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p99: percentile(&sorted, 99.0),
        }
    }
}

/// The `q`-th percentile (0..=100) of ascending `sorted` samples, linearly
/// interpolated between closest ranks (numpy's default method).
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let rank = (q.clamp(0.0, 100.0) / 100.0) * last as f64;
    let lower = rank.floor() as usize;
    let upper = rank.ceil() as usize;
    let weight = rank - lower as f64;
    Some(sorted[lower] + (sorted[upper] - sorted[lower]) * weight)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn interpolates_like_numpy() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!(close(percentile(&v, 50.0), 50.5));
        assert!(close(percentile(&v, 90.0), 90.1));
        assert!(close(percentile(&v, 99.0), 99.01));
        assert!(close(percentile(&v, 0.0), 1.0));
        assert!(close(percentile(&v, 100.0), 100.0));
    }

    #[test]
    fn handles_tiny_inputs() {
        assert_eq!(percentile(&[], 50.0), None);
        assert!(close(percentile(&[7.0], 99.0), 7.0));
        assert!(close(percentile(&[1.0, 3.0], 50.0), 2.0));
    }

    #[test]
    fn summary_sorts_and_skips_non_finite() {
        let s = Summary::of(&[3.0, f64::NAN, 1.0, 2.0]);
        assert_eq!(s.count, 3);
        assert!(close(s.p50, 2.0));
        assert!(close(s.mean, 2.0));
        assert_eq!(Summary::of(&[]), Summary::default());
    }
}
