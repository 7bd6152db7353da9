"""`python -m train`: QLoRA supervised fine-tuning (run from the repository root; not installed)."""

from herd.console import quiet_third_party

quiet_third_party()  # first, before the ML stack loads: its known noise filtered (HERD_VERBOSE=1 shows it)
