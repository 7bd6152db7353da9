"""What a herd process prints: progress bars only on a terminal, the ML stack's known noise filtered.

herd's own lines (one per logging step, evaluations, decisions, refusals) always print. Everything else is
decided here, once per process, by `quiet_third_party()`, which `train/` and `infer/` call when they are
imported: before torch, transformers or DeepSpeed load (it imports none of them). Each filter acts at the
noise's source, so nothing else is touched:

  - warnings (FutureWarning, DeprecationWarning, PendingDeprecationWarning, UserWarning) raised inside the
    stack's own modules (STACK): deprecations of APIs herd pins, not actionable by a user;
  - the stack's logging below ERROR: transformers, datasets and torch's C++ through TRANSFORMERS_VERBOSITY /
    DATASETS_VERBOSITY / TORCH_CPP_LOG_LEVEL (unless set by the user), DeepSpeed ("Setting accelerator to CPU ..."; its logger
    resets its own level when imported, so a filter on it), bitsandbytes ("Failed to load CPU
    gemm_4bit_forward from kernels-community ... pip install kernels"), accelerate, peft, trl;
  - bare prints: transformers' "[INFO] Running in WANDB offline mode" (imported with WANDB_MODE=offline),
    DeepSpeed's "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" (each time an op
    loads): those modules get a `print` of their own that drops these lines;
  - distutils' INFO records: the gcc command lines DeepSpeed's op builders log when they probe the compiler
    (on its "compilers" logger, or the root logger in older setuptools);
  - off a terminal (a pipe, a SLURM output file): the progress bars of datasets and huggingface_hub
    (transformers' "Loading weights", "Writing model shards"), whose carriage returns pile up into one line.

`HERD_VERBOSE=1` turns every filter off (progress bars still follow the terminal). An environment variable,
not a config key: the noise starts at import, before Hydra composes a config, and under `accelerate launch`
every rank inherits it. Not filtered: what other C/C++ code (NCCL, CUDA, bitsandbytes' library) writes to
the file descriptors itself, and the output of processes herd does not run (the `accelerate launch` parent).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import warnings

VERBOSE_ENV = "HERD_VERBOSE"
# The environment variables quiet_third_party() set itself (not the user): a verbose child process that
# inherited them from a quiet herd process (a test's pytest, a notebook) drops them again.
_SET_BY_HERD_ENV = "HERD_QUIETED_ENV"

STACK = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed",
         "huggingface_hub", "tokenizers", "safetensors", "wandb")
_STACK_MODULES = r"(" + "|".join(STACK) + r")(\..*)?$"
_WARNING_CATEGORIES = (FutureWarning, DeprecationWarning, PendingDeprecationWarning, UserWarning)
# Loggers that keep the level set on them; transformers and datasets set theirs from the variables below.
# "compilers": distutils' compiler (vendored by setuptools) logs each command line at INFO, e.g. DeepSpeed's
# op builders probing for libaio on every zero2/zero3 launch.
_QUIET_LOGGERS = ("bitsandbytes", "accelerate", "peft", "trl", "compilers")
# TORCH_CPP_LOG_LEVEL: torch's C++ (c10) warnings, which C++ writes to stderr itself (e.g. ProcessGroupNCCL's);
# read when torch is imported.
_VERBOSITY_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error", "TORCH_CPP_LOG_LEVEL": "ERROR"}
_NO_BARS_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
# Bare prints, by module: the module gets a `print` that drops these lines (_QuietPrints).
_DS_BUILT = re.compile(r"DeepSpeed \S+ built successfully")  # each time a DeepSpeed op loads, built or cached
_PRINTS = {"transformers.integrations.integration_utils": re.compile(r"\[INFO\] Running in WANDB offline mode"),
           "deepspeed.comm.torch": _DS_BUILT, "deepspeed.comm.ccl": _DS_BUILT}


def verbose() -> bool:
    """HERD_VERBOSE=1 (or true/yes/on): show the stack's warnings and logs as the libraries print them."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def interactive() -> bool:
    """Whether progress bars are drawn: stdout and stderr both a terminal. A pipe or a SLURM output file gets
    herd's plain lines instead (tqdm's carriage returns would pile up into one line there)."""
    return all(stream is not None and stream.isatty() for stream in (sys.stdout, sys.stderr))


class _BelowError(logging.Filter):
    """Drops records below ERROR: for loggers that reset their own level when their library is imported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


class _DistutilsInfo(logging.Filter):
    """Drops the INFO records distutils logs on the root logger (its spawn's command lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "_distutils" not in record.pathname


class _QuietPrints(importlib.abc.MetaPathFinder):
    """Imports the modules of _PRINTS with a module-level `print` that drops their known lines and prints the
    rest: their bare prints (at import or later) have no logger or warning to filter. Nothing is redirected."""

    def find_spec(self, fullname, path, target=None):
        pattern = _PRINTS.get(fullname)
        if pattern is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or not isinstance(spec.loader, importlib.abc.Loader):
            return spec
        execute = spec.loader.exec_module

        def quiet_print(*args, **kwargs):
            if not pattern.fullmatch(" ".join(map(str, args))):
                print(*args, **kwargs)

        def exec_module(module):
            module.__dict__["print"] = quiet_print
            execute(module)

        spec.loader.exec_module = exec_module
        return spec


def quiet_third_party() -> None:
    """Install the filters above in this process (idempotent); with HERD_VERBOSE=1 only the bars rule."""
    if verbose():
        for name in filter(None, os.environ.pop(_SET_BY_HERD_ENV, "").split(",")):
            os.environ.pop(name, None)
    if not interactive():
        _set_default_env(_NO_BARS_ENV)
    if verbose():
        return
    _set_default_env(_VERBOSITY_ENV)
    for category in _WARNING_CATEGORIES:
        warnings.filterwarnings("ignore", category=category, module=_STACK_MODULES)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    deepspeed = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _BelowError) for f in deepspeed.filters):
        deepspeed.addFilter(_BelowError())
    root = logging.getLogger()
    if not any(isinstance(f, _DistutilsInfo) for f in root.filters):
        root.addFilter(_DistutilsInfo())
    if not any(isinstance(f, _QuietPrints) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietPrints())


def _set_default_env(values: dict[str, str]) -> None:
    """Set what the user did not, and remember it (see _SET_BY_HERD_ENV)."""
    ours = set(filter(None, os.environ.get(_SET_BY_HERD_ENV, "").split(",")))
    for name, value in values.items():
        if name not in os.environ:
            os.environ[name] = value
            ours.add(name)
    if ours:
        os.environ[_SET_BY_HERD_ENV] = ",".join(sorted(ours))
