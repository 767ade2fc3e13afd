"""The checked-in model_repository/ (the shipped Gated PixelCNN) is exactly what the exporter and the
repository writer produce now, and serves from any clone."""
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelrnn.export import build_engine
from pixelrnn.export.cells import build_cell, sample_cached
from tests.deployment import require, serve
from pixelrnn.training.checkpoint import load_model
from pixelrnn.runtime.datasets import load

REPO = Path(__file__).resolve().parent.parent
REPOSITORY = REPO / "model_repository"
NAME = "gated_pixelcnn_binarized_mnist"
CHECKPOINT = REPO / "checkpoints" / f"{NAME}.pt"


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.slow
def test_checked_in_repository_is_what_the_writer_produces_now(tmp_path):
    # A stale copy would serve old glue, runtime or weights. Regenerate with:
    #   python export/build_engine.py --checkpoint checkpoints/NAME.pt --name NAME --repository model_repository --tensorrt off
    fresh = tmp_path / "repository"
    assert build_engine.main(["--checkpoint", str(CHECKPOINT), "--name", NAME, "--out", str(tmp_path / "export"),
                              "--repository", str(fresh), "--tensorrt", "off"]) == 0
    want, have = files(fresh), files(REPOSITORY)
    assert sorted(have) == sorted(want), "files differ: regenerate model_repository/"
    stale = [name for name in want if have[name] != want[name]]
    assert not stale, f"stale in model_repository/: {stale}"


@pytest.mark.triton
def test_checked_in_repository_serves_the_shipped_checkpoint(tmp_path):
    require("tritonclient.grpc")
    from pixelrnn.client import PixelClient

    model, _ = load_model(CHECKPOINT)
    images = load("binarized-mnist", "valid").images[:4]
    with serve(REPOSITORY, tmp_path / "triton.log") as server, PixelClient(server.grpc_url, model=NAME) as client:
        scores = client.score(images)
        sampled = client.sample_images(2, seed=11)
    with torch.no_grad():
        want = model.nll(torch.from_numpy(images.astype(np.int64))).numpy()
    assert np.allclose(scores.nll_nats, want, rtol=1e-5, atol=1e-3)
    assert np.array_equal(sampled, sample_cached(build_cell(model), 2, seed=11))
