"""python -m infer.merge run_dir=runs/<run> [precision=bf16|fp32] [merge.output=dir]

Merge the LoRA adapter into the unquantized base and save a plain transformers model, after a numeric check.
"""

from herd.cli import hydra_entry
from herd.config.infer import register_infer_schema

# Named, not imported: a refused config exits before torch and transformers are even imported.
main = hydra_entry("infer", "infer.recipes.merge:run", register=register_infer_schema)

if __name__ == "__main__":
    main()
