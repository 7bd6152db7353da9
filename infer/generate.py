"""python -m infer.generate run_dir=runs/<run> [generate.prompts=prompts.jsonl] [generate.max_new_tokens=...]

Batch generation in the Llama-2 chat format, sharded over processes, resumable, one JSONL in input order.
"""

from herd.cli import hydra_entry
from herd.config.infer import register_infer_schema

# Named, not imported: a refused config exits before torch and transformers are even imported.
main = hydra_entry("infer", "infer.recipes.generate:run", register=register_infer_schema)

if __name__ == "__main__":
    main()
