"""Crash-safe training: a run SIGKILLed mid-epoch resumes to the very weights of an uninterrupted
run; damaged checkpoints are refused with one line naming the file by every command that reads
them; a crash while a checkpoint is written never leaves a partial file as the latest one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pixelrnn.export import build_engine
from pixelrnn.training import checkpoint, evaluate, train
from pixelrnn.training.checkpoint import load_checkpoint, save_checkpoint
from pixelrnn.training.models import build_model

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parent.parent
# 1024 binary 6x6 images, 8 per batch: 128 steps per epoch. Checkpoints every 5 steps never fall
# on an epoch boundary before step 640, so every checkpoint of a 600-step run is mid-epoch.
PER_EPOCH, EVERY, LONG = 128, 5, 600
FLAGS = ["--arch", "pixelcnn", "--data", "synthetic", "--data-arg", "size=6", "--data-arg", "count=1024", "--bits", "1",
         "--hidden", "6", "--layers", "1", "--model-arg", "input_kernel=3", "--batch-size", "8", "--lr", "0.01",
         "--valid-every", "50", "--checkpoint-every", str(EVERY), "--log-every", "5", "--valid-images", "16",
         "--seed", "3", "--threads", "1"]
SHORT = 20
HAVE_PROC = Path("/proc/self/fd").is_dir()  # to tell which file a write goes to
DAMAGE = ["truncated", "flipped", "garbage", "empty"]
PROBLEM = {"truncated": "truncated", "flipped": "checksum mismatch", "garbage": "not a pixelrnn checkpoint", "empty": "empty file"}


def train_cli(out, *extra):
    return [sys.executable, "-m", "pixelrnn.training.train", *extra, "--out", str(out)]


def popen(cmd):
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def damage(src: Path, dst: Path, how: str) -> Path:
    raw = src.read_bytes()
    if how == "truncated":
        raw = raw[: len(raw) * 2 // 3]
    elif how == "flipped":  # inside the payload: only the checksum can tell
        raw = bytearray(raw)
        for i in range(len(raw) // 2, len(raw) // 2 + 4):
            raw[i] ^= 0xA5
        raw = bytes(raw)
    elif how == "garbage":
        raw = os.urandom(len(raw))
    else:
        raw = b""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(raw)
    return dst


def assert_same_run(a: dict, b: dict, records: bool = True) -> None:
    """Same step, weights, optimizer moments and (with `records`) history and metrics, bit for bit."""
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    if records:
        assert a["history"] == b["history"] and a["metrics"] == b["metrics"]


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """An uninterrupted SHORT-step run (in process): the reference, and a valid checkpoint to damage."""
    out = tmp_path_factory.mktemp("short")
    assert train.main(FLAGS + ["--out", str(out), "--steps", str(SHORT)]) == 0
    return out


# ---------------------------------------------------------------------------- killed runs

@pytest.mark.slow
def test_sigkill_mid_epoch_then_bare_resume_equals_uninterrupted(tmp_path):
    """SIGKILL right after the first checkpoint lands; `--out DIR --resume` alone (the flags come
    from the checkpoint) finishes the run with the uninterrupted run's weights, optimizer, history."""
    reference = popen(train_cli(tmp_path / "ref", *FLAGS, "--steps", str(LONG)))
    victim = popen(train_cli(tmp_path / "victim", *FLAGS, "--steps", str(LONG)))
    last = tmp_path / "victim" / "last.pt"
    try:
        deadline = time.monotonic() + 90
        while not last.exists():
            assert victim.poll() is None, f"ended before its first checkpoint: {victim.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 90 s"
            time.sleep(0.005)
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=30)
        assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    finally:
        if victim.poll() is None:
            victim.kill()
    killed = load_checkpoint(last)  # whatever the kill interrupted, the latest checkpoint is whole
    assert 0 < killed["step"] < LONG and killed["step"] % EVERY == 0 and killed["step"] % PER_EPOCH != 0

    resumed = subprocess.run(train_cli(tmp_path / "victim", "--resume", "--threads", "1"), cwd=REPO,
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {last} at step {killed['step']}" in resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == LONG
    _, err = reference.communicate(timeout=180)
    assert reference.returncode == 0, err[-3000:]

    final = load_checkpoint(last)
    assert_same_run(final, load_checkpoint(tmp_path / "ref" / "last.pt"))
    assert load_checkpoint(tmp_path / "victim" / "best.pt")["step"] == load_checkpoint(tmp_path / "ref" / "best.pt")["step"]
    assert temp_files(tmp_path / "victim") == []
    assert json.loads((tmp_path / "victim" / "metrics.json").read_text())["finished"]


KILL_DURING_SECOND_SAVE = """
import os, signal, sys
from pixelrnn.training import checkpoint, train
real, saves = checkpoint._write_all, []

def write_half_then_die(f, header, data):
    if ".last.pt." in os.readlink(f"/proc/self/fd/{f.fileno()}"):
        saves.append(1)
        if len(saves) == 2:
            f.write(header)
            f.write(data[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    real(f, header, data)

checkpoint._write_all = write_half_then_die
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_PROC, reason="needs /proc to see which file is being written")
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(short_run, tmp_path):
    """Killed halfway through writing the step-10 checkpoint: last.pt is still the whole step-5
    file, the half-written temp file is never taken for it, and resume clears it and finishes
    with the uninterrupted weights."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_SAVE, *FLAGS, "--steps", str(SHORT), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert load_checkpoint(out / "last.pt")["step"] == EVERY
    partial = temp_files(out)
    assert len(partial) == 1 and partial[0].startswith(".last.pt.")
    assert (out / partial[0]).stat().st_size < (out / "last.pt").stat().st_size

    assert train.main(FLAGS + ["--out", str(out), "--steps", str(SHORT), "--resume"]) == 0
    assert temp_files(out) == []
    assert_same_run(load_checkpoint(out / "last.pt"), load_checkpoint(short_run / "last.pt"))


@pytest.mark.skipif(not HAVE_PROC, reason="needs /proc to see which file is being written")
def test_failed_checkpoint_write_is_one_line_and_the_run_resumes(short_run, tmp_path, monkeypatch, capsys):
    """A write error (disk full) on the step-10 save: exit 2 with one line, the step-5 file intact,
    no temp file, and resume reaches the uninterrupted weights."""
    real, saves = checkpoint._write_all, []

    def disk_full_on_second_last(f, header, data):
        if ".last.pt." in os.readlink(f"/proc/self/fd/{f.fileno()}"):
            saves.append(1)
            if len(saves) == 2:
                f.write(header)
                f.write(data[: len(data) // 2])
                raise OSError(28, "No space left on device")
        real(f, header, data)

    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "_write_all", disk_full_on_second_last)
    assert train.main(FLAGS + ["--out", str(out), "--steps", str(SHORT)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: [Errno 28] No space left on device" and not any("Traceback" in line for line in err)
    assert load_checkpoint(out / "last.pt")["step"] == EVERY and temp_files(out) == []
    monkeypatch.setattr(checkpoint, "_write_all", real)
    assert train.main(FLAGS + ["--out", str(out), "--steps", str(SHORT), "--resume"]) == 0
    assert_same_run(load_checkpoint(out / "last.pt"), load_checkpoint(short_run / "last.pt"))


def test_resume_takes_the_run_flags_from_the_checkpoint_unless_given(short_run, tmp_path):
    """A bare --resume continues with the saved schedule (not the defaults, which would change the
    batch size and the length); flags given again win, --steps or --epochs replacing both."""
    out = tmp_path / "run"
    assert train.main(FLAGS + ["--out", str(out), "--steps", str(SHORT), "--stop-at", "7"]) == 0
    assert train.main(["--out", str(out), "--resume", "--threads", "1"]) == 0
    # --stop-at validates at step 7, which the reference never did: compare the training state only
    assert_same_run(load_checkpoint(out / "last.pt"), load_checkpoint(short_run / "last.pt"), records=False)
    saved = load_checkpoint(out / "last.pt")["train_args"]
    assert saved["batch_size"] == 8 and saved["steps"] == SHORT and saved["stop_at"] is None and "explicit" not in saved

    assert train.main(["--out", str(out), "--resume", "--threads", "1", "--epochs", "0.25"]) == 0  # 32 steps
    assert load_checkpoint(out / "last.pt")["step"] == PER_EPOCH // 4


# ---------------------------------------------------------------------------- damaged checkpoints

def run_in_process(cli: str, bad: Path, tmp_path: Path) -> int:
    if cli == "train --resume":
        return train.main(["--out", str(bad.parent), "--resume", "--threads", "1"])
    if cli == "evaluate":
        return evaluate.main(["--checkpoint", str(bad), "--limit", "4"])
    return build_engine.main(["--checkpoint", str(bad), "--out", str(tmp_path / "export"), "--tensorrt", "off"])


def assert_one_line(err: str, bad: Path, problem: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0] and problem in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("cli", ["train --resume", "evaluate", "build_engine"])
def test_damaged_checkpoint_is_refused_with_one_line(short_run, tmp_path, capsys, cli, how):
    bad = damage(short_run / "last.pt", tmp_path / "run" / "last.pt", how)
    before = bad.read_bytes()
    capsys.readouterr()
    assert run_in_process(cli, bad, tmp_path) == 2
    assert_one_line(capsys.readouterr().err, bad, PROBLEM[how])
    assert bad.read_bytes() == before  # a refused resume does not overwrite the evidence
    assert not (tmp_path / "export").exists()


def tiny_checkpoint(path: Path, config: dict, weights_config: dict | None = None, **extra) -> Path:
    torch.manual_seed(0)
    model = build_model("pixelcnn", dict(weights_config or config))
    data = {"name": "synthetic", "size": 6, "bits": 1, "count": 16}
    save_checkpoint(path, {"arch": "pixelcnn", "config": config, "model": model.state_dict(), "data": data, **extra})
    return path


def test_resume_from_a_checkpoint_that_does_not_fit_is_one_line(short_run, tmp_path, capsys):
    """Weights or optimizer state that do not fit the model the config builds: the file is named,
    not a multi-line RuntimeError from load_state_dict."""
    config = load_checkpoint(short_run / "last.pt")["config"]
    wider = tiny_checkpoint(tmp_path / "wider" / "last.pt", config, {**config, "hidden": 9})
    assert train.main(["--out", str(wider.parent), "--resume"]) == 2
    assert_one_line(capsys.readouterr().err, wider, "'input_conv.weight' has shape (9, 1, 3, 3) in the file")
    exported = tiny_checkpoint(tmp_path / "no-optimizer" / "last.pt", config)  # like the ones export tests write
    assert train.main(["--out", str(exported.parent), "--resume"]) == 2
    assert_one_line(capsys.readouterr().err, exported, "no optimizer state")


@pytest.mark.slow
def test_real_entry_points_refuse_a_damaged_checkpoint(short_run, tmp_path):
    """The commands as a user types them, `make serve CHECKPOINT=...` included: exit != 0, no
    traceback, the file named; make stops before the server and writes no repository."""
    bad = damage(short_run / "last.pt", tmp_path / "run" / "last.pt", "flipped")
    repository = tmp_path / "repository"
    commands = {
        "train": train_cli(bad.parent, "--resume"),
        "evaluate": [sys.executable, "-m", "pixelrnn.training.evaluate", "--checkpoint", str(bad)],
        "build_engine": [sys.executable, "export/build_engine.py", "--checkpoint", str(bad), "--out", str(tmp_path / "x")],
        # -o setup: the venv is there already; setup must not reinstall under a test
        "make serve": ["make", "-s", "-o", "setup", "serve", f"CHECKPOINT={bad}", f"REPOSITORY={repository}",
                       "PY=" + sys.executable],
    }
    running = {name: popen(cmd) for name, cmd in commands.items()}
    for name, proc in running.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0, (name, out, err)
        assert "Traceback" not in err and str(bad) in err and "checksum mismatch" in err, (name, err)
        if name != "make serve":
            assert len(err.strip().splitlines()) == 1, (name, err)
    assert not repository.exists() and "tritonserver ready" not in out
