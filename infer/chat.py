"""python -m infer.chat run_dir=runs/<run> [chat.system_prompt=...] [chat.echo_prompt=true]

Multi-turn chat in the Llama-2 format with streamed answers; /reset, /exit; reads stdin when piped.
"""

from herd.cli import hydra_entry
from herd.config.infer import register_infer_schema

# Named, not imported: a refused config exits before torch and transformers are even imported.
main = hydra_entry("infer", "infer.recipes.chat:run", register=register_infer_schema)

if __name__ == "__main__":
    main()
