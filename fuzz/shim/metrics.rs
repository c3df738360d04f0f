//! Stand-in for `src/gate/metrics.rs` in the fuzz build: only `MarginSpace`, which the policy parser
//! needs (the real module pulls in the comparison kernel). Keep in step with `src/gate/metrics.rs`.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MarginSpace {
    Prob,
    Logit,
}

impl MarginSpace {
    pub fn name(self) -> &'static str {
        match self {
            MarginSpace::Prob => "prob",
            MarginSpace::Logit => "logit",
        }
    }
}
