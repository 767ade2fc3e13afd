"""TEST ONLY (tests/test_cluster.py): the shipped NAME_sample model with two test hooks.

The cluster fixture copies the repository, renames the sampler's model.py to shipped_model.py
and puts this file in its place, with the seed in a file `stuck_seed` beside it.

- Stuck sends: a START with that SEED and no KNOWN rows gets a sink whose second response send
  never returns, as a send stuck in Triton 2.51's gRPC stream handler does (server/engine/outbox.py,
  "Stuck sends"); a client resuming that sequence sends KNOWN rows, so it is not caught again.
- A ledger: every START's seed, when it starts and when that request ends (done or error),
  appended to `ledger-<tritonserver pid>` beside this file, so that a test which freezes this
  stub can tell which images are open on this replica (the kill mid-image in test_cluster.py).

Everything else is the shipped model, which therefore carries no test hook.
"""
import os
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the stub imports this file by path; shipped_model.py is beside it

import shipped_model  # noqa: E402

STUCK_SEED = int((HERE / "stuck_seed").read_text())
LEDGER = HERE / f"ledger-{os.getppid()}"  # the stub is tritonserver's child: one ledger per replica run


def record(event: str, seed: int) -> None:
    # One short append per line, closed at once: a reader sees whole lines, even with this stub stopped.
    with open(LEDGER, "a") as f:
        f.write(f"{event} {seed}\n")


class StuckSink:
    """A ResponseSink whose second send_rows never returns."""

    def __init__(self, sink):
        self.sink, self.sends = sink, 0

    def send_rows(self, events) -> None:
        self.sends += 1
        if self.sends > 1:
            threading.Event().wait()  # for ever: the engine must find it stuck and go on without it
        self.sink.send_rows(events)

    def done(self) -> None:
        self.sink.done()

    def error(self, message: str, code=None) -> None:
        self.sink.error(message, code)

    def cancelled(self) -> bool:
        return self.sink.cancelled()


class LedgerSink:
    """A START request's ResponseSink that records the request's end in the ledger."""

    def __init__(self, sink, seed: int):
        self.sink, self.seed = sink, seed

    def send_rows(self, events) -> None:
        self.sink.send_rows(events)

    def done(self) -> None:
        record("end", self.seed)
        self.sink.done()

    def error(self, message: str, code=None) -> None:
        record("end", self.seed)
        self.sink.error(message, code)

    def cancelled(self) -> bool:
        return self.sink.cancelled()


class TritonPythonModel(shipped_model.TritonPythonModel):
    def initialize(self, args):
        super().initialize(args)
        start = self.engine.start

        def start_with_hooks(key, spec, sink, *rest, **kw):
            if spec.seed == STUCK_SEED and spec.known is None:
                sink = StuckSink(sink)
            record("start", spec.seed)
            return start(key, spec, LedgerSink(sink, spec.seed), *rest, **kw)

        self.engine.start = start_with_hooks
        shipped_model.pb_utils.Logger.log_warn(f"TEST ONLY: seed {STUCK_SEED}'s sends get stuck, sequences recorded in {LEDGER.name} "
                                               "(tests/triton_test_model.py)")
