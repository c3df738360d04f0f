//! Uncertainty: Wilson interval on top-1 agreement, KL mean with a standard error clustered by sequence,
//! McNemar's paired test between two candidates on the same plan, and percentiles.
use serde::Serialize;
use statrs::distribution::{Binomial, ChiSquared, ContinuousCDF, DiscreteCDF, Normal};

/// 95% Wilson score interval for `k` successes in `n` trials; `None` when n = 0.
pub fn wilson(k: usize, n: usize) -> Option<(f64, f64)> {
    if n == 0 {
        return None;
    }
    let z = Normal::new(0.0, 1.0).ok()?.inverse_cdf(0.975);
    let (n, p) = (n as f64, k as f64 / n as f64);
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    Some(((centre - half).max(0.0), (centre + half).min(1.0)))
}

/// Mean of `values` (each tagged with its cluster, here the sequence) and its cluster-robust standard error:
/// SE² = G/(G−1) · Σ_g (Σ_{i∈g} (x_i − mean))² / N². `se` is `None` with fewer than two clusters.
pub fn clustered_mean(values: &[(usize, f64)]) -> Option<(f64, Option<f64>)> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().map(|v| v.1).sum::<f64>() / n;
    let mut sums: std::collections::BTreeMap<usize, f64> = Default::default();
    for &(g, x) in values {
        *sums.entry(g).or_default() += x - mean;
    }
    let g = sums.len() as f64;
    let se = (sums.len() >= 2)
        .then(|| (g / (g - 1.0) * sums.values().map(|s| s * s).sum::<f64>() / (n * n)).sqrt());
    Some((mean, se))
}

/// Linear-interpolation percentile (`q` in 0..=100) of already sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let r = q / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (r.floor() as usize, r.ceil() as usize);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (r - lo as f64))
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct McNemar {
    /// Positions where A matches the oracle and B does not.
    pub a_only: usize,
    /// Positions where B matches the oracle and A does not.
    pub b_only: usize,
    /// Two-sided p-value (exact binomial below 25 discordant pairs, χ² with continuity correction above).
    pub p_value: f64,
    pub method: &'static str,
}

pub fn mcnemar(a_only: usize, b_only: usize) -> McNemar {
    let n = a_only + b_only;
    if n == 0 {
        return McNemar {
            a_only,
            b_only,
            p_value: 1.0,
            method: "none discordant",
        };
    }
    if n < 25 {
        let k = a_only.min(b_only) as u64;
        let p = Binomial::new(0.5, n as u64)
            .map(|b| (2.0 * b.cdf(k)).min(1.0))
            .unwrap_or(1.0);
        McNemar {
            a_only,
            b_only,
            p_value: p,
            method: "exact binomial",
        }
    } else {
        let d = (a_only as f64 - b_only as f64).abs() - 1.0;
        let chi = d.max(0.0).powi(2) / n as f64;
        let p = ChiSquared::new(1.0).map(|c| c.sf(chi)).unwrap_or(1.0);
        McNemar {
            a_only,
            b_only,
            p_value: p,
            method: "chi-squared, continuity-corrected",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // Wilson 95% for 8/10: (0.4902, 0.9433)
        let (lo, hi) = wilson(8, 10).unwrap();
        assert!(
            (lo - 0.4902).abs() < 1e-3 && (hi - 0.9433).abs() < 1e-3,
            "{lo} {hi}"
        );
        // exact McNemar, 1 vs 9 discordant: p = 2·P(X ≤ 1 | n=10) = 0.02148
        assert!((mcnemar(1, 9).p_value - 0.021484375).abs() < 1e-9);
        assert_eq!(mcnemar(0, 0).p_value, 1.0);
        // two clusters with opposite deviations
        let (m, se) = clustered_mean(&[(0, 1.0), (0, 1.0), (1, 3.0), (1, 3.0)]).unwrap();
        assert_eq!(m, 2.0);
        assert!((se.unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), Some(2.0));
    }
}
