"""The reference training program: data, models, the loop, checkpoints, logging, CLI."""
