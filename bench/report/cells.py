"""Sections on sampling in process: sampling speed, the exported row cells' graphs, and the row
engine's batching."""
from __future__ import annotations

from bench.report.common import bullets, header, ms, para, pct, size_text, spread_ms, table


# -- sampling and the exported cells ---------------------------------------------------------------

def sampling(d: dict) -> list[str]:
    cfg = d["config"]
    rows = []
    for arch, r in d["results"].items():
        t, o = r["cached_torch"], r["cached_onnx"]
        rows.append([arch, size_text(r["model"]["config"]) or "default", f"{r['model']['parameters']:,}",
                     f"{r['naive']['seconds']:.1f} s", f"{t['seconds']:.2f} s ({t['speedup_over_naive']:.0f}x)",
                     f"{o['seconds']:.2f} s ({o['speedup_over_naive']:.0f}x)", f"{o['vs_scoring']:.1f}"])
    tg = d["targets"]
    per = tg["per_arch"]
    after = d.get("load_average_after")
    return header("Sampling speed", "sampling.json", d, "`python -m bench.sampling --json bench/results/sampling.json`") + [
        para(f"Per architecture, with the same randomly initialised model at its default size, batch "
             f"{cfg['batch']}, {cfg['size']}x{cfg['size']}, {cfg['levels']} levels, seed {cfg['seed']}, "
             f"{cfg['threads']} thread: naive sampling (a full forward pass per sub-pixel, extrapolated from its "
             f"first {cfg['naive_rows']} rows per repeat), the cached row cells in torch, and the same cells in "
             "onnxruntime, beside one scoring pass of the same batch. Every path runs "
             f"{cfg['repeats']} times, interleaved; the table gives medians (min and max are in the file) and "
             "speedups are ratios of medians. All paths draw identical images: "
             f"{'yes' if d['identical'] else 'NO'}."
             + (f" Load average after the run: {after[0]:.2f}." if after else "")),
        table(["arch", "size", "parameters", "naive", "torch cells", "onnxruntime cells",
               "sampling / one scoring pass (onnx)"], rows),
        para(f"Targets: >= {tg['speedup_over_naive']['pixelcnn_type']:g}x over naive for PixelCNN-type models "
             f"and >= {tg['speedup_over_naive']['lstm']:g}x for the LSTMs; sampling at most "
             f"{tg['vs_scoring_at_most']['pixelcnn']:g}x one scoring pass for the PixelCNN and "
             f"{tg['vs_scoring_at_most']['default']:g}x for every architecture (a scoring pass is the floor, "
             f"about 1). Speedup targets met by {sum(p['speedup_met'] for p in per.values())} of {len(per)} "
             f"architectures, scoring-pass targets by {sum(p['vs_scoring_met'] for p in per.values())} of "
             f"{len(per)}, on the onnxruntime cells' medians. The torch cells pay Python overhead per pixel and "
             "layer; why an onnxruntime cell costs what it costs is the next section."),
    ]


SESSION_VARIANT = {"optimize_extended": "extended optimisations", "optimize_basic": "basic optimisations",
                   "two_intra_op_threads": "2 intra-op threads", "no_memory_pattern": "no memory pattern",
                   "cpu_memory_arena": "CPU memory arena on"}


def cell_graphs(d: dict) -> list[str]:
    res = d["results"]
    rows = [[arch, f"{r['nodes_exported']:,}", f"{r['nodes_run']:,}", f"{r['nodes_run_per_pixel']:.0f}"]
            for arch, r in res.items()]
    variants = [v for v in next(iter(res.values()))["image_batch_seconds"] if v != "make_session"]
    vrows = [[arch] + [f"{r['image_batch_seconds'][v]['vs_make_session']:.2f}x" for v in variants]
             for arch, r in res.items()]
    options = [r["image_batch_seconds"][v]["vs_make_session"] for r in res.values() for v in variants
               if v != "cpu_memory_arena"]
    arena = [r["image_batch_seconds"]["cpu_memory_arena"]["vs_make_session"] for r in res.values()]
    cfg = d["config"]
    return header("Row-cell graphs", "cell_graphs.json", d,
                  "`python -m bench.cell_graphs --json bench/results/cell_graphs.json`") + [
        para("An exported cell is one image row unrolled: thousands of tiny ops whose cost is per-op overhead "
             "in onnxruntime, not arithmetic. The bench records each cell's op histogram as exported and as "
             "onnxruntime runs it after its graph optimisations (in the file), and times session-option "
             "variants against the settings `runtime/onnx_graphs.make_session` uses (batch "
             f"{cfg['batch']}, {cfg['size']}x{cfg['size']}, {cfg['repeats']} interleaved repeats, randomly "
             "initialised models at the default sizes). What keeps the op count down (export/cells/base.py):"),
        bullets([
            "per-row maps (the rows above's contribution, the previous row's states, the uniforms and forced "
            "values) are split into columns once per row (`columns`: Transpose, Reshape, one Split) instead of "
            "being indexed per pixel;",
            "the taps on the current row are one Concat + Gemm with the bias folded in (`row_taps`), not a "
            "stacked window and an Einsum;",
            "finished columns are reassembled with one Concat (`from_columns`);",
            "the temperature is prepared once per row, and the Diagonal BiLSTM's state-to-state tap on the row "
            "above is applied to the whole row at once;",
            "nothing branches on or recomputes a shape at run time: only the batch axis is dynamic, so sizes "
            "are constants (`squeeze(2)` would export as an If per layer and row, `chunk()` as Shape, Gather, "
            "Add, Div and Mul before every Split: see `drop_row_axis`, `gated_pixelcnn.gate`, "
            "`row_lstm.lstm_update`);",
            "the row's log-probability is computed once per row from its logits, not per sub-pixel.",
        ]),
        para("tests/test_bench_cell_graphs.py keeps that shape: no Einsum, no Gather added per pixel, no If, "
             "no Shape op added per pixel. Every sampler still draws identical images from a seed "
             f"({'all identical' if all(r['identical_images'] for r in res.values()) else 'NOT all identical'} "
             "in this run)."),
        table(["arch", "nodes exported", "nodes run (after onnxruntime's optimisations)", "run per pixel"], rows),
        para("A batch's time under each session variant, relative to `make_session`'s settings (medians):"),
        table(["arch"] + [SESSION_VARIANT.get(v, v) for v in variants], vrows),
        para(f"No session option helps reliably: the others range from {min(options):.2f}x to "
             f"{max(options):.2f}x of `make_session`'s time, in both directions per architecture and within "
             "this machine's noise (the repeats' min and max are in the file), so the settings stay: one "
             "thread, all optimisations, no spinning. `make_session` turns onnxruntime's CPU memory arena off "
             "so that a sampler gives a flood's memory back (docs/reliability.md, Overload); with the arena on "
             f"a batch took {min(arena):.2f}x to {max(arena):.2f}x the time, so going without it costs up to "
             f"{pct(1 / min(arena) - 1)}."),
    ]


# -- the row engine ----------------------------------------------------------------------------------

ENGINE_PATH = {"one_image": "engine, one 1-image sequence", "one_sequence": "engine, one {n}-image sequence",
               "sequences": "engine, {n} single-image sequences", "cell_one_image": "cell alone, batch 1",
               "cell_one_sequence": "cell alone, batch {n}"}


def engine_batching(d: dict) -> list[str]:
    r, n = d["results"], d["config"]["streams"]
    h = r["model"]["shape"][1]
    rows = [[ENGINE_PATH.get(p, p).format(n=n), spread_ms(x)] for p, x in r["paths"].items()]
    return header("Cell and engine batching", "engine_batching.json", d,
                  "`python -m bench.engine_batching --json bench/results/engine_batching.json`") + [
        para(f"In process, with no server: one image, one {n}-image sequence, {n} single-image sequences batched "
             f"by the row engine, and the cell alone at batch 1 and {n} ({h} calls, one image's rows); "
             f"{d['config']['repeats']} interleaved repeats, medians (min-max). Images identical on every path: "
             f"{'yes' if r['identical'] else 'NO'}."),
        table(["path", "time per image batch"], rows),
        bullets([f"the cell alone: a call of {n} images yields {r['cell_bound']:.2f}x a call of one "
                 f"({ms(r['paths']['cell_one_sequence']['seconds'])} for {h} batch-{n} calls);",
                 f"bound (one {n}-image sequence against one image): {r['bound']:.2f}x;",
                 f"the engine with {n} separate sequences: {r['scaling']:.2f}x ({pct(r['share'])} of the bound), "
                 f"{r['per_sequence_row_us']:.0f} us more per row of each separate sequence (its state, random "
                 "numbers and row bookkeeping)."]),
    ]
