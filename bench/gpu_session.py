"""One bounded session on a GPU machine: continue the long runs on CUDA, test, benchmark, hand back.

    bash scripts/gpu_train.sh --prepare    # here, once: binarized MNIST into runs/device_data
    bash scripts/gpu_train.sh [--budget-minutes 8] [--mode concurrent] [RUN_DIR ...]   # on the GPU machine

The GPU machine gets a copy of this working tree (so runs/long/*/last.pt travel) and the data in
runs/device_data (git-ignored: it travels only when the call carries that folder), runs
`bash scripts/gpu_train.sh` from the checkout's root within the call's time limit
(--call-limit-s, 600 s), and hands back what is under $OUT. Its Python is the machine's own
(a CUDA build of torch), where this project is not installed: pixelrnn is then imported from
the checkout (checkout_imports). On the GPU machine, each phase bounded by a timeout clamped to
what is left of the call (less --margin-s):

1. preflight: Python, torch, CUDA, optional packages (one line), the runs, the data;
2. "before": every run's last.pt scored on the FULL validation split (the runs themselves
   validate on a --valid-images subset, kept as it is so their history stays comparable);
3. the GPU tests (`pytest -m gpu`) and the sampling bench (`python -m bench.sampling --device
   cuda`), each given what is left once the training at its full budget and the phases after
   it are set aside;
4. training: `training.train --resume --device cuda --max-minutes M` per run, CONCURRENTLY by
   default: these models are small (batch 64 of 28x28), so one process leaves the GPU mostly
   idle between kernel launches and two interleave at little cost to each, doubling the
   training per GPU minute (--mode sequential to compare; the summary records steps/s). The
   budget is minutes of training summed over the runs (default 8): M = budget / runs, less
   where the call's time would not hold it (the summary says so);
5. "after": the new last.pt scored on the full validation split.

What comes back, under $OUT (rewritten after every phase, so a call cut off still reports):
gpu_session.json (the summary: before/after full-validation NLL per run, the tests' and the
bench's outcome), bench/sampling_cuda.json, and runs/NAME/last.pt and metrics.json for every
run that advanced. At most 8 files of 16 MiB each come back, two folders deep: summary, bench
JSON and 2 per run fit three runs; with more, the per-run metrics.json are left out (the
summary holds them).

`--device cpu` runs the same path without a GPU, for this module's tests; it needs
GPU_SESSION_ALLOW_CPU=1, so that nothing trains on a CPU by mistake.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# LIVE (the children still running) is also gpu_session.LIVE, for the tests.
from bench.gpu_children import (LIVE, OPTIONAL, ROOT, checkout_imports, child_env, end_children, run_bounded,  # noqa: F401
                                spawn, tail, wait_or_kill)

DEFAULT_GLOB = "runs/long/*/last.pt"
DATA_ROOT = "runs/device_data"  # under /runs/*, which git ignores: carried, never committed
MAX_FILES_BACK = 8  # the GPU machine hands back at most this many files from $OUT, each at most:
MAX_FILE_BYTES = 16 * 2**20
# Seconds, the defaults of each phase's timeout; each is clamped to what the call has left.
# At the defaults the worst case adds up to the call's 600 s less the margin (a test checks it):
# 10 preflight + 60 before + 45 tests + 100 bench + 285 training (2 runs) + 70 after = 570.
PREFLIGHT_S = 10  # python, torch import, reading the checkpoints
EVAL_TIMEOUT = 60  # python + torch import, CUDA init, 10k images per run
TESTS_TIMEOUT = 45  # collecting every test module is most of it
BENCH_TIMEOUT = 100
TRAIN_OVERHEAD = 45  # per training process: start, data, CUDA init, last validation, save, plot
TRAIN_GRACE = 90  # a process still alive this long after its --max-minutes is killed
AFTER_RESERVE = 70  # what training leaves for the "after" evaluation and the hand-over


def log(msg: str) -> None:
    print(f"[gpu_session] {msg}", file=sys.stderr, flush=True)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class Clock:
    """Seconds left before the call's deadline (the GPU machine's limit on one call, less a margin)."""

    def __init__(self, limit_s: float, margin_s: float):
        self.start = time.monotonic()
        self.deadline = self.start + limit_s - margin_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.deadline - time.monotonic()


# ---------------------------------------------------------------------------- planning

def slots(n_runs: int, mode: str) -> int:
    """How many runs' worth of wall-clock time training takes: one if concurrent, all if sequential."""
    return 1 if mode == "concurrent" else max(n_runs, 1)


def training_wall_s(budget_min: float, n_runs: int, mode: str, overhead_s: float = TRAIN_OVERHEAD) -> float:
    """Seconds the training phase takes at the full budget (each process also spends `overhead_s`
    outside its --max-minutes)."""
    return slots(n_runs, mode) * (budget_min / max(n_runs, 1) * 60 + overhead_s)


def plan_minutes(budget_min: float, n_runs: int, mode: str, seconds_left: float,
                 overhead_s: float = TRAIN_OVERHEAD) -> tuple[float, bool]:
    """Minutes of training per run (--max-minutes) and whether the call's time cut the budget.

    The budget is training minutes summed over the runs, split equally between them.
    """
    share = budget_min / max(n_runs, 1)
    fits = (seconds_left / slots(n_runs, mode) - overhead_s) / 60
    return (round(max(min(share, fits), 0.0), 3), fits < share)


# ---------------------------------------------------------------------------- evaluation (a child process)

def evaluate(paths: list[str], device: str) -> dict:
    """Score each checkpoint on its data's full validation split: {path: {...} or {"error": ...}}."""
    import torch

    from pixelrnn.training.checkpoint import load_model
    from pixelrnn.runtime.datasets import load
    from pixelrnn.training.distributions import nats_to_bits_per_dim
    from pixelrnn.training.train import Dist, check_data_fits, mean_nll

    dev = torch.device(device)
    dist = Dist(rank=0, world=1, local_world=1, device=dev)
    results = {}
    for path in paths:
        started = time.monotonic()
        try:
            model, ckpt = load_model(path)
            valid = load(ckpt["data"], "valid")
            labels = check_data_fits(model, valid)
            nats = mean_nll(model.to(dev), torch.as_tensor(valid.images), labels, 500 if dev.type == "cuda" else 64, dist)
        except (ValueError, OSError) as e:  # CheckpointError, DataError (e.g. data not carried), bad fit
            results[path] = {"error": str(e).splitlines()[0]}
            continue
        results[path] = {"step": ckpt["step"], "nll_nats": nats, "bits_per_dim": float(nats_to_bits_per_dim(nats, model.dims)),
                         "n_images": len(valid), "seconds": round(time.monotonic() - started, 1)}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"device_name": name, "results": results}


def evaluate_in_child(paths: list[str], device: str, timeout: float, workdir: Path, env: dict) -> dict:
    """evaluate() in a bounded child process, so a hung GPU or slow data cannot stall the call."""
    if not paths:
        return {"results": {}}
    if timeout < 5:
        return {"error": "no time left to evaluate"}
    res = run_bounded([sys.executable, "-m", "bench.gpu_session", "--evaluate", "--device", device, *paths],
                      timeout, workdir / f"evaluate-{time.monotonic_ns()}.log", env)
    lines = [ln for ln in res["output"].splitlines() if ln.startswith("{")]
    if res["rc"] != 0 or not lines:
        why = "timed out" if res["timed_out"] else f"exit {res['rc']}"
        return {"error": f"evaluation {why}: {tail(res['output'], 3)}"}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------- phases

def preflight(args, summary: dict, workdir: Path) -> dict:
    """Facts, missing packages (one line) and the environment the children get."""
    import torch

    env, missing, from_checkout = child_env(workdir)
    if from_checkout:
        log(f"pixelrnn is not installed here: imported from the checkout at {ROOT}")
    line = "packages: all present" if not missing else "packages missing: " + "; ".join(f"{m} ({OPTIONAL[m]})" for m in missing)
    log(line)
    data_root = Path(args.data_root)
    if (data_root / "binarized_mnist" / "valid.npz").exists() and "BINARIZED_MNIST_DIR" not in env:
        # The env var, not --data-dir: a --data-dir would be saved into the checkpoint's data spec
        # and point at a folder that exists only on the GPU machine.
        env["BINARIZED_MNIST_DIR"] = str((data_root / "binarized_mnist").resolve())
    summary["machine"] = {"python": sys.version.split()[0], "torch": torch.__version__, "pixelrnn_from_checkout": from_checkout,
                          "numpy": _version("numpy"), "cuda_available": torch.cuda.is_available(),
                          "cpus": os.cpu_count(), "packages_missing": missing, "packages_line": line,
                          "binarized_mnist_dir": env.get("BINARIZED_MNIST_DIR")}
    return env


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def find_runs(inputs: list[str]) -> list[Path]:
    paths = [Path(a) / "last.pt" if Path(a).is_dir() else Path(a) for a in inputs]
    return paths or [Path(p) for p in sorted(glob.glob(DEFAULT_GLOB))]


def snapshot(path: Path) -> dict:
    """What the summary records of a run's last.pt, read on the CPU."""
    from pixelrnn.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    return {"step": ckpt["step"], "epoch": ckpt["epoch"], "hours": ckpt.get("hours"),
            "devices": sorted({t["device"] for t in ckpt.get("timeline") or []}),
            "valid_subset_nll_nats": ckpt["metrics"].get("nll_nats"),
            "valid_subset_bits_per_dim": ckpt["metrics"].get("bits_per_dim"),
            "valid_subset_images": ckpt["metrics"].get("valid_images"),
            "arch": ckpt["arch"], "data": ckpt["data"], "levels": ckpt["config"].get("levels")}


def add_scores(runs: list[dict], key: str, scores: dict) -> None:
    """Record full-split scores under run[key]: full_valid_error is this run's own problem (its data
    is missing, say), full_valid_unavailable a failure of the whole evaluation."""
    for run in runs:
        if "error" in scores:
            run[key]["full_valid_unavailable"] = scores["error"]
        elif run["checkpoint"] in scores["results"]:
            run[key].update({f"full_valid_{k}": v for k, v in scores["results"][run["checkpoint"]].items()})


def trainable(run: dict) -> bool:
    """Readable, and its data loads here (else training.train would fail the same way, later)."""
    return "error" not in run["before"] and "full_valid_error" not in run["before"]


def run_tests(args, clock: Clock, out: Path, workdir: Path, env: dict) -> dict:
    if importlib.util.find_spec("pytest") is None:
        return {"skipped": "pytest is not installed"}
    timeout = min(args.tests_timeout, clock.left() - args.reserve_s)
    if timeout < 10:
        return {"skipped": f"{clock.left():.0f} s left, {args.reserve_s:.0f} s of them kept for later phases"}
    # --continue-on-collection-errors: a test module importing a package this machine lacks
    # (tritonclient, say) must not stop the gpu tests of the other modules.
    res = run_bounded([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                       "--continue-on-collection-errors"], timeout, workdir / "pytest.log", env)
    res["summary_line"] = next((ln for ln in reversed(res["output"].splitlines()) if ln.strip()), "")
    res["output"] = tail(res["output"], 60)
    return res


def run_bench(args, clock: Clock, out: Path, workdir: Path, env: dict) -> dict:
    source = Path("bench/sampling.py")
    if not source.exists() or not re.search(r"""["']--device["']""", source.read_text()):
        return {"skipped": "bench.sampling has no --device flag in this tree"}
    timeout = min(args.bench_timeout, clock.left() - args.reserve_s)
    if timeout < 20:
        return {"skipped": f"{clock.left():.0f} s left, {args.reserve_s:.0f} s of them kept for later phases"}
    target = out / "bench" / f"sampling_{args.device}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bench.sampling", "--device", args.device, "--json", str(target), *shlex.split(args.bench_args)]
    res = run_bounded(cmd, timeout, workdir / "bench.log", env)
    res["json"] = str(target) if target.exists() else None
    res["output"] = tail(res["output"], 40)
    return res


def train_runs(args, runs: list[dict], clock: Clock, workdir: Path, env: dict, summary: dict) -> None:
    """Continue every run with --max-minutes, concurrently or one after another."""
    todo = [r for r in runs if trainable(r)]
    for r in runs:
        if r not in todo:
            r["train"] = {"skipped": r["before"].get("error") or r["before"].get("full_valid_error")}
    left = clock.left() - args.reserve_s
    minutes, cut = plan_minutes(args.budget_minutes, len(todo), args.mode, left)
    summary["plan"] = {"mode": args.mode, "runs": len(todo), "budget_minutes": args.budget_minutes,
                       "minutes_per_run": minutes, "budget_cut_to_fit_call": cut, "seconds_left_for_training": round(left)}
    log(f"training: {len(todo)} run(s) {args.mode}ly, {minutes:.2f} min each"
        + (f" (budget {args.budget_minutes} min cut to fit the call)" if cut else ""))
    if not todo or minutes <= 0:
        for r in todo:
            r["train"] = {"skipped": "no time left to train"}
        return
    threads = max(1, (os.cpu_count() or 1) // (len(todo) if args.mode == "concurrent" else 1))

    def start(run: dict) -> tuple[subprocess.Popen, object, float]:
        cmd = [sys.executable, "-m", "pixelrnn.training.train", "--out", str(Path(run["checkpoint"]).parent), "--resume",
               "--device", args.device, "--max-minutes", f"{minutes}", "--threads", str(threads),
               *shlex.split(args.train_args)]
        run["train"] = {"cmd": shlex.join(cmd), "max_minutes": minutes}
        handle = open(workdir / f"train-{run['name']}.log", "wb")
        return spawn(cmd, handle, env), handle, time.monotonic()

    def finish(run: dict, proc, handle, started: float) -> None:
        # The process's own clock stops it; this bound only catches one that hangs.
        killed = wait_or_kill(proc, started + minutes * 60 + TRAIN_GRACE - time.monotonic())
        handle.close()
        text = (workdir / f"train-{run['name']}.log").read_text(errors="replace")
        run["train"].update(rc=proc.returncode, killed=killed, seconds=round(time.monotonic() - started, 1),
                            stopped_by_max_minutes="stopping cleanly" in text, output=tail(text, 25))

    if args.mode == "concurrent":
        started = [(run, *start(run)) for run in todo]
        for run, proc, handle, t0 in started:
            finish(run, proc, handle, t0)
    else:
        for run in todo:
            finish(run, *start(run))


def hand_over(runs: list[dict], out: Path, files_used: int) -> None:
    """Copy each advanced run's last.pt (and a metrics JSON, if the file limit allows) under out/runs/NAME."""
    advanced = [r for r in runs if "step" in r["after"] and r["after"]["step"] > r["before"]["step"]]
    with_metrics = files_used + 2 * len(advanced) <= MAX_FILES_BACK
    for run in runs:
        run["returned"] = []
        if run not in advanced:
            continue
        dest = out / "runs" / run["name"]
        dest.mkdir(parents=True, exist_ok=True)
        src = Path(run["checkpoint"])
        if src.stat().st_size > MAX_FILE_BYTES:
            run["returned_error"] = f"{src} is {src.stat().st_size} bytes, over the {MAX_FILE_BYTES}-byte limit on files back"
            continue
        shutil.copy2(src, dest / "last.pt")
        run["returned"].append(str(dest / "last.pt"))
        if with_metrics:
            train_metrics = src.parent / "metrics.json"
            metrics = {k: run[k] for k in ("name", "before", "after")}
            metrics["train"] = {k: v for k, v in run.get("train", {}).items() if k != "output"}
            metrics["train_metrics"] = json.loads(train_metrics.read_text()) if train_metrics.exists() else None
            write_json(dest / "metrics.json", metrics)
            run["returned"].append(str(dest / "metrics.json"))


def session(args) -> int:
    clock = Clock(args.call_limit_s, args.margin_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": args.device, "phases": {}}
    save = lambda: write_json(out / "gpu_session.json", {**summary, "seconds": round(clock.elapsed(), 1)})  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="gpu-session-") as tmp:
        workdir = Path(tmp)
        env = preflight(args, summary, workdir)
        if args.device == "cuda" and not summary["machine"]["cuda_available"]:
            summary["error"] = "torch sees no CUDA device here; nothing was run"
            save()
            log(f"error: {summary['error']}")
            return 2
        paths = find_runs(args.runs)
        if not paths:
            summary["error"] = f"no runs given and none match {DEFAULT_GLOB}"
            save()
            log(f"error: {summary['error']}")
            return 2
        runs = []
        for path in paths:
            name = re.sub(r"[^A-Za-z0-9._-]", "_", path.parent.name)  # a folder name that can come back
            run = {"name": name, "checkpoint": str(path), "before": {}, "after": {}}
            try:
                run["before"] = snapshot(path)
            except ValueError as e:  # CheckpointError: missing, truncated, corrupt
                run["before"] = {"error": str(e)}
                log(f"skipping {path}: {e}")
            runs.append(run)
        summary["runs"] = runs
        save()

        t = time.monotonic()
        readable = [r["checkpoint"] for r in runs if "error" not in r["before"]]
        scores = evaluate_in_child(readable, args.device, min(EVAL_TIMEOUT, clock.left() - AFTER_RESERVE), workdir, env)
        add_scores(runs, "before", scores)
        summary["machine"]["device_name"] = scores.get("device_name")
        summary["phases"]["evaluate_before"] = round(time.monotonic() - t, 1)
        save()

        # The tests and the bench get what the training at its full budget, the "after" evaluation
        # and the hand-over leave: training is what the call is for.
        args.reserve_s = training_wall_s(args.budget_minutes, sum(map(trainable, runs)), args.mode) + AFTER_RESERVE
        for phase, step in (("tests", run_tests), ("bench", run_bench)):
            t = time.monotonic()
            summary[phase] = {"skipped": "--skip"} if phase in args.skip else step(args, clock, out, workdir, env)
            summary["phases"][phase] = round(time.monotonic() - t, 1)
            log(f"{phase}: " + (summary[phase].get("skipped") or f"rc {summary[phase]['rc']} in {summary[phase]['seconds']} s"))
            save()

        t = time.monotonic()
        args.reserve_s = AFTER_RESERVE
        train_runs(args, runs, clock, workdir, env, summary)
        summary["phases"]["train"] = round(time.monotonic() - t, 1)
        save()

        t = time.monotonic()
        for run in runs:
            if "error" in run["before"]:
                continue
            try:
                run["after"] = snapshot(Path(run["checkpoint"]))
            except ValueError as e:
                run["after"] = {"error": str(e)}
            if "cmd" in run.get("train", {}) and "step" in run["after"]:
                # Per second spent in training steps (the checkpoints' hours), not counting the
                # process's start and validations: what concurrent and sequential runs compare on.
                steps = run["after"]["step"] - run["before"]["step"]
                seconds = ((run["after"]["hours"] or 0.0) - (run["before"]["hours"] or 0.0)) * 3600
                run["train"].update(steps=steps, step_seconds=round(seconds, 1),
                                    steps_per_second=round(steps / seconds, 2) if seconds > 0 else None)
        readable = [r["checkpoint"] for r in runs if "step" in r["after"]]
        add_scores(runs, "after", evaluate_in_child(readable, args.device, min(EVAL_TIMEOUT, clock.left()), workdir, env))
        summary["phases"]["evaluate_after"] = round(time.monotonic() - t, 1)
        files_used = 1 + int(bool(summary["bench"].get("json")))
        hand_over(runs, out, files_used)
        save()
    for run in runs:
        b, a = run["before"], run["after"]
        log(f"{run['name']}: step {b.get('step')} -> {a.get('step')}, full valid NLL "
            f"{b.get('full_valid_nll_nats', b.get('full_valid_error', b.get('error')))} -> "
            f"{a.get('full_valid_nll_nats', a.get('full_valid_error', a.get('error')))} nats")
    # 1: some run came back with nothing (unreadable, data missing, not advanced or too big).
    return 0 if all(run["returned"] for run in runs) else 1


# ---------------------------------------------------------------------------- command line

def prepare(data_root: str) -> int:
    """Here, before the GPU machine's call: copy the data the long runs need into the carried folder."""
    from pixelrnn.runtime.datasets import DataError, binarized_mnist_dir

    try:
        source = binarized_mnist_dir()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = sorted(source.glob("*.npz"))
    if not files:
        print(f"error: no .npz files in {source} (set BINARIZED_MNIST_DIR)", file=sys.stderr)
        return 2
    dest = Path(data_root) / "binarized_mnist"
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, dest / f.name)
    size = sum(f.stat().st_size for f in files) / 2**20
    print(f"copied {len(files)} file(s), {size:.1f} MiB, to {dest}; on the GPU machine: bash scripts/gpu_train.sh, "
          f"carrying {data_root}, within 600 s")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="scripts/gpu_train.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help=f"run directories or last.pt files (default: {DEFAULT_GLOB})")
    p.add_argument("--out", default=env("OUT"), help="where results go (default: $OUT, which the GPU machine hands back)")
    p.add_argument("--budget-minutes", type=float, default=float(env("GPU_BUDGET_MINUTES", "8")),
                   help="minutes of training summed over the runs ($GPU_BUDGET_MINUTES, default 8)")
    p.add_argument("--mode", choices=("concurrent", "sequential"), default=env("GPU_MODE", "concurrent"))
    p.add_argument("--device", choices=("cuda", "cpu"), default=env("GPU_SESSION_DEVICE", "cuda"))
    p.add_argument("--call-limit-s", type=float, default=float(env("GPU_CALL_LIMIT_S", "600")),
                   help="the GPU machine's time limit on one call ($GPU_CALL_LIMIT_S)")
    p.add_argument("--margin-s", type=float, default=30.0, help="left unused before the call limit")
    p.add_argument("--data-root", default=DATA_ROOT, help="carried data (binarized_mnist/*.npz)")
    p.add_argument("--skip", default=env("GPU_SKIP", ""), help="comma-separated phases to skip: tests, bench")
    p.add_argument("--tests-timeout", type=float, default=TESTS_TIMEOUT)
    p.add_argument("--bench-timeout", type=float, default=BENCH_TIMEOUT)
    p.add_argument("--bench-args", default=env("BENCH_ARGS", ""), help="extra bench.sampling flags ($BENCH_ARGS)")
    # E.g. "--epochs 30": a run that reaches the end of its schedule on the GPU stops there, and
    # a longer schedule must be asked for (it changes the cosine learning rate from here on).
    p.add_argument("--train-args", default=env("GPU_TRAIN_ARGS", ""), help="extra training.train flags ($GPU_TRAIN_ARGS)")
    p.add_argument("--prepare", action="store_true", help="here: copy the data into --data-root and stop")
    p.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)  # the child process's mode
    args = p.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip - {"tests", "bench"}:
        p.error(f"--skip: unknown phase(s) {', '.join(sorted(args.skip - {'tests', 'bench'}))}")
    if args.device == "cpu" and not args.evaluate and env("GPU_SESSION_ALLOW_CPU") != "1":
        p.error("--device cpu is for testing this script; set GPU_SESSION_ALLOW_CPU=1 to allow it")
    if not (args.prepare or args.evaluate) and not args.out:
        p.error("give --out DIR or set $OUT")
    if args.budget_minutes <= 0:
        p.error("--budget-minutes must be positive")
    args.reserve_s = 0.0  # seconds each phase leaves for the later ones; session() sets it per phase
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    checkout_imports()  # before anything imports pixelrnn's subpackages
    if args.prepare:
        return prepare(args.data_root)
    if args.evaluate:
        print(json.dumps(evaluate(args.runs, args.device)))
        return 0
    signal.signal(signal.SIGTERM, end_children)
    return session(args)


if __name__ == "__main__":
    sys.exit(main())
