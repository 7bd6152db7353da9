"""lm-evaluation-harness on the model herd loads (base, base+adapter, 4-bit or not), data-parallel.

herd loads the model itself (so run_dir=, quant= and merge_adapter= work as everywhere) and hands it to
lm-eval's HFLM. HFLM only shards requests over processes when it loads a model by name on CUDA devices; with
a loaded model, or on CPU, every rank would silently evaluate everything. So herd sets HFLM's rank, world
size and accelerator itself, and records how many requests each rank ran.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf

from herd import rundir
from herd.config.infer import InferJob
from herd.dist import all_gather_objects
from herd.errors import ConfigError
from herd.inference import load_for_inference, output_path, resolve_source, start_processes
from herd.paths import user_file


def counting_lm(base: type) -> type:
    """An HFLM subclass that counts the requests this rank evaluates."""

    class CountingLM(base):
        requests_run = 0

        def loglikelihood(self, requests, *args, **kwargs):
            self.requests_run += len(requests)
            return super().loglikelihood(requests, *args, **kwargs)

        def loglikelihood_rolling(self, requests, *args, **kwargs):
            self.requests_run += len(requests)
            return super().loglikelihood_rolling(requests, *args, **kwargs)

        def generate_until(self, requests, *args, **kwargs):
            self.requests_run += len(requests)
            return super().generate_until(requests, *args, **kwargs)

    return CountingLM


def run(cfg: DictConfig) -> dict | None:
    job: InferJob = OmegaConf.to_object(cfg)
    le = job.lm_eval
    state, device = start_processes(job.device)
    if not le.tasks:
        raise ConfigError("lm_eval.tasks is empty; e.g. lm_eval.tasks=[arc_easy] or a local task's name")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise ConfigError("lm-eval is not installed: pip install -e '.[eval]'") from None
    source = resolve_source(job)
    output = output_path(le.output, "lm_eval.output", "lm_eval", source)
    if not le.include_defaults and not le.include_path:
        raise ConfigError("lm_eval.include_defaults=false leaves no tasks; set lm_eval.include_path=<dir>")
    include_path = None
    if le.include_path:
        include_path = str(user_file(le.include_path, "lm_eval.include_path", directory=True))
    task_manager = TaskManager(include_path=include_path, include_defaults=le.include_defaults)
    unknown = [task for task in le.tasks if not task_manager.match_tasks([task])]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s) {', '.join(unknown)}; see `lm-eval ls tasks`"
                          + (f" or the YAMLs in {include_path}" if include_path else ""))

    model, tokenizer = load_for_inference(source, job, device)
    lm = counting_lm(HFLM)(pretrained=model, tokenizer=tokenizer, batch_size=le.batch_size)
    if state.num_processes > 1:
        lm._rank, lm._world_size = state.process_index, state.num_processes
        lm.accelerator = Accelerator(cpu=device == "cpu")
    results = simple_evaluate(
        model=lm, tasks=list(le.tasks), num_fewshot=le.num_fewshot, limit=le.limit, task_manager=task_manager,
        apply_chat_template=le.apply_chat_template, log_samples=False,
    )
    requests_per_rank = all_gather_objects(lm.requests_run)
    if not state.is_main_process:
        return None
    results["herd"] = {**source.describe(), "world_size": state.num_processes,
                       "requests_per_rank": requests_per_rank, "precision": job.precision.value}
    rundir.write_json(Path(output) / "results.json", json.loads(json.dumps(results, default=str)))
    print(make_table(results), flush=True)
    print(f"lm-eval: {state.num_processes} process(es), requests per rank {requests_per_rank} "
          f"-> {Path(output) / 'results.json'}", flush=True)
    return results
