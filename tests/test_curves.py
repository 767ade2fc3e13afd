"""training.curves: validation NLL against hours from real (tiny) runs' timelines, the --json
table, the fallbacks for checkpoints without a timeline, and one-line errors for bad files."""
import json
import shutil

import pytest
from PIL import Image

from pixelrnn.training import curves, train
from pixelrnn.training.checkpoint import build_checkpoint_model, load_checkpoint, save_checkpoint

# 64 tiny 8x8 synthetic images, 16 per batch; validation every 2 steps.
TINY = ["--data", "synthetic", "--data-arg", "size=8", "--data-arg", "count=64", "--hidden", "6", "--layers", "1",
        "--batch-size", "16", "--valid-every", "2", "--checkpoint-every", "2", "--log-every", "2",
        "--valid-images", "32", "--threads", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A binary run trained 4 steps then resumed to 8 (its timeline spans two invocations), and a
    3-bit run of 4 steps: one of each unit."""
    root = tmp_path_factory.mktemp("curves")
    binary, multi = root / "tiny_binary", root / "tiny_multi"
    assert train.main(["--arch", "pixelcnn", "--bits", "1", *TINY, "--steps", "4", "--out", str(binary)]) == 0
    assert train.main(["--resume", "--steps", "8", "--out", str(binary)]) == 0
    assert train.main(["--arch", "gated_pixelcnn", "--bits", "3", *TINY, "--steps", "4", "--out", str(multi)]) == 0
    return binary, multi


def valid_history(ckpt):
    return [h for h in ckpt["history"] if "valid_nll_nats" in h]


def test_timeline_matched_to_history_by_step(runs):
    binary, _ = runs
    run = curves.read_run(binary / "last.pt")
    ckpt = load_checkpoint(binary / "last.pt")
    assert [p[4] for p in run.points] == [2, 4, 6, 8]  # both invocations' validations
    by_step = {t["step"]: t["hours"] for t in ckpt["timeline"]}
    for hours, device, nats, bpd, step in run.points:
        entry = next(h for h in valid_history(ckpt) if h["step"] == step)
        assert (hours, device, nats, bpd) == (by_step[step], "cpu", entry["valid_nll_nats"], entry["valid_bits_per_dim"])
    hours = [p[0] for p in run.points]
    assert hours == sorted(hours) and hours[0] > 0 and hours[-1] <= ckpt["hours"]


def test_png_and_json_table(runs, tmp_path, capsys):
    binary, multi = runs
    png, table = tmp_path / "out" / "curves.png", tmp_path / "out" / "runs.json"
    assert curves.main(["--out", str(png), "--json", str(table), str(binary), str(multi / "last.pt")]) == 0
    assert capsys.readouterr().err == ""
    with Image.open(png) as img:
        assert img.format == "PNG"
        two_panels = img.size[0]
    rows = {row["name"]: row for row in json.loads(table.read_text())}
    assert set(rows) == {"tiny_binary", "tiny_multi"}
    for name, steps, arch, unit, levels in (("tiny_binary", 8, "pixelcnn", "nats", 2),
                                            ("tiny_multi", 4, "gated_pixelcnn", "bits/dim", 8)):
        row, ckpt = rows[name], load_checkpoint(binary.parent / name / "last.pt")
        best = min(valid_history(ckpt), key=lambda h: h["valid_nll_nats"])
        assert (row["arch"], row["unit"], row["levels"], row["data"]) == (arch, unit, levels, "synthetic")
        assert (row["hidden"], row["layers"]) == (6, 1)
        assert row["params"] == sum(p.numel() for p in build_checkpoint_model(name, ckpt).parameters())
        assert (row["steps"], row["epochs"]) == (steps, steps / 4)
        assert row["hours"] == ckpt["hours"] > 0 and row["hours_source"] == "timeline"
        assert row["devices"] == ["cpu"] and row["hours_by_device"]["cpu"] == pytest.approx(ckpt["timeline"][-1]["hours"])
        assert (row["best_valid_nll_nats"], row["best_step"]) == (best["valid_nll_nats"], best["step"])
        assert row["best_valid_bits_per_dim"] == best["valid_bits_per_dim"]
    # Only one unit present: one panel, half the width.
    assert curves.main(["--out", str(tmp_path / "one.png"), str(binary)]) == 0
    with Image.open(tmp_path / "one.png") as img:
        assert img.size[0] < 0.6 * two_panels


def test_devices_and_paper_lines(runs, tmp_path):
    """A run continued on CUDA: its hours split by device, and binarized-MNIST reference lines drawn."""
    binary, _ = runs
    ckpt = load_checkpoint(binary / "last.pt")
    for t in ckpt["timeline"]:
        if t["step"] > 4:
            t["device"] = "cuda"
    ckpt["data"]["name"] = curves.PAPER_DATA
    save_checkpoint(tmp_path / "mixed" / "last.pt", ckpt)
    run = curves.read_run(tmp_path / "mixed" / "last.pt")
    assert [p[1] for p in run.points] == ["cpu", "cpu", "cuda", "cuda"]
    row = curves.table_row(run)
    assert row["devices"] == ["cpu", "cuda"]
    assert sum(row["hours_by_device"].values()) == pytest.approx(ckpt["timeline"][-1]["hours"])
    assert row["hours_by_device"]["cpu"] == pytest.approx(ckpt["timeline"][1]["hours"])
    assert curves.main(["--out", str(tmp_path / "mixed.png"), str(tmp_path / "mixed")]) == 0
    assert curves.main(["--out", str(tmp_path / "plain.png"), "--no-paper", str(tmp_path / "mixed")]) == 0
    assert (tmp_path / "mixed.png").read_bytes() != (tmp_path / "plain.png").read_bytes()


def strip_timeline(src, dest):
    ckpt = load_checkpoint(src)
    del ckpt["timeline"], ckpt["hours"]
    save_checkpoint(dest, ckpt)
    return ckpt


def test_no_timeline_estimates_from_metrics_minutes(runs, tmp_path, capsys):
    binary, _ = runs
    ckpt = strip_timeline(binary / "last.pt", tmp_path / "old" / "last.pt")
    (tmp_path / "old" / "metrics.json").write_text(json.dumps({"minutes": 6.0, "step": 8}))
    run = curves.read_run(tmp_path / "old" / "last.pt")
    assert run.hours_source == "estimated"
    assert [(p[0], p[1]) for p in run.points] == [(s * 0.1 / 8, "estimated") for s in (2, 4, 6, 8)]
    table = tmp_path / "t.json"
    assert curves.main(["--out", str(tmp_path / "c.png"), "--json", str(table), str(tmp_path / "old")]) == 0
    assert capsys.readouterr().err == ""
    row = json.loads(table.read_text())[0]
    assert row["hours"] == pytest.approx(0.1) and row["hours_source"] == "estimated" and row["steps"] == ckpt["step"]


def test_no_timeline_nor_minutes_is_skipped_with_a_warning(runs, tmp_path, capsys):
    binary, multi = runs
    strip_timeline(binary / "last.pt", tmp_path / "bare" / "last.pt")
    table = tmp_path / "t.json"
    assert curves.main(["--out", str(tmp_path / "c.png"), "--json", str(table), str(tmp_path / "bare"), str(multi)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and str(tmp_path / "bare" / "last.pt") in err[0]
    rows = json.loads(table.read_text())
    assert [r["name"] for r in rows] == ["bare", "tiny_multi"] and rows[0]["hours"] is None  # still in the table
    # Nothing left to draw: an error, not an empty figure.
    assert curves.main(["--out", str(tmp_path / "d.png"), str(tmp_path / "bare")]) == 2
    assert "error: " in capsys.readouterr().err and not (tmp_path / "d.png").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing", "empty_dir"])
def test_unreadable_file_is_one_line_error(runs, tmp_path, capsys, damage):
    binary, _ = runs
    bad = tmp_path / "bad" / "last.pt"
    bad.parent.mkdir()
    if damage == "truncate":
        bad.write_bytes((binary / "last.pt").read_bytes()[:500])
    elif damage == "garbage":
        bad.write_bytes(b"not a checkpoint at all")
    arg = bad.parent if damage == "empty_dir" else bad
    png = tmp_path / "c.png"
    assert curves.main(["--out", str(png), "--json", str(tmp_path / "t.json"), str(binary), str(arg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: ")
    assert not png.exists()


def test_default_is_every_long_run(runs, tmp_path, monkeypatch, capsys):
    binary, multi = runs
    for run in runs:
        (tmp_path / "runs" / "long" / run.name).mkdir(parents=True)
        shutil.copy(run / "last.pt", tmp_path / "runs" / "long" / run.name / "last.pt")
    (tmp_path / "runs" / "long" / "just_started").mkdir()  # no record written yet: left out, said so
    monkeypatch.chdir(tmp_path)
    assert curves.main(["--json", "t.json"]) == 0
    assert [r["name"] for r in json.loads((tmp_path / "t.json").read_text())] == ["tiny_binary", "tiny_multi"]
    assert "just_started: no run record yet; left out" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "runs")
    assert curves.main(["--json", "t.json"]) == 2
    assert capsys.readouterr().err.strip() == f"error: no checkpoints given and none match {curves.DEFAULT_GLOB}"


def test_needs_an_output():
    with pytest.raises(SystemExit):
        curves.parse_args(["runs/x"])


def test_a_new_cycle_continues_its_parents_curve_and_shows_the_average(runs, tmp_path):
    """A run started with --init-from is drawn from its parent's hours on, labelled as a new
    cycle, and an --ema run's averaged weights get their own points and table fields."""
    binary, _ = runs
    cycle = tmp_path / "cycle"
    assert train.main(["--init-from", str(binary / "last.pt"), "--steps", "4", "--ema", "0.5", "--valid-every", "2",
                       "--valid-images", "32", "--threads", "1", "--out", str(cycle)]) == 0
    (cycle / "last.pt").unlink()  # a finished run keeps only its record; the parent's hours still count
    run = curves.read_run(curves.find_record(str(cycle)))
    parent_hours = load_checkpoint(binary / "last.pt")["hours"]
    record = json.loads((cycle / "history.json").read_text())
    assert record["init_from"] == str(binary / "last.pt")
    assert [p[4] for p in run.points] == [2, 4]
    assert run.points[0][0] == pytest.approx(parent_hours + record["timeline"][0]["hours"])
    assert [round(h, 12) for h, _, _ in run.ema_points] == [round(p[0], 12) for p in run.points]
    assert "new cycle from tiny_binary" in run.label
    row = curves.table_row(run)
    averaged = [h["ema_valid_nll_nats"] for h in record["history"] if "ema_valid_nll_nats" in h]
    assert row["best_ema_valid_nll_nats"] == min(averaged) and row["init_from"] == str(binary / "last.pt")
    assert curves.main(["--out", str(tmp_path / "c.png"), str(binary), str(cycle)]) == 0


def test_a_deepened_run_says_so(tmp_path):
    """A run started from a shallower model (--init-from --layers) is labelled as deepened from it."""
    source, deeper = tmp_path / "shallow_row", tmp_path / "deep_row"
    assert train.main(["--arch", "row_lstm", "--bits", "1", *TINY, "--layers", "1", "--steps", "2", "--out", str(source)]) == 0
    assert train.main(["--init-from", str(source / "last.pt"), "--layers", "2", "--steps", "2", "--valid-images", "32",
                       "--threads", "1", "--out", str(deeper)]) == 0
    run = curves.read_run(curves.find_record(str(deeper)))
    assert "deepened from the 1-layer shallow_row" in run.label
