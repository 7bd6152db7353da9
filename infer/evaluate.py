"""python -m infer.evaluate run_dir=runs/<run> [evaluate.split=eval|train|all] [data=<option>]

Eval loss and perplexity of base or base+adapter, exact over every sample, sharded over processes
(also under `accelerate launch`).
"""

from herd.cli import hydra_entry
from herd.config.infer import register_infer_schema

# Named, not imported: a refused config exits before torch and transformers are even imported.
main = hydra_entry("infer", "infer.recipes.evaluate:run", register=register_infer_schema)

if __name__ == "__main__":
    main()
