"""The gRPC client (client/) against a real tritonserver (loopback, free ports), one server for
the module: a class-conditional RGB Gated PixelCNN whose config publishes levels / classes /
stage rows as parameters, as server/repository.py writes it (max batch 4, to exercise
chunking), and a grey multi-scale model whose parameters are taken out again, as a repository
written by other means may lack them (the client then leaves value checks to the server)."""
import ast
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.deployment import Tiny, export_models, require, serve, set_metadata

require("tritonclient.grpc")

from pixelrnn.client import ClientError, PixelClient, Row, assemble  # noqa: E402
from pixelrnn.client.cli import main as cli_main, read_inputs  # noqa: E402
from pixelrnn.client.library import ModelInfo, model_info  # noqa: E402
from pixelrnn.export.cells import build_cell, sample_cached  # noqa: E402
from pixelrnn.server.launcher import free_port  # noqa: E402

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent
GATED = dict(in_channels=3, height=5, width=4, levels=4, num_classes=2, hidden=6, layers=1, kernel=3)
MULTISCALE = dict(in_channels=1, height=6, width=4, levels=3, base_arch="gated_pixelcnn", hidden=6, layers=1,
                  small_config=dict(kernel=3), big_config=dict(kernel=3))


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """(server, {name: (model, manifest)})."""
    root = tmp_path_factory.mktemp("client")
    repository = root / "repository"
    exported = export_models(root, [Tiny("gated", "gated_pixelcnn", GATED, max_batch=4),
                                    Tiny("ms", "multiscale", MULTISCALE, max_batch=8)], repository)
    models = {name: (m.model, m.manifest) for name, m in exported.items()}
    published = (repository / "gated_score" / "config.pbtxt").read_text()
    assert all(f'key: "{k}" value: {{ string_value: "{v}" }}' in published for k, v in dict(levels=4, num_classes=2, stage_rows=5).items())
    set_metadata(repository / "ms_score" / "config.pbtxt", None)
    with serve(repository, root / "triton.log") as server:
        yield server, models


@pytest.fixture(scope="module")
def gated(deployed):
    with PixelClient(deployed[0].grpc_url, model="gated") as c:
        yield c


@pytest.fixture(scope="module")
def ms(deployed):
    with PixelClient(deployed[0].grpc_url, model="ms") as c:
        yield c


def expected(model, n, seed, temperature=1.0, labels=None, known=None, known_rows=0):
    labels = None if labels is None else torch.as_tensor(np.broadcast_to(labels, (n,)).copy())
    return sample_cached(build_cell(model), n, seed, temperature, labels, known, known_rows)


def nll(model, images, labels=None):
    with torch.no_grad():
        return model.nll(torch.from_numpy(images).long(), None if labels is None else torch.as_tensor(labels)).numpy()


# ---------------------------------------------------------------------------- without a server

def test_model_info_reads_the_score_config():
    config = {"max_batch_size": 8, "input": [{"name": "IMAGES", "data_type": "TYPE_UINT8", "dims": ["1", "6", "4"]}],
              "parameters": {"levels": {"string_value": "3"}, "stage_rows": {"string_value": "3,6"}}}
    info = model_info("m", config)
    assert (info.shape, info.max_batch, info.conditional, info.levels, info.num_classes, info.rows) == ((1, 6, 4), 8, False, 3, None, 9)
    with pytest.raises(ClientError, match="does not look like a PixelRNN scorer"):
        model_info("m", {"input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": ["4"]}]})


def test_assemble_takes_the_last_stage_in_order():
    small = [Row(i, 0, np.full((2, 1, 2), i, np.uint8), np.zeros(2, np.float32)) for i in range(2)]
    full = [Row(i, 1, np.full((2, 1, 4), i, np.uint8), np.zeros(2, np.float32)) for i in range(4)]
    images = assemble(small + full, (1, 4, 4))
    assert images.shape == (2, 1, 4, 4) and np.array_equal(images[0, 0, :, 0], np.arange(4))
    with pytest.raises(ClientError, match="out of order"):
        assemble(small + full[1:])


def test_a_response_of_several_rows_decodes_into_rows_in_order():
    """What the client reads of one sampler response (runtime/protocol.py): ROW B x C x R x W from
    ROW_INDEX on, ROW_LOGPROB B x R, CALL_BATCH per row; an output not asked for reads None."""
    from tritonclient.grpc import service_pb2

    from pixelrnn.client.stream import decode, split_rows
    from pixelrnn.runtime import protocol as p

    values = {p.STAGE: np.array([1], np.int32), p.ROW_INDEX: np.array([4], np.int32),
              p.ROW: np.arange(2 * 3 * 3 * 4, dtype=np.uint8).reshape(2, 3, 3, 4),
              p.ROW_LOGPROB: -np.arange(6, dtype=np.float32).reshape(2, 3), p.CALL_BATCH: np.array([5, 5, 2], np.int32)}
    response = service_pb2.ModelInferResponse()
    for name, value in values.items():
        out = response.outputs.add(name=name, datatype={np.uint8: "UINT8", np.int32: "INT32", np.float32: "FP32"}[value.dtype.type])
        out.shape.extend(value.shape)
        response.raw_output_contents.append(value.tobytes())
    decoded = decode(response)
    assert all(np.array_equal(decoded[n], v) and decoded[n].dtype == v.dtype for n, v in values.items())
    rows = split_rows(decoded)
    assert [(index, stage, batched) for index, stage, _, _, batched in rows] == [(4, 1, 5), (5, 1, 5), (6, 1, 2)]
    for j, (_, _, pixels, logprob, _) in enumerate(rows):
        np.testing.assert_array_equal(pixels, values[p.ROW][:, :, j])
        np.testing.assert_array_equal(logprob, values[p.ROW_LOGPROB][:, j])
    del decoded[p.CALL_BATCH], decoded[p.ROW_INDEX]
    assert [(index, batched) for index, _, _, _, batched in split_rows(decoded)] == [(None, None)] * 3
    assert split_rows({}) == []  # a final response: no rows


def test_an_unreachable_server_is_one_clear_error():
    port = free_port()
    with pytest.raises(ClientError, match=f"cannot reach the Triton server at 127.0.0.1:{port}") as e:
        PixelClient(f"127.0.0.1:{port}", model="x", timeout=10)
    assert "\n" not in str(e.value)


CLIENT_WITHOUT_TRAINING = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import pixelrnn.client, pixelrnn.client.cli, pixelrnn.client.library
from pixelrnn.runtime import data_flags, datasets, images
args = pixelrnn.client.cli.parse_args(["complete", "--model", "m", "--data", "synthetic", "--data-arg", "count=2", "--out", "x.png"])
assert datasets.load(data_flags.data_spec_from_args(args), args.split).images.shape == (2, 1, 32, 32)
images.save_grid(images.load_images(sys.argv[1], levels=4), 4, sys.argv[2])
training = sorted(m for m in sys.modules if m == "pixelrnn.training" or m.startswith("pixelrnn.training."))
assert not training, training
"""


def test_the_client_imports_nothing_of_training(tmp_path):
    """`pip install '.[client]'` has no torch: the client's image and data files come from runtime/."""
    for path in sorted((REPO / "client").glob("*.py")) + sorted((REPO / "web").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):  # imports inside functions too
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[:2] == ["pixelrnn", "training"]], f"{path.name}:{node.lineno}"
    np.save(tmp_path / "in.npy", np.arange(12, dtype=np.uint8).reshape(1, 3, 4) % 4)
    done = subprocess.run([sys.executable, "-c", CLIENT_WITHOUT_TRAINING, str(tmp_path / "in.npy"), str(tmp_path / "out.png")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out.png").is_file()


class FakeClient:
    """What read_inputs asks of a PixelClient, with no server."""

    def __init__(self, shape, levels):
        self.info = ModelInfo("m", shape, max_batch=4, conditional=False, levels=levels)

    check_images = PixelClient.check_images


@pytest.mark.parametrize("shape", [(1, 5, 4), (3, 5, 4)])
def test_cli_reads_npy_files_in_the_models_shape_and_pngs_in_its_levels(tmp_path, shape):
    c, h, w = shape
    rng = np.random.default_rng(3)
    batch, one = rng.integers(0, 4, (3,) + shape).astype(np.uint8), rng.integers(0, 4, shape).astype(np.uint8)
    np.save(tmp_path / "batch.npy", batch[:, 0] if c == 1 else batch)  # a grey batch may be N x H x W
    np.save(tmp_path / "one.npy", one[0] if c == 1 else one)  # one image: (H, W) or (C, H, W)
    Image.fromarray(np.full((h, w, 3) if c == 3 else (h, w), 255, np.uint8)).save(tmp_path / "white.png")
    files = [str(tmp_path / n) for n in ("batch.npy", "one.npy", "white.png")]
    images, where = read_inputs(files, FakeClient(shape, levels=4))
    np.testing.assert_array_equal(images, np.concatenate([batch, one[None], np.full((1,) + shape, 3, np.uint8)]))
    assert [(f.rsplit("/", 1)[-1], i) for f, i in where] == [("batch.npy", i) for i in range(3)] + [("one.npy", 0), ("white.png", 0)]
    np.save(tmp_path / "high.npy", np.full(shape, 4, np.uint8))
    with pytest.raises(ClientError, match=r"high.npy: values 4..4 are outside \[0, 4\)"):
        read_inputs([str(tmp_path / "high.npy")], FakeClient(shape, levels=4))
    with pytest.raises(ClientError, match="needs the model's levels"):
        read_inputs(files[-1:], FakeClient(shape, levels=None))


# ---------------------------------------------------------------------------- library

@pytest.mark.triton
def test_model_metadata(gated, ms):
    assert (gated.info.shape, gated.info.max_batch, gated.info.conditional) == ((3, 5, 4), 4, True)
    assert (gated.info.levels, gated.info.num_classes, gated.info.rows) == (4, 2, 5)
    assert (ms.info.shape, ms.info.max_batch, ms.info.conditional, ms.info.levels, ms.info.rows) == ((1, 6, 4), 8, False, None, None)


@pytest.mark.triton
def test_sample_streams_rows_and_gives_sample_cached_images(deployed, gated, ms):
    models = deployed[1]
    rows = list(gated.sample(3, seed=123, temperature=0.9, label=[0, 1, 1]))
    assert [(r.stage, r.index) for r in rows] == [(0, i) for i in range(5)]
    assert rows[0].pixels.shape == (3, 3, 4) and rows[0].pixels.dtype == np.uint8
    assert rows[0].logprob.shape == (3,) and np.all(rows[0].logprob <= 0)
    np.testing.assert_array_equal(assemble(rows), expected(models["gated"][0], 3, 123, 0.9, [0, 1, 1]))

    rows = list(ms.sample(2, seed=7))
    assert [(r.stage, r.index) for r in rows] == [(0, i) for i in range(3)] + [(1, i) for i in range(6)]
    full = expected(models["ms"][0], 2, 7)
    np.testing.assert_array_equal(assemble(rows, ms.info.shape), full)
    np.testing.assert_array_equal(assemble(r for r in rows if r.stage == 0), full[:, :, ::2, ::2])


@pytest.mark.triton
def test_more_images_than_the_max_batch_run_as_chunks_with_seeds_seed_plus_k(deployed, gated):
    model = deployed[1]["gated"][0]
    images = gated.sample_images(6, seed=5, label=1)  # max batch 4: chunks of 4 and 2
    np.testing.assert_array_equal(images[:4], expected(model, 4, 5, labels=1))
    np.testing.assert_array_equal(images[4:], expected(model, 2, 6, labels=1))
    cycled = gated.sample_images(3, seed=5)  # no label: classes 0, 1, 0
    np.testing.assert_array_equal(cycled, expected(model, 3, 5, labels=np.array([0, 1, 0])))


@pytest.mark.triton
def test_rows_per_response_changes_the_pacing_not_the_rows(deployed, gated):
    """The two chunks' sequences may be coalesced differently; the client yields their rows
    together, one by one, whatever the responses carried."""
    model = deployed[1]["gated"][0]
    want = np.concatenate([expected(model, 4, 5, labels=1), expected(model, 2, 6, labels=1)])
    for per_response in (None, 1, 2):
        rows = list(gated.sample(6, seed=5, label=1, rows_per_response=per_response))
        assert [(r.stage, r.index) for r in rows] == [(0, i) for i in range(5)]
        assert all(r.pixels.shape == (6, 3, 4) and r.logprob.shape == (6,) for r in rows)
        np.testing.assert_array_equal(assemble(rows), want)


@pytest.mark.triton
def test_complete_keeps_the_known_rows(deployed, gated, ms):
    for client, labels in ((gated, [1, 0]), (ms, None)):
        model, manifest = deployed[1][client.model]
        images = np.random.default_rng(5).integers(0, manifest["levels"], (2, *manifest["shape"])).astype(np.uint8)
        done = client.complete(images, known_rows=3, seed=9, label=labels)
        np.testing.assert_array_equal(done[:, :, :3], images[:, :, :3])
        np.testing.assert_array_equal(done, expected(model, 2, 9, labels=labels, known=images, known_rows=3))


@pytest.mark.triton
def test_score_is_the_models_nll_in_chunks_of_the_max_batch(deployed, gated, ms):
    for client, labels in ((gated, np.array([0, 1, 1, 0, 1, 0])), (ms, None)):
        model, manifest = deployed[1][client.model]
        images = np.random.default_rng(3).integers(0, manifest["levels"], (6, *manifest["shape"])).astype(np.uint8)
        scores = client.score(images, labels)
        want = nll(model, images, labels)
        np.testing.assert_allclose(scores.nll_nats, want, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(scores.bits_per_dim, want / (images[0].size * np.log(2)), rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("call, message", [
    (lambda c: c.score(np.full((2, 3, 5, 4), 4, np.uint8), [0, 1]), r"values must be in \[0, 4\) \(the model's levels\), got 4"),
    (lambda c: c.score(np.zeros((2, 3, 4, 4), np.uint8), [0, 1]), "must be N x 3 x 5 x 4"),
    (lambda c: c.score(np.zeros((2, 3, 5, 4), np.uint8)), "class-conditional: give labels"),
    (lambda c: c.score(np.zeros((2, 3, 5, 4), np.uint8), [0, 2]), r"labels must be in \[0, 2\)"),
    (lambda c: c.sample(1, temperature=-1), "temperature"),
    (lambda c: c.sample(1, temperature=6.0), r"temperature must be 0 \(greedy\) or a finite number in \[1e-06, 5\], got 6.0"),
    (lambda c: c.sample(1, seed=-1), r"seed must be a whole number in \[0, 2\*\*64\), got -1"),
    (lambda c: c.sample(1, rows_per_response=0), r"rows_per_response must be >= 1"),
    (lambda c: c.sample(2, known=np.zeros((2, 3, 1, 4)), known_rows=2), "known images must be"),
    (lambda c: c.complete(np.zeros((1, 3, 5, 4)), 6), r"known_rows must be in \[0, 5\]"),
])
def test_bad_input_is_refused_before_sending(gated, call, message):
    with pytest.raises(ClientError, match=message):
        call(gated)


@pytest.mark.triton
def test_without_published_levels_the_server_errors_come_out_as_client_errors(ms):
    with pytest.raises(ClientError, match=r"ms_score failed: IMAGES values must be in \[0, 3\)"):
        ms.score(np.full((1, 1, 6, 4), 3, np.uint8))
    with pytest.raises(ClientError, match="KNOWN values must be < 3"):
        ms.complete(np.full((1, 1, 6, 4), 3, np.uint8), known_rows=2)
    with pytest.raises(ClientError, match="not class-conditional"):
        ms.sample(1, label=0)


@pytest.mark.triton
def test_a_stream_left_early_is_cancelled_and_the_next_one_works(deployed, ms):
    rows = ms.sample(2, seed=1)
    assert next(rows).index == 0
    rows.close()  # the caller stops reading: the stream is cancelled
    np.testing.assert_array_equal(ms.sample_images(1, seed=3), expected(deployed[1]["ms"][0], 1, 3))


@pytest.mark.triton
def test_an_unknown_model_is_one_clear_error(deployed):
    with pytest.raises(ClientError, match="model 'nope' is not served at"):
        PixelClient(deployed[0].grpc_url, model="nope")


# ---------------------------------------------------------------------------- CLI

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pixelrnn.client", *map(str, args)], capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.triton
def test_cli_sample_writes_the_grid_and_the_librarys_images(deployed, gated, tmp_path):
    url = deployed[0].grpc_url
    result = run_cli("sample", "--url", url, "--model", "gated", "--n", 3, "--seed", 4, "--label", 1, "--out", tmp_path / "g.png",
                     "--npy", tmp_path / "g.npy", "--scale", 1, "--rows-per-response", 1)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["images"] == 3
    with Image.open(tmp_path / "g.png") as img:
        assert img.size == (2 * (4 + 2) + 2, 2 * (5 + 2) + 2) and img.mode == "RGB"  # 2 x 2 grid cells, pad 2
    np.testing.assert_array_equal(np.load(tmp_path / "g.npy"), gated.sample_images(3, seed=4, label=1))


@pytest.mark.triton
def test_cli_complete_from_npy_and_png(deployed, ms, tmp_path, capsys):
    url = deployed[0].grpc_url
    images = np.random.default_rng(8).integers(0, 3, (2, 6, 4)).astype(np.uint8)  # grey batch N x H x W
    np.save(tmp_path / "in.npy", images)
    assert cli_main(["complete", "--url", url, "--model", "ms", "--input", str(tmp_path / "in.npy"), "--n", "2", "--k", "2",
                     "--known-rows", "2", "--seed", "3", "--out", str(tmp_path / "c.png"), "--npy", str(tmp_path / "c.npy"), "--scale", "1"]) == 0
    done = np.load(tmp_path / "c.npy")
    np.testing.assert_array_equal(done, ms.complete(np.repeat(images[:, None], 2, axis=0), 2, seed=3))
    with Image.open(tmp_path / "c.png") as img:
        assert img.size == (4 * (4 + 2) + 2, 2 * (6 + 2) + 2)  # rows: original | occluded | 2 completions
    # PNG input needs the levels, which ms does not publish
    Image.fromarray(np.zeros((6, 4), np.uint8)).save(tmp_path / "in.png")
    capsys.readouterr()
    assert cli_main(["complete", "--url", url, "--model", "ms", "--input", str(tmp_path / "in.png"), "--out", str(tmp_path / "d.png")]) == 2
    assert "needs the model's levels" in capsys.readouterr().err


@pytest.mark.triton
def test_cli_score_prints_json_matching_the_model(deployed, tmp_path, capsys):
    url = deployed[0].grpc_url
    model = deployed[1]["gated"][0]
    batch = np.random.default_rng(2).integers(0, 4, (5, 3, 5, 4)).astype(np.uint8)
    np.save(tmp_path / "batch.npy", batch)
    Image.fromarray(np.full((5, 4, 3), 255, np.uint8)).save(tmp_path / "white.png")  # 255 -> level 3
    assert cli_main(["score", "--url", url, "--model", "gated", "--label", "1", "--json", str(tmp_path / "batch.npy"), str(tmp_path / "white.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["file"].rsplit("/", 1)[-1], r["index"]) for r in out["scores"]] == [("batch.npy", i) for i in range(5)] + [("white.png", 0)]
    want = nll(model, np.concatenate([batch, np.full((1, 3, 5, 4), 3, np.uint8)]), np.ones(6, np.int64))
    np.testing.assert_allclose([r["nll_nats"] for r in out["scores"]], want, rtol=1e-5, atol=1e-4)
    assert cli_main(["score", "--url", url, "--model", "gated", "--label", "1", str(tmp_path / "batch.npy")]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].split() == ["file", "index", "nll_nats", "bits_per_dim"] and len(table) == 7 and table[-1].startswith("mean")


@pytest.mark.triton
@pytest.mark.parametrize("case", ["refused", "unknown model", "bad npy", "wrong shape", "missing file", "server error", "data set",
                                  "no label"])
def test_cli_errors_are_one_line_and_exit_2(deployed, tmp_path, capsys, case):
    url = deployed[0].grpc_url
    (tmp_path / "bad.npy").write_text("not an array")
    np.save(tmp_path / "shape.npy", np.zeros((2, 3, 4, 4), np.uint8))
    np.save(tmp_path / "three.npy", np.full((1, 6, 4), 3, np.uint8))
    argv = {
        "refused": ["sample", "--url", f"127.0.0.1:{free_port()}", "--model", "gated", "--out", str(tmp_path / "x.png")],
        "unknown model": ["score", "--url", url, "--model", "nope", str(tmp_path / "shape.npy")],
        "bad npy": ["score", "--url", url, "--model", "gated", "--label", "0", str(tmp_path / "bad.npy")],
        "wrong shape": ["score", "--url", url, "--model", "gated", "--label", "0", str(tmp_path / "shape.npy")],
        "missing file": ["score", "--url", url, "--model", "gated", "--label", "0", str(tmp_path / "none.npy")],
        "server error": ["score", "--url", url, "--model", "ms", str(tmp_path / "three.npy")],
        "data set": ["complete", "--url", url, "--model", "ms", "--data", "synthetic", "--data-arg", "count=4", "--out", str(tmp_path / "x.png")],
        "no label": ["complete", "--url", url, "--model", "gated", "--input", str(tmp_path / "shape.npy"), "--out", str(tmp_path / "x.png")],
    }[case]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    if case == "refused":  # and the real entry point says the same
        result = run_cli(*argv)
        assert result.returncode == 2 and result.stderr.startswith("error: cannot reach") and result.stderr.count("\n") == 1
