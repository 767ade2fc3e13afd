"""Command-line flags that name a data set (`--data NAME --data-dir --bits --data-arg`), shared by
training, evaluation, sampling and the client. numpy only: the client uses them without torch.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses

from pixelrnn.runtime.datasets import DataSpec


def parse_key_values(pairs: list[str] | None, flag: str) -> dict:
    """["hidden=24", "small_config={'layers': 1}"] -> {"hidden": 24, ...} (Python literals, else str)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} expects key=value, got {pair!r}")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="data set: binarized-mnist, fashion-mnist, fashion-mnist-binary, mnist (test only), rgb-patches, synthetic")
    p.add_argument("--data-dir", help="directory of the data files (default: the source's own)")
    p.add_argument("--bits", type=int, help="quantization of grey/colour data: levels = 2**bits (default 8)")
    p.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="other DataSpec field (size, channels, count, binarize, seed, classes=[0,1]); repeatable")


def data_spec_from_args(args: argparse.Namespace, base: dict | None = None) -> DataSpec:
    """The DataSpec named by the flags; `base` (e.g. a checkpoint's spec) fills what they leave out."""
    if args.data is None and base is None:
        raise ValueError("--data is required")
    same = base is not None and args.data in (None, base.get("name"))
    fields = dict(base) if same else {"name": args.data}
    if args.data_dir is not None:
        fields["data_dir"] = args.data_dir
    if args.bits is not None:
        fields["bits"] = args.bits
    extra = parse_key_values(args.data_arg, "--data-arg")
    known = {f.name for f in dataclasses.fields(DataSpec)}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"--data-arg: DataSpec has no field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    fields.update(extra)
    return DataSpec(**fields)
