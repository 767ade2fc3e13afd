"""`pixelrnn COMMAND ...`: one console command for the whole pipeline, in its order.

Each command is the `main` of a module that also runs as `python -m pixelrnn.MODULE`; this only
dispatches, so `pixelrnn train --help` is the trainer's own help.
"""
from __future__ import annotations

import importlib
import sys

# name: (module, what it does, the install extra it needs)
COMMANDS = {
    "train": ("pixelrnn.training.train", "train a model on a named data set (resumable)", "full"),
    "evaluate": ("pixelrnn.training.evaluate", "NLL of a checkpoint on a data split", "full"),
    "ensemble": ("pixelrnn.training.ensemble", "one model from trained checkpoints, their conditionals averaged", "full"),
    "ship": ("pixelrnn.training.ship", "a run's checkpoint without its resume state, to ship", "full"),
    "curves": ("pixelrnn.training.curves", "validation NLL against hours of training, for runs", "full"),
    "sample": ("pixelrnn.export.sample", "sample or complete images from a checkpoint, in process", "full"),
    "export": ("pixelrnn.export.build_engine", "checkpoint -> ONNX (+ TensorRT) -> Triton model repository", "full"),
    "repository": ("pixelrnn.server.repository", "rewrite a model repository from an export folder", "full"),
    "serve": ("pixelrnn.server.launcher", "serve a model repository on tritonserver", "full"),
    "cluster": ("pixelrnn.server.cluster", "tritonserver replicas behind nginx, the gRPC load balancer", "full"),
    "runtime-env": ("pixelrnn.server.runtime_env", "build the Python environment a repository executes in", "full"),
    "client": ("pixelrnn.client.cli", "sample, complete and score against a served model (gRPC)", "client"),
    "web": ("pixelrnn.web.__main__", "the live web page of a served model", "web"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what, _) in COMMANDS.items()]
    return "usage: pixelrnn COMMAND [ARGS...]   (pixelrnn COMMAND --help for its flags)\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pixelrnn: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, _, extra = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and not e.name.startswith("pixelrnn"):
            print(f"pixelrnn {name}: needs the '{extra}' install (pip install 'pixelrnn-serving[{extra}]'): "
                  f"no module named {e.name!r}", file=sys.stderr)
            return 2
        raise
    sys.argv[0] = f"pixelrnn {name}"
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
