"""`make serve CHECKPOINT=<damaged file>` stops at once, non-zero, with one `error:` line that
names the file: what the user sees in the terminal (make's own "recipe failed" line may follow)."""
import hashlib
import os
import re
import subprocess
import time

import pytest

from pixelrnn.server.launcher import free_port
from tests.deployment import REPO, stop_group

CHECKPOINT = REPO / "checkpoints" / "pixelcnn_binarized_mnist.pt"
TIMEOUT_S = 120  # build_engine refuses a damaged checkpoint in a few seconds; make setup, when current, in < 1 s


def setup_is_current() -> bool:
    """What scripts/setup.sh checks before it skips the reinstall."""
    stamp = REPO / ".venv" / ".pyproject.sha256"
    want = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    return stamp.is_file() and stamp.read_text().strip() == want


def damage(kind: str, path):
    if kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        path.write_bytes(CHECKPOINT.read_bytes()[: CHECKPOINT.stat().st_size // 2])
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_make_serve_refuses_a_damaged_checkpoint_in_one_line(tmp_path, kind):
    checkpoint = damage(kind, tmp_path / f"{kind}.pt")
    repository = tmp_path / "repository"
    # A stale .venv would make `make setup` reinstall it, inside a test run, under other tests:
    # then leave setup out (make -o setup). CI runs `make test`, which sets up first.
    skip_setup = [] if setup_is_current() else ["-o", "setup"]
    argv = ["make", "--no-print-directory", *skip_setup, "serve", f"CHECKPOINT={checkpoint}", f"REPOSITORY={repository}",
            f"GRPC_PORT={free_port()}", f"HTTP_PORT={free_port()}", f"METRICS_PORT={free_port()}"]
    start = time.monotonic()
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop_group(process)
        pytest.fail(f"make serve with a {kind} checkpoint still running after {TIMEOUT_S} s")
    seconds = time.monotonic() - start
    print(f"make serve ({kind}): exit {process.returncode} after {seconds:.1f} s\n{output}")
    assert process.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert str(checkpoint) in errors[0]
    assert "Traceback" not in output
    assert "-m server" not in output and "tritonserver ready" not in output  # it never got to serving
    assert not repository.exists() or not any(repository.iterdir())
    # Nothing else but make's echo of the commands it ran, set-up lines and make's own failure line.
    others = [line for line in output.splitlines() if line and not line.startswith("error:")]
    # Under `make test` this make is a sub-make, whose failure line reads "make[1]: ***".
    assert all(line.startswith(("bash scripts/setup.sh", "[setup]", ".venv/bin/python export/build_engine.py", "make: ***"))
               or re.match(r"make\[\d+\]: \*\*\*", line) for line in others), others
