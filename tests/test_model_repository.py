"""The checked-in model_repository/ (the shipped PixelCNN) is current and serves from any clone."""
import filecmp
from pathlib import Path

import numpy as np
import pytest
import torch

from client import PixelClient
from export.cells import build_cell, sample_cached
from server.launcher import TritonServer
from training.checkpoint import load_model
from training.data import load

REPO = Path(__file__).resolve().parent.parent
REPOSITORY = REPO / "model_repository"
NAME = "pixelcnn_binarized_mnist"
TEMPLATES = {"score": "score_model.py", "sample": "sample_model.py"}


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_checked_in_glue_is_the_current_template(kind):
    # A stale copy would serve old glue: regenerate with export/build_engine.py --repository.
    assert filecmp.cmp(REPOSITORY / f"{NAME}_{kind}" / "1" / "model.py", REPO / "server" / "triton_models" / TEMPLATES[kind], shallow=False)


@pytest.mark.triton
def test_checked_in_repository_serves_the_shipped_checkpoint():
    model, _ = load_model(REPO / "checkpoints" / f"{NAME}.pt")
    images = load("binarized-mnist", "valid").images[:4]
    with TritonServer(REPOSITORY) as server:
        client = PixelClient(server.grpc_url, model=NAME)
        scores = client.score(images)
        sampled = client.sample_images(2, seed=11)
    with torch.no_grad():
        want = model.nll(torch.from_numpy(images.astype(np.int64))).numpy()
    assert np.allclose(scores.nll_nats, want, rtol=1e-5, atol=1e-3)
    assert np.array_equal(sampled, sample_cached(build_cell(model), 2, seed=11))
