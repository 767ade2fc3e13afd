"""scripts/gpu_train.sh / bench.gpu_session without a GPU: the budget arithmetic, the CPU
override, the time budget respected through --max-minutes, the hand-over under $OUT and the
summary's before/after NLL, on tiny runs in temp dirs (never runs/long); and pixelrnn imported
from the checkout where the project is not installed, as on the GPU machine."""
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from bench import gpu_children, gpu_session as gs
from pixelrnn.training import train
from pixelrnn.training.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_train.sh"
TOTAL_STEPS = 100_000  # far more than a few seconds allow: only --max-minutes can end the run
TINY = ["--arch", "pixelcnn", "--data", "synthetic", "--data-arg", "size=8", "--data-arg", "count=64", "--bits", "1",
        "--hidden", "6", "--layers", "1", "--batch-size", "16", "--valid-every", "50", "--checkpoint-every", "50",
        "--log-every", "10", "--valid-images", "32", "--threads", "1", "--steps", str(TOTAL_STEPS)]


def tiny_run(path: Path, stop_at: int = 3) -> Path:
    assert train.main(TINY + ["--out", str(path), "--stop-at", str(stop_at)]) == 0
    return path


# ---------------------------------------------------------------------------- fast

def test_plan_splits_the_budget_and_fits_the_call():
    # Plenty of time: the budget (summed over runs) is split equally.
    assert gs.plan_minutes(8, 2, "concurrent", 3600) == (4.0, False)
    assert gs.plan_minutes(8, 2, "sequential", 3600) == (4.0, False)
    # 300 s left: concurrent runs share them, sequential ones take turns; each loses the overhead.
    assert gs.plan_minutes(8, 2, "concurrent", 300, overhead_s=45) == (4.0, False)
    minutes, cut = gs.plan_minutes(8, 2, "sequential", 300, overhead_s=45)
    assert cut and minutes == pytest.approx((150 - 45) / 60, abs=1e-3)
    assert gs.plan_minutes(8, 2, "concurrent", 30, overhead_s=45) == (0.0, True)
    assert gs.training_wall_s(8, 2, "concurrent", 45) == 240 + 45
    assert gs.training_wall_s(8, 2, "sequential", 45) == 2 * (240 + 45)


def test_default_budget_fits_the_gpu_machines_call_with_tests_and_bench():
    """At the defaults, training at its full budget plus the tests' and the bench's timeouts, the
    evaluations and the hand-over end inside the GPU machine's 600 s per call, less the margin."""
    args = gs.parse_args(["--out", "x"])
    assert (args.budget_minutes, args.mode, args.call_limit_s) == (8.0, "concurrent", 600.0)
    used = (gs.PREFLIGHT_S + gs.EVAL_TIMEOUT + gs.training_wall_s(args.budget_minutes, 2, args.mode) + gs.AFTER_RESERVE
            + args.tests_timeout + args.bench_timeout)
    assert used <= args.call_limit_s - args.margin_s


def test_cpu_needs_the_override(monkeypatch, capsys):
    monkeypatch.delenv("GPU_SESSION_ALLOW_CPU", raising=False)
    with pytest.raises(SystemExit):
        gs.parse_args(["--device", "cpu", "--out", "x"])
    assert "GPU_SESSION_ALLOW_CPU=1" in capsys.readouterr().err
    monkeypatch.setenv("GPU_SESSION_ALLOW_CPU", "1")
    assert gs.parse_args(["--device", "cpu", "--out", "x"]).device == "cpu"
    monkeypatch.delenv("OUT", raising=False)
    with pytest.raises(SystemExit):
        gs.parse_args(["--device", "cpu"])  # nowhere to put results


def test_no_cuda_is_reported_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert gs.main(["--out", str(tmp_path), "--skip", "tests,bench", str(tmp_path / "none")]) == 2
    summary = json.loads((tmp_path / "gpu_session.json").read_text())
    assert "no CUDA device" in summary["error"] and "runs" not in summary


def test_missing_packages_one_line_and_tqdm_stand_in(tmp_path, monkeypatch, capsys):
    real = gs.importlib.util.find_spec
    monkeypatch.setattr(gs.importlib.util, "find_spec", lambda name, *a: None if name in ("tqdm", "matplotlib") else real(name, *a))
    args = gs.parse_args(["--out", str(tmp_path)])
    summary = {}
    env = gs.preflight(args, summary, tmp_path)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "packages" in ln]
    assert len(lines) == 1 and "tqdm" in lines[0] and "matplotlib" in lines[0]
    assert summary["machine"]["packages_missing"] == ["tqdm", "matplotlib"]
    stub_dir = env["PYTHONPATH"].split(os.pathsep)[0]
    # The stand-in serves training.train's progress bar: a whole tiny run goes through it.
    stub = types.ModuleType("tqdm_stub")
    exec((Path(stub_dir) / "tqdm.py").read_text(), stub.__dict__)
    monkeypatch.setattr(train, "tqdm", stub.tqdm)
    assert train.main(TINY + ["--out", str(tmp_path / "run"), "--stop-at", "2"]) == 0
    assert "stopping cleanly at step 2" in capsys.readouterr().err


def test_unreadable_run_is_skipped_and_reported(tmp_path, monkeypatch):
    bad = tmp_path / "runs" / "broken" / "last.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"truncated")
    out = tmp_path / "out"
    monkeypatch.setenv("GPU_SESSION_ALLOW_CPU", "1")
    assert gs.main(["--out", str(out), "--device", "cpu", "--skip", "tests,bench", str(bad.parent)]) == 1
    run = json.loads((out / "gpu_session.json").read_text())["runs"][0]
    assert run["name"] == "broken" and str(bad) in run["before"]["error"]
    assert run["train"] == {"skipped": run["before"]["error"]} and run["returned"] == []
    assert not (out / "runs").exists()


def test_run_whose_data_is_missing_is_not_trained(tmp_path):
    """On the GPU machine the data is there only if carried: a run whose data does not load is named and skipped."""
    run = tiny_run(tmp_path / "run")
    ckpt = load_checkpoint(run / "last.pt")
    ckpt["data"] = {"name": "binarized-mnist", "data_dir": str(tmp_path / "not-carried")}
    save_checkpoint(run / "last.pt", ckpt)
    scores = gs.evaluate([str(run / "last.pt")], "cpu")
    assert "not-carried" in scores["results"][str(run / "last.pt")]["error"]
    record = {"checkpoint": str(run / "last.pt"), "before": {"step": 3}}
    gs.add_scores([record], "before", scores)
    assert not gs.trainable(record)


def test_hand_over_keeps_within_what_the_gpu_machine_hands_back(tmp_path):
    runs = []
    for k in range(4):
        ckpt = tmp_path / f"r{k}" / "last.pt"
        ckpt.parent.mkdir()
        ckpt.write_bytes(b"x")
        runs.append({"name": f"r{k}", "checkpoint": str(ckpt), "before": {"step": 1}, "after": {"step": 2}})
    runs[3]["after"] = {"step": 1}  # did not advance: nothing to bring back
    gs.hand_over(runs, tmp_path / "out", files_used=2)
    assert [len(r["returned"]) for r in runs] == [2, 2, 2, 0]  # 2 + 3 x 2 = 8 files
    runs[3]["after"] = {"step": 2}
    gs.hand_over(runs, tmp_path / "out2", files_used=2)
    assert [len(r["returned"]) for r in runs] == [1, 1, 1, 1]  # 10 would not come back: last.pt only
    files = [p for p in (tmp_path / "out2").rglob("*") if p.is_file()]
    assert len(files) == 4 and all(len(p.relative_to(tmp_path / "out2").parts) <= 3 for p in files)


FAKE_BENCH = """import argparse, json, sys
p = argparse.ArgumentParser()
p.add_argument("--device")
p.add_argument("--json")
p.add_argument("--naive-rows")
a = p.parse_args()
json.dump({"device": a.device, "naive_rows": a.naive_rows}, open(a.json, "w"))
print("benchmarked on", a.device)
"""


def test_bench_runs_when_it_has_a_device_flag(tmp_path, monkeypatch):
    """bench.sampling --device may not exist in every tree: skipped with a reason, else run with its JSON under OUT."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__init__.py").write_text("")
    (tmp_path / "bench" / "sampling.py").write_text("print('no device flag')\n")
    args = gs.parse_args(["--out", str(tmp_path / "out"), "--bench-args", "--naive-rows 4"])
    clock = gs.Clock(600, 30)
    assert "no --device flag" in gs.run_bench(args, clock, tmp_path / "out", tmp_path, dict(os.environ))["skipped"]
    (tmp_path / "bench" / "sampling.py").write_text(FAKE_BENCH)
    res = gs.run_bench(args, clock, tmp_path / "out", tmp_path, dict(os.environ))
    assert res["rc"] == 0 and not res["timed_out"] and "benchmarked on cuda" in res["output"]
    assert json.loads(Path(res["json"]).read_text()) == {"device": "cuda", "naive_rows": "4"}
    assert res["json"] == str(tmp_path / "out" / "bench" / "sampling_cuda.json")
    args.reserve_s = 590  # what later phases need leaves it too little time: skipped, not started
    assert "kept for later phases" in gs.run_bench(args, clock, tmp_path / "out", tmp_path, dict(os.environ))["skipped"]


def test_timeout_ends_the_whole_process_group(tmp_path):
    marker = tmp_path / "grandchild.pid"
    code = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(marker)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(60)")
    res = gs.run_bounded([sys.executable, "-c", code], 2, tmp_path / "log", dict(os.environ))
    assert res["timed_out"] and res["seconds"] < 20 and "started" in res["output"]
    status = Path(f"/proc/{int(marker.read_text())}/status")
    for _ in range(50):  # the grandchild went with it: gone, or a zombie its new parent has not reaped yet
        try:
            if "\nState:\tZ" in status.read_text():
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the grandchild outlived the timeout")
    assert not gs.LIVE


def test_pixelrnn_comes_from_the_checkout_where_the_project_is_not_installed(tmp_path):
    """As on the GPU machine: a Python with torch but without this project installed, started in
    the checkout's root (where pixelrnn/ alone holds none of the subpackages). The children's
    sitecustomize makes pixelrnn.training the checkout's training/, for `-m` runs too, and the
    machine's own sitecustomize still runs."""
    import site

    env = {**os.environ, "PYTHONPATH": ""}
    env.pop("PYTHONHOME", None)
    # -S: no site processing, so not the project's editable install; the site-packages (torch)
    # are added by hand, and the hook's folder imported as site would import it.
    packages = os.pathsep.join(site.getsitepackages())
    code = ("import sys; sys.path += {packages!r}.split({sep!r}); {pre}"
            "import pixelrnn.training.checkpoint as c; print(c.__file__)")

    def run(pre: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-S", "-c", code.format(packages=packages, sep=os.pathsep, pre=pre)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    assert "No module named 'pixelrnn.training'" in run("").stderr  # the situation: not installed
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(gpu_children.SITE_HOOK.format(root=str(REPO)))
    other = tmp_path / "other"  # a sitecustomize further along the path: the machine's own
    other.mkdir()
    (other / "sitecustomize.py").write_text("import sys; sys.machine_site_ran = True\n")
    done = run(f"sys.path[:0] = [{str(hook)!r}, {str(other)!r}]; import sitecustomize; "
               "assert getattr(sys, 'machine_site_ran', False); ")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(REPO / "training" / "checkpoint.py")


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


# ---------------------------------------------------------------------------- the whole CPU path

@pytest.mark.slow
def test_session_on_cpu_respects_the_budget_and_hands_over(tmp_path):
    run = tiny_run(tmp_path / "runs" / "tiny_run")
    before = load_checkpoint(run / "last.pt")
    out = tmp_path / "out"
    budget = 0.05  # minutes: 3 s of training steps
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_SESSION_ALLOW_CPU": "1"}
    env["GPU_TRAIN_ARGS"] = "--log-every 5"  # passed through to training.train
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--budget-minutes", str(budget),
                           "--skip", "tests,bench", str(run)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads((out / "gpu_session.json").read_text())
    assert summary["device"] == "cpu" and summary["plan"]["minutes_per_run"] == budget
    assert not summary["plan"]["budget_cut_to_fit_call"]
    (record,) = summary["runs"]
    b, a, t = record["before"], record["after"], record["train"]
    # The budget: the run was stopped by its --max-minutes, far short of its steps, and the hours
    # it spent in training steps are within the budget (plus one step).
    assert t["rc"] == 0 and not t["killed"] and t["stopped_by_max_minutes"] and f"--max-minutes {budget}" in t["cmd"]
    assert t["cmd"].endswith("--log-every 5")
    assert b["step"] == 3 < a["step"] < TOTAL_STEPS
    assert 0 < (a["hours"] - b["hours"]) * 60 <= budget + 0.01
    assert t["steps"] == a["step"] - 3 and t["steps_per_second"] > 0
    # Before/after on the full validation split (64 images), and the runs' own subset (32).
    for side in (b, a):
        assert side["full_valid_n_images"] == 64 and side["full_valid_nll_nats"] > 0 and side["valid_subset_images"] == 32
    assert b["full_valid_step"] == 3 and a["full_valid_step"] == a["step"]
    assert a["full_valid_nll_nats"] < b["full_valid_nll_nats"]  # thousands of steps on the bars do learn
    assert b["valid_subset_nll_nats"] == before["metrics"]["nll_nats"]

    # The hand-over: the continued checkpoint (the run's own file, byte for byte) and its metrics.
    back = out / "runs" / "tiny_run"
    assert sorted(p.name for p in back.iterdir()) == ["last.pt", "metrics.json"]
    assert (back / "last.pt").read_bytes() == (run / "last.pt").read_bytes()
    after = load_checkpoint(back / "last.pt")
    assert after["step"] == a["step"] and after["timeline"][-1]["step"] == a["step"]
    assert after["history"][:len(before["history"])] == before["history"]  # the same run, continued
    metrics = json.loads((back / "metrics.json").read_text())
    assert metrics["before"]["full_valid_nll_nats"] == b["full_valid_nll_nats"]
    assert metrics["after"]["full_valid_nll_nats"] == a["full_valid_nll_nats"]
    assert metrics["train_metrics"]["step"] == a["step"] and not metrics["train_metrics"]["finished"]
    assert record["returned"] == [str(back / "last.pt"), str(back / "metrics.json")]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_session.json", "runs"]
