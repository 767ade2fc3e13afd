"""A model repository is a deployable artifact: copied away from the project, a stock
tritonserver whose Python environment holds only numpy<2 and onnxruntime (no torch, no project
install) serves it, with the images and NLLs of the full install in process. And the runtime,
the Triton glue and the client import and sample with torch made unimportable."""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelrnn.client import PixelClient
from pixelrnn.export.cells import build_cell, sample_cached
from pixelrnn.server.runtime_env import make_runtime_env
from tests.deployment import Tiny, export_models, serve

REPO = Path(__file__).resolve().parent.parent
FAMILIES = [  # plain, class-conditional RGB, multi-scale
    Tiny("plain", "pixelcnn", dict(in_channels=1, height=6, width=5, levels=2, hidden=6, layers=1), max_batch=8),
    Tiny("rgb", "gated_pixelcnn", dict(in_channels=3, height=5, width=4, levels=4, num_classes=3, hidden=6, layers=1, kernel=3), max_batch=8),
    Tiny("ms", "multiscale", dict(in_channels=1, height=6, width=4, levels=3, base_arch="gated_pixelcnn", hidden=6, layers=1,
                                  small_config=dict(kernel=3), big_config=dict(kernel=3)), max_batch=8),
]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    build = tmp_path_factory.mktemp("build")
    models = export_models(build, FAMILIES, build / "repository")
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "repository"
    shutil.copytree(build / "repository", elsewhere)
    shutil.rmtree(build / "repository")
    for m in models.values():  # nothing the copy could still reach back to
        shutil.rmtree(m.export_dir)
    venv = make_runtime_env(tmp_path_factory.mktemp("env") / "venv")
    return models, elsewhere, venv


def expected_images(model, n, seed, labels=None):
    return sample_cached(build_cell(model), n, seed, labels=None if labels is None else torch.as_tensor(labels))


@pytest.mark.triton
@pytest.mark.slow
def test_a_copied_repository_serves_from_a_torch_free_environment(deployed, tmp_path):
    models, repository, venv = deployed
    python = str(venv / "bin" / "python")
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    versions = subprocess.run([python, "-c", "import numpy, onnxruntime; print(numpy.__version__)"],
                              capture_output=True, text=True, check=True).stdout
    assert versions.startswith("1.")  # numpy<2: the backend stub predates NumPy 2
    generated = [p for p in repository.rglob("*") if p.suffix in (".pbtxt", ".json")]
    assert generated and not [p for p in generated if str(REPO) in p.read_text() or "/tmp/" in p.read_text()]

    with serve(repository, tmp_path / "triton.log", venv=venv) as server:
        for name, m in models.items():
            cfg = m.model.config
            labels = np.arange(3) % cfg.num_classes if cfg.num_classes else None
            with PixelClient(server.grpc_url, model=name) as client:
                images = client.sample_images(3, seed=7, label=labels)
                np.testing.assert_array_equal(images, expected_images(m.model, 3, 7, labels))
                scores = client.score(images, labels=labels)
            with torch.no_grad():
                want = m.model.nll(torch.from_numpy(images).long(), None if labels is None else torch.as_tensor(labels)).numpy()
            np.testing.assert_allclose(scores.nll_nats, want, rtol=1e-5, atol=1e-3)
    log = (tmp_path / "triton.log").read_text()
    assert "Traceback" not in log
    for name in models:  # the glue ran the modules copied beside it, not a checkout's or an install's
        assert f"pixelrnn from {repository.resolve() / f'{name}_sample' / '1' / 'pixelrnn'}" in log


def unrelated_package(folder: Path, name: str) -> Path:
    """A distribution holding a top-level package `name` that is not ours: what a user's
    environment may already have under a generic name."""
    (folder / name).mkdir(parents=True)
    (folder / name / "__init__.py").write_text(f"WHO = 'unrelated {name}'\n")
    (folder / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "unrelated-{name}"
        version = "1.0"
        [tool.setuptools]
        packages = ["{name}"]
    """))
    return folder


@pytest.mark.triton
@pytest.mark.slow
def test_the_client_install_samples_and_scores_without_torch_beside_unrelated_packages(deployed, tmp_path):
    """`pip install .[client]` into a fresh environment that already holds unrelated packages
    named `client` and `runtime`: no torch, the CLI samples and scores, and the other packages
    still import as themselves (the project installs one package, pixelrnn)."""
    models, repository, _ = deployed
    venv = tmp_path / "client-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=180)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for name in ("client", "runtime"):
        done = subprocess.run(pip + [str(unrelated_package(tmp_path / f"unrelated-{name}", name))],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
    # From a copy of the sources: pip builds in the source tree and would leave build/ in the checkout.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", ".triton", "runs", "build", "__pycache__",
                                                                 "*.egg-info", "model_repository", "checkpoints"))
    done = subprocess.run(pip + [f"{source}[client]"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert subprocess.run([python, "-c", "import torch"], capture_output=True, cwd=tmp_path).returncode != 0
    who = subprocess.run([python, "-c", "import client, runtime; print(client.WHO, '/', runtime.WHO)"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert who.stdout.strip() == "unrelated client / unrelated runtime", who.stderr
    plain = models["plain"].model
    with serve(repository, tmp_path / "triton.log") as server:
        cli = [str(venv / "bin" / "pixelrnn"), "client"]
        sample = subprocess.run(cli + ["sample", "--url", server.grpc_url, "--model", "plain", "--n", "2", "--seed", "3",
                                       "--out", str(tmp_path / "s.png"), "--npy", str(tmp_path / "s.npy")],
                                capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert sample.returncode == 0, sample.stderr
        images = np.load(tmp_path / "s.npy")
        np.testing.assert_array_equal(images, expected_images(plain, 2, 3))
        score = subprocess.run(cli + ["score", "--url", server.grpc_url, "--model", "plain", "--json", str(tmp_path / "s.npy")],
                               capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert score.returncode == 0, score.stderr
    got = [r["nll_nats"] for r in json.loads(score.stdout)["scores"]]
    with torch.no_grad():
        np.testing.assert_allclose(got, plain.nll(torch.from_numpy(images).long()).numpy(), rtol=1e-5, atol=1e-3)
    # A command of the full install says what it needs instead of a traceback.
    train = subprocess.run([str(venv / "bin" / "pixelrnn"), "train", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert train.returncode == 2 and "pixelrnn-serving[full]" in train.stderr and "Traceback" not in train.stderr


TORCH_FREE = textwrap.dedent("""
    import importlib.util, json, sys, types
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    import numpy as np
    pb = types.ModuleType("triton_python_backend_utils")  # only the Triton stub has the real one
    pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START, pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 1, 2
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    sys.modules["triton_python_backend_utils"] = pb
    import pixelrnn.client, pixelrnn.client.cli, pixelrnn.client.library
    from pixelrnn.runtime import protocol, rowloop
    from pixelrnn.server import engine
    from pixelrnn.runtime.manifest import read_manifest
    from pixelrnn.runtime.runner import OnnxRunner
    args = json.loads(sys.argv[1])
    for path in args["glue"]:
        spec = importlib.util.spec_from_file_location("model_" + str(len(sys.modules)), path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    out = {}
    for name, folder in args["exports"].items():
        manifest = read_manifest(folder)
        labels = np.arange(2) % manifest["num_classes"] if manifest["num_classes"] else None
        image = rowloop.sample(OnnxRunner.from_manifest(manifest, folder), rowloop.SampleSpec(batch=2, seed=5, labels=labels))
        out[name] = image.tolist()
    assert "torch" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
    print(json.dumps(out))
""")


def test_runtime_glue_and_client_import_and_sample_without_torch(tmp_path):
    models = export_models(tmp_path, FAMILIES, tmp_path / "repository")
    glue = [str(p) for p in sorted((tmp_path / "repository").glob("*/1/model.py"))]
    assert len(glue) == 2 * len(FAMILIES)
    args = {"glue": glue, "exports": {name: str(m.export_dir) for name, m in models.items()}}
    done = subprocess.run([sys.executable, "-c", TORCH_FREE, json.dumps(args)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    images = json.loads(done.stdout.strip().splitlines()[-1])
    for name, m in models.items():
        k = m.model.config.num_classes
        want = expected_images(m.model, 2, 5, np.arange(2) % k if k else None)
        np.testing.assert_array_equal(np.array(images[name], np.uint8), want)
