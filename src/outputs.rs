//! Where qgate may write, checked **before** any expensive work (an oracle run, a simulation): qgate never
//! replaces what it did not write.
//!
//! - A report directory (`run --out`, `sweep --out`) may be replaced only when it is absent, empty, or holds
//!   nothing but the files a previous qgate report listed in its `summary.json` manifest (`report_files`;
//!   reports written before the manifest existed: its four fixed file names). Anything else in it — the
//!   user's notes, the capture being gated, a sub-directory — refuses the run (exit 2, naming the entry).
//! - A capture file (`--out` of oracle, simulate, import, plan) may replace an existing file only when that
//!   file is itself a qgate capture, and never one of the run's own inputs.
use crate::error::{io_err, Error, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The files reports wrote before summary.json carried a manifest.
const LEGACY_REPORT_FILES: [&str; 4] = [
    "report.md",
    "positions.csv",
    "summary.json",
    "positions.svg",
];

/// The files a previous qgate report in `dir` says it wrote, or why `dir` is not such a report.
fn manifest(dir: &Path) -> std::result::Result<BTreeSet<String>, String> {
    let p = dir.join("summary.json");
    let text = std::fs::read_to_string(&p)
        .map_err(|_| "it holds files and no qgate summary.json".to_string())?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|_| "its summary.json is not a qgate report".to_string())?;
    if v.get("schema").and_then(|s| s.as_str()) != Some(crate::gate::outcome::REPORT_SCHEMA) {
        return Err("its summary.json is not a qgate report".into());
    }
    let mut files: BTreeSet<String> = match v.get("report_files").and_then(|f| f.as_array()) {
        Some(a) => a
            .iter()
            .filter_map(|x| x.as_str())
            .filter(|n| !n.contains('/') && !n.contains('\\') && *n != ".." && *n != ".")
            .map(str::to_string)
            .collect(),
        None => LEGACY_REPORT_FILES.iter().map(|s| s.to_string()).collect(),
    };
    files.insert("summary.json".into());
    Ok(files)
}

/// Why `dir` (an existing directory) may not be replaced by a report, if it may not.
pub fn why_not_replaceable(dir: &Path) -> Option<String> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => return Some(format!("cannot be read ({e})")),
    };
    let entries: Vec<std::fs::DirEntry> = rd.filter_map(|e| e.ok()).collect();
    if entries.is_empty() {
        return None;
    }
    let ours = match manifest(dir) {
        Ok(m) => m,
        Err(why) => return Some(why),
    };
    let mut foreign: Vec<String> = entries
        .iter()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let plain_file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
            !(plain_file && ours.contains(&name))
        })
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    if foreign.is_empty() {
        return None;
    }
    foreign.sort();
    let n = foreign.len();
    foreign.truncate(3);
    Some(format!(
        "it holds {n} entr{} qgate did not write ({}{})",
        if n == 1 { "y" } else { "ies" },
        foreign.join(", "),
        if n > 3 { ", …" } else { "" }
    ))
}

/// Check a report directory before any work: absent (its parent can be created), or replaceable.
pub fn check_report_dir(out: &Path) -> Result<()> {
    if out.exists() || out.is_symlink() {
        if !out.is_dir() || out.is_symlink() {
            return Err(Error::input(
                out,
                "exists and is not a directory; refusing to replace it (choose another --out)",
            ));
        }
        if let Some(why) = why_not_replaceable(out) {
            return Err(Error::input(
                out,
                format!("refusing to replace this directory: {why}; qgate only replaces its own reports (choose another --out, or move those files)"),
            ));
        }
    }
    // The report is staged beside `out` and renamed into place.
    probe_writable(parent_of(out))
}

/// Remove a previous report that `check_report_dir` accepted: only the files its manifest lists, then the
/// (then empty) directory. Anything that appeared meanwhile is left where it is.
pub fn remove_previous_report(dir: &Path) -> Result<()> {
    let ours = manifest(dir).unwrap_or_default();
    for name in &ours {
        let p = dir.join(name);
        if p.is_file() && !p.is_symlink() {
            std::fs::remove_file(&p).map_err(|e| io_err(&p, e))?;
        }
    }
    std::fs::remove_dir(dir).map_err(|e| {
        Error::input(
            dir,
            format!("the previous report was moved here and could not be removed entirely ({e}); nothing of yours was deleted"),
        )
    })
}

/// The directory an output path goes in (`.` for a bare file name).
fn parent_of(out: &Path) -> &Path {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Check, before any work, that qgate can create files in `dir` or, where `dir` does not exist yet, in
/// its nearest existing ancestor (which must be a directory): a temporary file is created there and
/// removed again. A read-only volume or a path under a regular file is found now, not after an oracle
/// run of hours.
pub fn probe_writable(dir: &Path) -> Result<()> {
    let mut at = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    loop {
        match at.try_exists() {
            Ok(true) => break,
            Ok(false) if at != Path::new(".") => at = parent_of(at),
            Ok(false) => break,
            // under a regular file: walk up to it (it is then found not to be a directory)
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => at = parent_of(at),
            Err(e) => {
                return Err(Error::input(
                    at,
                    format!("cannot be examined ({e}); choose another output path"),
                ))
            }
        }
    }
    if !at.is_dir() {
        return Err(Error::input(at, "is not a directory"));
    }
    tempfile::Builder::new()
        .prefix(".qgate-probe-")
        .tempfile_in(at)
        .map(drop)
        .map_err(|e| {
            Error::input(
                at,
                format!("qgate cannot create files here ({e}); choose another output path"),
            )
        })
}

/// `p` as the file system resolves it, whether or not it exists: its deepest existing ancestor
/// canonicalized (links followed), the rest appended with `.` and `..` applied.
fn resolved(p: &Path) -> Option<PathBuf> {
    use std::path::Component;
    let abs = std::path::absolute(p).ok()?;
    let mut base = abs.as_path();
    let mut rest: Vec<Component> = Vec::new();
    let mut out = loop {
        if let Ok(c) = base.canonicalize() {
            break c;
        }
        rest.push(base.components().next_back()?);
        base = base.parent()?;
    };
    for c in rest.into_iter().rev() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    Some(out)
}

/// Whether `inner` is `outer` or lies inside it, as the file system resolves them (links, `..`; neither
/// needs to exist).
pub fn is_within(inner: &Path, outer: &Path) -> bool {
    match (resolved(inner), resolved(outer)) {
        (Some(i), Some(o)) => i.starts_with(o),
        _ => false,
    }
}

/// A file or directory the run writes besides its report directory (`--junit`, `--captures`) must not lie
/// inside it: the report directory is replaced as a whole by the next run, which would then refuse it.
pub fn check_outside_report(path: &Path, flag: &str, report_dir: &Path) -> Result<()> {
    if is_within(path, report_dir) {
        return Err(Error::input(
            path,
            format!(
                "is inside the report directory {} (--out), which qgate replaces as a whole on the next run; put {flag} beside it",
                report_dir.display()
            ),
        ));
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Check a capture output path before any work: not one of `inputs`, and either absent or an existing
/// qgate capture (which is then replaced atomically).
pub fn check_capture_out(out: &Path, inputs: &[&Path]) -> Result<()> {
    if let Some(i) = inputs.iter().find(|i| same_file(out, i)) {
        return Err(Error::input(
            out,
            format!(
                "is also an input of this run ({}); choose another --out",
                i.display()
            ),
        ));
    }
    if out.is_dir() {
        return Err(Error::input(
            out,
            "is a directory; --out names the capture file to write",
        ));
    }
    if out.exists() && crate::capture::Capture::open(out).is_err() {
        return Err(Error::input(
            out,
            "exists and is not a qgate capture; refusing to replace it (choose another --out)",
        ));
    }
    probe_writable(parent_of(out))
}

/// A directory qgate will create files in (`sweep --captures`): absent, or a directory; the captures it
/// writes there are checked one by one with [`check_capture_out`].
pub fn check_capture_dir(dir: &Path) -> Result<PathBuf> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::input(dir, "exists and is not a directory"));
    }
    Ok(dir.to_path_buf())
}

/// Check a `--junit FILE` path before any work: not a directory, and its parent (if named) a directory or
/// absent. An existing JUnit file is replaced (temp file + rename), as CI systems expect.
pub fn check_junit_out(out: &Path) -> Result<()> {
    if out.is_dir() {
        return Err(Error::input(
            out,
            "is a directory; --junit names the XML file to write",
        ));
    }
    if out.exists() {
        use std::io::Read;
        let mut head = Vec::new();
        std::fs::File::open(out)
            .and_then(|f| f.take(4096).read_to_end(&mut head))
            .map_err(|e| io_err(out, e))?;
        if !is_junit_xml(&head) {
            return Err(Error::input(
                out,
                "exists and is not a JUnit XML file; refusing to replace it (choose another --junit)",
            ));
        }
    }
    probe_writable(parent_of(out))
}

/// Whether a file's first bytes are a JUnit XML document: its first element (after an optional BOM,
/// XML declaration, processing instructions, comments and whitespace) is `<testsuites` or `<testsuite`.
/// A file that merely mentions the tag (a README about JUnit) is not.
fn is_junit_xml(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    let mut rest = text.trim_start_matches('\u{feff}').trim_start();
    loop {
        if let Some(r) = rest.strip_prefix("<?") {
            match r.find("?>") {
                Some(e) => rest = r[e + 2..].trim_start(),
                None => return false,
            }
        } else if let Some(r) = rest.strip_prefix("<!--") {
            match r.find("-->") {
                Some(e) => rest = r[e + 3..].trim_start(),
                None => return false,
            }
        } else {
            break;
        }
    }
    let tag = |name: &str| {
        rest.strip_prefix(name)
            .and_then(|r| r.chars().next())
            .is_some_and(|c| c == '>' || c == '/' || c.is_whitespace())
    };
    tag("<testsuites") || tag("<testsuite")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_resolves_dot_dot_and_links_whether_or_not_paths_exist() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("reports/run");
        assert!(is_within(&out.join("junit.xml"), &out));
        assert!(is_within(&out, &out));
        // beside it, spelled through the report directory
        assert!(!is_within(&out.join("../junit.xml"), &out));
        assert!(!is_within(&d.path().join("reports/run2"), &out));
        #[cfg(unix)]
        {
            std::fs::create_dir_all(d.path().join("real/run")).unwrap();
            std::os::unix::fs::symlink(d.path().join("real"), d.path().join("link")).unwrap();
            assert!(is_within(
                &d.path().join("real/run/j.xml"),
                &d.path().join("link/run")
            ));
        }
    }

    #[test]
    fn probe_finds_a_file_where_a_directory_is_needed() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("notes.txt");
        std::fs::write(&f, "keep me").unwrap();
        let e = probe_writable(&f.join("a/b")).unwrap_err().to_string();
        assert!(
            e.contains("notes.txt") && e.contains("is not a directory"),
            "{e}"
        );
        probe_writable(&d.path().join("new/deeper")).unwrap();
        assert!(!d.path().join("new").exists(), "the probe creates nothing");
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "no stray file"
        );
    }
}
