"""Sections on reliability: abandoned streams and overload."""
from __future__ import annotations

from bench.report.common import bullets, header, ms, para


def abandoned_streams(d: dict) -> list[str]:
    mib, ev, g = d["rss_mib_total"], d["events_200"], d["growth_kb_per_100"]
    return header("Abandoned streams", "abandoned_streams.json", d,
                  "tests/test_reliability_streams.py run with `PIXELRNN_WRITE_RESULTS=1`") + [
        para("200 clients drop mid-image: they cancel, drop the channel, are SIGKILLed or leave their sequence "
             "open (docs/reliability.md, Cancelled and abandoned streams). Server RSS is tritonserver and both "
             "backend stubs together."),
        bullets([f"sampler events over the 200: started {ev['started']}, cancelled {ev['cancelled']}, expired "
                 f"{ev['expired']}, failed {ev['failed']}; at most {d['peak_live_sequences']} sequences live at once, "
                 f"{d['live_after']} after",
                 f"live sequences back to 0 {d['seconds_to_settle_after_last_drop']:.1f} s after the last drop",
                 f"server RSS {mib['start']} MiB at the start, {mib['after_warmup_50']} MiB after 50 warm-up drops, "
                 f"{mib['after_100']} MiB after 100, {mib['after_200']} MiB after 200: {g[0] / 1024:+.1f} MiB over "
                 f"the first 100, {g[1] / 1024:+.1f} MiB over the second. A leak grows in both halves; the test "
                 "fails if the flatter half grows by more than 8 MiB per 100 streams"]),
    ]


def overload(d: dict) -> list[str]:
    v, a, m, t, sf = d["victim"], d["admission"], d["memory"], d["trim_cost"], d["server_flood"]
    fair, unfair, fl = v["fair"], v["unfair"], d["flood"]
    floods, arena = d.get("server_floods"), d.get("arena_default")
    back = (f"back within 20% of the baseline {sf['seconds_to_within_20pct']:.2f} s after the flood"
            if sf["seconds_to_within_20pct"] is not None else
            f"not back within 20% of the baseline in {sf['settle_window_s']:.0f} s")
    items = [
        f"Admission: the sampler's budget at `--sampler-memory-mb {a['memory_mb']}` is {a['budget_images']:,} images "
        f"({a['image_bytes'] / 1024:.0f} KiB each). In process, {a['starts']} STARTs of {fl['images_each']} images: "
        f"{a['admitted']} admitted ({a['admitted_images']:,} images), {a['refused']} refused at once; the first "
        f"refusal reads `{a['first_refusal']}`.",
        f"Through tritonserver, {sf['starts']} STARTs of {sf['images_each']} images on one stream had "
        f"{sf['admitted']} admitted and {sf['refused']} refused at once ({sf['other_errors']} other errors); a "
        f"1-image client meanwhile got its first row after {ms(sf['victim']['first_row_s'])} and its image after "
        f"{sf['victim']['image_s']:.2f} s, and the flood was done in {sf['flood_s']:.1f} s.",
        f"Fairness, in process, with {fl['sequences']} sequences of {fl['images_each']} images under way: a 1-image "
        f"sequence got its first row after {ms(fair['first_row_s'], 1)} ({fair['first_row_calls']} cell call) and "
        f"its whole image after {fair['image_s']:.2f} s ({fair['image_calls']} calls), where one row per sequence "
        f"per round gave {ms(unfair['first_row_s'])} ({unfair['first_row_calls']} calls) and "
        f"{unfair['image_s']:.2f} s ({unfair['image_calls']} calls); the workload got "
        f"{d['fairness_throughput_ratio']:.2f}x the image-rows per CPU second (medians of {fl['repeats']} "
        "interleaved repeats).",
        f"Memory, in process: a flood of {2 * fl['sequences']} such sequences took RSS {m['baseline_mib']:.0f} MiB "
        f"before, {m['peak_mib']:.0f} MiB at the peak, {m['after_flood_mib']:.0f} MiB after the flood as the "
        f"allocator leaves it, {m['after_trim_mib']:.0f} MiB after the trim ({ms(m['trim_seconds'])}); the first "
        f"{t['steps']} calls right after a trim ran {t['slowdown_after_trim']:.2f}x slower, once per idle period.",
        f"Memory, through tritonserver: the server's processes held {sf['rss_mib']['baseline']:.0f} MiB before the "
        f"flood, {sf['rss_mib']['peak']:.0f} MiB at the peak and {sf['rss_mib']['after_settle']:.0f} MiB "
        f"{sf['settle_window_s']:.0f} s after, {back}.",
    ]
    if floods:
        mibs = ", ".join(f"{x:.0f}" for x in floods["after_settle_mib"])
        items.append(f"Repeated floods with `MALLOC_ARENA_MAX` {floods['malloc_arena_max']}: {floods['within_20pct']} "
                     f"of {floods['runs']} floods back within 20% ({mibs} MiB {sf['settle_window_s']:.0f} s after); "
                     f"median flood time {floods['flood_s_median']:.1f} s.")
    if arena:
        mibs = ", ".join(f"{x:.0f}" for x in arena["after_settle_mib"])
        items.append(f"The same floods interleaved with glibc's default arenas (`MALLOC_ARENA_MAX` "
                     f"{arena['malloc_arena_max']}): {arena['within_20pct']} of {arena['runs']} back within 20% "
                     f"({mibs} MiB); median flood time {arena['flood_s_median']:.1f} s.")
    return header("Overload", "overload.json", d, "`python -m bench.overload --json bench/results/overload.json --server`") + [
        para("How the sampler's admission, scheduling and memory behave under a flood of big sampling "
             "requests (docs/reliability.md, Overload, says what each mechanism does):"),
        bullets(items),
    ]
