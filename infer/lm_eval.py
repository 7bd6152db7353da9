"""python -m infer.lm_eval run_dir=runs/<run> lm_eval.tasks=[hellaswag] [lm_eval.include_path=dir]

lm-evaluation-harness on base+adapter, data-parallel under `accelerate launch` (needs the eval extra).
"""

from herd.cli import hydra_entry
from herd.infer_config import register_infer_configs

# Named, not imported: a refused config exits before torch and transformers are even imported.
main = hydra_entry("infer", "infer.recipes.lm_eval:run", register=register_infer_configs)

if __name__ == "__main__":
    main()
