"""Hydra entrypoints that refuse bad configs with one line instead of a traceback.

Hydra reports a bad override as several lines plus a hint about HYDRA_FULL_ERROR. herd composes the
config once up front with the same overrides, turns any failure into one line naming the key and what is
allowed, and exits 2 before anything loads. Only then does `hydra.main` run the task (so `--cfg job`,
`--multirun` and the rest of Hydra's command line keep working).

The user's own config folders (`--config-dir DIR`, `hydra.searchpath=[...]`) are searched after herd's conf/,
in Hydra's order: the up-front compose and `hydra.main` are given the same search path (`user_search_path`
rewrites both flags into one `hydra.searchpath` of absolute folders), so the check sees what the run will.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from herd.config.checks import first_violation
from herd.config.train import register_train_schema
from herd.dist import close_process_group, ensure_run_id
from herd.errors import ConfigError, HerdError
from herd.paths import REPO_ROOT, describe_os_error, storage_failure

CONF_DIR = REPO_ROOT / "conf"

# Hydra flags that take a value, so that the value is not mistaken for an override.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}
_INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}  # --info [VALUE]


_CONFIG_DIR_FLAGS = ("--config-dir", "-cd")
# Flags that would replace herd's primary config (conf/train.yaml, infer.yaml, slurm.yaml): the up-front check
# would then validate a different config than the one that runs.
_PRIMARY_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn")
SEARCHPATH_KEY = "hydra.searchpath"


def _flag_values(argv: Sequence[str], names: Sequence[str]) -> list[tuple[int, int, str]]:
    """(index, number of argv items, value) of each `--flag VALUE` / `--flag=VALUE` in argv."""
    found = []
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in names and eq:
            found.append((i, 1, value))
        elif arg in names:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value (a folder of configs)")
            found.append((i, 2, argv[i + 1]))
    return found


def _searchpath_arguments(argv: Sequence[str]) -> list[tuple[int, list[str]]]:
    """(index, entries) of each `hydra.searchpath=[...]` override in argv."""
    found = []
    for i, arg in enumerate(argv):
        if arg.lstrip("+").partition("=")[0] != SEARCHPATH_KEY or arg.startswith("~"):
            continue
        try:
            parsed = OverridesParser.create().parse_overrides([arg.lstrip("+")])[0]
        except HydraException as error:
            raise ConfigError(f"{SEARCHPATH_KEY}: {str(error).splitlines()[0]}") from None
        value = None if parsed.is_sweep_override() else parsed.value()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{SEARCHPATH_KEY} must be a list of folders, e.g. {SEARCHPATH_KEY}=[/home/me/my-conf]; "
                              f"got {arg.partition('=')[2]}")
        found.append((i, value))
    return found


def _search_entry(entry: str, where: str) -> str:
    """One search path entry as an absolute file:// folder (or the pkg:// entry), refused in one line when it
    is not there. Plain paths are relative to the working directory, as Hydra reads them; ~ is expanded."""
    scheme, sep, rest = entry.partition("://")
    if not sep:
        scheme, rest = "file", entry
    if scheme == "pkg":
        module = rest.replace("/", ".").strip(".")
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError(f"{where} '{entry}': no importable package '{module}'")
        return entry
    if scheme != "file":
        raise ConfigError(f"{where} '{entry}': only folders (a path or file://) and packages (pkg://) are searched")
    folder = Path(os.path.expanduser(rest)).absolute()
    if not folder.is_dir():
        raise ConfigError(f"{where} '{entry}': no such folder ({folder})")
    return f"file://{folder}"


def user_search_path(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The user's config folders in argv, in the order Hydra searches them after herd's conf/ (`--config-dir`
    first, then the `hydra.searchpath` entries), each checked to exist, as absolute file:// URIs; and argv
    with those flags replaced by one `hydra.searchpath=[...]` holding them, so that `hydra.main` searches
    exactly what the up-front check searched. Refused in one line: a missing folder, --config-path /
    --config-name (herd's primary configs are its own; put yours in a group folder, e.g. experiment/)."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg.partition("=")[0] in _PRIMARY_CONFIG_FLAGS:
            raise ConfigError(f"{arg.partition('=')[0]} would replace herd's primary config; keep your configs in "
                              "group folders (experiment/, model/, data/, ...) of a folder passed with --config-dir")
    dirs = _flag_values(argv, _CONFIG_DIR_FLAGS)
    searchpaths = _searchpath_arguments(argv)
    entries = [_search_entry(value, "--config-dir") for _, _, value in dirs[-1:]]  # argparse: the last one wins
    if searchpaths:  # Hydra reads the first hydra.searchpath override
        entries += [_search_entry(entry, SEARCHPATH_KEY) for entry in searchpaths[0][1]]
    drop = {i + k for i, n, _ in dirs for k in range(n)} | {i for i, _ in searchpaths}
    rest = [arg for i, arg in enumerate(argv) if i not in drop]
    if entries:  # among the other overrides: argparse takes Hydra's overrides as one run of positionals
        rest.insert(_first_override_index(rest), searchpath_override(entries))
    return entries, rest


def _first_override_index(argv: Sequence[str]) -> int:
    skip_next = False
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
        elif arg in _FLAGS_WITH_VALUE or (arg == "--info" and i + 1 < len(argv) and argv[i + 1] in _INFO_VALUES):
            skip_next = True
        elif not arg.startswith("-"):
            return i
    return len(argv)


def searchpath_override(entries: Sequence[str]) -> str:
    """`hydra.searchpath=[...]` for the given entries, each quoted for Hydra's override grammar."""
    quoted = [entry if re.fullmatch(r"[\w/:.+@-]+", entry) else "'" + entry.replace("\\", "\\\\").replace("'", "\\'") + "'"
              for entry in entries]
    return f"{SEARCHPATH_KEY}=[{','.join(quoted)}]"


def _shadowed_file(config_name: str, choices: dict, search_path: Sequence[str]) -> str | None:
    """Hydra searches herd's conf/ first: a user file named like one of herd's (model/tiny.yaml) is never
    read. Where such a file is chosen and differs from herd's, one line naming both."""
    chosen = [f"{config_name}.yaml"] + [f"{group}/{option}.yaml" for group, option in choices.items()
                                        if option and not group.startswith("hydra")]
    for entry in search_path:
        if not entry.startswith("file://"):
            continue
        folder = Path(entry.removeprefix("file://"))
        for relative in chosen:
            mine, herds = folder / relative, CONF_DIR / relative
            if mine.is_file() and herds.is_file() and mine.read_bytes() != herds.read_bytes():
                group = relative.removesuffix(".yaml").rpartition("/")[0]
                fix = (f"rename yours and pass {group}=<new name>" if group
                       else "put your settings in an experiment/ file and pass experiment=<name>")
                return (f"{mine} is never read: herd's {herds.relative_to(REPO_ROOT)} has the same name and Hydra "
                        f"searches herd's conf/ first; {fix}")
    return None


def user_overrides(argv: list[str]) -> list[str]:
    """The key=value / group=option overrides in argv, first value of each sweep, hydra.* left out.
    A sweep without --multirun is refused here, in one line."""
    multirun = "-m" in argv or "--multirun" in argv
    overrides, skip_next = [], False
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
        elif arg in _FLAGS_WITH_VALUE or (arg == "--info" and i + 1 < len(argv) and argv[i + 1] in _INFO_VALUES):
            skip_next = True
        elif not arg.startswith("-") and not arg.lstrip("+~").startswith(("hydra.", "hydra/")):
            overrides.append(arg)
    parsed = OverridesParser.create().parse_overrides(overrides)
    first_values = []
    for override, text in zip(parsed, overrides):
        if override.is_sweep_override():
            if not multirun:
                raise ConfigError(f"'{text}' is a sweep; add --multirun (-m) or quote the value")
            first = next(iter(override.sweep_string_iterator()))
            text = f"{override.get_key_element()}={first}"
        first_values.append(text)
    return first_values


def sweep_dir_override(argv: list[str], key: str) -> list[str]:
    """Under --multirun, `hydra.sweep.dir=<the value of key>` when the user set `key` (train's output_dir):
    the sweep's jobs then run in <that dir>/<job number> instead of conf's default sweep dir. A sweep over
    `key` itself is refused: the jobs would need one directory to share."""
    if "-m" not in argv and "--multirun" not in argv:
        return []
    given = [arg for arg in argv if arg.lstrip("+").partition("=")[0] == key]
    if not given or any(arg.startswith("hydra.sweep.dir=") for arg in argv):
        return []
    if OverridesParser.create().parse_overrides([given[-1]])[0].is_sweep_override():
        raise ConfigError(f"{key} cannot be swept: give one {key}, the sweep directory; each job runs in "
                          f"<{key}>/<job number>")
    return [f"hydra.sweep.dir={given[-1].partition('=')[2]}"]


def _allowed_keys(config_name: str, full_key: str) -> str:
    parent_key = full_key.rpartition(".")[0]
    base = compose(config_name=config_name)
    parent = OmegaConf.select(base, parent_key) if parent_key else base
    if isinstance(parent, DictConfig):
        return "allowed keys: " + ", ".join(str(k) for k in parent)
    node = base._get_node(parent_key) if parent_key and "." not in parent_key else None
    schema = getattr(getattr(node, "_metadata", None), "ref_type", None)  # a group left null (infer's model)
    if dataclasses.is_dataclass(schema):
        return "allowed keys: " + ", ".join(f.name for f in dataclasses.fields(schema))
    return ""


def _config_file(config_path: str, search_path: Sequence[str]) -> str:
    """Where a config of the search path (e.g. experiment/mine) is read from: the first folder holding it."""
    for folder in [str(CONF_DIR), *(e.removeprefix("file://") for e in search_path if e.startswith("file://"))]:
        candidate = Path(folder) / f"{config_path}.yaml"
        if candidate.is_file():
            return str(candidate.relative_to(REPO_ROOT)) if folder == str(CONF_DIR) else str(candidate)
    return config_path


def _yaml_problem(error: BaseException) -> str | None:
    """A YAML syntax error (PyYAML, under OmegaConf.load) as one line: file, line, problem."""
    if not type(error).__module__.startswith("yaml"):
        return None
    mark = getattr(error, "problem_mark", None)
    where = f"{mark.name} line {mark.line + 1}" if mark is not None else "a config file"
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    return f"{where} is not valid YAML: {problem}" + (f" ({context})" if context else "")


def describe_error(config_name: str, error: BaseException, search_path: Sequence[str] = ()) -> str:
    """One line: what is wrong (in which file, when a config file holds it) and what is allowed."""
    if isinstance(error, MissingConfigException) and error.options:
        group, _, missing = (error.missing_cfg_file or "").rpartition("/")
        return f"unknown option '{missing}' for '{group}'; allowed: {', '.join(sorted(error.options))}"
    # Hydra names the file whose merge failed ("In 'experiment/mine': ...") and chains the cause implicitly.
    in_file = re.match(r"In '([^']+)'", str(error))
    where = f" in {_config_file(in_file.group(1), search_path)}" if in_file else ""
    cause: BaseException = error
    while not isinstance(cause, OmegaConfBaseException) and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OmegaConfBaseException):
        message = str(getattr(cause, "msg", cause)).splitlines()[0]
        full_key = getattr(cause, "full_key", "") or ""
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            return f"unknown key '{full_key}'{where}; {_allowed_keys(config_name, full_key)}"
        if isinstance(cause, MissingMandatoryValue):
            return f"'{full_key}' must be set (e.g. {full_key}=...)"
        return f"invalid value for '{full_key}'{where}: {message}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(line for line in lines if "HYDRA_FULL_ERROR" not in line)


def unknown_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys present in `node` that its dataclass schema does not declare (e.g. added with '+key=')."""
    found = []
    if isinstance(node, DictConfig):
        schema = OmegaConf.get_type(node)
        declared = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
        for key in node:
            full_key = f"{prefix}{key}"
            if declared is not None and key not in declared:
                found.append(full_key)
            elif not OmegaConf.is_missing(node, key):
                found += unknown_keys(node._get_node(key), f"{full_key}.")
    return found


def _null_parent(config_name: str, overrides: list[str]) -> str:
    """One line for an override whose parent is null (an optional group left unchosen, as in infer)."""
    base = compose(config_name=config_name)
    for override in overrides:
        key = override.lstrip("+~").partition("=")[0]
        parent = key.partition(".")[0]
        if "." in key and parent in base and base[parent] is None:
            return (f"cannot set '{key}': '{parent}' is not chosen; pick one first "
                    f"(e.g. {parent}=<option> {override})")
    return f"cannot apply overrides {' '.join(overrides)}"


def check_config(config_name: str, overrides: list[str], search_path: Sequence[str] = ()) -> DictConfig:
    """Compose and fully resolve the config; raise ConfigError with a one-line reason. `search_path`: the
    user's config folders (user_search_path), searched after herd's conf/ as Hydra's main will."""
    ensure_run_id()
    GlobalHydra.instance().clear()
    extra = [searchpath_override(search_path)] if search_path else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        try:
            cfg = compose(config_name=config_name, overrides=overrides + extra, return_hydra_config=bool(extra))
            if extra:
                shadowed = _shadowed_file(config_name, dict(cfg.hydra.runtime.choices), search_path)
                if shadowed:
                    raise ConfigError(shadowed)
                cfg = compose(config_name=config_name, overrides=overrides + extra)
            # Resolve everything but Hydra's own ${now:...}/${hydra:...} interpolations now, so a
            # missing mandatory value is refused here rather than deep inside a run.
            OmegaConf.to_container(cfg, resolve=False, throw_on_missing=True)
            extra = unknown_keys(cfg)
            if extra:
                raise ConfigError(f"unknown key '{extra[0]}'; {_allowed_keys(config_name, extra[0])}")
            violation = first_violation(cfg)
            if violation:
                raise ConfigError(violation)
        except ConfigError:
            raise
        except (HydraException, OmegaConfBaseException, ValueError) as error:
            raise ConfigError(describe_error(config_name, error, search_path)) from None
        except AssertionError:  # OmegaConf.update into a null node: `model.path=x` with no model chosen
            raise ConfigError(_null_parent(config_name, overrides)) from None
        except Exception as error:  # a config file that is not YAML at all: PyYAML's error, under OmegaConf
            problem = _yaml_problem(error)
            if problem is None:
                raise
            raise ConfigError(problem) from None
    GlobalHydra.instance().clear()
    return cfg


class _RedactingOmegaConf(OmegaConf):
    """OmegaConf whose save() writes the config through herd.redaction.redact."""

    @staticmethod
    def save(config: Any, f: Any, resolve: bool = False) -> None:
        from herd.redaction import redact

        container = OmegaConf.to_container(config, resolve=resolve) if OmegaConf.is_config(config) else config
        OmegaConf.save(OmegaConf.create(redact(container)), f)


def redact_sweep_config() -> None:
    """Hydra's sweeper saves the sweep's config, the command line's overrides included (e.g. a token typed
    into data.system_prompt), to <sweep dir>/multirun.yaml before the first job: make it save through
    redact, as every file herd writes. (hydra-core is pinned; its BasicSweeper calls OmegaConf.save.)"""
    from hydra._internal.core_plugins import basic_sweeper

    basic_sweeper.OmegaConf = _RedactingOmegaConf


def hydra_entry(
    config_name: str, task_path: str, register: Callable[[], None] = register_train_schema,
    sweep_dir_key: str | None = None,
) -> Callable[[], None]:
    """A `main()` for `python -m <entry>`: validate, then run `task_path` ("module:function") under
    @hydra.main. The task is imported only once the config is known to be good. `register` stores the
    config's schema in Hydra's ConfigStore (train's by default). `sweep_dir_key`: the config key that, when
    given with --multirun, names the sweep directory."""

    def main() -> None:
        register()
        ensure_run_id()
        try:
            search_path, argv = user_search_path(sys.argv[1:])
            sys.argv[1:] = argv  # hydra.main searches exactly what the check searched
            if sweep_dir_key:
                sys.argv += sweep_dir_override(sys.argv[1:], sweep_dir_key)
            check_config(config_name, user_overrides(sys.argv[1:]), search_path)
        except (ConfigError, HydraException) as error:
            print(f"herd: invalid config: {str(error).splitlines()[0]}", file=sys.stderr)
            sys.exit(2)

        def guarded_task(cfg: DictConfig) -> Any:
            module, _, function = task_path.partition(":")
            task: Callable[[DictConfig], Any] = getattr(importlib.import_module(module), function)
            try:
                return task(cfg)
            except ConfigError as error:
                print(f"herd: invalid config: {error}", file=sys.stderr)
                sys.exit(2)
            except HerdError as error:
                print(f"herd: {error}", file=sys.stderr)
                sys.exit(2)
            except OSError as error:  # a full or read-only disk, a permission: the file and the reason
                print(f"herd: {describe_os_error(error)}", file=sys.stderr)
                sys.exit(1)
            except KeyboardInterrupt:
                print("herd: interrupted", file=sys.stderr)
                sys.exit(130)
            except Exception as error:
                failure = storage_failure(error)  # a full disk reported by a library as a plain Exception
                if failure is None:
                    raise
                print(f"herd: {describe_os_error(failure)} ({cfg.get('output_dir') or 'the output'}); free space "
                      "or write elsewhere, then run the same command again to resume", file=sys.stderr)
                sys.exit(1)

        redact_sweep_config()
        hydra.main(version_base=None, config_path=str(CONF_DIR), config_name=config_name)(guarded_task)()
        # Reached only when every job succeeded (Hydra exits on a failure); after the last job of a sweep,
        # whose jobs share the launch's process group.
        close_process_group()

    return main
