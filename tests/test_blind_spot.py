"""The PixelCNN blind spot and its fix by the Gated PixelCNN's two stacks (7x7 grey image)."""
import torch

from pixelrnn.training.causality import check_model
from pixelrnn.training.models import build_model

SPEC = dict(in_channels=1, height=7, width=7, levels=2)
OUT = (0, 3, 3)
ABOVE_RIGHT = (0, 2, 5)  # one row up, two columns right: allowed, but masked 3x3 stacks never reach it


def test_pixelcnn_has_blind_spot():
    torch.manual_seed(0)
    model = build_model("pixelcnn", dict(SPEC, hidden=6, layers=3, input_kernel=3, kernel=3))
    report = check_model(model, 1, 7, 7, 2)
    assert report.ok, report.describe()
    assert bool(report.allowed[OUT + ABOVE_RIGHT])
    assert not report.sees(OUT, ABOVE_RIGHT)
    assert report.sees(OUT, (0, 2, 4))  # the edge of what it does reach


def test_gated_pixelcnn_has_no_blind_spot():
    torch.manual_seed(0)
    model = build_model("gated_pixelcnn", dict(SPEC, hidden=6, layers=3, kernel=3))
    report = check_model(model, 1, 7, 7, 2)
    assert report.ok, report.describe()
    assert report.sees(OUT, ABOVE_RIGHT)
    # Three 3-wide layers reach 3 rows up and 3 columns either way: here every allowed pixel.
    for i in range(7):
        for j in range(7):
            if report.allowed[OUT + (0, i, j)]:
                assert report.sees(OUT, (0, i, j)), (i, j)
