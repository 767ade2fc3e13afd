"""Model files: the exporter refuses a checkpoint whose config does not fit its weights; the
runner checks every exported graph against the sha256 in manifest.json; a server on a
repository with a damaged model refuses to start and says which model and why, in one line."""
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from pixelrnn.export import build_engine
from pixelrnn.runtime.onnx_graphs import OnnxCell
from pixelrnn.server.launcher import ServerError, TritonServer, find_tritonserver, free_port, load_failures
from pixelrnn.runtime.manifest import ModelFilesError, artifact_path, read_manifest
from pixelrnn.runtime.runner import OnnxRunner, scorer
from pixelrnn.training.checkpoint import save_checkpoint
from pixelrnn.training.models import build_model

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parent.parent
NAME = "tiny"
CONFIG = dict(in_channels=1, height=4, width=4, levels=2, hidden=6, layers=1, input_kernel=3)


def checkpoint(path: Path, config: dict, weights_config: dict | None = None, arch: str = "pixelcnn",
               edit=lambda state: state) -> Path:
    torch.manual_seed(0)
    state = build_model("pixelcnn", dict(weights_config or CONFIG)).state_dict()
    save_checkpoint(path, {"arch": arch, "config": config, "model": edit(dict(state)), "step": 1})
    return path


def flip_weights(path: Path) -> None:
    """Damage the largest weight tensor in place: the graph still parses, the numbers are wrong."""
    raw = bytearray(path.read_bytes())
    weights = max((t.raw_data for t in onnx.load(path).graph.initializer), key=len)
    at = raw.find(weights) + len(weights) // 2
    assert at >= len(weights) // 2 and len(weights) >= 16
    raw[at:at + 4] = bytes(b ^ 0x5A for b in raw[at:at + 4])
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(export folder, repository) of a tiny PixelCNN, written by build_engine."""
    root = tmp_path_factory.mktemp("export")
    ckpt = checkpoint(root / "tiny.pt", CONFIG)
    code = build_engine.main(["--checkpoint", str(ckpt), "--out", str(root / "out"), "--name", NAME, "--tensorrt", "off",
                              "--repository", str(root / "repository")])
    assert code == 0
    return root / "out", root / "repository"


# ---------------------------------------------------------------------------- exporter

MISMATCHES = {
    "wider weights": (dict(CONFIG), dict(weights_config={**CONFIG, "hidden": 8}),
                      "'input_conv.weight' has shape (8, 1, 3, 3) in the file but the config builds (6, 1, 3, 3)"),
    "deeper config": ({**CONFIG, "layers": 2}, {}, "'blocks.1.weight' is missing from the file"),
    "missing key": (dict(CONFIG), dict(edit=lambda s: {k: v for k, v in s.items() if k != "head2.bias"}),
                    "'head2.bias' is missing from the file"),
    "extra key": (dict(CONFIG), dict(edit=lambda s: {**s, "head3.weight": torch.zeros(1)}),
                  "'head3.weight' in the file does not exist in the model"),
    "other arch": ({k: v for k, v in CONFIG.items() if k != "input_kernel"}, dict(arch="gated_pixelcnn"),
                   "config does not match the weights: parameter 'layers.0."),
    "arch field": (dict(CONFIG), dict(arch="row_lstm"), "row_lstm config has no field(s) input_kernel"),
    "no image size": ({k: v for k, v in CONFIG.items() if k != "height"}, {}, "config lacks height"),
    "mistyped field": ({**CONFIG, "hidden": "6"}, {}, "config field 'hidden' is '6' (str), expected int"),
    "impossible field": ({**CONFIG, "hidden": -6}, {}, "config does not build a pixelcnn model"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_exporter_refuses_a_config_that_does_not_fit_the_weights(tmp_path, capsys, case):
    config, kwargs, problem = MISMATCHES[case]
    ckpt = checkpoint(tmp_path / "bad.pt", config, **kwargs)
    assert build_engine.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--tensorrt", "off"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {ckpt}: ") and problem in lines[0], err
    assert not (tmp_path / "out").exists()


def test_exporter_script_exits_2_without_a_traceback(tmp_path):
    ckpt = checkpoint(tmp_path / "bad.pt", CONFIG, weights_config={**CONFIG, "hidden": 8})
    result = subprocess.run([sys.executable, "export/build_engine.py", "--checkpoint", str(ckpt), "--tensorrt", "off",
                             "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "does not match the weights" in result.stderr


def test_exporter_reports_an_unusable_model_name(tmp_path, capsys):
    """A --name Triton cannot use is the user's error: one line, not write_repository's traceback."""
    ckpt = checkpoint(tmp_path / "ok.pt", CONFIG)
    code = build_engine.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--tensorrt", "off",
                              "--name", "my model", "--repository", str(tmp_path / "repo")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: Triton repository") and "'my model'" in err and len(err.strip().splitlines()) == 1


def test_manifest_records_each_artifact_sha256(exported):
    out, _ = exported
    manifest = read_manifest(out)
    recorded = {desc["file"]: desc["sha256"] for desc in manifest["artifacts"].values()}
    assert recorded == {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in ("cell.onnx", "scorer.onnx")}


# ---------------------------------------------------------------------------- runner checks

@pytest.fixture
def copy(exported, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(exported[0], out)
    return out


def test_intact_export_loads(copy):
    manifest = read_manifest(copy)
    assert OnnxRunner.from_manifest(manifest, copy).stages[0].name == "cell" and scorer(manifest, copy) is not None


def test_a_flipped_byte_in_a_graph_is_caught_by_its_checksum(copy):
    """onnxruntime itself opens the damaged file (the weights are just numbers): only the
    checksum stands between it and wrong samples."""
    flip_weights(copy / "cell.onnx")
    OnnxCell(copy / "cell.onnx")  # loads without complaint
    with pytest.raises(ModelFilesError, match=r"cell\.onnx: corrupted or replaced: sha256 [0-9a-f]{16}\.\.\. differs") as e:
        OnnxRunner.from_manifest(read_manifest(copy), copy)
    assert str(copy / "cell.onnx") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("damage, problem", [
    ("truncated graph", "scorer.onnx: corrupted or replaced"),
    ("missing graph", "scorer.onnx: missing (the scorer graph listed in manifest.json)"),
    ("no checksum", "manifest.json: records no sha256 for scorer.onnx"),
    ("unlisted graph", "manifest.json: lists no 'scorer' graph"),
])
def test_scorer_files_are_checked(copy, damage, problem):
    manifest = read_manifest(copy)
    if damage == "truncated graph":
        (copy / "scorer.onnx").write_bytes((copy / "scorer.onnx").read_bytes()[:100])
    elif damage == "missing graph":
        (copy / "scorer.onnx").unlink()
    elif damage == "no checksum":
        del manifest["artifacts"]["scorer"]["sha256"]
    else:
        del manifest["artifacts"]["scorer"]
    with pytest.raises(ModelFilesError, match=problem.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        scorer(manifest, copy)
    assert artifact_path(read_manifest(copy), copy, "cell") == copy / "cell.onnx"  # the other graph is fine


@pytest.mark.parametrize("content, problem", [
    (None, "manifest.json: missing (the export manifest"),
    ("{not json", "manifest.json: not valid JSON (Expecting property name enclosed in double quotes at line 1, column 2)"),
    ('{"format": "something-else/9"}', "manifest.json: format 'something-else/9', expected 'pixelrnn-export/1'"),
    ("[1, 2]", "manifest.json: format 'list', expected"),
])
def test_a_bad_manifest_is_one_line_naming_it(copy, content, problem):
    if content is None:
        (copy / "manifest.json").unlink()
    else:
        (copy / "manifest.json").write_text(content)
    with pytest.raises(ModelFilesError) as e:
        read_manifest(copy)
    assert str(e.value).startswith(f"{copy}/{problem}") and "\n" not in str(e.value), str(e.value)


def test_config_parse_failures_are_read_from_the_log():
    log = ('[libprotobuf ERROR text_format.cc:337] Error parsing text-format inference.ModelConfig: 3:15: Message type '
           '"inference.ModelConfig" has no field named "max_batch_sise".\n'
           'E1123 17:39:04.955444 6844 model_repository_manager.cc:1460] "Poll failed for model directory \'tiny_score\': '
           'failed to read text proto from /r/tiny_score/config.pbtxt"\n'
           'E1123 17:39:04.955444 6844 model_repository_manager.cc:1460] "Poll failed for model directory \'other\': '
           'unexpected platform type \'x\'"\n')
    assert load_failures(log) == [
        'tiny_score: failed to read text proto from /r/tiny_score/config.pbtxt (3:15: Message type "inference.ModelConfig" '
        'has no field named "max_batch_sise".)',
        "other: unexpected platform type 'x'"]


# ---------------------------------------------------------------------------- a real server

def have_server() -> bool:
    try:
        find_tritonserver()
        return True
    except ServerError:
        return False


def broken_repository(exported, tmp_path: Path, damage: str) -> Path:
    repository = tmp_path / "repository"
    shutil.copytree(exported[1], repository)
    if damage == "corrupted onnx":
        flip_weights(repository / f"{NAME}_score" / "1" / "scorer.onnx")
    elif damage == "missing manifest":
        (repository / f"{NAME}_sample" / "1" / "manifest.json").unlink()
    else:
        config = repository / f"{NAME}_score" / "config.pbtxt"
        config.write_text(config.read_text().replace("max_batch_size", "max_batch_sise"))
    return repository


SERVER_CASES = {  # damage -> (the broken model, what its one line must say)
    "corrupted onnx": (f"{NAME}_score", "scorer.onnx: corrupted or replaced: sha256"),
    "missing manifest": (f"{NAME}_sample", "manifest.json: missing"),
    "invalid config": (f"{NAME}_score", 'config.pbtxt (3:15: Message type "inference.ModelConfig" has no field named "max_batch_sise".)'),
}


@pytest.mark.triton
@pytest.mark.skipif(not have_server(), reason="tritonserver not installed (make setup)")
@pytest.mark.parametrize("damage", sorted(SERVER_CASES))
def test_server_refuses_to_start_and_names_the_broken_model(exported, tmp_path, damage):
    model, problem = SERVER_CASES[damage]
    healthy = ({f"{NAME}_score", f"{NAME}_sample"} - {model}).pop()
    server = TritonServer(broken_repository(exported, tmp_path, damage), log_path=tmp_path / "triton.log", startup_timeout=60)
    with pytest.raises(ServerError) as e:
        server.start()
    message = str(e.value)
    assert "\n" not in message and "exited with code 1 during start-up; failed to load: " in message, message
    assert f"{model}: " in message and problem in message and f"{healthy}:" not in message, message
    assert not server.running()


@pytest.mark.triton
@pytest.mark.skipif(not have_server(), reason="tritonserver not installed (make setup)")
def test_server_cli_refuses_a_corrupted_model_in_one_line(exported, tmp_path):
    repository = broken_repository(exported, tmp_path, "corrupted onnx")
    ports = set()
    while len(ports) < 3:
        ports.add(free_port())
    grpc, http, metrics = map(str, ports)
    result = subprocess.run([sys.executable, "-m", "pixelrnn.server", "--repository", str(repository), "--grpc-port", grpc,
                             "--http-port", http, "--metrics-port", metrics, "--log", str(tmp_path / "log")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tritonserver exited with code 1") and f"{NAME}_score: " in lines[0], result.stderr
    assert "tritonserver ready" not in result.stdout
