"""Scale-out benchmark: aggregate throughput of 1, 2, 3 tritonserver replicas behind nginx.

    python -m bench.cluster --json bench/results/cluster.json [--checkpoint PATH] [--replicas 1,2,3]
                            [--streams 16] [--score-clients 2] [--seconds 5] [--repeats 5] [--quick]
    python -m bench.cluster --sustained --json bench/results/cluster.json [--replicas 3] [--streams 48]
                            [--score-clients 4] [--seconds 60] [--quick]

The checkpoint is exported once into a temporary repository (build_engine --repository, the
default settings) and served by max(--replicas) tritonserver replicas (server/cluster.py). One
nginx proxy per replica count balances over the first N replicas, so every count is measured
against the same running servers (an idle replica costs next to no CPU), and the counts are
interleaved in every repeat, the order rotating, so other load on the machine hits them alike.

Replica 0 is also measured without the proxy ("direct"), which is what nginx itself costs.
One window, through one proxy (or direct), for --seconds: --streams threads, each with its own
client.PixelClient, sample one single-image sequence after another (each its own seed), and
--score-clients threads score --score-batch images per call, back to back. When the time is up
each thread finishes its call; the rates are what was done over the window's wall time. Every
error is counted (exit status 1 if there was one); every image must have all its rows in order.
Each replica's share of the score calls comes from its Triton metrics
(nv_inference_request_success), its share of the sequences from the sampler's metrics (pushed
every 0.5 s: a window's count may take in a few of the window before).

On this project's 2-core machine the clients, nginx and every replica share the two cores (with
whatever else runs): a second replica can use what one leaves idle (one sampler engine is one
Python process), beyond that more replicas add processes, not CPU, and the aggregate flattens;
the figures say what the proxy and the extra processes cost, not how a cluster of machines
scales. Windows vary a lot on a shared machine: each setting's min and max are kept with its
median.

--sustained is the issue's long run instead: max(--replicas) replicas (default 3) behind one
proxy, --streams sampling streams (48) and --score-clients scoring clients (4) for --seconds
(60), once, with bench/load.py's clients: a warm-up image per stream, then images back to back,
every image checked after the run against the in-process sampler for its seed and every score
against the in-process scorer. Then every replica's sampler must hold no live sequence, all of
them together must count every sequence completed and none failed, and scoring and sampling must
have reached every replica (their metrics); any failure is an error. Its results go under the
key "sustained" of the --json file, whose other keys are kept.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import (Errors, export, machine_info, metric, metrics_text, model_record, percentiles_ms, reexec_with_malloc_env, result,
                          score_images, settled_metrics, verify_content, write_json)
from pixelrnn.client.library import ClientError, PixelClient
from pixelrnn.runtime import protocol as p
from pixelrnn.server.cluster import Cluster, Proxy

DEFAULT_CHECKPOINT = "checkpoints/pixelcnn_binarized_mnist.pt"
DEFAULTS = dict(replicas="1,2,3", streams=16, score_clients=2, score_batch=16, seconds=5.0, repeats=5)
QUICK = dict(replicas="1,2", streams=4, score_clients=1, score_batch=4, seconds=1.5, repeats=1)
SUSTAINED = dict(replicas="3", streams=48, score_clients=4, score_batch=16, seconds=60.0, repeats=1)
SUSTAINED_QUICK = dict(replicas="2", streams=4, score_clients=1, score_batch=4, seconds=2.0, repeats=1)


def counts(cluster: Cluster, name: str) -> list[tuple[float, float]]:
    """Per replica: (score calls done, sequences started), from its metrics page."""
    out = []
    for url in cluster.metrics_urls:
        text = metrics_text(url)
        out.append((metric(text, "nv_inference_request_success", model=p.score_model(name)) or 0.0,
                    metric(text, "pixelrnn_sampler_events_total", model=p.sample_model(name), event="started") or 0.0))
    return out


def window(url: str, manifest: dict, args, seeds, errors: list[str]) -> dict:
    """One measured window through the proxy at `url` (see the module notes)."""
    name, (c, h, w) = manifest["name"], manifest["shape"]
    stop = [0.0]
    done = {"images": 0, "scored": 0}
    lock = threading.Lock()
    images = np.random.default_rng(0).integers(0, manifest["levels"], (args.score_batch, c, h, w)).astype(np.uint8)

    def sampler():
        try:
            with PixelClient(url, model=name) as client:
                while time.perf_counter() < stop[0]:
                    with lock:
                        seed = next(seeds)
                    rows = list(client.sample(1, seed=seed))
                    if [(r.stage, r.index) for r in rows][-h:] != [(rows[-1].stage, i) for i in range(h)]:
                        raise ClientError(f"seed {seed}: rows missing or out of order")
                    with lock:
                        done["images"] += 1
        except ClientError as e:
            errors.append(str(e))

    def scorer():
        try:
            with PixelClient(url, model=name) as client:
                while time.perf_counter() < stop[0]:
                    client.score(images)
                    with lock:
                        done["scored"] += len(images)
        except ClientError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=sampler) for _ in range(args.streams)]
    threads += [threading.Thread(target=scorer) for _ in range(args.score_clients)]
    start = time.perf_counter()
    stop[0] = start + args.seconds
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_s": done["images"] / seconds, "pixels_per_s": done["images"] * c * h * w / seconds,
            "scored_images_per_s": done["scored"] / seconds, "images": done["images"], "scored": done["scored"]}


def run(args, manifest: dict, cluster: Cluster, targets: dict[str, str]) -> dict:
    """Every target ({"direct": a replica's own gRPC address, "N": the proxy over N replicas})
    measured --repeats times, interleaved."""
    seeds, errors = iter(range(1, 10**9)), []
    for url in targets.values():  # warm-up: connections, sessions, first calls
        window(url, manifest, argparse.Namespace(**{**vars(args), "seconds": min(1.0, args.seconds)}), seeds, errors)
    runs = {n: [] for n in targets}
    order = list(targets)
    for repeat in range(args.repeats):
        for n in order[repeat % len(order):] + order[:repeat % len(order)]:
            before = counts(cluster, manifest["name"])
            result = window(targets[n], manifest, args, seeds, errors)
            after = counts(cluster, manifest["name"])
            result["score_calls_per_replica"] = [int(a[0] - b[0]) for a, b in zip(after, before)]
            result["sequences_per_replica"] = [int(a[1] - b[1]) for a, b in zip(after, before)]
            runs[n].append(result)
            print(f"  {n}, repeat {repeat + 1}: {result['pixels_per_s']:,.0f} pixels/s sampled, "
                  f"{result['scored_images_per_s']:,.0f} images/s scored; score calls per replica "
                  f"{result['score_calls_per_replica']}", file=sys.stderr, flush=True)
    results = {}
    for n, rs in runs.items():
        results[n] = {
            "pixels_per_s": statistics.median(r["pixels_per_s"] for r in rs),
            "pixels_per_s_min": min(r["pixels_per_s"] for r in rs), "pixels_per_s_max": max(r["pixels_per_s"] for r in rs),
            "images_per_s": statistics.median(r["images_per_s"] for r in rs),
            "scored_images_per_s": statistics.median(r["scored_images_per_s"] for r in rs),
            "scored_images_per_s_min": min(r["scored_images_per_s"] for r in rs),
            "scored_images_per_s_max": max(r["scored_images_per_s"] for r in rs),
            "runs": rs,
        }
    one = results["1"]
    for r in results.values():
        r["sampling_vs_one_replica"] = r["pixels_per_s"] / one["pixels_per_s"]
        r["scoring_vs_one_replica"] = r["scored_images_per_s"] / one["scored_images_per_s"]
    return {"results": results, "errors": len(errors), "error_messages": sorted(set(errors))[:20]}


def sustained(args, manifest: dict, folder: Path, cluster: Cluster) -> dict:
    """--sustained (module notes): one long run through the proxy over every replica."""
    from bench import load

    name, (c, h, w) = manifest["name"], manifest["shape"]
    images, labels, source = score_images(args.checkpoint, manifest, 1000, 0)
    errors = Errors()
    before = counts(cluster, name)
    print(f"warm-up, then {args.streams} streams + {args.score_clients} scoring clients through the proxy over "
          f"{cluster.count} replicas for {args.seconds:g} s ...", file=sys.stderr, flush=True)
    samplers, scorers, elapsed = load.run_clients(argparse.Namespace(**{**vars(args), "seed": 1}), cluster.url, manifest, images,
                                                  labels, errors)
    sampled, scored = sum(r["images"] for r in samplers), sum(r["images"] for r in scorers)
    expected = sampled + args.streams  # and one warm-up image per stream

    metrics, _ = settled_metrics([r.metrics_url for r in cluster.replicas], p.sample_model(name), expected)
    completed = sum(m["events"].get("completed", 0) for m in metrics)
    after = counts(cluster, name)
    score_calls = [int(a[0] - b[0]) for a, b in zip(after, before)]
    sequences = [int(a[1] - b[1]) for a, b in zip(after, before)]
    for k, m in enumerate(metrics):
        if m["live"] != 0:
            errors.add(f"replica {k}'s sampler still holds {m['live']} live sequences after the run")
        for event in ("failed", "expired", "disconnected", "cancelled", "refused", "stuck"):
            if m["events"].get(event):
                errors.add(f"replica {k}'s sampler counts {m['events'][event]} {event} sequences or requests")
    if completed != expected:
        errors.add(f"the replicas' samplers count {completed} completed sequences, expected {expected}")
    if not all(score_calls) or not all(sequences):
        errors.add(f"the load did not reach every replica: score calls {score_calls}, sequences {sequences}")
    print(f"checking {sampled} images and {scored} scores against the in-process graphs ...", file=sys.stderr, flush=True)
    verified = verify_content(samplers, scorers, manifest, folder, images, labels, errors)
    rows = sum(r["rows"] for r in samplers)
    return {
        "model": model_record(manifest, args.checkpoint),
        "machine": machine_info(),
        "checkpoint": args.checkpoint,
        "settings": {"replicas": cluster.count, "streams": args.streams, "score_clients": args.score_clients,
                     "score_batch": args.score_batch, "seconds": args.seconds},
        "seconds": elapsed,
        "score_data": source,
        "totals": {"images_sampled": sampled, "rows": rows, "images_scored": scored,
                   "score_requests": sum(len(r["latencies"]) for r in scorers)},
        "throughput": {"pixels_per_s": sampled * c * h * w / elapsed, "images_sampled_per_s": sampled / elapsed,
                       "rows_per_s": rows / elapsed, "images_scored_per_s": scored / elapsed},
        "latency_ms": {"first_row": percentiles_ms([f for r in samplers for f in r["firsts"]]),
                       "row": percentiles_ms([g for r in samplers for g in r["gaps"]]),
                       "score_request": percentiles_ms([x for r in scorers for x in r["latencies"]])},
        "score_calls_per_replica": score_calls,  # the warm-up's included
        "sequences_per_replica": sequences,
        "sampler_metrics": [{"live": m["live"], "events_total": m["events"]} for m in metrics],
        "expected_completed": expected,
        "content": verified,
        "errors": errors.total(),
        "error_messages": errors.report(),
    }


def report_sustained(payload: dict) -> None:
    s, t, lat = payload["settings"], payload["throughput"], payload["latency_ms"]
    print(f"{s['replicas']} replicas behind nginx, {s['streams']} sampling streams + {s['score_clients']} scoring clients for "
          f"{payload['seconds']:.0f} s: {payload['totals']['images_sampled']} images ({t['pixels_per_s']:,.0f} pixels/s), "
          f"{payload['totals']['images_scored']} scored ({t['images_scored_per_s']:,.0f}/s); first row p50 "
          f"{lat['first_row'].get('p50', 0):.0f} ms; score calls per replica {payload['score_calls_per_replica']}, "
          f"sequences per replica {payload['sequences_per_replica']}; {payload['content']['images_checked']} images and "
          f"{payload['content']['scores_checked']} scores checked, {payload['content']['images_wrong']} and "
          f"{payload['content']['scores_wrong']} wrong")
    print(f"errors: {payload['errors']}")


def write_sustained(path: str, payload: dict) -> None:
    """The run under "sustained" in the JSON at `path`, its other keys kept."""
    existing = json.loads(Path(path).read_text()) if Path(path).exists() else {"benchmark": "cluster"}
    write_json(path, {**existing, "sustained": payload})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--replicas", help=f"replica counts (default {DEFAULTS['replicas']})")
    parser.add_argument("--streams", type=int)
    parser.add_argument("--score-clients", type=int)
    parser.add_argument("--score-batch", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--quick", action="store_true", help="a short run (for the tests)")
    parser.add_argument("--sustained", action="store_true",
                        help="one long run through the proxy over max(--replicas) replicas instead (module notes)")
    args = parser.parse_args(argv)
    defaults = (SUSTAINED_QUICK if args.quick else SUSTAINED) if args.sustained else QUICK if args.quick else DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        counts_wanted = sorted({int(n) for n in args.replicas.split(",")})
    except ValueError:
        counts_wanted = []
    if args.sustained and counts_wanted:
        counts_wanted = [max(counts_wanted)]
    elif not counts_wanted or counts_wanted[0] != 1:
        parser.error(f"--replicas: replica counts from 1 (the baseline of the ratios), e.g. 1,2,3; got {args.replicas!r}")

    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        work = Path(tmp)
        manifest, _, _, export_seconds = export(args.checkpoint, work)  # the repository's default settings
        if args.sustained:
            with Cluster(work / "repository", counts_wanted[0], run_dir=work / "run", supervise=False) as cluster:
                payload = sustained(args, manifest, work / "export", cluster)
            report_sustained(payload)
            if args.json:
                write_sustained(args.json, payload)
            return 1 if payload["errors"] else 0
        with Cluster(work / "repository", max(counts_wanted), run_dir=work / "run", supervise=False) as cluster:
            proxies = {}
            try:
                for n in counts_wanted:
                    proxies[n] = Proxy([r.ports["grpc"] for r in cluster.replicas[:n]], work / f"proxy-{n}").start()
                print(f"{max(counts_wanted)} replicas up; measuring {counts_wanted} ...", file=sys.stderr, flush=True)
                # "direct": replica 0 without the proxy, what nginx itself costs
                targets = {"direct": cluster.replicas[0].grpc_url, **{str(n): proxy.url for n, proxy in proxies.items()}}
                measured = run(args, manifest, cluster, targets)
            finally:
                for proxy in proxies.values():
                    proxy.stop()
    out = {
        **result("cluster", model_record(manifest, args.checkpoint, export_seconds=export_seconds)),
        "checkpoint": args.checkpoint,
        "settings": {k: getattr(args, k) for k in ("replicas", "streams", "score_clients", "score_batch", "seconds", "repeats")},
        "proxy": "nginx (Debian), grpc_pass to an upstream of the replicas, least_conn",
        **measured,
    }
    for n, r in out["results"].items():
        print(f"{n}: sampling {r['pixels_per_s']:,.0f} pixels/s ({r['sampling_vs_one_replica']:.2f}x one), "
              f"scoring {r['scored_images_per_s']:,.0f} images/s ({r['scoring_vs_one_replica']:.2f}x one)")
    print(f"errors: {out['errors']}")
    if args.json:
        write_json(args.json, out)
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    reexec_with_malloc_env("bench.cluster", sys.argv[1:])
    sys.exit(main())
