"""Sample, complete and score images with a model served by Triton (`python -m pixelrnn.server`).

    python -m pixelrnn.client sample   --url localhost:8001 --model NAME --n 16 --out grid.png [--seed S]
                              [--temperature T] [--label L] [--npy samples.npy] [--retries N]
    python -m pixelrnn.client complete --url ... --model NAME (--input FILE... | --data NAME [--split valid])
                              [--n 4] [--known-rows R] [--k 3] --out grid.png [--npy completions.npy]
    python -m pixelrnn.client score    --url ... --model NAME FILE... [--label L] [--json] [--per-pixel DIR]
    python -m pixelrnn.client ood      --url ... --model NAME (FILE... | --data NAME [--split test] [--n N]) [--json PATH]

Images go in and out as .npy arrays of levels (N x C x H x W, N x H x W for grey models, C x H x W
or H x W for one image) or as PNG files (0..255, mapped to the model's levels). Any failure
prints one line `error: ...` on stderr and exits with 2. With --retries N, sampling and completion
survive N losses of the server: each time the client waits for it (--retry-wait seconds at most)
and resumes the images from the rows it already has, saying so on stderr; with the same seed the
images are those of an uninterrupted run.

Through a TLS proxy (`pixelrnn cluster --tls-cert ...`): --tls, --root-cert CA.pem (the CA that
signed its certificate; implies --tls) and the bearer token from $PIXELRNN_TOKEN (or --token,
which other users can see in the process list). A missing or wrong token is one line
`error: UNAUTHENTICATED: ...`; the token is never printed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from pixelrnn.client.connection import TOKEN_ENV, Credentials, token_from
from pixelrnn.client.library import DEFAULT_URL, ClientError, ModelInfo, PixelClient, assemble
from pixelrnn.runtime.data_flags import add_data_arguments, data_spec_from_args
from pixelrnn.runtime.datasets import load
from pixelrnn.runtime.images import completion_grid, nll_heatmap, read_image_file, save_grid, save_rgb


def display_levels(info: ModelInfo, images: np.ndarray) -> int:
    """The model's levels, for turning levels into grey values; where the server does not say,
    the smallest power of two above the largest value."""
    if info.levels:
        return info.levels
    top = int(images.max()) if images.size else 1
    return min(256, 2 ** max(1, math.ceil(math.log2(top + 1))))


def read_inputs(paths: list[str], client: PixelClient) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """Images uint8 (N, C, H, W) from .npy / PNG files, and (file, index in the file) per image."""
    images, where = [], []
    for path in paths:
        if Path(path).suffix.lower() != ".npy" and not client.info.levels:
            raise ClientError(f"{path}: reading a PNG needs the model's levels, which the server does not publish; give a .npy of levels")
        try:
            arr = read_image_file(path, client.info.levels, client.info.shape)
        except ValueError as e:
            raise ClientError(str(e)) from None
        images.append(client.check_images(arr, what=path))
        where += [(path, i) for i in range(len(arr))]
    if not images:
        raise ClientError("no input files given")
    return np.concatenate(images), where


def data_images(args, client: PixelClient) -> tuple[np.ndarray, np.ndarray | None]:
    """The first --n images of --data's --split, and their labels (conditional models)."""
    try:
        data = load(data_spec_from_args(args), args.split)
    except ImportError as e:  # e.g. rgb-patches reads scikit-image's photographs
        raise ClientError(f"data set {args.data!r} needs the full install (pip install '.[full]'): {e}") from None
    info = client.info
    if data.shape != info.shape or (info.levels and data.levels != info.levels):
        raise ClientError(f"{data.description}: images {data.shape} with {data.levels} levels do not fit model "
                          f"{info.name!r} ({' x '.join(map(str, info.shape))}" + (f", {info.levels} levels)" if info.levels else ")"))
    labels = None
    if info.conditional and args.label is None:
        if data.labels is None:
            raise ClientError(f"{data.description} has no labels and the model is class-conditional: give --label")
        labels = data.labels[:args.n]
    return client.check_images(data.images[:args.n], what=data.description), labels


def warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def resume_args(args, notice=warn) -> dict:
    """PixelClient.sample's retry and pacing arguments: a lost server and each resume are said on stderr."""
    return dict(retries=args.retries, retry_wait_s=args.retry_wait, on_retry=notice, rows_per_response=args.rows_per_response)


def cmd_sample(args, client: PixelClient) -> dict:
    from tqdm import tqdm

    resume = resume_args(args, lambda line: tqdm.write(f"warning: {line}", file=sys.stderr))  # above the progress bar
    rows, stream = [], client.sample(args.n, args.seed, args.temperature, args.label, **resume)  # checks the arguments
    with tqdm(total=client.info.rows, desc="rows", unit="row", file=sys.stderr, leave=False) as bar:
        for row in stream:
            rows.append(row)
            bar.update(1)
    samples = assemble(rows, client.info.shape)
    return write_outputs(args, samples, lambda: (samples, display_levels(client.info, samples), args.nrow))


def cmd_complete(args, client: PixelClient) -> dict:
    if (args.input is None) == (args.data is None):
        raise ClientError("give either --input FILE... or --data NAME")
    if args.n < 1 or args.k < 1:
        raise ClientError("--n and --k must be at least 1")
    if args.input:
        if client.info.conditional and args.label is None:
            raise ClientError(f"model {client.model!r} is class-conditional: give the images' class with --label")
        originals, _ = read_inputs(args.input, client)
        originals, labels = originals[:args.n], None
    else:
        originals, labels = data_images(args, client)
    h = client.info.shape[1]
    known_rows = h // 2 if args.known_rows is None else args.known_rows
    known = np.repeat(originals, args.k, axis=0)  # each example k times, consecutively
    label = np.repeat(labels, args.k) if labels is not None else args.label
    samples = client.complete(known, known_rows, args.seed, args.temperature, label, **resume_args(args))
    levels = display_levels(client.info, np.concatenate([originals, samples]))
    return write_outputs(args, samples, lambda: (completion_grid(originals, samples, levels, known_rows, args.k), 256, args.k + 2))


def write_outputs(args, samples: np.ndarray, grid) -> dict:
    images, levels, nrow = grid()
    try:
        save_grid(images, levels, args.out, nrow=nrow, scale=args.scale)
        if args.npy:
            np.save(args.npy, samples)
    except OSError as e:
        raise ClientError(f"cannot write the output: {e}") from None
    return {"out": str(args.out), "npy": args.npy, "images": int(len(samples)), "shape": list(samples.shape[1:])}


def write_heatmaps(folder: str, where: list[tuple[str, int]], pixel_nll: np.ndarray, scale: int = 8) -> list[str]:
    """One PNG per image: where the model found it surprising (runtime/images.py nll_heatmap),
    all on one scale so that maps compare."""
    heat, paths = nll_heatmap(pixel_nll), []
    try:
        for k, ((file, index), image) in enumerate(zip(where, heat)):
            paths.append(str(save_rgb(image, Path(folder) / f"{k:04d}_{Path(file).stem}_{index}_nll.png", scale)))
    except OSError as e:
        raise ClientError(f"cannot write the per-pixel maps: {e}") from None
    return paths


def cmd_score(args, client: PixelClient) -> dict | None:
    images, where = read_inputs(args.files, client)
    scores = client.score(images, args.label, per_pixel=bool(args.per_pixel))
    records = [{"file": f, "index": i, "nll_nats": float(n), "bits_per_dim": float(b)}
               for (f, i), n, b in zip(where, scores.nll_nats, scores.bits_per_dim)]
    if args.per_pixel:
        for record, path, pixel in zip(records, write_heatmaps(args.per_pixel, where, scores.pixel_nll), scores.pixel_nll):
            record.update(nll_map=path, max_pixel_nll_nats=float(pixel.max()))
    mean = {"nll_nats": float(np.mean(scores.nll_nats)), "bits_per_dim": float(np.mean(scores.bits_per_dim))}
    if args.json:
        print(json.dumps({"model": client.model, "scores": records, "mean": mean}))
        return None
    width = max(len("file"), *(len(r["file"]) for r in records))
    print(f"{'file':<{width}}  {'index':>5}  {'nll_nats':>12}  {'bits_per_dim':>12}")
    for r in records:
        print(f"{r['file']:<{width}}  {r['index']:>5}  {r['nll_nats']:>12.4f}  {r['bits_per_dim']:>12.5f}")
    print(f"{'mean':<{width}}  {len(records):>5}  {mean['nll_nats']:>12.4f}  {mean['bits_per_dim']:>12.5f}")
    return None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pixelrnn.client", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--url", default=DEFAULT_URL, help=f"Triton gRPC address host:port (default {DEFAULT_URL})")
        sub.add_argument("--model", required=True, help="the deployment's model name (serves NAME_sample and NAME_score)")
        sub.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server on any one call or row")
        sub.add_argument("--tls", action="store_true", help="gRPC over TLS (a proxy such as pixelrnn cluster --tls-cert)")
        sub.add_argument("--root-cert", metavar="PEM", help="the CA certificate the server's is signed by (default: the "
                         "system's trusted CAs; implies --tls)")
        sub.add_argument("--token", help=f"bearer token to send (TLS only; default ${TOKEN_ENV} with --tls, which is "
                         "better: a flag shows in the process list)")
        return sub

    def sampling(sub: argparse.ArgumentParser, n: int, what: str) -> None:
        sub.add_argument("--n", type=int, default=n, help=what)
        sub.add_argument("--seed", type=int, help="the same seed gives the same images (default: random)")
        sub.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
        sub.add_argument("--label", type=int, help="class id for every image (class-conditional models)")
        sub.add_argument("--out", required=True, help="PNG grid to write")
        sub.add_argument("--npy", help="also save the images' levels (n, C, H, W) as .npy")
        sub.add_argument("--scale", type=int, default=3, help="enlarge the PNG grid by this factor")
        sub.add_argument("--retries", type=int, default=0,
                         help="if the server goes away, wait for it and resume from the rows received, N times at most")
        sub.add_argument("--retry-wait", type=float, default=60.0, help="seconds to wait for the server each time (default 60)")
        sub.add_argument("--rows-per-response", type=int,
                         help="at most N rows per server response (1: one response per row; default: the server sends "
                              "the rows that are ready together)")

    sample = command("sample", "sample images, streamed row by row")
    sampling(sample, 16, "images to sample")
    sample.add_argument("--nrow", type=int, help="images per grid row")

    complete = command("complete", "complete images from their first rows: grid rows of original | occluded | completions")
    sampling(complete, 4, "examples to complete")
    complete.add_argument("--input", nargs="+", help=".npy / PNG images to complete")
    add_data_arguments(complete)  # instead of --input
    complete.add_argument("--split", default="valid", choices=("train", "valid", "test"))
    complete.add_argument("--known-rows", type=int, help="rows kept (default: half the image)")
    complete.add_argument("--k", type=int, default=3, help="completions per example")

    score = command("score", "print -log p of images (nats and bits per dimension)")
    score.add_argument("files", nargs="+", help=".npy (one image or a batch) or PNG files")
    score.add_argument("--label", type=int, help="class id of every image (class-conditional models)")
    score.add_argument("--json", action="store_true", help="print JSON instead of a table")
    score.add_argument("--per-pixel", metavar="DIR", help="also write a PNG map of each image's per-pixel NLL into DIR")

    ood = command("ood", "is each image like the model's training data? verdicts from NAME_ood (likelihood ratio)")
    ood.add_argument("files", nargs="*", help=".npy (one image or a batch) or PNG files")
    add_data_arguments(ood)  # instead of files
    ood.add_argument("--split", default="test", choices=("train", "valid", "test"))
    ood.add_argument("--n", type=int, default=16, help="images of --data to check")
    ood.add_argument("--label", type=int, help=argparse.SUPPRESS)  # data_images reads it; the detector takes none
    ood.add_argument("--json", metavar="PATH", help="also write every image's scores and verdict here")
    return parser.parse_args(argv)


def cmd_ood(args, client: PixelClient) -> dict | None:
    if bool(args.files) == bool(args.data):
        raise ClientError("give image files or --data NAME (not both)")
    if args.files:
        images, where = read_inputs(args.files, client)
    else:
        images, _ = data_images(args, client)
        where = [(f"{args.data}/{args.split}", i) for i in range(len(images))]
    s = client.ood(images)
    records = [{"file": f, "index": i, "verdict": "out" if o else "in", "llr": float(r), "nll_nats": float(n),
                "background_nll_nats": float(b), "complexity_bits": float(c)}
               for (f, i), o, r, n, b, c in zip(where, s.ood, s.llr, s.nll_nats, s.background_nll_nats, s.complexity)]
    summary = {"model": client.model, "images": len(records), "out_of_distribution": int(s.ood.sum())}
    if args.json:
        try:
            Path(args.json).write_text(json.dumps({**summary, "images": records}, indent=1) + "\n")
        except OSError as e:
            raise ClientError(f"cannot write {args.json}: {e}") from None
    width = max(len("file"), *(len(r["file"]) for r in records)) if records else 4
    print(f"{'file':<{width}}  {'index':>5}  {'verdict':>7}  {'llr':>10}  {'nll_nats':>10}  {'complexity':>10}")
    for r in records:
        print(f"{r['file']:<{width}}  {r['index']:>5}  {r['verdict']:>7}  {r['llr']:>10.2f}  {r['nll_nats']:>10.2f}  "
              f"{r['complexity_bits']:>10.1f}")
    print(f"{summary['out_of_distribution']} of {len(records)} out of distribution")
    return None


COMMANDS = {"sample": cmd_sample, "complete": cmd_complete, "score": cmd_score, "ood": cmd_ood}


def credentials(args) -> Credentials:
    """TLS and the token from --tls, --root-cert, --token and $PIXELRNN_TOKEN."""
    tls = args.tls or args.root_cert is not None
    return Credentials(tls=tls, root_cert=args.root_cert, token=token_from(args.token, tls))


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        with PixelClient(args.url, args.model, timeout=args.timeout, row_timeout=args.timeout,
                         credentials=credentials(args)) as client:
            result = COMMANDS[args.command](args, client)
    except (ClientError, ValueError, OSError) as e:  # runtime.datasets' DataError is a ValueError
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2
    if result is not None:
        result["seconds"] = round(time.monotonic() - started, 3)
        print(json.dumps(result))
    return 0
