"""The CI/CD example (deploy/github-actions/infercore.yml): valid GitHub Actions syntax (the
workflow schema check-jsonschema vendors), a job graph that runs tests and model validation
before the image, staging before the canary and a gated promotion, and every
``infercore deploy k8s`` command in it accepted by the real CLI parser."""

from __future__ import annotations

import json
import re
import shlex
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from infercore.cli import _parser

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "deploy/github-actions/infercore.yml"


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    doc = yaml.safe_load(WORKFLOW.read_text())
    # YAML 1.1 reads the key `on` as True; GitHub reads it as "on".
    if True in doc:
        doc["on"] = doc.pop(True)
    return doc


def test_workflow_validates_against_the_github_workflow_schema(workflow: dict[str, Any]) -> None:
    schema = json.loads(
        (
            resources.files("check_jsonschema.builtin_schemas.vendor") / "github-workflows.json"
        ).read_text()
    )
    jsonschema.Draft7Validator(schema).validate(workflow)
    bad = {**workflow, "jobs": {"x": {"runs-on": "ubuntu-latest", "steps": [{"uses": 3}]}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(bad)


def test_job_graph(workflow: dict[str, Any]) -> None:
    jobs = workflow["jobs"]
    for name, job in jobs.items():
        needs = job.get("needs", [])
        for dep in [needs] if isinstance(needs, str) else needs:
            assert dep in jobs, f"{name} needs unknown job {dep}"
        assert job.get("timeout-minutes"), f"{name} has no timeout"
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), step

    def ancestors(job: str) -> set[str]:
        found: set[str] = set()
        for dep in jobs[job].get("needs", []):
            found |= {dep, *ancestors(dep)}
        return found

    assert {"test", "validate-models"} <= ancestors("image")
    assert {"image", "manifests", "staging"} <= ancestors("canary")
    assert "canary" in ancestors("promote")
    assert jobs["promote"]["environment"] == "production"  # required reviewers: the approval
    assert jobs["image"]["if"] == "github.event_name != 'pull_request'"
    assert jobs["image"]["permissions"]["packages"] == "write"
    assert workflow["permissions"] == {"contents": "read"}  # least privilege by default


def _commands(workflow: dict[str, Any]) -> list[list[str]]:
    """Every `uv run infercore …` command of the workflow, as argv (shell continuations joined)."""
    found = []
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            script = step.get("run", "").replace("\\\n", " ")
            for line in script.splitlines():
                if "uv run infercore" in line:
                    argv = shlex.split(line.split("uv run infercore", 1)[1])
                    found.append([a for a in argv if a not in ("&&",)])
    return found


def test_every_infercore_command_parses(workflow: dict[str, Any]) -> None:
    commands = _commands(workflow)
    assert any(c[:2] == ["deploy", "k8s"] for c in commands)
    assert any(c[:2] == ["config", "validate"] for c in commands)
    parser = _parser()
    for argv in commands:
        args, extra = parser.parse_known_args(argv)
        assert not [e for e in extra if e.startswith("-")], argv
        if args.command == "deploy":
            assert args.out and "--image" in argv
    canary = [c for c in commands if "--track" in c]
    assert canary and all(c[c.index("--track") + 1] == "canary" for c in canary)


def test_workflow_is_documented() -> None:
    doc = (REPO / "docs/deploy.md").read_text()
    assert "deploy/github-actions/infercore.yml" in doc
    for secret in set(re.findall(r"secrets\.([A-Z_]+)", WORKFLOW.read_text())) - {"GITHUB_TOKEN"}:
        assert secret in doc, f"docs/deploy.md does not mention the secret {secret}"
