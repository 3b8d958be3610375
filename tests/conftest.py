"""Test-session settings."""

import os

import torch

# Under pytest-xdist every worker is its own process; two workers each running two torch
# threads on two cores oversubscribe the CPU and slow the training tests several-fold.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
