"""One module per infer command, each with `run(cfg)`; imported only after the config is validated."""
