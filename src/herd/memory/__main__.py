"""python -m herd.memory [--table | --model M --seq-len N ...]: see herd.memory.cli."""

from herd.memory.cli import main

main()
