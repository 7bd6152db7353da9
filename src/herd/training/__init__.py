"""What only training uses: the job's memory plan, the strategy, checkpoints, preemption, the manifest,
fault hooks and tracking. Shared code (train and infer both) lives one level up, in herd."""
