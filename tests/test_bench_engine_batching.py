"""bench.engine_batching on a tiny exported model (class-conditional, so labels travel too): the
figures are consistent with the timed paths, the batched images equal each seed's alone, and bad
arguments are refused. No speed is asserted."""
import json

import pytest
import torch

from bench import engine_batching
from pixelrnn.export import build_engine
from pixelrnn.training.checkpoint import save_checkpoint
from pixelrnn.training.models import build_model

CONFIG = dict(in_channels=1, height=6, width=5, levels=4, hidden=6, layers=1, kernel=3, num_classes=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine-batching")
    torch.manual_seed(3)
    save_checkpoint(folder / "tiny.pt", {"arch": "gated_pixelcnn", "config": CONFIG,
                                         "model": build_model("gated_pixelcnn", dict(CONFIG)).state_dict(), "step": 1})
    out = folder / "out"
    assert build_engine.main(["--checkpoint", str(folder / "tiny.pt"), "--out", str(out), "--tensorrt", "off",
                              "--max-batch", "8"]) == 0
    return out


def test_a_short_run_writes_consistent_figures_and_identical_images(model_dir, tmp_path, capsys):
    out = tmp_path / "eb.json"
    assert engine_batching.main(["--model-dir", str(model_dir), "--streams", "4", "--repeats", "2", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    r = d["results"]
    assert d["benchmark"] == "engine_batching" and d["config"]["streams"] == 4 and r["identical"] is True
    t = {k: r["paths"][k]["seconds"] for k in ("one_image", "one_sequence", "sequences", "cell_one_image", "cell_one_sequence")}
    assert all(len(r["paths"][k]["runs"]) == 2 for k in t)
    assert r["bound"] == pytest.approx(4 * t["one_image"] / t["one_sequence"])
    assert r["scaling"] == pytest.approx(4 * t["one_image"] / t["sequences"])
    assert r["share"] == pytest.approx(r["scaling"] / r["bound"])
    assert r["cell_bound"] == pytest.approx(4 * t["cell_one_image"] / t["cell_one_sequence"])
    assert r["per_sequence_row_us"] == pytest.approx(1e6 * (t["sequences"] - t["one_sequence"]) / (4 * CONFIG["height"]))
    assert "identical images: yes" in capsys.readouterr().out


def test_the_batched_images_are_each_seeds_own(model_dir):
    """The check the bench relies on, directly: 3 sequences batched give the images of 3 runs alone,
    and not all the same image (each sequence draws from its own seed)."""
    manifest = engine_batching.read_manifest(model_dir)
    runner = engine_batching.OnnxRunner.from_manifest(manifest, model_dir)
    specs = [engine_batching.SampleSpec(batch=1, seed=s, labels=engine_batching.labels_for(manifest, 1, s)) for s in range(3)]
    shape = tuple(manifest["shape"])
    together = engine_batching.sample_engine(runner, 8, specs, shape)
    alone = [engine_batching.sample_engine(runner, 8, [s], shape)[0] for s in specs]
    assert [a.shape for a in together] == [(1, 1, CONFIG["height"], CONFIG["width"])] * 3
    assert all((a == b).all() for a, b in zip(together, alone))
    assert len({a.tobytes() for a in together}) > 1


@pytest.mark.parametrize("argv", [["--streams", "0"], ["--streams", "9"], ["--repeats", "0"]])
def test_bad_arguments_are_refused(model_dir, argv):
    with pytest.raises(SystemExit):
        engine_batching.main(["--model-dir", str(model_dir), *argv])
