//! The gate's decisions as types: a candidate's status, the rule that failed, the symptom kinds and the
//! run's exit code. Everything downstream (reports, JUnit, CI annotations) matches on these; nothing
//! downstream compares strings or decides again. This module depends on nothing else in the gate.
use serde::Serialize;

pub use crate::error::ExitCode;

/// The decision for one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pass,
    Fail,
    /// The `--control` capture: compared and reported, never gated.
    Control,
    /// The plan was rejected (exit 3): no candidate was judged.
    NotJudged,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "fail",
            Status::Control => "control",
            Status::NotJudged => "not_judged",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The policy rule (or symptom) that failed a candidate. Serialised as the policy field's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// NaN/Inf or constant logit rows (`fail_on_garbage_rows`).
    GarbageRows,
    /// Too few of the plan's counted positions compared (`min_coverage`).
    MinCoverage,
    MaxIntroducedConfidentFlips,
    MinCosine,
    MaxMeanKl,
    RolloutPrefix,
    /// `fail_on_collapse`.
    Collapse,
    /// `fail_on_repetition`.
    DegenerateRepetition,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Rule::GarbageRows => "garbage_rows",
            Rule::MinCoverage => "min_coverage",
            Rule::MaxIntroducedConfidentFlips => "max_introduced_confident_flips",
            Rule::MinCosine => "min_cosine",
            Rule::MaxMeanKl => "max_mean_kl",
            Rule::RolloutPrefix => "rollout_prefix",
            Rule::Collapse => "collapse",
            Rule::DegenerateRepetition => "degenerate_repetition",
        }
    }

    /// Every rule, in the order `verdict::judge` applies them.
    pub const ALL: [Rule; 8] = [
        Rule::GarbageRows,
        Rule::MinCoverage,
        Rule::Collapse,
        Rule::MaxIntroducedConfidentFlips,
        Rule::MinCosine,
        Rule::MaxMeanKl,
        Rule::RolloutPrefix,
        Rule::DegenerateRepetition,
    ];
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How one rule came out for one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleOutcome {
    Passed,
    Failed,
    /// The policy does not ask for it (e.g. `min_cosine` absent, a symptom switched off).
    NotRequired,
    /// An earlier rule failed; the verdict names the first failure only.
    NotEvaluated,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub status: Status,
    /// The first failing rule, if any.
    pub failed_rule: Option<Rule>,
    pub reason: String,
    /// Every rule's outcome, in the order applied (a failed rule stops the evaluation of later ones).
    pub rules: Vec<(Rule, RuleOutcome)>,
}

/// What a symptom detector found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SymptomKind {
    CosineCrater,
    #[serde(rename = "collapse_after_position_0")]
    CollapseAfterPosition0,
    DegenerateRepetition,
}
