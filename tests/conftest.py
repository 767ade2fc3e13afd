import os
import random
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Two cores: more intra-op threads than that only adds contention between test processes.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def seeded_draws(request):
    """Every test starts from the same random state, whatever ran before it and in which
    order: a test that passes only for some weight draws fails every time, not once in a while.
    The seed derives from the test's id, so tests do not all share one draw."""
    seed = zlib.crc32(request.node.nodeid.encode()) % 2**31
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield


@pytest.fixture
def repo_root() -> Path:
    return REPO
