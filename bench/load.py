"""Load test: many concurrent sampling streams plus scoring traffic on the real Triton server.

    python -m bench.load --json bench/results/load.json [--checkpoint PATH] [--streams 32]
                         [--seconds 60] [--score-clients 2] [--score-batch 16] [--compare-per-row] [--quick]

The checkpoint is exported into a temporary Triton repository and served by tritonserver on free
loopback ports (bench/common.served; the repository's settings are recorded). After one
untimed image per stream and one request per scorer (warm-up), for --seconds:

  samplers  --streams threads, each with its own gRPC channel and stream, sample one
            single-image sequence after another, every one with its own seed. The arrival time
            of every row is stamped in the stream's callback: the per-row latency is the time
            between consecutive rows of a sequence, the time to first row runs from sending the
            request. Every image is checked (rows in order, shapes, values within the levels,
            log-probabilities) and, after the run, compared with the in-process sampler's image
            for its seed. When the time is up, each stream finishes the image in flight.
  scorers   --score-clients threads, each with its own client.PixelClient, score --score-batch
            images per request, back to back: the checkpoint's validation images (its data
            spec, runtime.datasets.load), random levels where those are not there; after the
            run every score is compared with the in-process scorer's NLL of its image.

A response may carry several rows (row coalescing): "row" latency is between consecutive rows
of a sequence (0 between rows of one response), "response" latency between its responses.
--compare-per-row first runs the same load with ROWS_PER_RESPONSE 1 (one response per row, no
coalescing) on the same server, recorded under "per_row": both in one run.

Then the sampler's own metrics (pixelrnn_sampler_live_sequences and
pixelrnn_sampler_events_total on Triton's metrics endpoint, pushed every 0.5 s) must show every
sequence completed and none still live. Every error (an error response, a malformed image, a
score or image that differs from the in-process graphs, a sequence left live or not
completed) is counted and its message kept; the exit status is 1 if there was one. The clients
run in this process, on the same CPUs as the server, so the latencies include the clients' own
Python time.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time

import numpy as np

# verify_content and percentiles_ms: also load.*, as bench.cluster and the tests use them.
from bench.common import (Errors, Served, add_repository_args, finish, labels_for, machine_line, percentiles_ms,  # noqa: F401
                          reexec_with_malloc_env, result, score_images, served, settled_metrics, stream_image, verify_content)
from pixelrnn.client.library import ROW_OUTPUTS, PixelClient, Row, assemble
from pixelrnn.client.stream import SampleStream
from pixelrnn.runtime import protocol as p
from pixelrnn.server.repository import stage_rows

DEFAULT_CHECKPOINT = "checkpoints/pixelcnn_binarized_mnist.pt"
DEFAULTS = dict(streams=32, seconds=60.0, score_clients=2, score_batch=16)
QUICK = dict(streams=8, seconds=5.0, score_clients=1, score_batch=4)


# ---------------------------------------------------------------------------- clients

def timed_stream(url: str, timeout: float) -> SampleStream:
    """One gRPC channel and stream to the server, one sequence at a time; every response is
    stamped with its arrival time in the stream's callback (client/stream.py)."""
    return SampleStream(url, outputs=(*ROW_OUTPUTS, p.CALL_BATCH), timeout=timeout)


def sample_timed(stream: SampleStream, model: str, seed: int, labels: np.ndarray | None,
                 per_response: int | None = None) -> tuple[list[Row], list[float], list[int], list[float]]:
    """One image -> (rows, [send time, then each row's arrival], CALL_BATCH per row, [send time,
    then each response's arrival]); rows that shared a response arrived together. An error
    response raises RuntimeError, no final response within the stream's timeout StreamTimeout."""
    rows, sent = stream_image(stream, model, 1, seed, labels, per_response, sequence_id=next(_ids))
    responses, k = [sent], 0
    while k < len(rows):  # each response's rows are consecutive in `rows`
        responses.append(rows[k].at)
        k += rows[k].response_rows
    return rows, [sent] + [r.at for r in rows], [r.batched for r in rows], responses


_ids = itertools.count(1)  # sequence ids, unique within this run (a fresh server)


def check_image(rows: list[Row], manifest: dict) -> None:
    """Raises ValueError unless `rows` are one whole image of the model: every stage's rows in
    order, the right shapes, values within the levels, log-probabilities <= 0."""
    c, _, w = manifest["shape"]
    widths = ([manifest["multiscale"]["small_shape"][2]] if manifest.get("multiscale") else []) + [w]
    want = [(s, i) for s, h in enumerate(stage_rows(manifest)) for i in range(h)]
    got = [(r.stage, r.index) for r in rows]
    if got != want:
        raise ValueError(f"rows (stage, index) {got[:3]}... are not {want[:3]}... ({len(got)} rows, expected {len(want)})")
    for r in rows:
        if r.pixels.shape != (1, c, widths[r.stage]) or r.pixels.dtype != np.uint8:
            raise ValueError(f"row {r.stage}/{r.index}: {r.pixels.dtype} {r.pixels.shape}, expected uint8 (1, {c}, {widths[r.stage]})")
        if r.pixels.max() >= manifest["levels"]:
            raise ValueError(f"row {r.stage}/{r.index}: value {r.pixels.max()} >= {manifest['levels']} levels")
        if r.logprob.shape != (1,) or not (np.isfinite(r.logprob[0]) and r.logprob[0] <= 1e-4):
            raise ValueError(f"row {r.stage}/{r.index}: log p {r.logprob} is not a log-probability")


def wait(barrier: threading.Barrier) -> None:
    """Wait at `barrier`; one broken by a client that failed to start is passed (that failure is counted)."""
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass


def sampler(url: str, manifest: dict, seeds, opened: threading.Barrier, start: threading.Barrier, stop: list[float],
            errors: Errors, k: int, timeout: float, per_response: int | None = None) -> dict:
    """One stream's loop: images until stop[0] (set at the release), the last one finished."""
    labels, model = labels_for(manifest, 1, k), manifest["name"]
    stream = timed_stream(url, timeout)
    gaps, response_gaps, firsts, batched, images, drawn = [], [], [], [], 0, []
    try:
        try:
            rows, _, _, _ = sample_timed(stream, model, next(seeds), labels, per_response)  # warm-up
            check_image(rows, manifest)
        except Exception as e:  # noqa: BLE001 - counted; the timed loop still runs
            errors.add(f"warm-up: {e}")
            stream.close(cancel=True)
            stream = timed_stream(url, timeout)
        wait(opened)
        start.wait()
        while time.perf_counter() < stop[0]:
            try:
                seed = next(seeds)
                rows, times, calls, responses = sample_timed(stream, model, seed, labels, per_response)
                check_image(rows, manifest)
                drawn.append((seed, labels, assemble(rows, tuple(manifest["shape"]))))  # checked after the run
            except Exception as e:  # noqa: BLE001 - counted; a broken stream is replaced
                errors.add(str(e))
                stream.close(cancel=True)
                stream = timed_stream(url, timeout)
                continue
            firsts.append(times[1] - times[0])
            gaps.extend(np.diff(times[1:]))
            response_gaps.extend(np.diff(responses[1:]))
            batched.extend(calls)
            images += 1
    finally:
        stream.close(cancel=True)
    return {"images": images, "gaps": gaps, "response_gaps": response_gaps, "firsts": firsts, "batched": batched,
            "rows": images * sum(stage_rows(manifest)), "responses": len(response_gaps) + images, "drawn": drawn}


def scorer(url: str, manifest: dict, images: np.ndarray, labels, batch: int, opened: threading.Barrier,
           start: threading.Barrier, stop: list[float], errors: Errors, k: int, timeout: float) -> dict:
    """One scoring client's loop: requests of `batch` images (cycling through `images`) until stop[0]."""
    wait(opened)  # every stream placed first (run_clients): even reading the model's config is a call
    client = PixelClient(url, manifest["name"], timeout=timeout)
    latencies, scored, offset, answers = [], 0, k * batch, []

    def once() -> None:
        nonlocal offset
        take = np.arange(offset, offset + batch) % len(images)
        offset += batch
        nll = client.score(images[take], None if labels is None else labels[take]).nll_nats
        if nll.shape != (batch,):
            raise ValueError(f"{nll.shape[0]} scores for {batch} images")
        answers.append((take, nll))  # compared with the in-process scorer after the run

    try:
        try:
            once()  # warm-up
        except Exception as e:  # noqa: BLE001
            errors.add(f"warm-up: {e}")
        start.wait()
        while time.perf_counter() < stop[0]:
            t = time.perf_counter()
            try:
                once()
            except Exception as e:  # noqa: BLE001 - counted, the loop goes on
                errors.add(str(e))
                continue
            latencies.append(time.perf_counter() - t)
            scored += batch
    finally:
        client.close()
    return {"images": scored, "latencies": latencies, "answers": answers}


# ---------------------------------------------------------------------------- the run

def run_clients(args, url: str, manifest: dict, images: np.ndarray, labels, errors: Errors,
                per_response: int | None = None) -> tuple[list[dict], list[dict], float]:
    """args.streams samplers and args.score_clients scorers on `url`, warmed up, then timed together
    for args.seconds (images from seed args.seed on, each its own) -> (the samplers' results, the
    scorers', the timed seconds). bench/cluster.py --sustained runs them through its proxy."""
    seeds = itertools.count(args.seed)  # next() is atomic under the GIL: every image its own seed
    stop = [float("inf")]
    # The streams open and warm up before any score call: a stream stays on the replica a
    # least_conn proxy chose when it opened, and any unary call in flight at that moment (a
    # score, or a scoring client reading the model's config) would tilt the choice
    # (bench/cluster.py --sustained: 3 streams on one replica, 1 on the other, and every score
    # call then went to the other). Placed while nothing else is in flight, the streams spread
    # evenly, and so do the score calls.
    opened = threading.Barrier(args.streams + args.score_clients)
    start = threading.Barrier(args.streams + args.score_clients + 1)
    timeout = max(60.0, 2 * args.seconds)
    results, threads = {}, []

    def run(key, fn, *a):
        try:
            results[key] = fn(*a)
        except Exception as e:  # noqa: BLE001 - a client that could not even start
            errors.add(f"{key}: {e}")
            opened.abort()  # nobody waits for it at the barriers
            start.abort()

    for k in range(args.streams):
        threads.append(threading.Thread(target=run, args=(f"sampler {k}", sampler, url, manifest, seeds, opened, start, stop,
                                                          errors, k, timeout, per_response), daemon=True))
    for k in range(args.score_clients):
        threads.append(threading.Thread(target=run, args=(f"scorer {k}", scorer, url, manifest, images, labels,
                                                          args.score_batch, opened, start, stop, errors, k, timeout),
                                     daemon=True))
    for t in threads:
        t.start()
    try:
        start.wait()  # every client warmed up
    except threading.BrokenBarrierError:
        pass
    began = time.perf_counter()
    stop[0] = began + args.seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    samplers = [r for key, r in results.items() if key.startswith("sampler")]
    scorers = [r for key, r in results.items() if key.startswith("scorer")]
    return samplers, scorers, elapsed


def run_load(args, srv: Served, per_response: int | None = None, completed_before: int = 0) -> dict:
    """One load phase; `per_response`: the streams' ROWS_PER_RESPONSE (None: rows coalesced);
    `completed_before`: sequences this server completed in earlier phases."""
    manifest, folder, server = srv.manifest, srv.folder, srv.server
    images, labels, source = score_images(args.checkpoint, manifest, 1000, args.seed)
    errors = Errors()
    print(f"warm-up, then {args.streams} streams + {args.score_clients} scoring clients for {args.seconds:g} s ...",
          file=sys.stderr, flush=True)
    samplers, scorers, elapsed = run_clients(args, server.grpc_url, manifest, images, labels, errors, per_response)
    sampled = sum(r["images"] for r in samplers)
    rows = sum(r["rows"] for r in samplers)
    scored = sum(r["images"] for r in scorers)
    c, h, w = manifest["shape"]
    # Every sequence this fresh server saw: one warm-up image per stream and the timed ones.
    expected_completed = completed_before + sampled + args.streams
    (metrics,), settle = settled_metrics([server.metrics_url], p.sample_model(manifest["name"]), expected_completed)
    if metrics["live"] != 0:
        errors.add(f"the sampler still holds {metrics['live']} live sequences {settle:.1f} s after the run")
    if not errors.total():  # failed requests end sequences otherwise: those errors are counted already
        events = metrics["events"]
        if events.get("completed", 0) != expected_completed:
            errors.add(f"the sampler counts {events.get('completed', 0)} completed sequences, expected {expected_completed}")
        for event in ("failed", "expired", "disconnected", "cancelled", "refused"):
            if events.get(event):
                errors.add(f"the sampler counts {events[event]} {event} sequences or requests")
    print(f"checking {sampled} images and {scored} scores against the in-process graphs ...", file=sys.stderr, flush=True)
    verified = verify_content(samplers, scorers, manifest, folder, images, labels, errors)
    batched = np.array([b for r in samplers for b in r["batched"]] or [0])
    per_stream = [r["images"] for r in samplers] or [0]
    return {
        "seconds": elapsed,
        "score_data": source,
        "totals": {"images_sampled": sampled, "rows": rows, "pixels": sampled * c * h * w, "score_requests":
                   sum(len(r["latencies"]) for r in scorers), "images_scored": scored, "errors": errors.total(),
                   "error_messages": errors.report()},
        "throughput": {"rows_per_s": rows / elapsed, "pixels_per_s": sampled * c * h * w / elapsed,
                       "images_sampled_per_s": sampled / elapsed, "images_scored_per_s": scored / elapsed},
        "rows_per_response": per_response,  # the streams' ROWS_PER_RESPONSE (None: coalesced as the server finds them)
        "responses": {"count": sum(r["responses"] for r in samplers),
                      "rows_per_response_mean": rows / max(1, sum(r["responses"] for r in samplers))},
        "latency_ms": {
            # row: between consecutive rows of a sequence (0 between rows that came in one
            # response); response: between consecutive responses of a sequence
            "row": percentiles_ms([g for r in samplers for g in r["gaps"]]),
            "response": percentiles_ms([g for r in samplers for g in r["response_gaps"]]),
            "first_row": percentiles_ms([f for r in samplers for f in r["firsts"]]),
            "score_request": percentiles_ms([x for r in scorers for x in r["latencies"]]),
        },
        "streams": {"images_per_stream_min": int(min(per_stream)), "images_per_stream_max": int(max(per_stream)),
                    "call_batch_mean": float(batched.mean()), "call_batch_max": int(batched.max())},
        "content": verified,
        "sampler_metrics": {"live_sequences": metrics["live"], "events_total": metrics["events"],
                            "expected_completed": expected_completed, "settle_seconds": settle},
    }


# ---------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p_ = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    p_.add_argument("--json", help="write the results here")
    p_.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="the model to export and serve")
    p_.add_argument("--streams", type=int, help=f"concurrent sampling streams (default {DEFAULTS['streams']})")
    p_.add_argument("--seconds", type=float, help=f"how long to keep starting images (default {DEFAULTS['seconds']:g})")
    p_.add_argument("--score-clients", type=int, help=f"concurrent scoring clients (default {DEFAULTS['score_clients']})")
    p_.add_argument("--score-batch", type=int, help=f"images per scoring request (default {DEFAULTS['score_batch']})")
    add_repository_args(p_)
    p_.add_argument("--seed", type=int, default=0, help="the first image's seed (each image takes the next)")
    p_.add_argument("--rows-per-response", type=int, help="the streams' ROWS_PER_RESPONSE (default: none, the server coalesces)")
    p_.add_argument("--compare-per-row", action="store_true",
                    help="first the same load with ROWS_PER_RESPONSE 1 (one response per row, no coalescing) on the "
                         "same server, recorded under per_row, then the load as asked")
    p_.add_argument("--quick", action="store_true",
                    help="smaller defaults for tests: " + ", ".join(f"{k} {v:g}" for k, v in QUICK.items()))
    args = p_.parse_args(argv)
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("streams", "score_batch", "onnx_threads", "score_instances"):
        if getattr(args, k) < 1:
            p_.error(f"--{k.replace('_', '-')} must be at least 1")
    if args.score_clients < 0:
        p_.error("--score-clients must be at least 0")
    if not args.seconds > 0:
        p_.error("--seconds must be > 0")
    if args.rows_per_response is not None and args.rows_per_response < 1:
        p_.error("--rows-per-response must be at least 1")
    return args


def report(payload: dict) -> str:
    t, th, lat, m = payload["totals"], payload["throughput"], payload["latency_ms"], payload["sampler_metrics"]
    cfg, st = payload["config"], payload["streams"]

    def dist(d: dict) -> str:
        if not d.get("count"):
            return "none"
        return f"p50 {d['p50']:.2f}  p90 {d['p90']:.2f}  p99 {d['p99']:.2f}  max {d['max']:.2f} ms  ({d['count']})"

    lines = [
        f"load: {cfg['streams']} sampling streams + {cfg['score_clients']} scoring clients x {cfg['score_batch']} images, "
        f"{payload['seconds']:.1f} s ({cfg['seconds']:g} s + the images in flight), model {payload['model']['name']} "
        f"{' x '.join(map(str, payload['model']['shape']))}",
        f"  sampled  {t['images_sampled']} images, {t['rows']} rows: {th['rows_per_s']:.0f} rows/s, {th['pixels_per_s']:.0f} pixels/s, "
        f"{th['images_sampled_per_s']:.1f} images/s (per stream {st['images_per_stream_min']}..{st['images_per_stream_max']} images, "
        f"{st['call_batch_mean']:.1f} images per cell call)",
        f"  scored   {t['images_scored']} images in {t['score_requests']} requests: {th['images_scored_per_s']:.1f} images/s "
        f"({payload['score_data']})",
        f"  responses          {payload['responses']['count']}, {payload['responses']['rows_per_response_mean']:.2f} rows each "
        f"(ROWS_PER_RESPONSE {payload['rows_per_response'] or 'not set: coalesced'})",
        f"  row latency        {dist(lat['row'])}",
        f"  response latency   {dist(lat['response'])}",
        f"  first row          {dist(lat['first_row'])}",
        f"  score request      {dist(lat['score_request'])}",
        f"  sampler metrics: live sequences {m['live_sequences']}, events "
        + ", ".join(f"{k} {v}" for k, v in sorted(m["events_total"].items())),
        f"  errors: {t['errors']}" + "".join(f"\n    {e['count']} x {e['message']}" for e in t["error_messages"]),
    ]
    before = payload.get("per_row")
    if before:
        lines += [f"  one response per row (phase 1, same server): {before['throughput']['rows_per_s']:.0f} rows/s, "
                  f"{before['totals']['images_sampled']} images, errors {before['totals']['errors']}",
                  f"    row latency        {dist(before['latency_ms']['row'])}",
                  f"    first row          {dist(before['latency_ms']['first_row'])}"]
    lines.append(machine_line(payload["machine"], tritonserver=payload["server"]["tritonserver"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    with served(args.checkpoint, args, prefix="bench-load-") as srv:
        before = None
        if args.compare_per_row:
            print("phase 1 of 2: one response per row (ROWS_PER_RESPONSE 1) ...", file=sys.stderr, flush=True)
            before = run_load(args, srv, per_response=1)
            print("phase 2 of 2: as asked ...", file=sys.stderr, flush=True)
        measured = run_load(args, srv, per_response=args.rows_per_response,
                            completed_before=0 if before is None else before["sampler_metrics"]["expected_completed"])
        if before is not None:
            measured["per_row"] = before
    config = {"checkpoint": args.checkpoint, "streams": args.streams, "stream_images": 1, "seconds": args.seconds,
              "score_clients": args.score_clients, "score_batch": args.score_batch, "seed": args.seed,
              "rows_per_response": args.rows_per_response, "compare_per_row": args.compare_per_row,
              "warmup": "one image per stream and one request per scoring client, not counted", "quick": args.quick}
    model = {**srv.model, "rows_per_image": sum(stage_rows(srv.manifest))}
    payload = result("load", model, config=config, server=srv.record, **measured)
    finish(payload, args.json, report(payload))
    errors = payload["totals"]["errors"] + (payload["per_row"]["totals"]["errors"] if "per_row" in payload else 0)
    if errors:
        print(f"error: {errors} errors under load (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    reexec_with_malloc_env("bench.load", sys.argv[1:])
    sys.exit(main())
