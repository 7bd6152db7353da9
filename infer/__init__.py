"""`python -m infer.<command>`: evaluate, generate, merge, chat, lm_eval (run from the repository root; not
installed). Each entry module is a few lines; the work is in infer/recipes/<command>.py."""
