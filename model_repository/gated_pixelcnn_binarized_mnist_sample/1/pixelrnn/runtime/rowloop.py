"""The one row-sampling loop: how a sampling job turns cell calls into images.

Every sampler built on row cells goes through here: the server's engine (server/engine/scheduler.py,
many sequences per cell call), `export.cells.sample_cached` (the torch cells), the benches and
the tests' oracle. What makes images identical on every path is decided in this file only:
- one `draw_row_uniforms` per row of every stage, known rows included, from the job's own
  stream (runtime/randomness.py), so a job resumed after k known rows skips exactly k draws;
- known rows are copied (FORCE) instead of sampled, their uniforms still drawn;
- multi-scale models run two stages: the small image (H/f x W/f) first, then the full image,
  whose grid pixels (every f-th column of every f-th row) are the small image's, copied
  (FIXED), and whose every row gets that row of the condition map computed from the small
  image. Known rows of the full image give the small image's known rows (the grid rows among
  them).

A runner runs the cells: `stages` (list of Stage), `factor`, `levels`, `num_classes`,
`initial_state(stage, batch)`, `run_row(stage, state, uniforms, temperature, forced, force,
labels, condition, fixed) -> (row (B, C, W) int, logprob (B,), new state)` and, for
multi-scale models, `condition(small images) -> (B, cond, H, W)`. runtime/runner.py runs the
exported ONNX graphs; export/cells has a torch runner. State is opaque here: only several
sequences in one call (`call_row`) need it to be numpy arrays with the batch on axis 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pixelrnn.runtime import request
from pixelrnn.runtime.randomness import draw_row_uniforms, sampling_rng


@dataclass(frozen=True)
class Stage:
    name: str
    channels: int
    height: int
    width: int
    conditioned: bool = False  # the multi-scale big cell: condition rows and grid columns as inputs


@dataclass
class SampleSpec:
    """What a sampling job asks for; `check` holds it to runtime/request.py's rules."""

    batch: int = 1
    temperature: float = 1.0  # 0 is greedy
    seed: int = 0
    labels: np.ndarray | None = None  # (B,) int64 (one id stands for all), class-conditional models only
    known: np.ndarray | None = None  # (B, C, R, W): the first R rows are kept as given

    def check(self, runner, max_batch: int | None = None) -> "SampleSpec":
        """Every field by runtime/request.py's rules for the runner's model (`max_batch`: the
        most images one job may hold; None: not bounded here), in place: labels become (B,)
        int64, known rows int64. Raises request.RequestError (a ValueError) naming the field."""
        last = runner.stages[-1]
        self.batch = request.check_batch(self.batch, max_batch)
        self.temperature = request.check_temperature(self.temperature)
        self.seed = request.check_seed(self.seed)
        self.labels = request.check_labels(self.labels, self.batch, int(runner.num_classes or 0))
        self.known = request.check_known(self.known, self.batch, (last.channels, last.height, last.width), runner.levels)
        return self


@dataclass
class RowSequence:
    """One job's progress through its stages: canvases, state, and the random stream."""

    spec: SampleSpec
    stages: list[Stage]
    factor: int
    rng: np.random.Generator
    canvases: list[np.ndarray]  # per stage (B, C, H_s, W_s) int64, known values filled in
    known_rows: list[int]  # per stage
    state: tuple = ()
    stage: int = 0
    row: int = 0
    condition: np.ndarray | None = None  # big stage: (B, cond, H, W)

    @classmethod
    def open(cls, runner, spec: SampleSpec) -> "RowSequence":
        """Start the job `spec` (checked first: SampleSpec.check) at its first row."""
        spec.check(runner)
        stages = list(runner.stages)
        factor = int(getattr(runner, "factor", 1) or 1)
        b = spec.batch
        canvases = [np.zeros((b, st.channels, st.height, st.width), np.int64) for st in stages]
        known = None if spec.known is None else np.asarray(spec.known, np.int64)
        r = 0 if known is None else known.shape[2]
        if len(stages) == 1:
            known_rows = [r]
        else:  # multi-scale: the small image's known rows are the grid rows among them
            known_rows = [math.ceil(r / factor), r]
            if r:
                canvases[0][:, :, :known_rows[0]] = known[:, :, ::factor, ::factor]
        if r:
            canvases[-1][:, :, :r] = known
        seq = cls(spec, stages, factor, sampling_rng(spec.seed), canvases, known_rows)
        seq.state = runner.initial_state(0, b)
        return seq

    @property
    def done(self) -> bool:
        return self.stage == len(self.stages)

    @property
    def image(self) -> np.ndarray:
        """The full-size canvas (B, C, H, W) uint8."""
        return self.canvases[-1].astype(np.uint8)

    def fixed(self) -> np.ndarray | None:
        """Conditioned stage: (W,) bool, the columns of this row on the small image's grid."""
        if not self.stages[self.stage].conditioned:
            return None
        f = self.factor
        return (np.arange(self.stages[self.stage].width) % f == 0) & (self.row % f == 0)

    def group(self) -> tuple:
        """Sequences with equal groups can share one cell call (same stage, same grid columns)."""
        fixed = self.fixed()
        return self.stage, None if fixed is None else fixed.tobytes()

    def inputs(self) -> dict:
        """This row's cell inputs, drawing its uniforms from the stream (call once per row)."""
        st, b = self.stages[self.stage], self.spec.batch
        inputs = dict(
            uniforms=draw_row_uniforms(self.rng, b, st.channels, st.width),
            temperature=np.full(b, self.spec.temperature, np.float64),
            forced=self.canvases[self.stage][:, :, self.row],
            force=np.full(b, self.row < self.known_rows[self.stage]),
            labels=self.spec.labels,
            condition=None,
            fixed=self.fixed(),
        )
        if st.conditioned:
            inputs["condition"] = self.condition[:, :, self.row]
        return inputs

    def take(self, runner, row: np.ndarray, state) -> None:
        """Record the row the cell made and move on (to the next stage at the end of one)."""
        self.canvases[self.stage][:, :, self.row] = row
        self.state = state
        self.row += 1
        if self.row < self.stages[self.stage].height:
            return
        self.stage, self.row = self.stage + 1, 0
        if self.done:
            return
        # Multi-scale: the small image is complete; it conditions the big stage and fills its grid.
        small = self.canvases[self.stage - 1]
        self.condition = np.asarray(runner.condition(small), np.float32)
        f, big = self.factor, self.canvases[self.stage]
        big[:, :, ::f, ::f] = small
        r = self.known_rows[self.stage]
        if r:
            big[:, :, :r] = self.spec.known  # the full image's known rows, over the grid just copied
        self.state = runner.initial_state(self.stage, self.spec.batch)


def call_row(runner, seqs: list[RowSequence]) -> list[tuple[np.ndarray, np.ndarray, tuple]]:
    """One cell call for sequences of one `group()`; draws each one's uniforms. Returns per
    sequence (row (B, C, W) int64, logprob (B,) float32, new state); `take` records them."""
    stage = seqs[0].stage
    if len(seqs) == 1:  # no copies, and any kind of state (torch tensors on a GPU too)
        inputs = seqs[0].inputs()
        row, logprob, state = runner.run_row(stage, seqs[0].state, **inputs)
        return [(np.asarray(row, np.int64), np.asarray(logprob, np.float32), state)]
    each = [s.inputs() for s in seqs]
    inputs = {
        "uniforms": np.concatenate([e["uniforms"] for e in each], axis=2),  # (W, C, B): batch last
        "temperature": np.concatenate([e["temperature"] for e in each]),
        "forced": np.concatenate([e["forced"] for e in each]),
        "force": np.concatenate([e["force"] for e in each]),
        "labels": np.concatenate([e["labels"] for e in each]) if each[0]["labels"] is not None else None,
        "condition": np.concatenate([e["condition"] for e in each]) if each[0]["condition"] is not None else None,
        "fixed": each[0]["fixed"],
    }
    state = tuple(np.concatenate(parts, axis=0) for parts in zip(*(s.state for s in seqs)))
    row, logprob, new_state = runner.run_row(stage, state, **inputs)
    offsets = np.cumsum([0] + [s.spec.batch for s in seqs])
    return [(np.asarray(row[a:b], np.int64), np.asarray(logprob[a:b], np.float32), tuple(x[a:b] for x in new_state))
            for a, b in zip(offsets[:-1], offsets[1:])]


def sample(runner, spec: SampleSpec, progress=None) -> np.ndarray:
    """One job alone, start to end: images (B, C, H, W) uint8. `progress(i)` after every row,
    counting on through the stages."""
    seq = RowSequence.open(runner, spec)
    done = 0
    while not seq.done:
        (row, _, state), = call_row(runner, [seq])
        seq.take(runner, row, state)
        if progress is not None:
            progress(done)
        done += 1
    return seq.image
