"""python -m train [model=... data=... peft=... experiment=...] [key=value ...]

Parse (Hydra, schema in herd.config) -> build -> run; the run itself is train.recipe.run(cfg).
"""

from herd.cli import hydra_entry

# Named, not imported: a refused config exits before torch and transformers are even imported.
main = hydra_entry("train", "train.recipe:run", sweep_dir_key="output_dir")

if __name__ == "__main__":
    main()
