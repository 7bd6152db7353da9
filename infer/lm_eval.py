"""python -m infer.lm_eval run_dir=runs/<run> lm_eval.tasks=[hellaswag] [lm_eval.include_path=dir]

lm-evaluation-harness on base+adapter, data-parallel under `accelerate launch` (needs the eval extra).
"""

from herd.cli import hydra_entry
from herd.config.infer import register_infer_schema

# Named, not imported: a refused config exits before torch and transformers are even imported.
main = hydra_entry("infer", "infer.recipes.lm_eval:run", register=register_infer_schema)

if __name__ == "__main__":
    main()
