"""The typed schemas of every herd config, one module per entrypoint: train, infer, cluster (herd.slurm)."""
