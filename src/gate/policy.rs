//! The gate policy (TOML, schema `qgate-gate/1`). `gates/release.toml` is the default and is compiled in, so
//! `qgate run` behaves the same from any directory; command-line flags override single fields.
use super::metrics::MarginSpace;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const SCHEMA: &str = "qgate-gate/1";
pub const DEFAULT_POLICY: &str = include_str!("../../gates/release.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RolloutPrefix {
    Steps(usize),
    Word(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Sequences {
    List(Vec<usize>),
    Word(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub schema: String,
    pub margin_space: MarginSpace,
    pub margin_floor: f64,
    pub max_introduced_confident_flips: usize,
    #[serde(default)]
    pub min_cosine: Option<f64>,
    #[serde(default)]
    pub max_mean_kl: Option<f64>,
    pub rollout_prefix: RolloutPrefix,
    pub positions: String,
    pub sequences: Sequences,
    /// Reject the plan (exit 3) when a counted position's oracle margin is below the floor.
    #[serde(default)]
    pub require_confident_prompt: bool,
}

/// How much of the oracle rollout must match exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutRequirement {
    Off,
    Full,
    Steps(usize),
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
        self.rollout()?;
        if !matches!(self.positions.as_str(), "all" | "last") {
            return Err(format!(
                "positions = \"{}\": expected \"all\" or \"last\"",
                self.positions
            ));
        }
        if let Sequences::Word(w) = &self.sequences {
            if w != "all" {
                return Err(format!(
                    "sequences = \"{w}\": expected \"all\" or a list of indices"
                ));
            }
        }
        Ok(())
    }

    pub fn rollout(&self) -> std::result::Result<RolloutRequirement, String> {
        match &self.rollout_prefix {
            RolloutPrefix::Steps(n) => Ok(RolloutRequirement::Steps(*n)),
            RolloutPrefix::Word(w) if w == "full" => Ok(RolloutRequirement::Full),
            RolloutPrefix::Word(w) if w == "off" => Ok(RolloutRequirement::Off),
            RolloutPrefix::Word(w) => Err(format!(
                "rollout_prefix = \"{w}\": expected \"full\", \"off\" or a number"
            )),
        }
    }

    pub fn counts_sequence(&self, seq: usize) -> bool {
        match &self.sequences {
            Sequences::List(l) => l.contains(&seq),
            Sequences::Word(_) => true,
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
        assert_eq!(p.rollout().unwrap(), RolloutRequirement::Full);
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
}
