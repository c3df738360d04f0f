//! GitHub Actions: when `GITHUB_STEP_SUMMARY` names a file, `qgate run`/`sweep` append the verdict table
//! to it (the job's summary page); when `GITHUB_ACTIONS=true`, a failed candidate becomes an `::error`
//! annotation (a rung a sweep rejected a `::notice`; no scheme shipping an `::error`). Annotations go to
//! stderr (the runner reads workflow commands from both streams), so `--json` keeps stdout pure JSON.
//! Like the JUnit writer, this only formats what the gate decided, read from the summary as JSON.
use crate::error::{Error, Result};
use crate::gate::outcome::RunSummary;
use serde_json::Value;
use std::fmt::Write as _;
use std::io::Write as _;

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Markdown table cell: no pipes or line breaks.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn is_sweep(run: &Value) -> bool {
    run.get("ladder").is_some_and(|l| !l.is_null())
}

/// The step summary: a heading with the verdict, one row per candidate, and the verdict line.
pub fn step_summary(run: &Value) -> String {
    let mut o = String::new();
    let code = run.get("exit_code").and_then(Value::as_i64).unwrap_or(-1);
    let mark = match code {
        0 => "✅",
        3 => "⚠️",
        _ => "❌",
    };
    let what = if is_sweep(run) { "sweep" } else { "run" };
    let _ = writeln!(o, "### {mark} qgate {what}: {}\n", cell(s(run, "verdict")));
    let provenance = match run
        .pointer("/oracle/provenance/kind")
        .and_then(Value::as_str)
    {
        Some("unverified") => "**oracle provenance unverified (--trust-oracle)**".to_string(),
        Some(k) => format!("provenance: {}", cell(&k.replace('_', " "))),
        None => "provenance: not recorded".to_string(),
    };
    let _ = writeln!(
        o,
        "oracle `{}` ({}; {provenance}), margin floor {} ({} space)\n",
        cell(
            run.pointer("/oracle/capture")
                .and_then(Value::as_str)
                .unwrap_or("")
        ),
        cell(
            run.pointer("/oracle/dtype")
                .and_then(Value::as_str)
                .unwrap_or("")
        ),
        run.get("margin_floor")
            .map(|v| v.to_string())
            .unwrap_or_default(),
        cell(s(run, "margin_space")),
    );
    o.push_str("| candidate | exact | tie-flips | confident | introduced | min cos | mean KL | verdict |\n");
    o.push_str("|---|---:|---:|---:|---:|---:|---:|---|\n");
    let empty = Vec::new();
    for c in run
        .get("candidates")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
    {
        let num = |k: &str| c.get(k).map(|v| v.to_string()).unwrap_or("n/a".into());
        let f = |p: &str, digits: usize| {
            c.pointer(p)
                .and_then(Value::as_f64)
                .map(|x| format!("{x:.digits$}"))
                .unwrap_or("n/a".into())
        };
        let status = s(&c["verdict"], "status");
        let verdict = match c.pointer("/verdict/failed_rule").and_then(Value::as_str) {
            Some(r) => format!(
                "**{}** ({r}): {}",
                status.to_uppercase(),
                s(&c["verdict"], "reason")
            ),
            None => status.to_uppercase(),
        };
        let _ = writeln!(
            o,
            "| {} | {}/{} | {} | {} | {} | {} | {} | {} |",
            cell(s(c, "label")),
            num("exact"),
            num("positions_counted"),
            num("tie_flips"),
            num("confident_flips"),
            num("introduced_confident_flips"),
            f("/cosine/min", 4),
            f("/kl/mean", 6),
            cell(&verdict)
        );
    }
    match run.get("ship").and_then(Value::as_str) {
        Some(ship) => {
            let _ = writeln!(
                o,
                "\nships: **{}** ({})",
                cell(ship),
                cell(s(run, "ship_basis"))
            );
        }
        // nothing ships: say why (nothing passes, not decided, only simulations pass)
        None => {
            let _ = writeln!(o, "\n{}", cell(s(run, "ship_note")));
        }
    }
    o.push('\n');
    o
}

/// Workflow-command data: `%`, CR and LF escaped.
fn data(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// Workflow-command property value: as data, plus `:` and `,`.
fn prop(text: &str) -> String {
    data(text).replace(':', "%3A").replace(',', "%2C")
}

/// `::error` / `::notice` lines for what failed.
pub fn annotations(run: &Value) -> Vec<String> {
    let sweep = is_sweep(run);
    let mut out = Vec::new();
    let empty = Vec::new();
    for c in run
        .get("candidates")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
    {
        // a passing or not-judged candidate (prompt rejected: the run's own error says so) is not a failure
        let status = s(&c["verdict"], "status");
        if s(c, "role") != "candidate" || status == "pass" || status == "not_judged" {
            continue;
        }
        let rule = c
            .pointer("/verdict/failed_rule")
            .and_then(Value::as_str)
            .unwrap_or("verdict");
        let title = format!("qgate: {} fails {rule}", s(c, "label"));
        let level = if sweep { "notice" } else { "error" };
        out.push(format!(
            "::{level} title={}::{}",
            prop(&title),
            data(&format!(
                "{} — {}",
                s(c, "label"),
                s(&c["verdict"], "reason")
            ))
        ));
    }
    let code = run.get("exit_code").and_then(Value::as_i64);
    if code == Some(3) || (sweep && code == Some(1)) {
        let title = if code == Some(3) {
            "qgate: prompt rejected"
        } else if s(run, "verdict").starts_with("SHIP: not decided") {
            "qgate: ship not decided"
        } else {
            "qgate: no scheme ships"
        };
        out.push(format!(
            "::error title={}::{}",
            prop(title),
            data(s(run, "verdict"))
        ));
    }
    out
}

/// Append the step summary and print the annotations, as the GitHub Actions environment asks.
pub fn emit(run: &RunSummary) -> Result<()> {
    let summary = std::env::var_os("GITHUB_STEP_SUMMARY").filter(|p| !p.is_empty());
    let actions = std::env::var("GITHUB_ACTIONS").is_ok_and(|v| v == "true");
    if summary.is_none() && !actions {
        return Ok(());
    }
    let v = serde_json::to_value(run).map_err(|e| Error::Internal(format!("github: {e}")))?;
    if let Some(path) = summary {
        let path = std::path::PathBuf::from(path);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| {
                Error::input(&path, format!("GITHUB_STEP_SUMMARY: cannot append ({e})"))
            })?;
        f.write_all(step_summary(&v).as_bytes()).map_err(|e| {
            Error::input(&path, format!("GITHUB_STEP_SUMMARY: cannot append ({e})"))
        })?;
    }
    if actions {
        let mut e = std::io::stderr().lock();
        for line in annotations(&v) {
            let _ = writeln!(e, "{line}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run() -> Value {
        json!({
            "verdict": "FAIL: int4 fails max_introduced_confident_flips", "exit_code": 1,
            "oracle": {"capture": "o.safetensors", "dtype": "bf16"}, "margin_floor": 0.1,
            "margin_space": "prob", "ship": "int8", "ship_basis": "smallest size",
            "candidates": [
                {"label": "int4|x", "role": "candidate", "exact": 10, "positions_counted": 12,
                 "tie_flips": 1, "confident_flips": 1, "introduced_confident_flips": 1,
                 "cosine": {"min": 0.95}, "kl": null,
                 "verdict": {"status": "fail", "failed_rule": "max_introduced_confident_flips",
                             "reason": "1 confident flip(s) > 0 allowed (first at seq 0 pos 3: 50%\nmore)"}},
                {"label": "int8", "role": "candidate", "exact": 12, "positions_counted": 12,
                 "tie_flips": 0, "confident_flips": 0, "introduced_confident_flips": 0,
                 "verdict": {"status": "pass", "failed_rule": null, "reason": "ok"}},
                {"label": "f16", "role": "control", "verdict": {"status": "control", "failed_rule": null}}
            ]
        })
    }

    #[test]
    fn table_rows_and_verdict() {
        let md = step_summary(&run());
        assert!(md.starts_with("### ❌ qgate run: FAIL: int4 fails"), "{md}");
        assert!(md.contains("| int4\\|x | 10/12 | 1 | 1 | 1 | 0.9500 | n/a | **FAIL** (max_introduced_confident_flips): 1 confident flip(s) > 0 allowed (first at seq 0 pos 3: 50% more) |"), "{md}");
        assert!(
            md.contains("| int8 | 12/12 | 0 | 0 | 0 | n/a | n/a | PASS |"),
            "{md}"
        );
        assert!(md.contains("ships: **int8** (smallest size)"), "{md}");
    }

    #[test]
    fn one_escaped_error_per_failed_candidate() {
        let a = annotations(&run());
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(
            a[0],
            "::error title=qgate%3A int4|x fails max_introduced_confident_flips::int4|x — 1 confident flip(s) > 0 allowed (first at seq 0 pos 3: 50%25%0Amore)"
        );
    }
}
