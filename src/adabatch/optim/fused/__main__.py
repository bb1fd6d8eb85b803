"""``python -m adabatch.optim.fused``: build (or load) the CPU kernel ahead of time."""

from adabatch.optim.fused.cpu import main

main()
