//! The outcome of a gated run: what summary.json (`qgate-report/1`) holds and every report renders. The
//! gate fills it in; reports only format it.
use super::decision::{ExitCode, Rule};
use super::metrics::MarginSpace;
use super::policy::Policy;
use super::stats;
use super::summary::CandidateSummary;
use serde::Serialize;

pub const REPORT_SCHEMA: &str = "qgate-report/1";

#[derive(Debug, Clone, Serialize)]
pub struct OracleInfo {
    pub capture: String,
    pub label: String,
    pub runtime: String,
    pub dtype: String,
    pub provenance: super::provenance::Provenance,
    /// The model the oracle ran on, as its capture names it (directory name or HF id), if recorded.
    pub model: Option<String>,
    /// sha256 of the weights (one file: its hash; several: the hash of `file=sha;` lines), if recorded.
    pub weights_sha256: Option<String>,
    /// Where the oracle ran (`cpu`, `cuda:0`), if recorded.
    pub device: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanInfo {
    pub sequences: usize,
    pub tokens: usize,
    pub oracle_rows: usize,
    pub vocab_size: usize,
    /// `oracle::plan_sha256` of the plan's tokens.
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Paired {
    pub a: String,
    pub b: String,
    pub positions: usize,
    #[serde(flatten)]
    pub test: stats::McNemar,
}

/// The whole run: what summary.json holds and every report renders.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub schema: &'static str,
    pub qgate_version: &'static str,
    pub oracle: OracleInfo,
    pub plan: PlanInfo,
    pub margin_space: MarginSpace,
    pub margin_floor: f64,
    pub policy: Policy,
    pub prompt: super::verdict::PromptCheck,
    /// Gated candidates in the order given, then the control (role "control") if any.
    pub candidates: Vec<CandidateSummary>,
    pub paired: Vec<Paired>,
    pub ship: Option<String>,
    /// The ship decision in words (also when nothing ships, or it could not be decided).
    pub ship_note: String,
    /// How the ship decision was made.
    pub ship_basis: Option<super::verdict::ShipBasis>,
    pub exit_code: ExitCode,
    pub verdict: String,
    /// UTC date of the run (YYYY-MM-DD).
    pub date: String,
    /// `qgate sweep` only: the quantization ladder behind the ship decision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ladder: Option<Ladder>,
    /// Simulated and real captures of the same scheme in this run, and what their verdicts mean.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sim_vs_bundle: Vec<super::sim_vs_bundle::SimBundlePair>,
    /// The files qgate wrote into the report directory (this manifest lets a later run replace the
    /// directory only when it holds nothing else).
    pub report_files: Vec<String>,
}

/// One simulated scheme of a sweep.
#[derive(Debug, Clone, Serialize)]
pub struct Rung {
    pub label: String,
    pub alias: Option<String>,
    /// The exact spec (`attn=…,gdn=…,mlp=…,head=…`).
    pub spec: String,
    pub size_bytes: u64,
    /// Weights the scheme would quantize but leaves as they are (non-divisible dimensions).
    pub skipped: Vec<String>,
}

/// Why a scheme smaller than the one that ships was not chosen.
#[derive(Debug, Clone, Serialize)]
pub struct Rejection {
    pub label: String,
    pub size_bytes: Option<u64>,
    pub failed_rule: Option<Rule>,
    pub reason: String,
}

/// `--ablate`: one component group at a time at the ablation method, the rest at the base scheme.
#[derive(Debug, Clone, Serialize)]
pub struct Ablation {
    pub base: String,
    pub method: String,
    /// (component, the variant's summary).
    pub variants: Vec<(String, CandidateSummary)>,
    /// Components whose variant fails the policy.
    pub sensitive: Vec<String>,
}

/// The ladder a sweep reports: every scheme's spec, size and skipped weights, the compute dtype of the
/// simulation, and the reasons the smaller schemes were rejected.
#[derive(Debug, Clone, Serialize)]
pub struct Ladder {
    pub compute: String,
    pub scale_dtype: String,
    pub rungs: Vec<Rung>,
    pub rejected_smaller: Vec<Rejection>,
    pub ablation: Option<Ablation>,
    /// `--sensitivity`: every layer × component alone at the low method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<crate::quant::sensitivity::SensitivityMap>,
    /// `--search`: the smallest passing mix of two methods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<crate::quant::search::SearchOutcome>,
}
