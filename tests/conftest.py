"""Shared test configuration."""

import os

import torch

# Without a GPU, the Triton kernels (the CUDA fused AdaBelief) run on CPU tensors under
# Triton's interpreter, so their logic is tested everywhere. Read when a kernel is defined,
# so it is set before anything imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite runs with pytest-xdist on 2 cores: one intra-op thread per worker.
torch.set_num_threads(int(os.environ.get("ADABATCH_TEST_THREADS", "1")))
