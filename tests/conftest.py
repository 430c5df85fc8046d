"""Under pytest-xdist, each worker takes its share of the cores for torch's intra-op
threads, so that the workers do not oversubscribe the machine."""
import os

import torch

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
