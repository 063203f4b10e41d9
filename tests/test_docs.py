"""The README and the shipped examples stay true: what they show loads."""

from __future__ import annotations

import re
from pathlib import Path

from ruamel.yaml import YAML

import handlers
from server.definitions.loader import load_paths, load_workflow_text

REPO = Path(__file__).resolve().parent.parent


def test_readme_workflow_example_loads():
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Workflows\n\n```yaml\n(.*?)```", text, re.S).group(1)
    loaded = load_workflow_text(block, "README.md")
    assert {n.kind for n in loaded.compiled.nodes.values()} >= {"task", "wait_for_signal", "parallel", "map", "sleep", "workflow"}


def test_shipped_workflows_validate_against_their_handlers():
    config = YAML(typ="safe").load((REPO / "config" / "baton.yaml").read_text())
    handlers.load_modules(config["handler_modules"])  # what `baton dev` imports
    loaded, problems = load_paths([REPO / "config" / "workflows"], known_handlers=set(handlers.REGISTRY.names()))
    assert problems == []
    assert {w.model.name for w in loaded} >= {"nightly-dev-shutdown", "deploy-with-approval", "order-saga",
                                              "etl-partitions", "incident-response"}
