"""`python export/build_engine.py`: ONNX files and manifest from a checkpoint, clear failures,
the TensorRT switch, and (marked gpu) a real TensorRT engine where TensorRT and CUDA exist."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelrnn.export import build_engine
from pixelrnn.server.repository import TEMPLATES, served_modules
from pixelrnn.runtime import tensor_names as tn
from pixelrnn.export.cells import build_cell
from pixelrnn.export.onnx_export import export_scorer
from pixelrnn.runtime.onnx_graphs import OnnxCell, OnnxScorer
from pixelrnn.export.tensorrt_engine import float64_tensors, tensorrt_available
from pixelrnn.training.checkpoint import load_model, save_checkpoint
from pixelrnn.training.models import build_model

REPO = Path(__file__).resolve().parent.parent
PIXELCNN = dict(in_channels=1, height=6, width=6, levels=2, hidden=6, layers=1, input_kernel=3)
MULTISCALE = dict(in_channels=1, height=6, width=6, levels=4, num_classes=2, base_arch="gated_pixelcnn", hidden=6, layers=1,
                  small_config=dict(kernel=3), big_config=dict(kernel=3))
TRT_OK, TRT_WHY = tensorrt_available()


def tiny_checkpoint(path: Path, arch: str, config: dict) -> Path:
    torch.manual_seed(0)
    model = build_model(arch, dict(config))
    save_checkpoint(path, {"arch": arch, "config": config, "model": model.state_dict(), "step": 2})
    return path


@pytest.fixture(scope="module")
def pixelcnn_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", "pixelcnn", PIXELCNN)


def run_script(*args):
    return subprocess.run([sys.executable, str(REPO / "export" / "build_engine.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_script_exports_verified_onnx_and_a_manifest(pixelcnn_ckpt, tmp_path):
    out = tmp_path / "out"
    result = run_script("--checkpoint", pixelcnn_ckpt, "--out", out, "--name", "tiny", "--tensorrt", "auto")
    assert result.returncode == 0, result.stderr
    assert "TensorRT skipped" in result.stdout or TRT_OK
    assert "cell.onnx" in result.stdout and "scorer.onnx" in result.stdout  # one progress line each

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "tiny" and manifest["arch"] == "pixelcnn" and manifest["config"] == PIXELCNN
    assert manifest["shape"] == [1, 6, 6] and manifest["levels"] == 2 and manifest["num_classes"] == 0
    assert manifest["stages"] == ["cell"] and manifest["multiscale"] is None
    assert manifest["tensor_names"]["IMAGES"] == tn.IMAGES and manifest["export"]["opset"] == 17
    assert manifest["files"] == ["cell.onnx", "scorer.onnx"] and all((out / f).is_file() for f in manifest["files"])
    assert manifest["tensorrt"]["built"] is TRT_OK
    cell = manifest["artifacts"]["cell"]
    model, _ = load_model(pixelcnn_ckpt)
    assert [s["name"] for s in cell["state"]] == build_cell(model).state_names
    assert cell["state"][0]["input"] == tn.state_in(cell["state"][0]["name"]) and cell["state"][0]["shape"][0] == -1
    assert cell["parity"] == "passed" and cell["parity_tolerance"] == 1e-4 and cell["bytes"] == (out / "cell.onnx").stat().st_size

    # The files run on their own: the runners read everything they need from them.
    assert OnnxCell(out / "cell.onnx").state_names == build_cell(model).state_names
    x = np.random.default_rng(0).integers(0, 2, (3, 1, 6, 6)).astype(np.uint8)
    nll, _ = OnnxScorer(out / "scorer.onnx").score(x)
    with torch.no_grad():
        assert np.abs(nll - model.nll(torch.from_numpy(x).long()).numpy()).max() < 1e-4


def test_multiscale_exports_both_cells_and_the_condition_graph(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ms.pt", "multiscale", MULTISCALE)
    assert build_engine.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--tensorrt", "off"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(manifest["artifacts"]) == {"small_cell", "big_cell", "condition", "scorer"}
    assert manifest["stages"] == ["small_cell", "big_cell"] and manifest["num_classes"] == 2
    assert manifest["multiscale"] == {"factor": 2, "small_shape": [1, 3, 3], "base_arch": "gated_pixelcnn"}
    big = manifest["artifacts"]["big_cell"]
    assert tn.CONDITION in [s["name"] for s in big["inputs"]] and big["height"] == 6
    assert manifest["artifacts"]["small_cell"]["height"] == 3
    assert manifest["tensorrt"] == {"built": False, "reason": "--tensorrt off"}
    assert "TensorRT skipped" not in capsys.readouterr().out


def test_tensorrt_on_fails_clearly_without_tensorrt(pixelcnn_ckpt, tmp_path, capsys):
    if TRT_OK:
        pytest.skip(f"TensorRT is usable here ({TRT_WHY}); the gpu test covers --tensorrt on")
    code = build_engine.main(["--checkpoint", str(pixelcnn_ckpt), "--out", str(tmp_path / "out"), "--tensorrt", "on"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --tensorrt on") and TRT_WHY in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # failed before exporting anything


@pytest.mark.parametrize("damage", ["corrupt", "missing", "truncated"])
def test_bad_checkpoint_gives_exit_2_and_one_line_naming_the_file(pixelcnn_ckpt, tmp_path, capsys, damage):
    bad = tmp_path / "bad.pt"
    if damage == "corrupt":
        data = bytearray(pixelcnn_ckpt.read_bytes())
        data[-10] ^= 0xFF
        bad.write_bytes(bytes(data))
    elif damage == "truncated":
        bad.write_bytes(pixelcnn_ckpt.read_bytes()[:100])
    code = build_engine.main(["--checkpoint", str(bad), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], captured.err
    assert "Traceback" not in captured.err and not (tmp_path / "out").exists()


def test_bad_checkpoint_exit_code_as_a_script(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint at all")
    result = run_script("--checkpoint", bad)
    assert result.returncode == 2 and str(bad) in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_repository_is_self_contained(pixelcnn_ckpt, tmp_path):
    """--repository writes both models with model.py, the pixelrnn modules it imports, the graphs and the
    manifest; no generated text file holds an absolute path (or this machine's folders)."""
    out, repo = tmp_path / "out", tmp_path / "repo"
    assert build_engine.main(["--checkpoint", str(pixelcnn_ckpt), "--out", str(out), "--repository", str(repo), "--tensorrt", "off"]) == 0
    carried = []
    for model, graphs, glue in (("pixelcnn_score", ["scorer.onnx"], "score_model.py"), ("pixelcnn_sample", ["cell.onnx"], "sample_model.py")):
        version = repo / model / "1"
        assert (repo / model / "config.pbtxt").is_file() and (version / "model.py").is_file()
        carried = sorted((version / "pixelrnn").rglob("*.py"))
        assert len(carried) == len(served_modules(TEMPLATES / glue)) and (version / "pixelrnn" / "runtime" / "rowloop.py").is_file()
        assert all((version / g).is_file() for g in graphs) and (version / "manifest.json").is_file()
    texts = [p for p in repo.rglob("*") if p.suffix in (".pbtxt", ".json", ".py")]
    assert len(texts) > len(carried)
    for path in texts:
        text = path.read_text()
        for folder in (str(tmp_path), str(REPO), str(Path.home())):
            assert folder not in text, f"{path} mentions {folder}"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint"]["file"] == pixelcnn_ckpt.name and len(manifest["checkpoint"]["sha256"]) == 64


def test_cells_are_flagged_float64_and_the_scorer_is_not(pixelcnn_ckpt, tmp_path):
    """Why the cells stay on onnxruntime when TensorRT is built: TensorRT has no float64."""
    out = tmp_path / "out"
    assert build_engine.main(["--checkpoint", str(pixelcnn_ckpt), "--out", str(out), "--tensorrt", "off"]) == 0
    assert tn.UNIFORMS in float64_tensors(out / "cell.onnx")
    assert float64_tensors(out / "scorer.onnx") == []


# ---------------------------------------------------------------------------- gpu

@pytest.mark.gpu
def test_tensorrt_engine_matches_onnxruntime(tmp_path):
    if not TRT_OK:
        pytest.skip(f"needs TensorRT and a CUDA GPU: {TRT_WHY}")
    from pixelrnn.export.tensorrt_engine import build_engine as build_trt, check_engine

    torch.manual_seed(0)
    model = build_model("pixelcnn", dict(PIXELCNN)).eval()
    export_scorer(model, tmp_path / "scorer.onnx")
    plan = build_trt(tmp_path / "scorer.onnx", tmp_path / "scorer.plan", max_batch=8)
    assert check_engine(plan, tmp_path / "scorer.onnx", batch=4) < 1e-3


@pytest.mark.gpu
def test_build_engine_tensorrt_on_with_a_gpu(pixelcnn_ckpt, tmp_path):
    if not TRT_OK:
        pytest.skip(f"needs TensorRT and a CUDA GPU: {TRT_WHY}")
    out = tmp_path / "out"
    assert build_engine.main(["--checkpoint", str(pixelcnn_ckpt), "--out", str(out), "--tensorrt", "on", "--max-batch", "8"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensorrt"]["built"] and "scorer" in manifest["tensorrt"]["engines"] and "cell" in manifest["tensorrt"]["skipped"]
    assert (out / "scorer.plan").is_file()
