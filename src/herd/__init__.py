"""herd: QLoRA fine-tuning of Llama-2-class models; the code that `train/` and `infer/` share.

The module map (each module opens with the one line saying what it owns):
    errors          HerdError and its kinds: what a user can fix, shown as one line
    console         what a process prints: progress bars only on a terminal, the stack's known noise filtered
    config/         typed Hydra schemas: train, infer, cluster (train: the strategy vocabulary too); launch:
                    the user's accelerate and DeepSpeed files read against the strategy; dpo: the preference-tuning knobs
    cli             validate the config, then run the entrypoint under Hydra (sweeps, user config folders too)
    paths           where files are; the one atomic, durable file write
    dist            ranks, the run id, the SLURM job, the CPU launch env, collectives, process-group life
    rundir          the run directory's files; redaction: secrets kept out of every file
    chat_format     the Llama-2 chat format and converters into it
    data            data sets (files, hub, mixes) -> rows -> conversations -> tokenized, cached splits
    preference      preference pairs (method=dpo) -> tokenized, cached splits
    modeling        base model, tokenizer, quantization, LoRA (hub id or local path)
    lm_head         the loss head over labelled positions only
    packing         how packed conversations reach the model
    memory          the pure memory model of a QLoRA run and of a merge, and its CLI (python -m herd.memory)
    inference       what every infer command shares: load, batch, score, generate
    tensor_merge    the low-memory LoRA merge: one weight at a time, sharded safetensors out
    jsonl_parts     crash-safe JSONL output written by several ranks
    slurm           render and submit the sbatch template (python -m herd.slurm)
    training/       training only: plan, strategy, dpo, checkpoints, preemption, manifest, faults, tracking/
    fixtures/       built locally for offline runs and tests: the tiny Llama, the sample data
"""
