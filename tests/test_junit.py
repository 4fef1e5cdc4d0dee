"""`xatl verify --junit`: one JUnit testcase per check for CI test reporters; replaced only when xatl wrote it."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.bad_input import CHECK_FAILED, error_line, invoke, tree_digest
from tests.conftest import EXAMPLE_CHECKPOINT, VERIFY_CHECK_NAMES
from xatl_convert import __version__
from xatl_convert.conversion import convert
from xatl_convert.verify import CheckResult, VerifyReport
from xatl_convert.write_guard import is_xatl_report, write_report_file

DAMAGED_TENSOR = "model.layers.1.mlp.fc1.weight"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped example converted to Mamba, as `xatl convert examples/pythia-tiny --to mamba` makes it."""
    out = tmp_path_factory.mktemp("junit") / "converted"
    convert(EXAMPLE_CHECKPOINT, out, to="mamba")
    return out


@pytest.fixture(scope="module")
def damaged(converted: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the conversion with one transferred tensor changed, so that 'transfers exact' fails."""
    out = tmp_path_factory.mktemp("junit-damaged") / "converted"
    shutil.copytree(converted, out)
    state = load_file(out / "model.safetensors")
    state[DAMAGED_TENSOR] = state[DAMAGED_TENSOR].clone()
    state[DAMAGED_TENSOR].view(-1)[0] = 0.123
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _suite(path: Path) -> ElementTree.Element:
    root = ElementTree.parse(path).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    return suite


def _status(case: ElementTree.Element) -> str:
    """A testcase's verdict as the JSON report spells it."""
    if case.find("failure") is not None:
        return "fail"
    return "skip" if case.find("skipped") is not None else "pass"


def test_junit_report_has_one_testcase_per_check_agreeing_with_the_json_report(converted: Path, tmp_path: Path) -> None:
    json_path, junit_path = tmp_path / "verify.json", tmp_path / "verify.xml"
    result = invoke("verify", converted, "--layers", "2", "--json", json_path, "--junit", junit_path)
    assert result.exit_code == 0, result.output
    checks = json.loads(json_path.read_text())["checks"]
    suite = _suite(junit_path)
    cases = suite.findall("testcase")
    assert [case.get("name") for case in cases] == [check["name"] for check in checks]
    assert set(VERIFY_CHECK_NAMES) <= {check["name"] for check in checks}  # CUDA adds the kernels' own checks
    assert [_status(case) for case in cases] == [check["status"] for check in checks]
    assert {case.get("classname") for case in cases} == {"xatl.verify"}
    skipped = [check for check in checks if check["status"] == "skip"]
    assert len(skipped) == 2  # --layers 2 skips the two whole-model checks, and says why
    for check in skipped:
        case = next(case for case in cases if case.get("name") == check["name"])
        assert case.find("skipped").get("message") == check["value"]
    assert suite.get("name") == f"xatl verify {converted}"
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == (str(len(checks)), "0", "2")
    assert float(suite.get("time")) > 0
    properties = {element.get("name"): element.get("value") for element in suite.iter("property")}
    assert properties["xatl_report"] == "verify" and properties["xatl_convert_version"] == __version__


@pytest.fixture(scope="module")
def failed_junit(damaged: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The JUnit report of verify on the damaged copy (which exits 1)."""
    junit_path = tmp_path_factory.mktemp("junit-failed") / "verify.xml"
    assert invoke("verify", damaged, "--layers", "1", "--junit", junit_path).exit_code == CHECK_FAILED
    return junit_path


def test_a_failed_check_is_a_junit_failure_carrying_the_measured_value_and_the_bound(failed_junit: Path) -> None:
    suite = _suite(failed_junit)
    assert suite.get("failures") == "1"
    failures = {case.get("name"): case.find("failure") for case in suite.iter("testcase") if _status(case) == "fail"}
    assert list(failures) == ["transfers exact"]
    failure = failures["transfers exact"]
    assert failure.get("message") == "transfers exact: measured 43/44 equal; bound bit-for-bit"
    assert json.loads(failure.text)["mismatched"] == [DAMAGED_TENSOR]  # the details say which tensor


def test_a_rerun_replaces_its_own_junit_report(converted: Path, failed_junit: Path, tmp_path: Path) -> None:
    junit_path = tmp_path / "verify.xml"
    shutil.copy(failed_junit, junit_path)
    assert is_xatl_report(junit_path)
    result = invoke("verify", converted, "--layers", "1", "--junit", junit_path)
    assert result.exit_code == 0, result.output
    assert _suite(junit_path).get("failures") == "0"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["verify.xml"]  # no temporary file left beside it


FOREIGN_FILES = {
    "another tool's JUnit report": '<?xml version="1.0" encoding="utf-8"?>\n<testsuites><testsuite name="pytest" '
    'tests="1"><testcase classname="tests.test_app" name="test_it"/></testsuite></testsuites>\n',
    "an XML file that only names an entity": '<?xml version="1.0"?>\n<!DOCTYPE testsuites [<!ENTITY v "verify">]>\n'
    '<testsuites><testsuite><properties><property name="xatl_report" value="&v;"/></properties></testsuite>'
    "</testsuites>\n",
    "a text file": "the user's notes\n",
}


@pytest.mark.parametrize("content", FOREIGN_FILES.values(), ids=FOREIGN_FILES.keys())
def test_a_file_xatl_did_not_write_at_the_junit_path_is_refused_and_left_as_it_is(
    converted: Path, tmp_path: Path, content: str
) -> None:
    junit_path = tmp_path / "results.xml"
    junit_path.write_text(content)
    before = tree_digest(tmp_path)
    line = error_line(invoke("verify", converted, "--junit", junit_path))
    assert line == (
        f"error: --junit {junit_path}: exists and is not a report xatl wrote; xatl replaces only its own reports; "
        "choose another --junit"
    )
    assert tree_digest(tmp_path) == before


def test_the_json_and_junit_reports_cannot_share_a_path(converted: Path, tmp_path: Path) -> None:
    line = error_line(invoke("verify", converted, "--json", tmp_path / "r", "--junit", tmp_path / "r"))
    assert "--junit" in line and "--json" in line
    assert not (tmp_path / "r").exists()


def test_junit_xml_holds_any_output_path_and_check_text(tmp_path: Path) -> None:
    """Characters that XML 1.0 cannot hold (a control character in a path) are replaced, never a broken file."""
    odd = "out\x01<&>\"'"
    check = CheckResult("transfers exact", "fail", "1/2 equal \x1b", "bit-for-bit", {"mismatched": [odd]})
    report = VerifyReport(output=odd, source=None, checks=[check])
    write_report_file(tmp_path / "verify.xml", report.to_junit(1.5), "--junit")
    suite = _suite(tmp_path / "verify.xml")
    assert suite.get("name") == "xatl verify out\ufffd<&>\"'" and suite.get("time") == "1.500"
    assert (
        suite.find("testcase/failure").get("message") == "transfers exact: measured 1/2 equal \ufffd; bound bit-for-bit"
    )
    assert is_xatl_report(tmp_path / "verify.xml")
