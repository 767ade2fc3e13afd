"""bench.cell_graphs on 6x6 models: the JSON's structure, identical images under every session
variant, and the graph shape the row cells are built for (no timing is asserted)."""
import json

from bench import cell_graphs


def test_cell_graphs_json_and_per_pixel_graph_shape(tmp_path, capsys):
    out = tmp_path / "cell_graphs.json"
    size = 6
    assert cell_graphs.main(["--archs", "pixelcnn,diagonal_bilstm", "--repeats", "1", "--size", str(size), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"] == {"size": size, "batch": cell_graphs.BATCH, "repeats": 1}
    assert set(data["results"]) == {"pixelcnn", "diagonal_bilstm"}
    for arch, r in data["results"].items():
        assert r["identical_images"] is True
        assert set(r["image_batch_seconds"]) == set(cell_graphs.VARIANTS)
        assert r["image_batch_seconds"]["make_session"]["vs_make_session"] == 1.0
        assert 0 < r["nodes_run"] <= r["nodes_exported"] == sum(r["ops_exported"].values())
        assert r["nodes_run_per_pixel"] == r["nodes_run"] / size
        # The taps on the current row are one Gemm per layer and pixel (export/cells/base.py), not
        # an Einsum over a stacked window.
        assert "Einsum" not in r["ops_exported"], arch
    assert "pixelcnn" in capsys.readouterr().out


def test_pixelcnn_cell_reads_per_row_maps_without_a_gather_per_pixel(tmp_path):
    """The cost of a pixel is its ops: the per-row maps (the rows above, uniforms, forced values)
    are split into columns once per row, so widening the image adds no Gather (the cell had 13
    per pixel when it indexed them column by column) and a bounded number of nodes per pixel."""
    import torch

    from pixelrnn.export import onnx_export as ox
    from pixelrnn.export.cells import build_cell
    from pixelrnn.training.models import build_model

    counts = {}
    for width in (4, 6):
        torch.manual_seed(0)
        model = build_model("pixelcnn", dict(in_channels=1, height=4, width=width, levels=2, hidden=8, layers=2)).eval()
        path = tmp_path / f"cell{width}.onnx"
        ox.export_cell(build_cell(model), path)
        cell_graphs.session(path, {}, optimized_out=tmp_path / f"cell{width}.run.onnx")
        counts[width] = cell_graphs.histogram(tmp_path / f"cell{width}.run.onnx")
    per_pixel = {op: (counts[6].get(op, 0) - counts[4].get(op, 0)) / 2 for op in counts[6]}
    assert per_pixel.get("Gather", 0) == 0, per_pixel
    # 3 spatial layers x (Concat, Gemm, Add, Relu), the head, the draw and its log-probability.
    assert sum(per_pixel.values()) <= 40, per_pixel


def test_row_cells_have_no_shape_branches_or_shape_arithmetic_per_pixel(tmp_path):
    """Only the batch axis is dynamic: a cell must not branch on shapes at run time, nor redo
    shape arithmetic per pixel. squeeze(2) on a dynamic batch exported as an If per layer (a
    subgraph call copying the whole per-row map), and chunk() and every size read through the
    tracer as Shape, Gather, Div ... ops at every pixel of every layer; with the sizes read as
    constants (export/cells/base.drop_row_axis, gated_pixelcnn.gate, row_lstm.lstm_update)
    neither is left in any architecture: a wider image adds no Shape op."""
    import torch

    from pixelrnn.export import onnx_export as ox
    from pixelrnn.export.cells import build_cell
    from pixelrnn.training.models import build_model

    for arch in ("pixelcnn", "gated_pixelcnn", "row_lstm", "diagonal_bilstm"):
        shapes = {}
        for width in (4, 6):
            torch.manual_seed(0)
            model = build_model(arch, dict(in_channels=1, height=4, width=width, levels=2, hidden=6, layers=2)).eval()
            path = tmp_path / f"{arch}{width}.onnx"
            ox.export_cell(build_cell(model), path)
            ops = cell_graphs.histogram(path)
            assert ops.get("If", 0) == 0, (arch, ops)
            shapes[width] = ops.get("Shape", 0)
        assert shapes[6] == shapes[4] <= 8, (arch, shapes)  # per row: the batch size where zeros are made
