"""The documents cannot drift from what they describe.

- docs/measurements.md is exactly what `python -m bench.report` renders from bench/results/*.json
  now (rerun a bench, then `make docs`); rendering fails on a results file without a section or
  without its "machine" object, so every figure has its date, machine and load.
- The README stays a user's page: at most 300 lines, and its shipped-models table quotes
  bench/results/checkpoints.json.
- No document tells the history of its own making (dates and commit hashes do that).
- Every relative link and image in README.md and docs/*.md exists, down to the heading it names.
"""
import json
import re
from pathlib import Path

import pytest

from bench import report

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
HISTORY = re.compile(r"session [0-9]|this session|last session|next session|previous session", re.IGNORECASE)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def documents() -> list[Path]:
    return [README] + DOCS


def test_measurements_are_what_bench_report_renders_now():
    rendered = report.render()
    assert report.OUT.is_file(), "docs/measurements.md is missing: run make docs"
    assert report.OUT.read_text() == rendered, "docs/measurements.md differs from python -m bench.report: run make docs"


def test_every_results_file_has_its_section_and_machine():
    names = sorted(p.name for p in report.RESULTS.glob("*.json"))
    assert names and set(names) <= set(report.SECTIONS)
    for name in names:
        d = report.load(name)
        if name not in report.MACHINE_OPTIONAL:
            assert all(k in d["machine"] for k in report.MACHINE_KEYS), name


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= 300, f"README.md has {lines} lines (at most 300): move detail to docs/"


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_history_of_its_own_making(path):
    hits = [f"{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1) if HISTORY.search(line)]
    assert not hits, f"{path.relative_to(REPO)}: history wording (use a date or a commit hash):\n" + "\n".join(hits)


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {report.slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.MULTILINE)}


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_images_exist(path):
    broken = []
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists() or REPO not in dest.parents and dest != REPO:
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"{path.relative_to(REPO)}: " + "; ".join(broken)


def test_readme_shipped_models_table_quotes_checkpoints_json():
    results = json.loads((report.RESULTS / "checkpoints.json").read_text())["results"]
    rows = [line for line in README.read_text().splitlines() if line.startswith("|") and ".pt`" in line]
    quoted = {m.group(1) for line in rows for m in re.finditer(r"`([\w.-]+\.pt)`", line)}
    assert quoted == {Path(r["file"]).name for r in results.values()}, "README's table and checkpoints.json list other checkpoints"
    for r in results.values():
        row = next(line for line in rows if f"`{Path(r['file']).name}`" in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert report.nll_text(r) in cells, f"README gives {row!r}, checkpoints.json {report.nll_text(r)!r}"
        assert report.paper_text(r) in cells, f"README gives {row!r}, the paper's figure is {report.paper_text(r)!r}"


def test_readme_names_the_models_the_committed_repository_serves():
    served = report.served_models()
    assert served
    text = README.read_text()
    assert all(f"`{name}`" in text for name in served), served
