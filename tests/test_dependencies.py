"""pyproject.toml declares what the code imports, and nothing else; constraints.txt pins every declared package."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The project's own top-level names: its packages, and the benchmark scripts that import each other.
LOCAL = {"herd", "train", "infer", "tests", "benchmarks", "conftest", "wandb_reader",
         *(path.stem for path in (REPO / "benchmarks").glob("*.py"))}
# Declared but never imported by name: loaded by another package at run time.
RUNTIME_ONLY = {"deepspeed"}  # accelerate imports it for strategy=zero2|zero3|zero3_offload


def name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def third_party_imports(*roots: str) -> set[str]:
    """Distributions of every top-level module imported under `roots` that is neither stdlib nor herd's."""
    distributions = packages_distributions()
    found = set()
    for root in roots:
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
                for module in modules:
                    top = module.split(".")[0]
                    if top in sys.stdlib_module_names or top in LOCAL:
                        continue
                    if module.startswith("google.protobuf"):  # a namespace package several distributions share
                        found.add("protobuf")
                        continue
                    assert top in distributions, f"{path}: imports {top}, which no installed package provides"
                    found |= {name(d) for d in distributions[top]}
    return found


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_runtime_dependencies_are_exactly_what_the_code_imports():
    declared = {name(r) for r in project()["dependencies"]}
    imported = third_party_imports("src", "train", "infer")
    optional = {name(r) for extra in project()["optional-dependencies"].values() for r in extra}
    assert imported - declared - optional == set(), "imported but not declared"
    assert declared - imported - RUNTIME_ONLY == set(), "declared but never imported"


def test_tests_and_benchmarks_import_only_declared_packages():
    declared = {name(r) for r in project()["dependencies"]}
    extras = {name(r) for extra in project()["optional-dependencies"].values() for r in extra}
    imported = third_party_imports("tests", "benchmarks")
    assert imported - declared - extras == set()


def test_constraints_pin_every_declared_package():
    pins = {name(line): line for line in (REPO / "constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")}
    assert all("==" in pin for pin in pins.values()), "constraints.txt holds exact pins only"
    wanted = {name(r) for r in project()["dependencies"]}
    wanted |= {name(r) for extra in ("dev", "eval") for r in project()["optional-dependencies"][extra]}
    assert wanted - set(pins) == set(), "declared but not pinned in constraints.txt"
