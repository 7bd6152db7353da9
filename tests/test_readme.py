"""The README's commands name files and config options that exist (a README pointing at scripts that are
gone is a classic)."""

import re

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_named_files_exist():
    paths = set(re.findall(r"\b((?:src/herd|benchmarks|slurm|scripts|docs|conf|tests|train|infer|data)/[\w./-]+)",
                           README))
    paths = {p.rstrip(".") for p in paths if "<" not in p and "*" not in p}
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert len(paths) > 10 and not missing, missing


def test_named_config_options_exist():
    # Lines about the user's own config folders name options that live there, not in conf/.
    builtin = "\n".join(line for line in README.splitlines()
                        if not any(flag in line for flag in ("--config-dir", "hydra.searchpath")))
    for group, option in re.findall(r"\b(model|data|peft|strategy|tracking|experiment|cluster)=([\w.-]+)", builtin):
        if option.startswith(("<", "local")) or option in ("option", "NAME"):
            continue
        assert (REPO / "conf" / group / f"{option}.yaml").exists(), f"{group}={option}"


def test_opens_with_exactly_the_two_commands():
    first_block = README.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()
