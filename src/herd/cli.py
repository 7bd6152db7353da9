"""Hydra entrypoints that refuse bad configs with one line instead of a traceback.

Hydra reports a bad override as several lines plus a hint about HYDRA_FULL_ERROR. herd composes the
config once up front with the same overrides, turns any failure into one line naming the key and what is
allowed, and exits 2 before anything loads. Only then does `hydra.main` run the task (so `--cfg job`,
`--multirun` and the rest of Hydra's command line keep working).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Callable
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
from herd.paths import REPO_ROOT, describe_os_error

CONF_DIR = REPO_ROOT / "conf"

# Hydra flags that take a value, so that the value is not mistaken for an override.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}


def user_overrides(argv: list[str]) -> list[str]:
    """The key=value / group=option overrides in argv, first value of each sweep, hydra.* left out.
    A sweep without --multirun is refused here, in one line."""
    multirun = "-m" in argv or "--multirun" in argv
    overrides, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in _FLAGS_WITH_VALUE:
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
    return ""


def describe_error(config_name: str, error: BaseException) -> str:
    """One line: what is wrong and what is allowed."""
    if isinstance(error, MissingConfigException) and error.options:
        group, _, missing = (error.missing_cfg_file or "").rpartition("/")
        return f"unknown option '{missing}' for '{group}'; allowed: {', '.join(sorted(error.options))}"
    cause: BaseException = error
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if isinstance(cause, OmegaConfBaseException):
        message = str(getattr(cause, "msg", cause)).splitlines()[0]
        full_key = getattr(cause, "full_key", "") or ""
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            return f"unknown key '{full_key}'; {_allowed_keys(config_name, full_key)}"
        if isinstance(cause, MissingMandatoryValue):
            return f"'{full_key}' must be set (e.g. {full_key}=...)"
        return f"invalid value for '{full_key}': {message}"
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


def check_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose and fully resolve the config; raise ConfigError with a one-line reason."""
    ensure_run_id()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        try:
            cfg = compose(config_name=config_name, overrides=overrides)
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
            raise ConfigError(describe_error(config_name, error)) from None
        except AssertionError:  # OmegaConf.update into a null node: `model.path=x` with no model chosen
            raise ConfigError(_null_parent(config_name, overrides)) from None
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
            if sweep_dir_key:
                sys.argv += sweep_dir_override(sys.argv[1:], sweep_dir_key)
            check_config(config_name, user_overrides(sys.argv[1:]))
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

        redact_sweep_config()
        hydra.main(version_base=None, config_path=str(CONF_DIR), config_name=config_name)(guarded_task)()
        # Reached only when every job succeeded (Hydra exits on a failure); after the last job of a sweep,
        # whose jobs share the launch's process group.
        close_process_group()

    return main
