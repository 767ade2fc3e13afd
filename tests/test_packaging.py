"""What an install puts into site-packages: one top-level package, `pixelrnn`, holding the
pipeline's folders as subpackages; the checkout's tools (bench/, tests/, scripts/) stay out."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pixelrnn import cli

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_holds_one_top_level_package(tmp_path):
    # --no-build-isolation: the venv's setuptools builds it, nothing is fetched.
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"pixelrnn"}
    for sub in ("training", "export", "runtime", "server", "client", "web"):
        assert f"pixelrnn/{sub}/__init__.py" in names
    assert "pixelrnn/server/triton_models/sample_model.py" in names and "pixelrnn/web/static/index.html" in names
    assert "pixelrnn/server/deploy/nginx.conf.template" in names
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "pixelrnn = pixelrnn.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()


def test_the_console_command_lists_and_dispatches(capsys):
    assert cli.main([]) == 2 and "commands:" in capsys.readouterr().out
    assert cli.main(["no-such-command"]) == 2 and "unknown command 'no-such-command'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse's own --help: the command reached the module
        cli.main(["evaluate", "--help"])
    assert stop.value.code == 0 and "--checkpoint" in capsys.readouterr().out


def test_every_command_names_a_module_with_main():
    import importlib
    for name, (module, _, _) in cli.COMMANDS.items():
        assert callable(importlib.import_module(module).main), name
