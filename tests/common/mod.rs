//! Checks shared by the integration tests: every summary.json a test produces is validated against the
//! published schema (docs/qgate-report-1.schema.json), and every JUnit file is parsed and its structure
//! and counts checked.
#![allow(dead_code)]
use serde_json::Value;
use std::path::PathBuf;

/// A tensor's values as f32 bit patterns (bf16/f16 widen exactly), for bit-for-bit comparisons.
pub fn bits(t: &candle_core::Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The published `qgate-report/1` JSON Schema.
pub fn report_schema() -> Value {
    let p = repo().join("docs/qgate-report-1.schema.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("schema file"))
        .expect("schema is JSON")
}

/// Every way `summary` breaks the published schema (empty when it validates). The validator is `boon`
/// (draft 2020-12): unlike the `jsonschema` crate it does not switch on serde_json's `float_roundtrip`, so
/// the binary the tests run parses JSON exactly as the shipped one does.
pub fn schema_errors(summary: &Value) -> Vec<String> {
    let url = "file:///qgate/docs/qgate-report-1.schema.json";
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler.set_default_draft(boon::Draft::V2020_12);
    compiler
        .add_resource(url, report_schema())
        .expect("schema resource");
    let idx = compiler
        .compile(url, &mut schemas)
        .expect("the schema itself is valid draft 2020-12");
    match schemas.validate(summary, idx) {
        Ok(()) => Vec::new(),
        Err(e) => vec![format!("{e}")],
    }
}

/// Panics with every schema violation of `summary`.
pub fn assert_valid_summary(summary: &Value) {
    let errs = schema_errors(summary);
    assert!(
        errs.is_empty(),
        "summary.json does not match docs/qgate-report-1.schema.json:\n{}",
        errs.join("\n")
    );
}

/// One `<testcase>` of a JUnit file.
#[derive(Debug, Clone)]
pub struct Case {
    pub classname: String,
    pub name: String,
    /// "pass", "failure" or "skipped".
    pub outcome: &'static str,
    /// The failure's or skip's `message`.
    pub message: String,
    /// The failure's `type`.
    pub kind: String,
}

/// Parse a JUnit document and check what reporters rely on: `testsuites` › `testsuite` (name, tests,
/// failures, errors, skipped) › `testcase` (name, classname) with at most one `failure`/`skipped`/`error`
/// child, and the suite's counts equal to what it holds. Returns the test cases.
pub fn parse_junit(xml: &str) -> Vec<Case> {
    let doc = roxmltree::Document::parse(xml).expect("JUnit output is well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "testsuites");
    let num = |n: roxmltree::Node, a: &str| -> usize {
        n.attribute(a)
            .unwrap_or_else(|| panic!("<{}> lacks {a}", n.tag_name().name()))
            .parse()
            .unwrap_or_else(|_| panic!("<{}> {a} is not a count", n.tag_name().name()))
    };
    let mut all = Vec::new();
    let (mut tests, mut failures) = (0, 0);
    for suite in root.children().filter(|n| n.is_element()) {
        assert_eq!(suite.tag_name().name(), "testsuite");
        assert!(!suite.attribute("name").unwrap_or("").is_empty());
        let mut cases = Vec::new();
        for el in suite.children().filter(|n| n.is_element()) {
            match el.tag_name().name() {
                "properties" => {
                    for p in el.children().filter(|n| n.is_element()) {
                        assert_eq!(p.tag_name().name(), "property");
                        assert!(p.attribute("name").is_some() && p.attribute("value").is_some());
                    }
                }
                "testcase" => {
                    let kids: Vec<_> = el.children().filter(|n| n.is_element()).collect();
                    assert!(kids.len() <= 1, "a testcase with {} outcomes", kids.len());
                    let (outcome, message, kind) = match kids.first() {
                        None => ("pass", String::new(), String::new()),
                        Some(k) => {
                            let o = match k.tag_name().name() {
                                "failure" => "failure",
                                "skipped" => "skipped",
                                other => panic!("unexpected <{other}> in a testcase"),
                            };
                            let m = k.attribute("message").unwrap_or("").to_string();
                            assert!(!m.is_empty(), "a {o} without a message");
                            (o, m, k.attribute("type").unwrap_or("").to_string())
                        }
                    };
                    cases.push(Case {
                        classname: el.attribute("classname").expect("classname").to_string(),
                        name: el.attribute("name").expect("name").to_string(),
                        outcome,
                        message,
                        kind,
                    });
                }
                other => panic!("unexpected <{other}> in a testsuite"),
            }
        }
        let count = |o: &str| cases.iter().filter(|c| c.outcome == o).count();
        assert_eq!(num(suite, "tests"), cases.len(), "tests=");
        assert_eq!(num(suite, "failures"), count("failure"), "failures=");
        assert_eq!(num(suite, "skipped"), count("skipped"), "skipped=");
        assert_eq!(num(suite, "errors"), 0, "errors=");
        tests += cases.len();
        failures += count("failure");
        all.extend(cases);
    }
    assert_eq!(num(root, "tests"), tests);
    assert_eq!(num(root, "failures"), failures);
    all
}

/// The JUnit cases must say what summary.json says: per gated candidate, a failure whose type is the
/// failed rule and whose message is the verdict's reason (a sweep reports rejections as skipped).
pub fn assert_junit_matches_summary(cases: &[Case], summary: &Value) {
    let sweep = summary.get("ladder").is_some();
    for c in summary["candidates"].as_array().expect("candidates") {
        let label = c["label"].as_str().unwrap();
        let mine: Vec<&Case> = cases.iter().filter(|k| k.classname == label).collect();
        assert!(!mine.is_empty(), "no testcase for {label}");
        let status = c["verdict"]["status"].as_str().unwrap();
        let failures: Vec<&&Case> = mine.iter().filter(|k| k.outcome == "failure").collect();
        match (status, sweep) {
            ("fail", false) => {
                assert_eq!(failures.len(), 1, "{label}: {mine:?}");
                assert_eq!(
                    failures[0].kind,
                    c["verdict"]["failed_rule"].as_str().unwrap()
                );
                assert_eq!(
                    failures[0].name,
                    c["verdict"]["failed_rule"].as_str().unwrap()
                );
                assert_eq!(
                    failures[0].message,
                    c["verdict"]["reason"].as_str().unwrap()
                );
            }
            ("fail", true) => {
                assert!(failures.is_empty(), "{label}: {mine:?}");
                let rule = c["verdict"]["failed_rule"].as_str().unwrap();
                assert!(mine.iter().any(|k| k.name == rule
                    && k.outcome == "skipped"
                    && k.message.contains("rejected")));
            }
            ("pass", _) => {
                assert!(failures.is_empty(), "{label}: {mine:?}");
                assert!(
                    mine.iter().any(|k| k.outcome == "pass"),
                    "{label}: {mine:?}"
                );
            }
            _ => assert!(
                mine.iter().all(|k| k.outcome == "skipped"),
                "{label}: {mine:?}"
            ),
        }
    }
}
