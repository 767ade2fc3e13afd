"""The engine-workers section: the sampler's throughput by engine workers, in process and through
Triton, what more cores would give, and the scorer's instances and threads."""
from __future__ import annotations

from bench.report.common import bullets, header, k, met, para, pct, table


def _ratios(figures: dict) -> str:
    return ", ".join(f"{n}: {k(f['pixels_per_s'])} ({f['vs_one_worker']:.2f}x; server and clients kept "
                     f"{f['cores_busy']:.2f} cores busy, each worker in its cell calls {pct(f['worker_cell_share'])} "
                     "of the time)" for n, f in figures.items())


def _background(b: dict) -> str:
    share = b["benchmark_cpu_s"] / b["wall_s"]
    group = ""
    if b.get("autogroup"):
        group = (" The kernel groups processes by session (autogroup): a niced job in another session still takes "
                 "its group's share of the cores" + (f"; the benchmark ran in a group of nice {b['autogroup_nice']}."
                                                     if b.get("autogroup_nice") else "."))
    return (f"Meanwhile the rest of the machine took {b['niced_cpu_s']:.0f} CPU seconds in niced processes (background "
            f"training) and {b['other_cpu_s']:.0f} in others, in {b['wall_s']:.0f} s; the benchmark, its server "
            f"included, averaged {share:.2f} cores.{group}")


def engine_workers(d: dict) -> list[str]:
    r, cfg, t = d["results"], d["config"], d["targets"]
    ip = r["in_process"]["sequences"]
    rows = []
    for s, x in ip.items():
        for n, f in x["workers"].items():
            rows.append([s, n, k(f["pixels_per_s"]), f"{f['vs_one_worker']:.2f}x", f"{f['cells_alone']['vs_one_thread']:.2f}x"])
    projected = []
    for s, x in ip.items():
        pr = x["projection"]
        projected.append([s, f"{x['python_us_per_row']:.0f} us", f"{x['cell_us_per_row']:.0f} us", pct(x["python_share"]),
                          *(f"{pr[n]['speedup']:.2f}x ({pr[n]['amdahl']:.2f}x)" for n in ("2", "4", "8", "16")),
                          f"{pr['amdahl_limit']:.1f}x"])
    goals = [f"{key.replace('_', ' ')}: {v['value']:.2f}x against {'more than ' if key.startswith('triton') else ''}"
             f"{v['target']:g}x, {met(v['met'])}" for key, v in t.items() if v["value"] is not None]
    blocks = header("Engine workers", "engine_workers.json", d,
                    "`python -m bench.engine_workers --json bench/results/engine_workers.json`") + [
        para(f"The sampler's row engine with {' and '.join(str(n) for n in cfg['workers'])} workers (threads, a cell session "
             "each), in process with single-image sequences started together, and through tritonserver with concurrent "
             f"single-image gRPC streams; {cfg['repeats']} interleaved repeats, medians. `cells alone`: the same images "
             "split over as many threads, cell calls only, in the same run: what the cores let that many workers gain "
             f"then, whatever the engine does. Every image the same for its seed with any worker count: "
             f"{'yes' if r['identical'] else 'NO'}. {_background(d['background'])}"),
        table(["sequences", "workers", "pixels/s", "x one worker", "cells alone"], rows),
        para("Projection to more cores, one worker per core, from the CPU seconds of one worker (between cell calls: the "
             "engine's Python, which holds the GIL; inside them: the session run, which does not) and the cell's CPU time "
             "per call at each worker's batch (sequences / workers): a step takes at least the Python of every sequence, "
             "the workers taking turns, and at least one worker's Python and call. In brackets the plain Amdahl figure "
             "(the Python share serial, the cell share divided evenly); the last column is its limit."),
        table(["sequences", "Python per row", "cell per row", "Python share", "2 cores", "4 cores", "8 cores", "16 cores",
               "at most"], projected),
    ]
    if r.get("triton"):
        tr = r["triton"]
        sc = tr["scoring"]
        names = {"w1": "shipped (1 instance, 1 thread)", "i2": "2 instances", "t2": "2 onnxruntime threads"}
        blocks.append(para(
            "Through tritonserver the same cores also run tritonserver, gRPC, the sampler's senders and the clients. "
            "`cores busy`: their CPU seconds together per second of a run. The time in cell calls is wall time (the "
            "sampler's cell-seconds metric), waits for a core included: a second worker that is in its calls most "
            "of the time while the run does not get shorter is waiting for a core."))
        blocks.append(bullets(
            [f"through tritonserver, {s} streams, pixels/s by workers: {_ratios(f)}" for s, f in tr["streams"].items()]
            + [f"the scorer, {sc['images']} images, {label}: " + ", ".join(
                f"{names.get(kind, kind)} {f['images_per_s']:.0f} images/s ({f['vs_shipped']:.2f}x)" for kind, f in sc[how].items())
               for how, label in (("concurrent", f"{sc['clients']} clients sending 1-image requests"),
                                  ("chunks", f"one client sending chunks of {sc['chunk']}"))]))
    if goals:
        blocks.append(bullets(goals))
    return blocks
