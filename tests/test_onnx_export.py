"""Exported ONNX graphs (export/onnx_export.py) run in onnxruntime exactly like the torch cells
and the torch model: teacher-forced logits and log-probabilities, sampled images from the same
seed, batch sizes 1 and 3 on one file, and the scorer's NLL."""
import dataclasses

import numpy as np
import onnx
import pytest
import torch

from pixelrnn.export import onnx_export as ox
from pixelrnn.runtime import tensor_names as tn
from pixelrnn.runtime.onnx_graphs import OnnxCell, OnnxCondition, OnnxScorer
from pixelrnn.export.cells import CELLS, build_cell, sample_cached, teacher_forced_logits
from pixelrnn.export.cells.multiscale import MultiScaleSampler
from pixelrnn.runtime import rowloop
from pixelrnn.runtime.rowloop import SampleSpec
from pixelrnn.runtime.runner import OnnxRunner
from pixelrnn.training.models import ARCHITECTURES, build_model, config_class

H = W = 6
# Tiny cases; every registered architecture gets at least one (see the update below).
CASES = {
    "pixelcnn-grey-bernoulli": ("pixelcnn", dict(hidden=6, layers=2), 1, 2, 0),
    "pixelcnn-rgb-4": ("pixelcnn", dict(hidden=6, layers=1, input_kernel=3), 3, 4, 0),
    "row_lstm-grey-4": ("row_lstm", dict(hidden=6, layers=1), 1, 4, 0),
    "diagonal_bilstm-grey-bernoulli": ("diagonal_bilstm", dict(hidden=6, layers=1), 1, 2, 0),
    "gated-grey-4-labels": ("gated_pixelcnn", dict(hidden=6, layers=2, kernel=3), 1, 4, 3),
    "multiscale-gated-labels": ("multiscale", dict(base_arch="gated_pixelcnn", hidden=6, layers=2, small_config=dict(kernel=3), big_config=dict(kernel=3)), 1, 4, 2),
    "multiscale-pixelcnn-bernoulli": ("multiscale", dict(base_arch="pixelcnn", hidden=6, layers=1, small_config=dict(input_kernel=3), big_config=dict(input_kernel=3)), 1, 2, 0),
    "ensemble-grey-4": ("ensemble", dict(members=[{"arch": "pixelcnn", "config": dict(hidden=6, layers=1, input_kernel=3)},
                                                  {"arch": "row_lstm", "config": dict(hidden=6, layers=1)}]), 1, 4, 0),
    "ensemble-bernoulli-labels": ("ensemble", dict(members=[{"arch": "gated_pixelcnn", "config": dict(hidden=6, layers=2, kernel=3)},
                                                            {"arch": "gated_pixelcnn", "config": dict(hidden=3, layers=1, kernel=5)}]), 1, 2, 3),
}


def tiny_fields(arch):
    known = {f.name for f in dataclasses.fields(config_class(arch))}
    return {k: v for k, v in dict(hidden=6, layers=1).items() if k in known}


# An architecture registered later without a case here still gets tested, with default fields.
CASES.update({f"{arch}-auto": (arch, tiny_fields(arch), 1, 2, 0)
              for arch in sorted(set(ARCHITECTURES) - {a for a, *_ in CASES.values()})})


def make(case):
    arch, fields, channels, levels, classes = CASES[case]
    torch.manual_seed(0)
    cfg = dict(in_channels=channels, height=H, width=W, levels=levels, num_classes=classes, **fields)
    return build_model(arch, cfg).eval()


def labels_for(model, n):
    k = model.config.num_classes
    return np.arange(n) % k if k else None


def torch_labels(labels):
    return None if labels is None else torch.from_numpy(labels)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """case -> (model, {artifact: path}), each exported once."""
    done = {}

    def get(case):
        if case not in done:
            model, out = make(case), tmp_path_factory.mktemp(case)
            paths = {}
            for art in ox.artifacts(model):
                art.export(out / art.file)
                paths[art.name] = out / art.file
            done[case] = (model, paths)
        return done[case]

    return get


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_exports_or_says_it_has_no_cell(arch, exported):
    case = next(c for c, (a, *_) in CASES.items() if a == arch)
    model = make(case)
    if type(model) not in CELLS:
        with pytest.raises(ValueError):
            build_cell(model)
        with pytest.raises(ValueError):
            ox.artifacts(model)
        return
    _, paths = exported(case)
    expected = {"small_cell", "big_cell", "condition", "scorer"} if arch == "multiscale" else {"cell", "scorer"}
    assert set(paths) == expected
    for path in paths.values():
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
        assert proto.opset_import[0].version == ox.OPSET
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["format"] == ox.FORMAT and meta["levels"] == str(model.config.levels)


def has_cell(case):
    """False, after checking that build_cell refuses it, for an architecture without a cell."""
    model = make(case)
    if type(model) in CELLS:
        return True
    with pytest.raises(ValueError):
        build_cell(model)
    return False


def cells_of(case, exported):
    """(torch cells, onnx cells, condition runner) in stage order."""
    model, paths = exported(case)
    cell = build_cell(model)
    if isinstance(cell, MultiScaleSampler):
        return model, [cell.small, cell.big], [OnnxCell(paths["small_cell"]), OnnxCell(paths["big_cell"])], OnnxCondition(paths["condition"])
    return model, [cell], [OnnxCell(paths["cell"])], None


def big_row_inputs(model, condition_map, i):
    return dict(condition=condition_map[:, :, i], fixed=model.grid_mask()[i].numpy())


def onnx_teacher_forced(model, cells, condition, x, labels):
    """Run the exported cells over known images x (n, C, H, W): (last stage's logits (n, C, K, H, W), log p(x))."""
    n = x.shape[0]
    images = [model.subsample(torch.from_numpy(x)).numpy(), x] if condition is not None else [x]
    cond_map = condition(images[0]) if condition is not None else None
    total = np.zeros(n, np.float32)
    for stage, (cell, img) in enumerate(zip(cells, images)):
        state, rows = cell.initial_state(n), []
        u = np.zeros((cell.width, cell.channels, n))
        for i in range(cell.height):
            extra = big_row_inputs(model, cond_map, i) if stage == 1 else {}
            _, logprob, logits, state = cell.run_row(state, u, np.ones(n), img[:, :, i], np.ones(n, bool), labels, **extra)
            rows.append(logits)
            total += logprob
    return np.stack(rows, axis=3), total


def onnx_sample(model, cells, condition, n, seed, labels, temperature=1.0):
    """The exported cells through the row loop (the same loop as sample_cached's torch cells)."""
    runner = OnnxRunner(cells, condition, model.config.factor if condition is not None else 1)
    return rowloop.sample(runner, SampleSpec(batch=n, temperature=temperature, seed=seed, labels=labels))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n", [1, 3])
def test_teacher_forced_rows_match_torch(case, n, exported):
    if not has_cell(case):
        return
    model, torch_cells, cells, condition = cells_of(case, exported)
    x = np.random.default_rng(n).integers(0, model.config.levels, (n, model.config.in_channels, H, W))
    labels = labels_for(model, n)
    logits, logprob = onnx_teacher_forced(model, cells, condition, x, labels)
    want_logits, want_logprob = teacher_forced_logits(build_cell(model), torch.from_numpy(x), torch_labels(labels))
    assert np.abs(logits - want_logits.numpy()).max() < 1e-4
    assert np.abs(logprob - want_logprob.numpy()).max() < 1e-4
    with torch.no_grad():
        nll = model.nll(torch.from_numpy(x), torch_labels(labels)).numpy()
    assert np.abs(-logprob - nll).max() < 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n, temperature", [(1, 0.0), (3, 1.0)])
def test_sampled_images_match_the_torch_cells(case, n, temperature, exported):
    if not has_cell(case):
        return
    model, _, cells, condition = cells_of(case, exported)
    labels = labels_for(model, n)
    got = onnx_sample(model, cells, condition, n, seed=7, labels=labels, temperature=temperature)
    want = sample_cached(build_cell(model), n, seed=7, temperature=temperature, labels=torch_labels(labels))
    assert np.array_equal(got, want)


@pytest.mark.parametrize("case", ["pixelcnn-rgb-4", "gated-grey-4-labels", "multiscale-gated-labels"])
def test_one_row_with_mixed_force_matches_torch_outputs_and_state(case, exported):
    """Every output of the flat forward, state included, through the shared parity check."""
    model, paths = exported(case)
    cell = build_cell(model)
    cells = [cell.small, cell.big] if isinstance(cell, MultiScaleSampler) else [cell]
    names = ["small_cell", "big_cell"] if len(cells) == 2 else ["cell"]
    for torch_cell, name in zip(cells, names):
        assert ox.verify_cell(torch_cell, paths[name], batches=(1, 3, 4)) < 1e-4


@pytest.mark.parametrize("case", ["pixelcnn-grey-bernoulli", "pixelcnn-rgb-4", "gated-grey-4-labels", "multiscale-gated-labels", "multiscale-pixelcnn-bernoulli"])
def test_scorer_matches_model_nll(case, exported):
    model, paths = exported(case)
    scorer = OnnxScorer(paths["scorer"])
    for n in (1, 3):
        x = np.random.default_rng(n).integers(0, model.config.levels, (n, model.config.in_channels, H, W)).astype(np.uint8)
        labels = labels_for(model, n)
        nll, bpd = scorer.score(x, labels)
        with torch.no_grad():
            want = model.nll(torch.from_numpy(x).long(), torch_labels(labels)).numpy()
        assert nll.shape == (n,) and nll.dtype == np.float32
        assert np.abs(nll - want).max() < 1e-4
        assert np.allclose(bpd, want / (model.dims * np.log(2)), rtol=1e-5)
        # The per-pixel map: the model's own, summing to the image NLL (multi-scale: small-model
        # values at the grid pixels, big-model values elsewhere).
        nll2, _, pixel = scorer.score(x, labels, per_pixel=True)
        with torch.no_grad():
            want_pixel = model.pixel_nll(torch.from_numpy(x).long(), torch_labels(labels)).numpy()
        assert pixel.shape == x.shape and pixel.dtype == np.float32 and np.array_equal(nll2, nll)
        assert np.abs(pixel - want_pixel).max() < 1e-4 and (pixel >= 0).all()
        assert np.abs(pixel.reshape(n, -1).sum(1) - want).max() < 1e-4


def test_graph_interface_uses_the_shared_names(exported):
    model, paths = exported("multiscale-gated-labels")
    big = onnx.load(str(paths["big_cell"])).graph
    names = [i.name for i in big.input]
    state = [tn.state_in(n) for n in build_cell(model).big.state_names]
    assert names == state + [tn.UNIFORMS, tn.TEMPERATURE, tn.FORCED, tn.FORCE, tn.CONDITION, tn.FIXED, tn.LABELS]
    assert [o.name for o in big.output][:3] == [tn.ROW, tn.LOGPROB, tn.LOGITS]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in big.input}
    assert dims[tn.UNIFORMS] == [W, 1, "batch"] and dims[tn.FIXED] == [W] and dims[tn.FORCE] == ["batch"]
    scorer = onnx.load(str(paths["scorer"])).graph
    assert [i.name for i in scorer.input] == [tn.IMAGES, tn.LABELS]
    assert [o.name for o in scorer.output] == [tn.NLL_NATS, tn.BITS_PER_DIM, tn.PIXEL_NLL]
    assert scorer.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


def test_runner_requires_labels_and_condition(exported):
    model, paths = exported("multiscale-gated-labels")
    big = OnnxCell(paths["big_cell"])
    assert big.conditioned and big.num_classes == 2 and (big.height, big.width) == (H, W)
    args = (big.initial_state(1), np.zeros((W, 1, 1)), np.ones(1), np.zeros((1, 1, W), np.int64), np.zeros(1, bool))
    with pytest.raises(ValueError, match="condition"):
        big.run_row(*args, labels=np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="labels"):
        big.run_row(*args, condition=np.zeros((1, model.big_model.condition_channels, W), np.float32), fixed=np.zeros(W, bool))
    with pytest.raises(ValueError, match="labels"):
        OnnxScorer(paths["scorer"]).score(np.zeros((1, 1, H, W), np.uint8))


def test_parity_check_catches_a_different_model(exported, tmp_path):
    model, paths = exported("pixelcnn-grey-bernoulli")
    other = make("pixelcnn-grey-bernoulli")
    with torch.no_grad():
        other.head2.bias.add_(0.5)
    with pytest.raises(ox.ParityError, match="LOGITS|ROW|LOGPROB"):
        ox.verify_cell(build_cell(other), paths["cell"])
    with pytest.raises(ox.ParityError, match="NLL_NATS"):
        ox.verify_scorer(other, paths["scorer"])


def test_confident_bernoulli_model_keeps_finite_log_probs_in_onnx(tmp_path):
    # A trained binary model puts logits far from 0; an exported BCE once turned those into
    # log(0) * 0 = NaN. Scale the last layer up so the logits reach hundreds.
    from pixelrnn.export.cells import build_cell
    from pixelrnn.export.onnx_export import export_cell, export_scorer, verify_cell, verify_scorer

    torch.manual_seed(0)
    model = build_model("pixelcnn", dict(in_channels=1, height=5, width=5, levels=2, hidden=6, layers=1)).eval()
    with torch.no_grad():
        model.head2.weight.mul_(300.0)
        model.head2.bias.mul_(300.0)
    cell = build_cell(model)
    export_cell(cell, tmp_path / "cell.onnx")
    export_scorer(model, tmp_path / "scorer.onnx")
    # verify_* raise when outputs differ beyond tolerance; a NaN never passes.
    assert np.isfinite(verify_cell(cell, tmp_path / "cell.onnx"))
    assert np.isfinite(verify_scorer(model, tmp_path / "scorer.onnx"))
