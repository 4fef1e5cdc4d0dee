"""The GitHub Actions recipe in examples/ci/: its steps come in order, and its xatl commands pass on the example."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import EXAMPLE_CHECKPOINT, REPO_ROOT

WORKFLOW = REPO_ROOT / "examples" / "ci" / "xatl-validate.yml"
# What a user sets at the top of the workflow, here pointed at the shipped example and the built-in mapping.
EXAMPLE_ENV = {"SOURCE": "examples/pythia-tiny", "MAPPING": "mappings/gpt-neox.yaml", "LAYERS": "2"}

Step = dict[str, Any]


@pytest.fixture(scope="module")
def workflow() -> dict[Any, Any]:
    return yaml.safe_load(WORKFLOW.read_text())


@pytest.fixture(scope="module")
def steps(workflow: dict[Any, Any]) -> list[Step]:
    (job,) = workflow["jobs"].values()
    return job["steps"]


def _uses(action: str) -> Callable[[Step], bool]:
    return lambda step: step.get("uses", "").split("@")[0] == action


def _runs(words: str) -> Callable[[Step], bool]:
    return lambda step: words in step.get("run", "")


def _publishes_junit(step: Step) -> bool:
    """A test reporter action reading the JUnit report (any of them: dorny, mikepenz, EnricoMi)."""
    uses = step.get("uses", "")
    return bool(uses) and "upload-artifact" not in uses and "verify.xml" in json.dumps(step.get("with", {}))


# The recipe's steps, in the order they must run: each found by what it uses or runs.
RECIPE = {
    "check out": _uses("actions/checkout"),
    "set up Python": _uses("actions/setup-python"),
    "install xatl": _runs("pip install"),
    "restore the Hugging Face cache": _uses("actions/cache"),
    "validate mappings": _runs("xatl mappings validate"),
    "convert": _runs("xatl convert"),
    "verify": _runs("xatl verify"),
    "upload the reports": _uses("actions/upload-artifact"),
    "test report": _publishes_junit,
}


def test_the_workflow_runs_on_pushes_and_pull_requests_with_its_inputs_at_the_top(workflow: dict[Any, Any]) -> None:
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` key as true
    assert {"push", "pull_request"} <= set(triggers)
    assert set(EXAMPLE_ENV) <= set(workflow["env"])


def test_the_workflow_steps_come_in_order(steps: list[Step]) -> None:
    found = {}
    for name, matches in RECIPE.items():
        indices = [index for index, step in enumerate(steps) if matches(step)]
        assert len(indices) == 1, f"{name}: {len(indices)} steps match"
        found[name] = indices[0]
    assert list(found.values()) == sorted(found.values()), found
    cache = steps[found["restore the Hugging Face cache"]]["with"]
    assert cache["path"] == "~/.cache/huggingface" and "hashFiles('mappings/" in cache["key"]
    assert "pip install torch" in steps[found["install xatl"]]["run"].replace('"', "")  # torch pinned, CPU wheel
    assert "download.pytorch.org/whl/cpu" in steps[found["install xatl"]]["run"]
    verify = steps[found["verify"]]["run"]
    assert '--layers "$LAYERS"' in verify and "--json verify.json" in verify and "--junit verify.xml" in verify
    assert '"$SOURCE"' in steps[found["convert"]]["run"] and '--mapping "$MAPPING"' in steps[found["convert"]]["run"]
    upload = steps[found["upload the reports"]]
    assert upload["if"] == "always()" and set(upload["with"]["path"].split()) == {"verify.json", "verify.xml"}
    assert steps[found["test report"]]["if"] == "always()"


def test_the_workflow_xatl_commands_pass_on_the_shipped_example(steps: list[Step], tmp_path: Path) -> None:
    """Every `run:` that calls xatl, as GitHub runs it (bash -e), in a copy of a user's repository."""
    shutil.copytree(EXAMPLE_CHECKPOINT, tmp_path / "examples" / "pythia-tiny")
    shutil.copytree(REPO_ROOT / "mappings", tmp_path / "mappings")
    environment = {**os.environ, **EXAMPLE_ENV, "HF_HUB_OFFLINE": "1"}
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    commands = [step["run"] for step in steps if "xatl " in step.get("run", "")]
    assert len(commands) == 3  # validate, convert, verify
    for command in commands:
        script = "\n".join(line for line in command.splitlines() if not line.strip().startswith("pip "))
        assert "${{" not in script  # the shell reads the env variables; no expression is left for GitHub to fill
        result = subprocess.run(
            ["bash", "-e", "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, (script, result.stdout[-2000:], result.stderr[-2000:])
    report = json.loads((tmp_path / "verify.json").read_text())
    assert report["xatl_report"] == "verify" and report["passed"] is True
    suite = ElementTree.parse(tmp_path / "verify.xml").getroot().find("testsuite")
    assert suite.get("failures") == "0"
    assert [case.get("name") for case in suite.iter("testcase")] == [check["name"] for check in report["checks"]]
