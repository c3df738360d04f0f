//! `--junit FILE`: the run as JUnit XML for CI test reporters (Jenkins, GitLab, the GitHub test-report
//! actions). One `<testcase>` per gated candidate × gate rule (classname = the candidate's label, name =
//! the rule); it only formats what the gate decided, read from the run summary as summary.json has it.
//!
//! The verdict names the first rule a candidate fails (rules are applied in a fixed order): earlier rules
//! passed, that one is a `<failure>` carrying the reason, later ones are `<skipped>` ("not evaluated").
//! The control is one skipped testcase. In a sweep (the summary has a `ladder`) a rejected rung is the
//! point of the ladder, not a failure: its rules are skipped with the rejection reason, and one `ship`
//! testcase fails when no scheme ships. With `require_confident_prompt` a `prompt_confidence` testcase
//! fails when the plan is rejected (exit 3).
//!
//! The structure follows the common JUnit XML schema (testsuites › testsuite › testcase › failure |
//! skipped); `tests/data/junit.xsd` is checked against in the tests.
use crate::error::{io_err, Error, Result};
use crate::gate::outcome::RunSummary;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;

/// For summaries without `verdict.rules` (written before the gate recorded every rule's outcome): the
/// rules in the order `gate::verdict::judge` applied them then, and whether the policy enabled each.
fn rules(policy: &Value) -> Vec<&'static str> {
    let mut r = vec![
        "garbage_rows",
        "positions",
        "max_introduced_confident_flips",
    ];
    if !policy.get("min_cosine").is_none_or(Value::is_null) {
        r.push("min_cosine");
    }
    if !policy.get("max_mean_kl").is_none_or(Value::is_null) {
        r.push("max_mean_kl");
    }
    if policy.get("rollout_prefix").and_then(Value::as_str) != Some("off") {
        r.push("rollout_prefix");
    }
    r
}

enum Outcome {
    Pass,
    Failure { kind: String, message: String },
    Skipped(String),
}

struct Case {
    classname: String,
    name: String,
    outcome: Outcome,
    /// Extra lines for the failure body (the candidate's figures).
    detail: String,
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn candidate_detail(c: &Value) -> String {
    let mut d = String::new();
    let _ = writeln!(d, "capture: {}", s(c, "capture"));
    let num = |k: &str| c.get(k).map(|v| v.to_string()).unwrap_or("n/a".into());
    let _ = writeln!(
        d,
        "exact {}/{} counted positions, {} confident flip(s), {} introduced, {} tie-flip(s)",
        num("exact"),
        num("positions_counted"),
        num("confident_flips"),
        num("introduced_confident_flips"),
        num("tie_flips")
    );
    if let Some(m) = c.pointer("/cosine/min").and_then(Value::as_f64) {
        let _ = writeln!(d, "min cosine {m:.6}");
    }
    if let Some(m) = c.pointer("/kl/mean").and_then(Value::as_f64) {
        let _ = writeln!(d, "mean KL {m:.6}");
    }
    d
}

fn cases(run: &Value) -> Vec<Case> {
    let policy = run.get("policy").cloned().unwrap_or(Value::Null);
    let order = rules(&policy);
    let sweep = run.get("ladder").is_some_and(|l| !l.is_null());
    let mut out = Vec::new();
    let empty = Vec::new();
    for c in run
        .get("candidates")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
    {
        let label = s(c, "label").to_string();
        let verdict = c.get("verdict").cloned().unwrap_or(Value::Null);
        let status = s(&verdict, "status");
        let reason = s(&verdict, "reason").to_string();
        let failed = verdict.get("failed_rule").and_then(Value::as_str);
        let detail = candidate_detail(c);
        let case = |name: &str, outcome: Outcome| Case {
            classname: label.clone(),
            name: name.to_string(),
            outcome,
            detail: detail.clone(),
        };
        if s(c, "role") == "control" {
            out.push(case(
                "control",
                Outcome::Skipped(format!("control, not gated: {reason}")),
            ));
            continue;
        }
        // The gate records every rule's outcome (`verdict.rules`): use it as it is.
        if let (Some(rules), "pass" | "fail") =
            (verdict.get("rules").and_then(Value::as_array), status)
        {
            for pair in rules {
                let (Some(r), Some(o)) = (
                    pair.get(0).and_then(Value::as_str),
                    pair.get(1).and_then(Value::as_str),
                ) else {
                    continue;
                };
                let outcome = match o {
                    "passed" => Outcome::Pass,
                    "failed" if sweep => {
                        Outcome::Skipped(format!("rejected by the sweep ({r}): {reason}"))
                    }
                    "failed" => Outcome::Failure {
                        kind: r.to_string(),
                        message: reason.clone(),
                    },
                    "not_evaluated" => Outcome::Skipped(format!(
                        "not evaluated: rule {} failed first",
                        failed.unwrap_or("?")
                    )),
                    _ => continue, // not required by the policy: no testcase
                };
                out.push(case(r, outcome));
            }
            continue;
        }
        match (status, failed) {
            ("pass", _) => {
                for r in &order {
                    if *r == "rollout_prefix" && c.get("rollout").is_none_or(Value::is_null) {
                        out.push(case(r, Outcome::Skipped("no rollouts to compare".into())));
                    } else {
                        out.push(case(r, Outcome::Pass));
                    }
                }
            }
            ("fail", Some(rule)) => {
                // A rule this writer does not know the place of is reported first, and nothing as passed.
                let at = order.iter().position(|r| *r == rule);
                let names: Vec<&str> = match at {
                    Some(_) => order.clone(),
                    None => std::iter::once(rule).chain(order.iter().copied()).collect(),
                };
                let at = at.unwrap_or(0);
                for (i, r) in names.iter().enumerate() {
                    let outcome = if *r == rule {
                        if sweep {
                            Outcome::Skipped(format!("rejected by the sweep ({rule}): {reason}"))
                        } else {
                            Outcome::Failure {
                                kind: rule.to_string(),
                                message: reason.clone(),
                            }
                        }
                    } else if i < at {
                        Outcome::Pass
                    } else {
                        Outcome::Skipped(format!("not evaluated: rule {rule} failed first"))
                    };
                    out.push(case(r, outcome));
                }
            }
            (other, rule) => {
                // A status without a failing rule (or one this writer does not know): one testcase.
                let name = rule.unwrap_or("verdict");
                let outcome = if other == "fail" && !sweep {
                    Outcome::Failure {
                        kind: name.to_string(),
                        message: reason.clone(),
                    }
                } else {
                    Outcome::Skipped(format!("{other}: {reason}"))
                };
                out.push(case(name, outcome));
            }
        }
    }
    let rejected = run.pointer("/prompt/rejected").and_then(Value::as_bool) == Some(true);
    if rejected
        || policy
            .get("require_confident_prompt")
            .and_then(Value::as_bool)
            == Some(true)
    {
        let below = run
            .pointer("/prompt/below_floor")
            .map(|v| v.to_string())
            .unwrap_or_default();
        let counted = run
            .pointer("/prompt/positions_counted")
            .map(|v| v.to_string())
            .unwrap_or_default();
        out.push(Case {
            classname: "plan".into(),
            name: "prompt_confidence".into(),
            outcome: if rejected {
                Outcome::Failure {
                    kind: "prompt_rejected".into(),
                    message: s(run, "verdict").to_string(),
                }
            } else {
                Outcome::Pass
            },
            detail: format!("{below} of {counted} counted positions below the margin floor\n"),
        });
    }
    // a rejected prompt judged nothing: no ship testcase (the prompt_confidence one fails)
    if sweep && run.get("exit_code").and_then(Value::as_i64) != Some(3) {
        let ship = run.get("ship").and_then(Value::as_str);
        out.push(Case {
            classname: "sweep".into(),
            name: "ship".into(),
            outcome: match ship {
                Some(_) => Outcome::Pass,
                None => Outcome::Failure {
                    kind: if any_candidate_passes(run) {
                        "ship_not_decided"
                    } else {
                        "no_scheme_ships"
                    }
                    .into(),
                    message: s(run, "verdict").to_string(),
                },
            },
            detail: String::new(),
        });
    }
    out
}

/// Whether a gated candidate of the summary passed.
fn any_candidate_passes(run: &Value) -> bool {
    run.get("candidates")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("role").and_then(Value::as_str) == Some("candidate")
                    && c.pointer("/verdict/status").and_then(Value::as_str) == Some("pass")
            })
        })
}

/// XML 1.0 text or attribute value: escapes markup and drops characters XML cannot carry.
pub fn escape(text: &str) -> String {
    let mut o = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            '\t' | '\n' | '\r' => o.push(ch),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => o.push('\u{FFFD}'),
            c => o.push(c),
        }
    }
    o
}

/// The JUnit XML document for a run (or sweep) summary.
pub fn render(run: &RunSummary) -> Result<String> {
    let v = serde_json::to_value(run).map_err(|e| Error::Internal(format!("junit: {e}")))?;
    Ok(render_value(&v))
}

/// [`render`] from the summary as JSON (what summary.json holds).
pub fn render_value(run: &Value) -> String {
    let cs = cases(run);
    let failures = cs
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Failure { .. }))
        .count();
    let skipped = cs
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Skipped(_)))
        .count();
    let suite = if run.get("ladder").is_some_and(|l| !l.is_null()) {
        "qgate sweep"
    } else {
        "qgate run"
    };
    let mut x = String::new();
    x.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"qgate\" tests=\"{}\" failures=\"{failures}\" errors=\"0\">",
        cs.len()
    );
    let _ = writeln!(
        x,
        "  <testsuite name=\"{suite}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" timestamp=\"{}\">",
        cs.len(),
        crate::progress::utc_now().trim_end_matches('Z')
    );
    x.push_str("    <properties>\n");
    let props = [
        ("schema", s(run, "schema").to_string()),
        ("qgate_version", s(run, "qgate_version").to_string()),
        (
            "oracle",
            run.pointer("/oracle/capture")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        ),
        (
            "oracle_dtype",
            run.pointer("/oracle/dtype")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        ),
        (
            "ship",
            run.get("ship")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_string(),
        ),
        (
            "exit_code",
            run.get("exit_code")
                .map(|v| v.to_string())
                .unwrap_or_default(),
        ),
        ("verdict", s(run, "verdict").to_string()),
    ];
    for (k, v) in props {
        let _ = writeln!(x, "      <property name=\"{k}\" value=\"{}\"/>", escape(&v));
    }
    x.push_str("    </properties>\n");
    for c in &cs {
        let head = format!(
            "    <testcase classname=\"{}\" name=\"{}\"",
            escape(&c.classname),
            escape(&c.name)
        );
        match &c.outcome {
            Outcome::Pass => {
                let _ = writeln!(x, "{head}/>");
            }
            Outcome::Skipped(m) => {
                let _ = writeln!(
                    x,
                    "{head}>\n      <skipped message=\"{}\"/>\n    </testcase>",
                    escape(m)
                );
            }
            Outcome::Failure { kind, message } => {
                let _ = writeln!(
                    x,
                    "{head}>\n      <failure type=\"{}\" message=\"{}\">{}\n{}</failure>\n    </testcase>",
                    escape(kind),
                    escape(message),
                    escape(message),
                    escape(&c.detail)
                );
            }
        }
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}

/// Write the JUnit XML to `path` (temporary file beside it, then renamed: never half-written).
pub fn write(path: &Path, run: &RunSummary) -> Result<()> {
    let xml = render(run)?;
    write_atomic(path, xml.as_bytes())
}

/// Write `bytes` to `path` through a temporary file in the same directory and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    if path.is_dir() {
        return Err(Error::input(
            path,
            "is a directory; --junit takes a file name",
        ));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".qgate-junit-")
        .tempfile_in(&dir)
        .map_err(|e| io_err(&dir, e))?;
    tmp.write_all(bytes).map_err(|e| io_err(path, e))?;
    #[cfg(unix)]
    {
        // tempfile creates 0600; a report file is as readable as any other file qgate writes.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(|e| io_err(path, e))?;
    }
    tmp.persist(path).map_err(|e| io_err(path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy() -> Value {
        json!({"min_cosine": 0.98, "max_mean_kl": null, "rollout_prefix": "full",
               "require_confident_prompt": false})
    }

    #[test]
    fn first_failing_rule_fails_earlier_pass_later_skipped() {
        let run = json!({
            "schema": "qgate-report/1", "policy": policy(), "verdict": "FAIL", "exit_code": 1,
            "prompt": {"rejected": false},
            "candidates": [
                {"label": "int4 <a&b>", "role": "candidate", "capture": "x", "rollout": null,
                 "verdict": {"status": "fail", "failed_rule": "min_cosine", "reason": "min cosine 0.9 < 0.98"}},
                {"label": "int8", "role": "candidate", "capture": "y", "rollout": {"x": 1},
                 "verdict": {"status": "pass", "failed_rule": null, "reason": "ok"}},
                {"label": "f16", "role": "control", "capture": "z",
                 "verdict": {"status": "control", "failed_rule": null, "reason": "control (not gated)"}}
            ]
        });
        let x = render_value(&run);
        // 5 rules (max_mean_kl is off) × 2 candidates + the control
        assert!(
            x.contains("tests=\"11\" failures=\"1\" errors=\"0\" skipped=\"2\""),
            "{x}"
        );
        assert!(
            x.contains("classname=\"int4 &lt;a&amp;b&gt;\" name=\"positions\"/>"),
            "{x}"
        );
        assert!(
            x.contains("<failure type=\"min_cosine\" message=\"min cosine 0.9 &lt; 0.98\">"),
            "{x}"
        );
        assert!(x.contains("name=\"rollout_prefix\">\n      <skipped message=\"not evaluated: rule min_cosine failed first\"/>"), "{x}");
        assert!(
            x.contains("classname=\"int8\" name=\"rollout_prefix\"/>"),
            "{x}"
        );
        assert!(!x.contains("max_mean_kl"), "{x}");
    }

    #[test]
    fn sweep_rejections_are_skipped_and_ship_decides() {
        let run = json!({
            "policy": policy(), "verdict": "SHIP: none", "ship": null, "ladder": {"rungs": []},
            "candidates": [
                {"label": "int4lin", "role": "candidate", "capture": "x",
                 "verdict": {"status": "fail", "failed_rule": "positions", "reason": "none"}}
            ]
        });
        let x = render_value(&run);
        assert!(
            x.contains(
                "name=\"qgate sweep\" tests=\"6\" failures=\"1\" errors=\"0\" skipped=\"4\""
            ),
            "{x}"
        );
        assert!(
            x.contains("<skipped message=\"rejected by the sweep (positions): none\"/>"),
            "{x}"
        );
        assert!(
            x.contains("<failure type=\"no_scheme_ships\" message=\"SHIP: none\">"),
            "{x}"
        );
    }

    #[test]
    fn a_rule_of_unknown_place_fails_and_nothing_is_claimed_passed() {
        let run = json!({
            "policy": policy(), "verdict": "FAIL",
            "candidates": [
                {"label": "c", "role": "candidate", "capture": "x",
                 "verdict": {"status": "fail", "failed_rule": "coverage", "reason": "too few"}}
            ]
        });
        let x = render_value(&run);
        assert!(
            x.contains("tests=\"6\" failures=\"1\" errors=\"0\" skipped=\"5\""),
            "{x}"
        );
        assert!(
            x.contains("name=\"coverage\">\n      <failure type=\"coverage\" message=\"too few\">"),
            "{x}"
        );
    }

    #[test]
    fn control_characters_cannot_break_the_document() {
        assert_eq!(escape("a\u{1}b\"'\n"), "a\u{FFFD}b&quot;&apos;\n");
    }
}
