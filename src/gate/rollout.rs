//! Free-running greedy rollouts (`seq.{i}.rollout` on both sides): exact prefix, first divergence and the
//! oracle's margin there. The stop is a token too: EOS is compared like any other id, so a candidate that
//! stops early with an EOS where the oracle goes on diverges at that step. A candidate rollout that simply
//! holds fewer steps (the community's 8-token gates against a 16-step oracle) and agrees on all of them has
//! not stopped: it is *shorter*, and is compared over the common length (`truncated`).
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutDivergence {
    /// Step within the rollout (0 = the first generated token).
    pub step: usize,
    pub oracle_token: i64,
    pub candidate_token: i64,
    /// Oracle margin at the divergence, when known (the oracle's row after the last prompt token for step
    /// 0, the oracle capture's `rollout_margin` for later steps); `None` = unknown.
    pub oracle_margin: Option<f64>,
    /// Whether the divergence is a tie the oracle could not decide (`None`: not known). At step 0 the
    /// margin rule's tie test on the oracle's row; later, the oracle's recorded margin below the floor.
    pub tie: Option<bool>,
}

/// The side of a comparison that holds no rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Oracle,
    Candidate,
    /// Neither side, where other sequences have a rollout on both.
    Both,
}

impl Side {
    /// Why the sequence was not compared, in words.
    pub fn describe(self) -> &'static str {
        match self {
            Side::Oracle => "the oracle holds no rollout",
            Side::Candidate => "the candidate holds no rollout",
            Side::Both => "neither side holds a rollout",
        }
    }
}

/// A counted sequence the rollout rule could not compare: one side holds no rollout for it. A required
/// rule with such a gap was not applied there, and fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RolloutGap {
    pub seq: usize,
    pub missing_on: Side,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutComparison {
    pub seq: usize,
    pub oracle_len: usize,
    pub candidate_len: usize,
    pub exact_prefix: usize,
    pub divergence: Option<RolloutDivergence>,
    /// The candidate's rollout is shorter than the oracle's and agrees on every step it holds: compared
    /// over the common length only.
    pub truncated: bool,
}

impl RolloutComparison {
    /// Both rollouts identical, length included.
    pub fn is_exact(&self) -> bool {
        self.divergence.is_none() && self.oracle_len == self.candidate_len
    }
}

/// Compare two rollouts. `oracle_margins[k]` is the oracle margin at the row that chose step k, if known.
pub fn compare(
    seq: usize,
    oracle: &[i64],
    cand: &[i64],
    oracle_margins: &[Option<f64>],
) -> RolloutComparison {
    let n = oracle.len().min(cand.len());
    let k = (0..n).find(|&i| oracle[i] != cand[i]);
    RolloutComparison {
        seq,
        oracle_len: oracle.len(),
        candidate_len: cand.len(),
        exact_prefix: k.unwrap_or(n),
        truncated: k.is_none() && cand.len() < oracle.len(),
        divergence: k.map(|k| RolloutDivergence {
            step: k,
            oracle_token: oracle[k],
            candidate_token: cand[k],
            oracle_margin: oracle_margins.get(k).copied().flatten(),
            tie: None,
        }),
    }
}

/// Longest run of one repeated token (degenerate repetition when ≥ 8).
pub fn longest_run(tokens: &[i64]) -> (usize, Option<i64>) {
    let mut best = (0usize, None);
    let mut i = 0;
    while i < tokens.len() {
        let mut j = i;
        while j < tokens.len() && tokens[j] == tokens[i] {
            j += 1;
        }
        if j - i > best.0 {
            best = (j - i, Some(tokens[i]));
        }
        i = j;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_is_a_token_and_prefixes_are_exact() {
        // candidate stops (EOS = 2) where the oracle goes on
        let c = compare(0, &[5, 6, 7, 8], &[5, 6, 2], &[Some(0.3)]);
        assert_eq!(c.exact_prefix, 2);
        assert_eq!(
            c.divergence
                .as_ref()
                .map(|d| (d.step, d.oracle_token, d.candidate_token)),
            Some((2, 7, 2))
        );
        assert_eq!(c.divergence.unwrap().oracle_margin, None);
        let c = compare(0, &[5, 6], &[9, 6], &[Some(0.3)]);
        assert_eq!(c.divergence.unwrap().oracle_margin, Some(0.3));
        let c = compare(0, &[5, 6, 7], &[5, 8, 7], &[Some(0.3), Some(0.02), None]);
        assert_eq!(c.divergence.unwrap().oracle_margin, Some(0.02));
        let c = compare(0, &[5, 6], &[5, 6], &[]);
        assert!(c.is_exact());
        assert_eq!(longest_run(&[1, 3, 3, 3, 2]), (3, Some(3)));
    }
}
