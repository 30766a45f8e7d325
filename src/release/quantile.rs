//! A differentially private quantile, for contribution bounds that fit the
//! data: the owner learns, say, the 99th percentile of rows per person
//! without learning any one person's count.
//!
//! Report-noisy-max over candidate bounds (every integer up to 32, then
//! about 25% apart, up to `max`): candidate k
//! scores minus the distance from ⌈q·n⌉ to the ranks k spans, [#{values <
//! k}, #{values ≤ k}] (zero when k is a q-quantile, so a point mass has
//! one), which one person moves by at most 2 (their own count, and n); each
//! score gets discrete Laplace noise of scale 2·2/ε and the best noisy score
//! wins, which is ε-DP (Dwork & Roth,
//! *The Algorithmic Foundations of Differential Privacy*, §3.3). Integer
//! scores and an exact integer sampler: no floating-point exponential
//! mechanism.

use super::noise::{self, Noise};

/// Candidates one by one up to here, then about 25% apart: each candidate
/// draws noise and the best of many noisy scores drifts up with their
/// number, so a long tail of bad candidates is kept short.
const DENSE_UP_TO: u64 = 32;

/// The candidate bounds among 1..=`max`.
fn candidates(max: u64) -> Vec<u64> {
    let mut out: Vec<u64> = (1..=max.min(DENSE_UP_TO)).collect();
    let mut k = DENSE_UP_TO;
    while k < max {
        k = (k + k / 4).min(max);
        out.push(k);
    }
    out
}

/// The DP `q`-quantile of `values` among the candidates in 1..=`max`.
pub fn dp_quantile(values: &[u64], q: f64, epsilon: f64, max: u64) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let target = (q.clamp(0.0, 1.0) * values.len() as f64).ceil() as i64;
    let scale = Noise::laplace(4.0 / epsilon);
    let mut best = (i64::MIN, 1u64);
    for k in candidates(max.max(1)) {
        let below = sorted.partition_point(|v| *v < k) as i64;
        let up_to = sorted.partition_point(|v| *v <= k) as i64;
        let distance = (below - target).max(target - up_to).max(0);
        let score = -distance + noise::take(scale);
        if score > best.0 {
            best = (score, k);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_quantile_of_many_values() {
        // 10,000 persons: 1 to 10 rows evenly, so the 90th percentile is 9.
        let values: Vec<u64> = (0..10_000).map(|i| 1 + i % 10).collect();
        let found = dp_quantile(&values, 0.9, 1.0, 1000);
        assert!((8..=10).contains(&found), "{found}");
    }

    #[test]
    fn a_point_mass_is_its_own_quantile() {
        // Everyone has twelve rows (a month each): every quantile is 12.
        let values = vec![12u64; 50_000];
        for q in [0.1, 0.5, 0.99] {
            assert_eq!(dp_quantile(&values, q, 0.5, 1000), 12, "{q}");
        }
    }

    #[test]
    fn one_person_barely_moves_it() {
        // A heavy person with a million rows changes nothing: the answer is a
        // rank, and the person is one rank.
        let mut values: Vec<u64> = (0..20_000).map(|i| 1 + i % 20).collect();
        let without = dp_quantile(&values, 0.5, 1.0, 1000);
        values.push(1_000_000);
        let with = dp_quantile(&values, 0.5, 1.0, 1000);
        assert!(
            (9..=12).contains(&without) && (9..=12).contains(&with),
            "{without} {with}"
        );
    }

    #[test]
    fn on_few_values_the_answer_is_noise_not_a_value() {
        // Three persons: the ranks are buried under noise of scale 40 at ε = 0.1,
        // so answers spread over the candidates instead of naming a count.
        let values = [7u64, 7, 7];
        let answers: std::collections::HashSet<u64> = (0..50)
            .map(|_| dp_quantile(&values, 0.5, 0.1, 200))
            .collect();
        assert!(answers.len() > 10, "{answers:?}");
    }

    #[test]
    fn candidates_are_dense_then_geometric() {
        let c = candidates(1000);
        assert_eq!(&c[..3], &[1, 2, 3]);
        assert_eq!(*c.last().unwrap(), 1000);
        assert!(c.len() < 60, "{}", c.len());
        assert!(c.windows(2).all(|w| w[0] < w[1]));
    }
}
