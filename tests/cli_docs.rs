//! docs/cli.md is the `--help` of qgate and of every command, generated: this test regenerates it and
//! fails when the committed file differs (run `QGATE_UPDATE_DOCS=1 cargo test --test cli_docs` to
//! rewrite it after changing a flag).
mod common;

use std::process::Command;

fn help(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_qgate"))
        .args(args)
        .env("COLUMNS", "100")
        .output()
        .unwrap();
    assert!(o.status.success(), "{args:?}");
    String::from_utf8(o.stdout).unwrap()
}

/// The commands `qgate --help` lists (without `help` itself).
fn commands(top: &str) -> Vec<String> {
    top.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect()
}

fn render() -> String {
    let top = help(&["--help"]);
    let mut md = String::from(
        "# qgate command-line reference\n\n\
         Generated from `qgate --help` and `qgate <command> --help` by `tests/cli_docs.rs` \
         (`QGATE_UPDATE_DOCS=1 cargo test --test cli_docs` rewrites it; CI fails when it is stale).\n\n",
    );
    md.push_str("## qgate\n\n```text\n");
    md.push_str(&top);
    md.push_str("```\n");
    let cmds = commands(&top);
    assert!(cmds.len() >= 6, "{cmds:?}");
    for c in &cmds {
        md.push_str(&format!("\n## qgate {c}\n\n```text\n"));
        md.push_str(&help(&[c, "--help"]));
        md.push_str("```\n");
    }
    md
}

#[test]
fn cli_reference_is_current() {
    let got = render();
    let path = common::repo().join("docs/cli.md");
    if std::env::var_os("QGATE_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        want == got,
        "docs/cli.md is stale: run `QGATE_UPDATE_DOCS=1 cargo test --test cli_docs` and commit it"
    );
}

#[test]
fn readme_points_to_the_reference_and_names_every_command() {
    let readme = std::fs::read_to_string(common::repo().join("README.md")).unwrap();
    assert!(readme.contains("docs/cli.md"));
    for c in commands(&help(&["--help"])) {
        assert!(
            readme.contains(&format!("qgate {c} ")),
            "README lacks `qgate {c}`"
        );
    }
}
