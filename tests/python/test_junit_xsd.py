"""`qgate run --junit` and `qgate sweep --junit` output validates against the JUnit XML schema CI reporters
read (tests/data/junit.xsd), and says what summary.json says."""
from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import xmlschema

from qgate_helpers import FIX, REPO, clean_env, qgate_bin

XSD = REPO / "tests" / "data" / "junit.xsd"


@pytest.fixture(scope="module")
def schema() -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(str(XSD))


def run(args: list, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(qgate_bin()), *map(str, args)], capture_output=True, text=True,
                          env=clean_env(tmp), timeout=600, cwd=tmp)


def check(schema: xmlschema.XMLSchema, xml: Path, summary: dict) -> list:
    """Validate against the XSD (raises with the first violation); return the testcases."""
    schema.validate(str(xml))
    root = ET.parse(xml).getroot()
    assert root.tag == "testsuites"
    cases = root.findall("./testsuite/testcase")
    assert len(cases) == int(root.get("tests")) > 0
    labels = {c["label"] for c in summary["candidates"]}
    assert {c.get("classname") for c in cases} >= labels
    return cases


def test_run_junit_validates_and_carries_the_failures(tmp_path: Path, schema):
    junit = tmp_path / "junit.xml"
    r = run(["run", "--bundle", FIX / "hf/dense-gva-untied.f16.capture.safetensors",
             "--bundle", FIX / "hf/dense-vl-tied.bf16.capture.safetensors",
             "--oracle", FIX / "hf/dense-gva-untied.f32.capture.safetensors",
             "--out", tmp_path / "report", "--junit", junit], tmp_path)
    assert r.returncode == 1, r.stderr
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    cases = check(schema, junit, summary)
    failed = [c for c in summary["candidates"] if c["verdict"]["status"] == "fail"]
    failures = [c for c in cases if c.find("failure") is not None]
    assert len(failures) == len(failed) >= 1
    for f in failed:
        (case,) = [c for c in failures if c.get("classname") == f["label"]]
        el = case.find("failure")
        assert case.get("name") == el.get("type") == f["verdict"]["failed_rule"]
        assert el.get("message") == f["verdict"]["reason"]
        assert f["verdict"]["reason"] in el.text
    assert any(c.find("failure") is None and c.find("skipped") is None for c in cases)


def test_sweep_junit_validates(tmp_path: Path, schema):
    junit = tmp_path / "sweep.xml"
    r = run(["sweep", "--quiet", "--model", FIX / "models/dense-gva-untied", "--plan", FIX / "plans/tiny.plan.safetensors",
             "--oracle", "bf16", "--schemes", "f16,int4lin", "--out", tmp_path / "sweep", "--junit", junit], tmp_path)
    assert r.returncode in (0, 1), r.stderr
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    cases = check(schema, junit, summary)
    (ship,) = [c for c in cases if c.get("classname") == "sweep" and c.get("name") == "ship"]
    assert (ship.find("failure") is None) == (summary["ship"] is not None) == (r.returncode == 0)


def test_the_schema_rejects_what_reporters_cannot_read(tmp_path: Path, schema):
    bad = [
        '<testsuites><testsuite name="s" tests="1" failures="0" errors="0"><testcase classname="c"/></testsuite></testsuites>',
        '<testsuites><testsuite name="s" tests="x" failures="0" errors="0"/></testsuites>',
        '<testsuites><testsuite name="s" tests="1" failures="0" errors="0"><testcase name="n" classname="c">'
        '<failure message="a"/><skipped message="b"/></testcase></testsuite></testsuites>',
    ]
    for doc in bad:
        assert not schema.is_valid(doc), doc
    ok = ('<testsuites><testsuite name="s" tests="1" failures="1" errors="0"><testcase name="n" classname="c">'
          '<failure message="a" type="t">details</failure></testcase></testsuite></testsuites>')
    assert schema.is_valid(ok)
