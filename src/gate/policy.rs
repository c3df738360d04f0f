//! The gate policy (TOML, schema `qgate-gate/1`). `gates/release.toml` is the default and is compiled in, so
//! `qgate run` behaves the same from any directory; command-line flags override single fields.
//!
//! Every field is a typed value: a policy that names an unknown field, an unknown word or an impossible
//! number is refused when it is read (exit 2, naming the file), never half-applied. Fields added after the
//! first release have defaults that keep older policy files valid *and strict* (coverage 0.9, the tie gap
//! of 1 nat, a control limit of 1 %, every symptom failing).
use super::metrics::MarginSpace;
use crate::error::{Error, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::Path;

pub const SCHEMA: &str = "qgate-gate/1";
pub const DEFAULT_POLICY: &str = include_str!("../../gates/release.toml");

/// How much of the oracle rollout must match exactly: `"full"`, `"off"` or a number of steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutRequirement {
    Off,
    Full,
    Steps(usize),
}

impl RolloutRequirement {
    pub fn describe(self) -> String {
        match self {
            RolloutRequirement::Off => "off".into(),
            RolloutRequirement::Full => "full".into(),
            RolloutRequirement::Steps(n) => n.to_string(),
        }
    }
}

impl Serialize for RolloutRequirement {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            RolloutRequirement::Steps(n) => s.serialize_u64(*n as u64),
            other => s.serialize_str(&other.describe()),
        }
    }
}

impl<'de> Deserialize<'de> for RolloutRequirement {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Steps(usize),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Steps(n) => Ok(RolloutRequirement::Steps(n)),
            Raw::Word(w) if w == "full" => Ok(RolloutRequirement::Full),
            Raw::Word(w) if w == "off" => Ok(RolloutRequirement::Off),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "rollout_prefix = \"{w}\": expected \"full\", \"off\" or a number"
            ))),
        }
    }
}

/// Which positions of a sequence count towards the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PositionsRule {
    /// Every position.
    All,
    /// The plan's last position of each sequence (row T−1; a capture's own last row does not stand in
    /// for it).
    Last,
}

/// Which sequences of the plan count: all of them, or a list of indices (checked against the plan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sequences {
    All,
    List(Vec<usize>),
}

impl Serialize for Sequences {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Sequences::All => s.serialize_str("all"),
            Sequences::List(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Sequences {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            List(Vec<usize>),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::List(l) => Ok(Sequences::List(l)),
            Raw::Word(w) if w == "all" => Ok(Sequences::All),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "sequences = \"{w}\": expected \"all\" or a list of indices"
            ))),
        }
    }
}

/// How many confident flips of its own a control may have before it is refused: a count, or a percentage of
/// the counted positions (`"1%"`; at least 1, except `"0%"`: none).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ControlLimit {
    Count(usize),
    Percent(f64),
}

impl ControlLimit {
    /// The limit for `counted` positions.
    pub fn allowed(self, counted: usize) -> usize {
        match self {
            ControlLimit::Count(n) => n,
            // "0%" means none; any other percentage at least 1
            ControlLimit::Percent(p) if p <= 0.0 => 0,
            ControlLimit::Percent(p) => ((p / 100.0 * counted as f64).floor() as usize).max(1),
        }
    }
}

impl Default for ControlLimit {
    fn default() -> Self {
        ControlLimit::Percent(1.0)
    }
}

impl Serialize for ControlLimit {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            ControlLimit::Count(n) => s.serialize_u64(*n as u64),
            ControlLimit::Percent(p) => s.serialize_str(&format!("{p}%")),
        }
    }
}

impl<'de> Deserialize<'de> for ControlLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(usize),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(ControlLimit::Count(n)),
            Raw::Word(w) => w
                .strip_suffix('%')
                .and_then(|p| p.trim().parse::<f64>().ok())
                .filter(|p| p.is_finite() && (0.0..=100.0).contains(p))
                .map(ControlLimit::Percent)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "max_control_confident_flips = \"{w}\": expected a count or a percentage such as \"1%\""
                    ))
                }),
        }
    }
}

fn default_min_coverage() -> f64 {
    0.9
}
fn default_tie_gap() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_masked_tail_mass() -> f64 {
    crate::gate::metrics::MASKED_TAIL_MAX_ORACLE_MASS
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub schema: String,
    pub margin_space: MarginSpace,
    pub margin_floor: f64,
    /// A top-1 change is a tie-flip only when the candidate's token is within this many nats of the
    /// oracle's top-1 *and* within the floor in the margin space.
    #[serde(default = "default_tie_gap")]
    pub tie_max_logit_gap: f64,
    pub max_introduced_confident_flips: usize,
    /// Compared positions / planned positions the policy counts, at least this (0..=1).
    #[serde(default = "default_min_coverage")]
    pub min_coverage: f64,
    #[serde(default)]
    pub min_cosine: Option<f64>,
    #[serde(default)]
    pub max_mean_kl: Option<f64>,
    pub rollout_prefix: RolloutRequirement,
    pub positions: PositionsRule,
    pub sequences: Sequences,
    /// A control with more confident flips of its own is refused (exit 2).
    #[serde(default)]
    pub max_control_confident_flips: ControlLimit,
    /// NaN/Inf or constant logit rows fail the candidate.
    #[serde(default = "yes")]
    pub fail_on_garbage_rows: bool,
    /// A `−inf`-masked vocabulary tail (padding ids a runtime masks) is judged over the ids before it
    /// only when the oracle gives the masked ids at most this share of its probability (0..=1); else the
    /// row is garbage.
    #[serde(default = "default_masked_tail_mass")]
    pub masked_tail_max_oracle_mass: f64,
    /// Position 0 agrees and most later positions do not: fail.
    #[serde(default = "yes")]
    pub fail_on_collapse: bool,
    /// The same token 8+ times in a row in the candidate's rollout (and not in the oracle's): fail.
    #[serde(default = "yes")]
    pub fail_on_repetition: bool,
    /// Reject the plan (exit 3) when a counted position's oracle margin is below the floor.
    #[serde(default)]
    pub require_confident_prompt: bool,
}

impl Policy {
    pub fn parse(text: &str, origin: &Path) -> Result<Policy> {
        let p: Policy = toml::from_str(text)
            .map_err(|e| Error::input(origin, format!("bad gate policy: {}", e.message())))?;
        p.validate()
            .map_err(|m| Error::input(origin, format!("bad gate policy: {m}")))?;
        Ok(p)
    }

    pub fn load(path: Option<&Path>) -> Result<Policy> {
        match path {
            None => Policy::parse(DEFAULT_POLICY, Path::new("gates/release.toml (built in)")),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| crate::error::io_err(p, e))?;
                Policy::parse(&text, p)
            }
        }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.schema != SCHEMA {
            return Err(format!(
                "schema `{}` (this qgate reads `{SCHEMA}`)",
                self.schema
            ));
        }
        if !(self.margin_floor.is_finite() && self.margin_floor >= 0.0) {
            return Err(format!(
                "margin_floor {} must be a number >= 0",
                self.margin_floor
            ));
        }
        if self.margin_space == MarginSpace::Prob && self.margin_floor > 1.0 {
            return Err(format!(
                "margin_floor {} is above 1 in prob space",
                self.margin_floor
            ));
        }
        if !(self.tie_max_logit_gap.is_finite() && self.tie_max_logit_gap >= 0.0) {
            return Err(format!(
                "tie_max_logit_gap {} must be a number >= 0 (nats)",
                self.tie_max_logit_gap
            ));
        }
        if !(0.0..=1.0).contains(&self.min_coverage) {
            return Err(format!(
                "min_coverage {} must be in [0, 1]",
                self.min_coverage
            ));
        }
        if let Some(c) = self.min_cosine {
            if !(-1.0..=1.0).contains(&c) {
                return Err(format!("min_cosine {c} must be in [-1, 1]"));
            }
        }
        if let Some(k) = self.max_mean_kl {
            if !(k.is_finite() && k >= 0.0) {
                return Err(format!("max_mean_kl {k} must be a number >= 0"));
            }
        }
        if !(0.0..=1.0).contains(&self.masked_tail_max_oracle_mass) {
            return Err(format!(
                "masked_tail_max_oracle_mass {} must be in [0, 1]",
                self.masked_tail_max_oracle_mass
            ));
        }
        if let Sequences::List(l) = &self.sequences {
            if l.is_empty() {
                return Err("sequences = []: name at least one sequence, or \"all\"".into());
            }
        }
        Ok(())
    }

    /// Check the policy against the plan it is applied to: every listed sequence must exist.
    pub fn check_against_plan(&self, sequences: usize) -> std::result::Result<(), String> {
        if let Sequences::List(l) = &self.sequences {
            if let Some(bad) = l.iter().find(|&&s| s >= sequences) {
                return Err(format!(
                    "sequences lists index {bad}, but the plan has {sequences} sequence(s) (indices 0..{})",
                    sequences.saturating_sub(1)
                ));
            }
        }
        Ok(())
    }

    pub fn rollout(&self) -> RolloutRequirement {
        self.rollout_prefix
    }

    pub fn counts_sequence(&self, seq: usize) -> bool {
        match &self.sequences {
            Sequences::List(l) => l.contains(&seq),
            Sequences::All => true,
        }
    }

    /// Apply command-line overrides. Changing the margin space without giving a floor is refused: the
    /// policy's floor is in the policy's unit.
    pub fn override_with(
        &mut self,
        space: Option<MarginSpace>,
        floor: Option<f64>,
        require_confident_prompt: bool,
    ) -> Result<()> {
        if let Some(s) = space {
            if s != self.margin_space && floor.is_none() {
                return Err(Error::usage(format!(
                    "--margin-space {} changes the unit of the margin floor (the policy's floor {} is in {} space); pass --margin-floor as well",
                    s.name(),
                    self.margin_floor,
                    self.margin_space.name()
                )));
            }
            self.margin_space = s;
        }
        if let Some(f) = floor {
            self.margin_floor = f;
        }
        self.require_confident_prompt |= require_confident_prompt;
        self.validate()
            .map_err(|m| Error::usage(format!("after command-line overrides: {m}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_parses_and_typos_are_rejected() {
        let p = Policy::load(None).unwrap();
        assert_eq!(p.margin_floor, 0.1);
        assert_eq!(p.margin_space, MarginSpace::Prob);
        assert_eq!(p.max_introduced_confident_flips, 0);
        assert_eq!(p.rollout(), RolloutRequirement::Full);
        assert_eq!(p.min_coverage, 0.9);
        assert_eq!(p.tie_max_logit_gap, 1.0);
        assert_eq!(p.max_control_confident_flips, ControlLimit::Percent(1.0));
        assert!(p.fail_on_garbage_rows && p.fail_on_collapse && p.fail_on_repetition);
        let bad = DEFAULT_POLICY.replace("margin_floor", "margin_flor");
        let e = Policy::parse(&bad, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("margin_flor"), "{e}");
        let mut p2 = p.clone();
        assert!(p2
            .override_with(Some(MarginSpace::Logit), None, false)
            .is_err());
        p2.override_with(Some(MarginSpace::Logit), Some(1.5), true)
            .unwrap();
        assert_eq!(
            (
                p2.margin_space,
                p2.margin_floor,
                p2.require_confident_prompt
            ),
            (MarginSpace::Logit, 1.5, true)
        );
    }

    #[test]
    fn typed_fields_refuse_bad_words_and_numbers() {
        let with = |from: &str, to: &str| {
            let t = DEFAULT_POLICY.replace(from, to);
            assert_ne!(t, DEFAULT_POLICY, "{from}");
            Policy::parse(&t, Path::new("p.toml"))
        };
        for (from, to, needle) in [
            (
                "rollout_prefix = \"full\"",
                "rollout_prefix = \"fulll\"",
                "fulll",
            ),
            ("positions = \"all\"", "positions = \"first\"", "first"),
            ("sequences = \"all\"", "sequences = \"some\"", "some"),
            ("min_coverage = 0.9", "min_coverage = 1.5", "min_coverage"),
            (
                "tie_max_logit_gap = 1.0",
                "tie_max_logit_gap = -1",
                "tie_max_logit_gap",
            ),
            (
                "max_control_confident_flips = \"1%\"",
                "max_control_confident_flips = \"lots\"",
                "lots",
            ),
            ("sequences = \"all\"", "sequences = []", "sequences = []"),
        ] {
            let e = with(from, to).unwrap_err().to_string();
            assert!(
                e.contains(needle) && e.starts_with("p.toml: bad gate policy"),
                "{e}"
            );
        }
        let p = with("sequences = \"all\"", "sequences = [0, 99]").unwrap();
        assert!(p.check_against_plan(3).unwrap_err().contains("index 99"));
        assert!(p.check_against_plan(100).is_ok());
        assert_eq!(ControlLimit::Percent(1.0).allowed(50), 1);
        assert_eq!(ControlLimit::Percent(1.0).allowed(1000), 10);
        assert_eq!(ControlLimit::Count(0).allowed(1000), 0);
        assert_eq!(ControlLimit::Percent(0.0).allowed(1000), 0);
        // older policy files without the new fields get the strict defaults
        let old = "schema = \"qgate-gate/1\"\nmargin_space = \"prob\"\nmargin_floor = 0.1\n\
                   max_introduced_confident_flips = 0\nrollout_prefix = 4\npositions = \"last\"\nsequences = [0]\n";
        let p = Policy::parse(old, Path::new("old.toml")).unwrap();
        assert_eq!((p.min_coverage, p.tie_max_logit_gap), (0.9, 1.0));
        assert_eq!(p.rollout(), RolloutRequirement::Steps(4));
        assert_eq!(p.positions, PositionsRule::Last);
    }
}
