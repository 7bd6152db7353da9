"""`python -m train`: QLoRA supervised fine-tuning (run from the repository root; not installed)."""
