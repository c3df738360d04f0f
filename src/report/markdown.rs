//! report.md: the model-card table, the ship decision, every flip, and a llama.cpp-style KL / Δp block.
//! Deterministic: no timestamps, fixed number formats, plan order.
use super::tokens::TokenText;
use crate::gate::decision::Status;
use crate::gate::margin_rule::FlipKind;
use crate::gate::metrics::MarginSpace;
use crate::gate::outcome::{Ladder, RunSummary};
use crate::gate::policy::Sequences;
use crate::gate::summary::{CandidateSummary, DataKind, Distribution, Role};
use std::fmt::Write;

pub const NOT_COMPUTABLE: &str = "n/a";

fn not_computable(c: &CandidateSummary) -> String {
    let what = match c.data {
        DataKind::TopK => "top-k",
        DataKind::Argmax => "argmax-only",
        DataKind::None => "rollout-only",
        _ => "this",
    };
    format!("n/a — not computable from {what} capture")
}

pub fn human_size(b: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

fn label(c: &CandidateSummary) -> String {
    match &c.id.mode {
        Some(m) if !c.id.label.to_ascii_lowercase().contains(m.as_str()) => {
            format!("{} ({m})", c.id.label)
        }
        _ => c.id.label.clone(),
    }
}

fn verdict_cell(c: &CandidateSummary) -> String {
    match (c.verdict.status, c.verdict.failed_rule) {
        (Status::Pass, _) => "**PASS**".into(),
        (Status::Control, _) => "control".into(),
        (Status::NotJudged, _) => "not judged (prompt rejected)".into(),
        (Status::Fail, Some(r)) => format!("**FAIL** ({r})"),
        (Status::Fail, None) => "**FAIL**".into(),
    }
}

fn rollout_cell(c: &CandidateSummary) -> String {
    match &c.rollout {
        None => "not compared".into(),
        Some(r) if r.sequences_compared == 0 => "not compared".into(),
        Some(r) => {
            let short = r.per_sequence.iter().filter(|x| x.truncated).count();
            format!(
                "{}/{} exact (min prefix {}){}",
                r.sequences_exact,
                r.sequences_compared,
                r.min_exact_prefix,
                if short > 0 {
                    format!("; {short} shorter, compared over the common length")
                } else {
                    String::new()
                }
            )
        }
    }
}

fn margin_unit(s: MarginSpace) -> &'static str {
    match s {
        MarginSpace::Prob => "softmax probability (top-1 p − top-2 p)",
        MarginSpace::Logit => "logit gap in nats (top-1 − top-2)",
    }
}

fn dist_block(out: &mut String, name: &str, d: &Distribution, scale: f64, unit: &str) {
    let w = |out: &mut String, lbl: &str, v: f64| {
        let _ = writeln!(out, "{lbl:<12}{:>12.6}{unit}", v * scale);
    };
    let se =
        d.se.map(|s| format!(" ± {:>10.6}", s * scale))
            .unwrap_or_else(|| " ± n/a (one sequence)".into());
    let _ = writeln!(
        out,
        "{:<12}{:>12.6}{se}{unit}",
        format!("Mean    {name}:"),
        d.mean * scale
    );
    w(out, &format!("Maximum {name}:"), d.max);
    w(out, &format!("99.9%   {name}:"), d.p99_9);
    w(out, &format!("99.0%   {name}:"), d.p99);
    w(out, &format!("95.0%   {name}:"), d.p95);
    w(out, &format!("90.0%   {name}:"), d.p90);
    w(out, &format!("Median  {name}:"), d.median);
    w(out, &format!("10.0%   {name}:"), d.p10);
    w(out, &format!(" 5.0%   {name}:"), d.p5);
    w(out, &format!(" 1.0%   {name}:"), d.p1);
    w(out, &format!("Minimum {name}:"), d.min);
}

fn coverage_cell(c: &CandidateSummary) -> String {
    match c.coverage.fraction {
        Some(f) => format!(
            "{}/{} ({:.1}%)",
            c.coverage.compared,
            c.coverage.planned,
            100.0 * f
        ),
        None => "not computed".into(),
    }
}

fn control_cell(f: &crate::gate::margin_rule::Flip, tt: &TokenText) -> String {
    let chose = f
        .control_token
        .map(|t| format!("control chose {}", tt.token(t)))
        .unwrap_or_else(|| "control has no row here".into());
    match (f.kind, f.shared_with_control) {
        (_, None) => "—".into(),
        (FlipKind::Tie, _) => format!("n/a (tie); {chose}"),
        (_, Some(true)) => format!("shared ({chose})"),
        (_, Some(false)) => format!("introduced ({chose})"),
    }
}

/// The last component of a path: reports carry no local paths.
fn file_name(p: &str) -> String {
    std::path::Path::new(p)
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| p.to_string())
}

/// Every Markdown heading one level down (`#` → `##`), so report.md starts at `##`.
fn shift_headings(md: String) -> String {
    let mut out = String::with_capacity(md.len() + 64);
    let mut fenced = false;
    for line in md.split_inclusive('\n') {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        if !fenced && line.starts_with('#') && line.trim_start_matches('#').starts_with(' ') {
            out.push('#');
        }
        out.push_str(line);
    }
    out
}

/// Render report.md. `plan` holds the token sequences (for decoded context).
pub fn render(s: &RunSummary, plan: &[Vec<i64>], tt: &TokenText) -> String {
    let mut o = String::new();
    // Headings start at `#`; `shift_headings` moves them to `##` so the report drops into a model card.
    let _ = writeln!(o, "# qgate report\n");
    let _ = writeln!(
        o,
        "- qgate {} on {} (UTC); model `{}`, weights sha256 `{}`",
        s.qgate_version,
        s.date,
        s.oracle.model.as_deref().unwrap_or("not recorded"),
        s.oracle.weights_sha256.as_deref().unwrap_or("not recorded")
    );
    let _ = writeln!(
        o,
        "- Oracle: `{}` ({}, {}, device {}), capture `{}` — provenance: {}",
        s.oracle.label,
        s.oracle.dtype,
        s.oracle.runtime,
        s.oracle.device.as_deref().unwrap_or("not recorded"),
        file_name(&s.oracle.capture),
        s.oracle.provenance.describe()
    );
    let _ = writeln!(
        o,
        "- Plan: sha256 `{}`, {} sequence(s), {} tokens, {} oracle rows, vocabulary {}",
        s.plan.sha256, s.plan.sequences, s.plan.tokens, s.plan.oracle_rows, s.plan.vocab_size
    );
    let _ = writeln!(
        o,
        "- Margin: {}; floor {} — a top-1 change is a **tie-flip** (passes) only when the candidate's token is within the floor of the oracle's top-1 and within {} nats of it in the oracle's logits; any other change is a **confident flip**",
        margin_unit(s.margin_space),
        s.margin_floor,
        s.policy.tie_max_logit_gap
    );
    let p = &s.policy;
    let _ = writeln!(
        o,
        "- Policy: max introduced confident flips {}, min coverage {}, min cosine {}, max mean KL {}, rollout prefix {}, positions {}, sequences {}; failing symptoms: garbage rows {}, collapse {}, repetition {}",
        p.max_introduced_confident_flips,
        p.min_coverage,
        p.min_cosine.map(|v| v.to_string()).unwrap_or("off".into()),
        p.max_mean_kl.map(|v| v.to_string()).unwrap_or("off".into()),
        p.rollout_prefix.describe(),
        match p.positions {
            crate::gate::policy::PositionsRule::All => "all",
            crate::gate::policy::PositionsRule::Last => "last",
        },
        match &p.sequences {
            Sequences::List(l) => format!("{l:?}"),
            Sequences::All => "all".into(),
        },
        if p.fail_on_garbage_rows { "on" } else { "off" },
        if p.fail_on_collapse { "on" } else { "off" },
        if p.fail_on_repetition { "on" } else { "off" },
    );
    let _ = writeln!(o, "\n## Verdict\n\n**{}**\n", s.verdict);
    let _ = match &s.ship {
        Some(l) => writeln!(
            o,
            "Ship decision: **{l}** ({}).\n",
            s.ship_basis.map(|b| b.describe()).unwrap_or("")
        ),
        None => writeln!(o, "Ship decision: {}.\n", s.ship_note),
    };

    if let Some(l) = &s.ladder {
        ladder(&mut o, s, l);
    }
    if !s.sim_vs_bundle.is_empty() {
        let _ = writeln!(
            o,
            "## Simulation vs bundle
"
        );
        let _ = writeln!(
            o,
            "| simulated | bundle | scheme | top-1 agreement | verdicts | finding |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|");
        for p in &s.sim_vs_bundle {
            let _ = writeln!(
                o,
                "| {} | {} | `{}` | {}/{} | {} / {} | {} |",
                p.simulated,
                p.bundle,
                p.spec,
                p.top1_agree,
                p.positions,
                p.simulated_verdict,
                p.bundle_verdict,
                p.finding
            );
        }
        let _ = writeln!(o);
    }

    let _ = writeln!(o, "## Model card\n");
    let _ = writeln!(
        o,
        "| candidate | size | coverage | exact | tie-flips | confident flips | introduced (vs control) | cosine min / mean | mean KL ± se | p99 KL | rollout | verdict |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for c in &s.candidates {
        let na = || NOT_COMPUTABLE.to_string();
        let cos = c
            .cosine
            .as_ref()
            .map(|x| format!("{:.4} / {:.4}", x.min, x.mean))
            .unwrap_or_else(na);
        let kl =
            c.kl.as_ref()
                .map(|k| match k.se {
                    Some(se) => format!("{:.6} ± {:.6}", k.mean, se),
                    None => format!("{:.6} ± n/a", k.mean),
                })
                .unwrap_or_else(na);
        let p99 =
            c.kl.as_ref()
                .map(|k| format!("{:.6}", k.p99))
                .unwrap_or_else(na);
        let introduced = match (c.role, c.shared_with_control) {
            (Role::Control, _) => "—".to_string(),
            (_, Some(sh)) => format!("{} ({} shared)", c.introduced_confident_flips, sh),
            (_, None) => format!("{} (no control)", c.introduced_confident_flips),
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {}/{} exact | {} | {} | {} | {} | {} | {} | {} | {} |",
            label(c),
            c.id.size_bytes.map(human_size).unwrap_or("unknown".into()),
            coverage_cell(c),
            c.exact,
            c.positions_counted,
            c.tie_flips,
            c.confident_flips,
            introduced,
            cos,
            kl,
            p99,
            rollout_cell(c),
            verdict_cell(c)
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Cosine is the mean-centred cosine of the logit rows (softmax ignores a constant shift); KL is KL(oracle ‖ candidate) in nats. `n/a` = not computable from the candidate's capture, never a 0.\n"
    );
    for c in &s.candidates {
        let _ = write!(
            o,
            "- `{}`: {} ({} positions compared",
            c.id.label, c.verdict.reason, c.positions_compared
        );
        if !c.coverage.sequences_without_rows.is_empty() {
            let _ = write!(
                o,
                ", no compared row in sequence(s) {:?}",
                c.coverage.sequences_without_rows
            );
        }
        if c.positions_not_compared > 0 {
            let _ = write!(
                o,
                ", {} oracle rows without a candidate row",
                c.positions_not_compared
            );
        }
        let _ = write!(o, "; data: {})", c.data);
        if let Some((lo, hi)) = c.top1_wilson95 {
            let _ = write!(o, "; top-1 agreement 95% Wilson [{:.4}, {:.4}]", lo, hi);
        }
        if let Some(k) = c.kl_reverse_mean {
            let _ = write!(o, "; mean KL(candidate ‖ oracle) {k:.6}");
        }
        if let Some(ov) = c.top10_overlap_mean {
            let _ = write!(o, "; mean top-10 overlap {ov:.2}/10");
        }
        if let Some(r) = &c.rank_of_oracle_top1_median {
            let _ = write!(o, "; median rank of the oracle's top-1 {r}");
        }
        let _ = writeln!(o);
        if !c.not_computed.is_empty() {
            let _ = writeln!(
                o,
                "  - {}: {}",
                c.not_computed.join(", "),
                not_computable(c)
            );
        }
    }

    let _ = writeln!(o, "\n## Prompt validation\n");
    let _ = writeln!(
        o,
        "{} of {} counted oracle positions have a margin below the floor {}: those positions cannot judge a candidate (their flips are tie-flips).{}",
        s.prompt.below_floor,
        s.prompt.positions_counted,
        s.margin_floor,
        if s.prompt.rejected { " **The plan is rejected (`--require-confident-prompt`).**" } else { "" }
    );

    if !s.paired.is_empty() {
        let _ = writeln!(
            o,
            "\n## Paired comparisons (McNemar on per-position top-1 agreement)\n"
        );
        let _ = writeln!(
            o,
            "| A | B | positions | A right, B wrong | B right, A wrong | p | reading |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|---|");
        for pc in &s.paired {
            let reading = if pc.test.p_value < 0.05 {
                if pc.test.a_only > pc.test.b_only {
                    format!("{} measurably better", pc.a)
                } else {
                    format!("{} measurably better", pc.b)
                }
            } else {
                "no measurable difference".into()
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {:.4} ({}) | {} |",
                pc.a,
                pc.b,
                pc.positions,
                pc.test.a_only,
                pc.test.b_only,
                pc.test.p_value,
                pc.test.method,
                reading
            );
        }
    }

    let syms: Vec<String> = s
        .candidates
        .iter()
        .flat_map(|c| {
            c.symptoms.iter().map(move |y| {
                let at = y.pos.map(|p| format!(" pos {p}")).unwrap_or_default();
                format!(
                    "- `{}`: {} at seq {}{at}: {}",
                    c.id.label,
                    serde_json::to_value(y.kind)
                        .ok()
                        .and_then(|v| v.as_str().map(|x| x.replace('_', " ")))
                        .unwrap_or_default(),
                    y.seq,
                    y.detail
                )
            })
        })
        .collect();
    let _ = writeln!(o, "\n## Symptoms\n");
    if syms.is_empty() {
        let _ = writeln!(
            o,
            "None (cosine craters, collapse after position 0, degenerate repetition in rollouts)."
        );
    } else {
        for l in syms {
            let _ = writeln!(o, "{l}");
        }
    }

    let _ = writeln!(o, "\n## Flips\n");
    if !tt.available() {
        let _ = writeln!(
            o,
            "No tokenizer available: tokens are shown as ids (pass `--tokenizer` or `--model`).\n"
        );
    }
    for c in &s.candidates {
        let _ = writeln!(o, "### {}\n", c.id.label);
        if c.flips.is_empty() {
            let _ = writeln!(o, "No flips.\n");
            continue;
        }
        let _ = writeln!(o, "| seq | pos | kind | context | oracle top-1 (p) | oracle top-2 (p) | candidate (oracle p, gap) | margin | cosine | control |");
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|");
        for f in &c.flips {
            let ctx = plan
                .get(f.seq)
                .map(|t| tt.context(t, f.pos))
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} ({:.4}) | {} ({:.4}) | {} ({}) | {:.4} | {} | {} |",
                f.seq,
                f.pos,
                if f.kind == FlipKind::Confident {
                    "**confident**"
                } else {
                    "tie"
                },
                ctx,
                tt.token(f.oracle_top1),
                f.oracle_p1,
                tt.token(f.oracle_top2),
                f.oracle_p2,
                tt.token(f.candidate_token),
                match (f.oracle_p_candidate, f.oracle_logit_gap) {
                    (Some(p), Some(g)) => format!("{p:.4}, {g:.2} nats"),
                    _ => "unknown".into(),
                },
                f.margin,
                f.cosine
                    .map(|x| format!("{x:.4}"))
                    .unwrap_or(NOT_COMPUTABLE.into()),
                control_cell(f, tt)
            );
        }
        let _ = writeln!(o);
    }

    let _ = writeln!(o, "## Rollouts\n");
    for c in &s.candidates {
        match &c.rollout {
            Some(r) if !r.per_sequence.is_empty() => {
                for x in &r.per_sequence {
                    let d = match &x.divergence {
                        None if x.oracle_len == x.candidate_len => "identical".to_string(),
                        None if x.truncated => format!(
                            "candidate rollout is shorter ({} of {} steps, no EOS) and agrees on all of them: compared over the common length",
                            x.candidate_len, x.oracle_len
                        ),
                        None => format!(
                            "no differing token; lengths differ (oracle {}, candidate {})",
                            x.oracle_len, x.candidate_len
                        ),
                        Some(d) => format!(
                            "diverges at step {}: oracle {} / candidate {}, oracle margin {}",
                            d.step,
                            tt.token(d.oracle_token.max(0) as usize),
                            tt.token(d.candidate_token.max(0) as usize),
                            d.oracle_margin
                                .map(|m| format!("{m:.4}"))
                                .unwrap_or("unknown".into())
                        ),
                    };
                    let _ = writeln!(
                        o,
                        "- `{}` seq {}: exact prefix {}/{}; {d}",
                        c.id.label, x.seq, x.exact_prefix, x.oracle_len
                    );
                }
                for g in &r.not_compared {
                    let _ = writeln!(
                        o,
                        "- `{}` seq {}: not compared ({})",
                        c.id.label,
                        g.seq,
                        g.missing_on.describe()
                    );
                }
            }
            _ => {
                let _ = writeln!(
                    o,
                    "- `{}`: not compared ({})",
                    c.id.label,
                    c.rollout_missing
                        .as_deref()
                        .unwrap_or("no counted sequence has a rollout on both sides")
                );
            }
        }
    }

    let _ = writeln!(o, "\n## KL divergence and token probability (llama.cpp `perplexity --kl-divergence` layout)\n");
    for c in s
        .candidates
        .iter()
        .filter(|c| c.role == Role::Candidate || c.role == Role::Control)
    {
        let _ = writeln!(o, "### {}\n", c.id.label);
        match (&c.kl, &c.delta_p) {
            (Some(k), Some(dp)) => {
                let _ = writeln!(o, "```");
                let _ = writeln!(o, "====== KL divergence statistics ======");
                dist_block(&mut o, "KLD", k, 1.0, "");
                let _ = writeln!(o, "\n====== Token probability statistics ======");
                dist_block(&mut o, "Δp", dp, 100.0, " %");
                let _ = writeln!(o, "{:<12}{:>12.6} %", "RMS Δp    :", dp.rms * 100.0);
                if let Some(a) = c.top1_agreement {
                    let n = c.positions_counted as f64;
                    let se = (a * (1.0 - a) / n).sqrt();
                    let _ = writeln!(
                        o,
                        "{:<12}{:>12.6} ± {:>10.6} %",
                        "Same top p:",
                        a * 100.0,
                        se * 100.0
                    );
                }
                let _ = writeln!(o, "```\n");
            }
            _ => {
                let _ = writeln!(o, "KL and Δp: {}.", not_computable(c));
                if let Some(a) = c.top1_agreement {
                    let _ = writeln!(o, "Same top p: {:.4} %.", a * 100.0);
                }
                let _ = writeln!(o);
            }
        }
    }
    shift_headings(o)
}

fn short_metrics(c: &CandidateSummary) -> (String, String) {
    (
        c.cosine
            .as_ref()
            .map(|x| format!("{:.4}", x.min))
            .unwrap_or_else(|| NOT_COMPUTABLE.into()),
        c.kl.as_ref()
            .map(|k| format!("{:.6}", k.mean))
            .unwrap_or_else(|| NOT_COMPUTABLE.into()),
    )
}

/// `qgate sweep`: the ladder (largest first), why each smaller scheme was rejected, skipped weights and
/// the component ablation.
fn ladder(o: &mut String, s: &RunSummary, l: &Ladder) {
    let _ = writeln!(
        o,
        "## Quantization ladder (simulated: weights fake-quantized at load, {} compute, {} scales)\n",
        l.compute, l.scale_dtype
    );
    let _ = writeln!(
        o,
        "| scheme | spec | size | confident flips | introduced (vs control) | cosine min | mean KL | verdict |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    let mut rows: Vec<(&crate::gate::outcome::Rung, &CandidateSummary)> = l
        .rungs
        .iter()
        .filter_map(|r| {
            s.candidates
                .iter()
                .find(|c| c.id.label == r.label)
                .map(|c| (r, c))
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.0.size_bytes));
    for (r, c) in &rows {
        let (cos, kl) = short_metrics(c);
        let name = match &r.alias {
            Some(a) if a != &r.label => format!("{} ({a})", r.label),
            _ => r.label.clone(),
        };
        let introduced = match c.role {
            Role::Control => "—".to_string(),
            _ => c.introduced_confident_flips.to_string(),
        };
        let _ = writeln!(
            o,
            "| {name} | `{}` | {} | {} | {introduced} | {cos} | {kl} | {} |",
            r.spec,
            human_size(r.size_bytes),
            c.confident_flips,
            verdict_cell(c)
        );
    }
    let _ = writeln!(o);
    match &s.ship {
        Some(ship) if l.rejected_smaller.is_empty() => {
            let _ = writeln!(o, "No scheme smaller than **{ship}** was tried.\n");
        }
        _ => {
            let _ = writeln!(
                o,
                "{}\n",
                match &s.ship {
                    Some(ship) => format!("Rejected, smaller than **{ship}**:"),
                    None if s
                        .candidates
                        .iter()
                        .any(|c| c.role == Role::Candidate && c.verdict.status == Status::Pass) =>
                    {
                        format!("Nothing ships ({}). Rejected:", s.ship_note)
                    }
                    None => "Rejected (nothing passes):".to_string(),
                }
            );
            for r in &l.rejected_smaller {
                let _ = writeln!(
                    o,
                    "- `{}` ({}): {} [{}]",
                    r.label,
                    r.size_bytes.map(human_size).unwrap_or("unknown".into()),
                    r.reason,
                    r.failed_rule.map(|x| x.name()).unwrap_or("?")
                );
            }
            let _ = writeln!(o);
        }
    }
    let skipped: Vec<&crate::gate::outcome::Rung> =
        l.rungs.iter().filter(|r| !r.skipped.is_empty()).collect();
    if !skipped.is_empty() {
        let _ = writeln!(
            o,
            "Left unquantized (dimension not divisible; exporters skip these silently):\n"
        );
        for r in skipped {
            let _ = writeln!(o, "- `{}`: {}", r.label, r.skipped.join("; "));
        }
        let _ = writeln!(o);
    }
    if let Some(a) = &l.ablation {
        let _ = writeln!(
            o,
            "### Ablation: one component at `{}`, the rest at `{}`\n",
            a.method, a.base
        );
        let _ = writeln!(
            o,
            "| component | confident flips | introduced | cosine min | mean KL | verdict |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|");
        for (comp, c) in &a.variants {
            let (cos, kl) = short_metrics(c);
            let _ = writeln!(
                o,
                "| {comp} | {} | {} | {cos} | {kl} | {} |",
                c.confident_flips,
                c.introduced_confident_flips,
                verdict_cell(c)
            );
        }
        let _ = writeln!(
            o,
            "\nSensitive: {}\n",
            if a.sensitive.is_empty() {
                "none — every component survives alone".to_string()
            } else {
                a.sensitive.join(", ")
            }
        );
    }
}
