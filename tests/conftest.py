"""Shared test configuration."""

import os

import torch

# The suite runs with pytest-xdist on 2 cores: one intra-op thread per worker.
torch.set_num_threads(int(os.environ.get("ADABATCH_TEST_THREADS", "1")))
