"""`python -m infer.<command>`: evaluate, generate, merge, chat, lm_eval (run from the repository root; not
installed). Each entry module is a few lines; the work is in infer/recipes/<command>.py."""

from herd.console import quiet_third_party

quiet_third_party()  # first, before the ML stack loads: its known noise filtered (HERD_VERBOSE=1 shows it)
