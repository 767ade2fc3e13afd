"""Training CLI: outputs, exact resume, torchrun/DDP, and the evaluation CLI."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pixelrnn.training import distributions, evaluate, train
from pixelrnn.training.checkpoint import load_checkpoint, load_model
from pixelrnn.training.train import perturb_batch
from pixelrnn.runtime.datasets import DataSpec, ImageSet, load

REPO = Path(__file__).resolve().parent.parent
STEPS = 8
# 64 binary 8x8 images, 16 per batch (4 steps per epoch), a 6-feature one-block PixelCNN.
TINY = ["--arch", "pixelcnn", "--data", "synthetic", "--data-arg", "size=8", "--data-arg", "count=64", "--bits", "1",
        "--hidden", "6", "--layers", "1", "--model-arg", "input_kernel=3", "--batch-size", "16",
        "--valid-every", "3", "--checkpoint-every", "2", "--log-every", "2", "--valid-images", "32", "--seed", "3", "--threads", "1"]


def run_main(out, *extra, steps=STEPS):
    return train.main(TINY + ["--out", str(out), "--steps", str(steps), *extra])


def weights(path):
    return load_checkpoint(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert run_main(out) == 0
    return out


def test_outputs(full_run):
    ckpt = load_checkpoint(full_run / "last.pt")
    assert ckpt["step"] == STEPS and ckpt["epoch"] == STEPS / 4
    assert ckpt["data"]["name"] == "synthetic" and ckpt["config"]["hidden"] == 6 and ckpt["config"]["levels"] == 2
    assert ckpt["train_args"]["lr"] == 1e-3 and "torch" in ckpt["rng"]
    assert {"nll_nats", "bits_per_dim", "best_nll_nats", "train_nll_nats"} <= set(ckpt["metrics"])
    assert [h["step"] for h in ckpt["history"] if "valid_nll_nats" in h] == [3, 6, 8]
    assert [h["step"] for h in ckpt["history"] if "train_nll_nats" in h] == [2, 4, 6, 8]
    best = load_checkpoint(full_run / "best.pt")
    assert best["metrics"]["nll_nats"] == ckpt["metrics"]["best_nll_nats"]
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert metrics["step"] == STEPS and metrics["finished"] and metrics["nll_nats"] == ckpt["metrics"]["nll_nats"]
    assert metrics["bits_per_dim"] == pytest.approx(metrics["nll_nats"] / (64 * np.log(2)))
    with Image.open(full_run / "loss_curve.png") as img:
        assert img.format == "PNG" and img.size[0] > 100
    model, _ = load_model(full_run / "last.pt")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert sorted(p.name for p in full_run.iterdir()) == ["best.pt", "history.json", "last.pt", "loss_curve.png", "metrics.json"]
    record = json.loads((full_run / "history.json").read_text())  # the run without its weights
    assert record["history"] == ckpt["history"] and record["step"] == STEPS and record["perturb"] == 0.0
    assert record["params"] == sum(p.numel() for p in model.parameters()) and record["config"] == ckpt["config"]


def test_perturbed_training_draws_the_same_noise_on_resume():
    """--perturb: each sub-pixel replaced with probability mu (binary: flipped), drawn from
    (seed, step) alone, so a resumed run trains on the same perturbed batches."""
    x = torch.randint(0, 2, (256, 1, 8, 8))
    flipped = perturb_batch(x, 0.1, 2, step=5, seed=0)
    assert torch.equal(flipped, perturb_batch(x, 0.1, 2, step=5, seed=0))
    assert not torch.equal(flipped, perturb_batch(x, 0.1, 2, step=6, seed=0))
    changed = (flipped != x).float().mean().item()
    assert 0.08 < changed < 0.12 and torch.equal(flipped[flipped != x], 1 - x[flipped != x])
    grey = torch.randint(0, 256, (256, 1, 8, 8))
    noisy = perturb_batch(grey, 0.2, 256, step=1, seed=3)
    # a uniform draw lands on the old value 1 in 256 times: about 0.2 * 255/256 change
    assert 0.18 < (noisy != grey).float().mean().item() < 0.22 and int(noisy.max()) < 256
    assert torch.equal(perturb_batch(grey, 0.0, 256, step=1, seed=3), grey)


def test_perturb_must_be_a_probability(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_main(tmp_path, "--perturb", "1.5", steps=1)
    assert "--perturb must be in [0, 1)" in capsys.readouterr().err


def test_learning_happens(tmp_path):
    """Enough steps on the synthetic bars for the valid NLL to drop clearly below its start."""
    assert run_main(tmp_path, "--lr", "0.01", steps=40) == 0
    valid = [h["valid_nll_nats"] for h in load_checkpoint(tmp_path / "last.pt")["history"] if "valid_nll_nats" in h]
    assert valid[-1] < valid[0] - 3


def test_resume_after_stop_equals_uninterrupted(full_run, tmp_path):
    assert run_main(tmp_path, "--stop-at", "5") == 0
    stopped = load_checkpoint(tmp_path / "last.pt")
    assert stopped["step"] == 5
    assert not json.loads((tmp_path / "metrics.json").read_text())["finished"]
    assert run_main(tmp_path, "--resume") == 0
    resumed = load_checkpoint(tmp_path / "last.pt")
    assert resumed["step"] == STEPS
    assert_same_weights(resumed["model"], weights(full_run / "last.pt"))
    assert resumed["metrics"]["nll_nats"] == load_checkpoint(full_run / "last.pt")["metrics"]["nll_nats"]


def test_resume_after_kill_equals_uninterrupted(full_run, tmp_path, monkeypatch):
    """A crash at step 6 loses the work since the step-4 checkpoint; --resume redoes it identically."""
    real_step, calls = train.train_step, []

    def crashing_step(*args):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(train, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        run_main(tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4
    monkeypatch.setattr(train, "train_step", real_step)
    assert run_main(tmp_path, "--resume") == 0
    assert load_checkpoint(tmp_path / "last.pt")["step"] == STEPS
    assert_same_weights(weights(tmp_path / "last.pt"), weights(full_run / "last.pt"))


def test_weight_average_is_validated_kept_and_resumed(tmp_path):
    """--ema: the averaged weights are scored beside the raw ones at every validation, best.pt
    holds whichever scored best, and a stopped run resumes the average exactly."""
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert run_main(whole, "--ema", "0.5", "--lr", "0.01") == 0
    ckpt = load_checkpoint(whole / "last.pt")
    validations = [h for h in ckpt["history"] if "valid_nll_nats" in h]
    assert validations and all("ema_valid_nll_nats" in h for h in validations)
    assert ckpt["ema"]["n_averaged"] == STEPS and ckpt["ema"]["decay"] == 0.5
    assert any(not torch.equal(ckpt["ema"]["model"][k], ckpt["model"][k]) for k in ckpt["model"])
    best_entry = min(validations, key=lambda h: min(h["valid_nll_nats"], h["ema_valid_nll_nats"]))
    which = ckpt["metrics"]["best_weights"]
    assert ckpt["metrics"]["best_nll_nats"] == best_entry["ema_valid_nll_nats" if which == "ema" else "valid_nll_nats"]
    best = load_checkpoint(whole / "best.pt")
    assert "ema" not in best  # only last.pt carries what --resume needs
    # best.pt's weights score what the record says they scored
    model, _ = load_model(whole / "best.pt")
    spec = DataSpec(**ckpt["data"])
    valid = torch.as_tensor(load(spec, "valid").images[:32]).long()
    with torch.no_grad():
        assert float(model.nll(valid).double().mean()) == pytest.approx(ckpt["metrics"]["best_nll_nats"], abs=1e-4)

    assert run_main(halves, "--ema", "0.5", "--lr", "0.01", "--stop-at", "5") == 0
    assert run_main(halves, "--resume") == 0  # --ema comes back from the checkpoint
    resumed = load_checkpoint(halves / "last.pt")
    assert resumed["ema"]["n_averaged"] == STEPS
    assert_same_weights(resumed["ema"]["model"], ckpt["ema"]["model"])
    assert_same_weights(resumed["model"], ckpt["model"])


def test_init_from_starts_a_new_cycle_from_the_weights(full_run, tmp_path, capsys):
    """--init-from: a fresh schedule and optimizer from another run's weights, architecture and data."""
    out = tmp_path / "cycle"
    assert train.main(["--init-from", str(full_run / "last.pt"), "--out", str(out), "--steps", "0",
                       "--valid-images", "32", "--threads", "1"]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 0 and ckpt["arch"] == "pixelcnn" and ckpt["data"] == load_checkpoint(full_run / "last.pt")["data"]
    assert_same_weights(ckpt["model"], weights(full_run / "last.pt"))
    assert ckpt["train_args"]["init_from"] == str(full_run / "last.pt")
    assert train.main(["--init-from", str(full_run / "last.pt"), "--arch", "row_lstm", "--out", str(tmp_path / "x"),
                       "--steps", "1"]) == 2
    assert "holds a pixelcnn model, not row_lstm" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--init-from", str(full_run / "last.pt"), "--resume", "--out", str(out)])
    assert "pass one of them" in capsys.readouterr().err


def test_ship_keeps_the_weights_and_record_without_the_resume_state(full_run, tmp_path, capsys):
    """pixelrnn.training.ship: same weights and record, no optimizer/average/rng, smaller; a damaged
    source is one line and writes nothing."""
    from pixelrnn.training import ship

    target = tmp_path / "shipped.pt"
    assert ship.main([str(full_run / "last.pt"), str(target)]) == 0
    source, shipped = load_checkpoint(full_run / "last.pt"), load_checkpoint(target)
    assert_same_weights(shipped["model"], source["model"])
    assert shipped["optimizer"] is None and "rng" not in shipped and "ema" not in shipped
    assert {k: shipped[k] for k in ("arch", "config", "data", "step", "metrics", "history", "train_args")} == \
        {k: source[k] for k in ("arch", "config", "data", "step", "metrics", "history", "train_args")}
    assert target.stat().st_size < (full_run / "last.pt").stat().st_size
    load_model(target)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((full_run / "last.pt").read_bytes()[:-10])
    assert ship.main([str(damaged), str(tmp_path / "never.pt")]) == 2
    assert "damaged.pt" in capsys.readouterr().err and not (tmp_path / "never.pt").exists()


def test_max_minutes_stops_with_checkpoint(tmp_path):
    assert run_main(tmp_path, "--max-minutes", "0") == 0
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 1 and not metrics["finished"] and "nll_nats" in metrics


def test_refuses_to_clobber_and_to_resume_nothing(full_run, tmp_path, capsys):
    before = (full_run / "last.pt").read_bytes()
    assert run_main(full_run) == 2
    assert "--resume" in capsys.readouterr().err
    assert (full_run / "last.pt").read_bytes() == before
    assert run_main(tmp_path / "empty", "--resume") == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--model-arg", "no_such_field=1"], "no_such_field"),
    (["--model-arg", "height=5"], "contradicts the data"),
    (["--model-arg", "oops"], "key=value"),
    (["--data-arg", "colour=1"], "DataSpec has no field"),
    (["--data-arg", "size=8", "--bits", "9"], "bits"),
])
def test_bad_flags_are_messages(tmp_path, capsys, flags, message):
    assert run_main(tmp_path, *flags) == 2
    assert message in capsys.readouterr().err


def test_batches_are_a_pure_function_of_seed_epoch_and_rank():
    a = train.batch_indices(5, 64, 16, seed=1)
    assert torch.equal(a, train.batch_indices(5, 64, 16, seed=1)) and len(a) == 16
    shards = [train.batch_indices(5, 64, 16, seed=1, rank=r, world=2) for r in range(2)]
    assert torch.equal(torch.sort(torch.cat(shards)).values, torch.sort(a).values)
    epoch = torch.cat([train.batch_indices(s, 64, 16, seed=1) for s in range(4)])
    assert torch.equal(torch.sort(epoch).values, torch.arange(64))  # one epoch sees every image once
    assert not torch.equal(train.batch_indices(4, 64, 16, seed=1), train.batch_indices(0, 64, 16, seed=1))


def test_cosine_schedule():
    assert train.cosine_lr(0, 100, 1e-3) == pytest.approx(1e-3)
    assert train.cosine_lr(50, 100, 1e-3) == pytest.approx(5e-4)
    assert train.cosine_lr(100, 100, 1e-3) == pytest.approx(0)


def test_conditional_model_needs_labels():
    model = SimpleNamespace(config=SimpleNamespace(in_channels=1, height=4, width=4, levels=2, num_classes=3))
    images = np.zeros((5, 1, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="no labels"):
        train.check_data_fits(model, ImageSet(images, None, 2, 0, "unlabelled"))
    with pytest.raises(ValueError, match="out of range"):
        train.check_data_fits(model, ImageSet(images, np.full(5, 3), 2, 4, "four classes"))
    labels = train.check_data_fits(model, ImageSet(images, np.arange(5) % 3, 2, 3, "ok"))
    assert labels.dtype == torch.long
    with pytest.raises(ValueError, match="do not fit"):
        train.check_data_fits(model, ImageSet(images, None, 4, 0, "four levels"))


def test_conditional_flag_on_unlabelled_data():
    args = train.parse_args(TINY + ["--out", "x", "--conditional"])
    with pytest.raises(ValueError, match="no class labels"):
        train.model_fields("pixelcnn", args, ImageSet(np.zeros((2, 1, 8, 8), np.uint8), None, 2, 0, "unlabelled"))
    assert train.model_fields("pixelcnn", args, load(DataSpec("synthetic", size=8, count=4), "train"))["num_classes"] == 3


def test_cli_subprocess_rgb(tmp_path):
    """The real entry point, on 3-channel 4-level data (softmax head)."""
    cmd = [sys.executable, "-m", "pixelrnn.training.train", "--arch", "pixelcnn", "--data", "synthetic", "--data-arg", "size=6",
           "--data-arg", "channels=3", "--data-arg", "count=32", "--bits", "2", "--hidden", "6", "--layers", "1",
           "--batch-size", "8", "--steps", "3", "--valid-images", "8", "--threads", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 3
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["config"]["in_channels"] == 3 and ckpt["config"]["levels"] == 4
    assert (tmp_path / "loss_curve.png").exists() and (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    """DDP over gloo: rank 0 writes the checkpoint, and sharded batches give the single-process result."""
    args = TINY + ["--steps", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pixelrnn.training.train", *args, "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ddp["step"] == 4 and (tmp_path / "ddp" / "metrics.json").exists()
    assert train.main(args + ["--out", str(tmp_path / "single")]) == 0
    single = load_checkpoint(tmp_path / "single" / "last.pt")
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5)
    assert ddp["metrics"]["nll_nats"] == pytest.approx(single["metrics"]["nll_nats"], rel=1e-4)


# ---------------------------------------------------------------------------- evaluation CLI

def test_evaluate_matches_direct_computation(full_run, capsys):
    assert evaluate.main(["--checkpoint", str(full_run / "last.pt"), "--split", "test", "--limit", "20", "--batch-size", "7"]) == 0
    result = json.loads(capsys.readouterr().out.strip())
    assert set(result) == {"nll_nats", "bits_per_dim", "n_images", "checkpoint", "data", "split"}
    assert result["n_images"] == 20 and result["split"] == "test" and result["data"]["size"] == 8

    model, _ = load_model(full_run / "last.pt")
    x = torch.as_tensor(load(DataSpec("synthetic", bits=1, size=8, count=64), "test").images[:20]).long()
    with torch.no_grad():
        direct = -distributions.log_prob(model(x), x, 2).double().flatten(1).sum(1).mean().item()
    assert result["nll_nats"] == pytest.approx(direct, rel=1e-6)
    assert result["bits_per_dim"] == pytest.approx(direct / (64 * np.log(2)), rel=1e-6)


def test_evaluate_other_data_and_errors(full_run, tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(full_run / "last.pt"), "--data-arg", "count=10", "--split", "valid"]) == 0
    assert json.loads(capsys.readouterr().out)["n_images"] == 10
    assert evaluate.main(["--checkpoint", str(full_run / "last.pt"), "--bits", "2"]) == 2
    assert "do not fit the model" in capsys.readouterr().err
    broken = tmp_path / "broken.pt"
    broken.write_bytes((full_run / "last.pt").read_bytes()[:100])
    assert evaluate.main(["--checkpoint", str(broken)]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "truncated" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- every architecture

def arch_flags(arch):
    from pixelrnn.training.models import config_class

    fields = {f.name for f in dataclasses.fields(config_class(arch))}
    flags = ["--hidden", "6"] if "hidden" in fields else []
    return flags + (["--layers", "1"] if "layers" in fields else [])


@pytest.mark.parametrize("arch", train.TRAINABLE)
def test_every_architecture_trains_resumes_evaluates_and_samples(arch, tmp_path, capsys):
    """The trainer, evaluator and sampler only use the registry API, so any architecture works."""
    from pixelrnn.training.sample import sample_reference

    base = ["--arch", arch, "--data", "synthetic", "--data-arg", "size=4", "--data-arg", "count=16", "--bits", "1",
            "--batch-size", "8", "--valid-images", "8", "--threads", "1", *arch_flags(arch)]
    if arch == "gated_pixelcnn":
        base.append("--conditional")
    assert train.main(base + ["--out", str(tmp_path / "a"), "--steps", "3"]) == 0
    assert train.main(base + ["--out", str(tmp_path / "b"), "--steps", "3", "--stop-at", "1"]) == 0
    assert train.main(base + ["--out", str(tmp_path / "b"), "--steps", "3", "--resume"]) == 0
    assert_same_weights(weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt"))
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(tmp_path / "a" / "last.pt"), "--limit", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["n_images"] == 4
    model, _ = load_model(tmp_path / "a" / "last.pt")
    labels = [0, 1] if model.config.num_classes else None
    x = sample_reference(model, 2, seed=0, labels=labels)
    assert x.shape == (2, 1, 4, 4) and np.array_equal(x, sample_reference(model, 2, seed=0, labels=labels))
