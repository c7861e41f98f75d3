"""Test-wide settings: one torch thread (the suite runs many small models; on a shared 2-core machine
extra threads only contend), and no model hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
