"""server/repository.py: the folders and configs it writes (parsed with Triton's own
ModelConfig protobuf), without starting a server."""
import json
from pathlib import Path

import pytest
from google.protobuf import text_format

from pixelrnn.runtime import protocol as p
from pixelrnn.server.repository import PERF_INPUT, TEMPLATES, module_file, served_modules, write_repository

from tests.deployment import require  # noqa: E402

model_config_pb2 = require("tritonclient.grpc.model_config_pb2")


def manifest(name="tiny", shape=(3, 8, 6), levels=4, num_classes=0, multiscale=False):
    stages = ["small_cell", "big_cell"] if multiscale else ["cell"]
    artifacts = {s: {"file": f"{s}.onnx"} for s in stages + (["condition"] if multiscale else []) + ["scorer"]}
    return {
        "format": "pixelrnn-export/1", "name": name, "arch": "multiscale" if multiscale else "pixelcnn", "shape": list(shape),
        "levels": levels, "num_classes": num_classes, "max_batch": 16, "stages": stages, "artifacts": artifacts,
        "multiscale": {"factor": 2, "small_shape": [shape[0], shape[1] // 2, shape[2] // 2]} if multiscale else None,
        "files": [a["file"] for a in artifacts.values()],
    }


def onnx_folder(tmp_path, m):
    folder = tmp_path / "onnx"
    folder.mkdir(exist_ok=True)
    for f in m["files"]:
        (folder / f).write_bytes(b"onnx " + f.encode())
    return folder


def config(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_score_and_sample_models_are_written(tmp_path):
    m = manifest(num_classes=3)
    written = write_repository(m, onnx_folder(tmp_path, m), tmp_path / "repo", sequence_idle_s=7.5, max_sequences=99)
    assert [d.name for d in written] == ["tiny_score", "tiny_sample"]
    score, sample = tmp_path / "repo" / "tiny_score", tmp_path / "repo" / "tiny_sample"
    assert sorted(f.name for f in (score / "1").iterdir()) == ["manifest.json", "model.py", "pixelrnn", "scorer.onnx"]
    assert sorted(f.name for f in (sample / "1").iterdir()) == ["cell.onnx", "manifest.json", "model.py", "pixelrnn"]
    # perf_analyzer's request data: the sampler's only (the scorer takes --input-data zero).
    assert (sample / PERF_INPUT).is_file() and not (score / PERF_INPUT).exists()
    for model, glue in ((score, "score_model.py"), (sample, "sample_model.py")):  # the modules the glue imports, byte for byte
        carried = {str(f.relative_to(model / "1")): f.read_bytes() for f in (model / "1" / "pixelrnn").rglob("*.py")}
        want = {str(Path(*name.split(".")) / "__init__.py") if module_file(name).name == "__init__.py"
                else str(Path(*name.split("."))) + ".py": module_file(name).read_bytes() for name in served_modules(TEMPLATES / glue)}
        assert carried == want
    assert {"pixelrnn/runtime/protocol.py", "pixelrnn/runtime/request.py", "pixelrnn/server/engine/scheduler.py",
            "pixelrnn/server/engine/admission.py", "pixelrnn/server/engine/outbox.py"} <= set(carried)
    assert not any(name.startswith(("pixelrnn/training", "pixelrnn/export", "pixelrnn/client")) for name in carried)
    assert json.loads((sample / "1" / "manifest.json").read_text()) == m
    assert "TritonPythonModel" in (sample / "1" / "model.py").read_text()

    s = config(score / "config.pbtxt")
    assert s.name == "tiny_score" and s.backend == "python" and s.max_batch_size == 16
    assert [(i.name, list(i.dims), i.optional) for i in s.input] == [(p.IMAGES, [3, 8, 6], False), (p.LABELS, [1], True)]
    assert s.input[0].data_type == model_config_pb2.TYPE_UINT8 and s.input[1].data_type == model_config_pb2.TYPE_INT64
    assert [(o.name, list(o.dims)) for o in s.output] == [(p.NLL_NATS, [1]), (p.BITS_PER_DIM, [1]), (p.PIXEL_NLL, [3, 8, 6])]
    assert list(s.dynamic_batching.preferred_batch_size) == [4, 8, 16] and s.dynamic_batching.max_queue_delay_microseconds > 0
    assert "project_root" not in s.parameters

    q = config(sample / "config.pbtxt")
    assert q.name == "tiny_sample" and q.max_batch_size == 0 and q.model_transaction_policy.decoupled
    assert q.sequence_batching.max_sequence_idle_microseconds == 7_500_000
    assert q.sequence_batching.oldest.max_candidate_sequences == 99
    inputs = {i.name: i for i in q.input}
    assert set(inputs) == {p.BATCH_SIZE, p.TEMPERATURE, p.SEED, p.LABELS, p.KNOWN, p.MAX_ROWS, p.ROWS_PER_RESPONSE}
    assert all(i.optional for i in q.input)
    assert inputs[p.TEMPERATURE].data_type == model_config_pb2.TYPE_FP64 and list(inputs[p.KNOWN].dims) == [-1, 3, -1, 6]
    assert [o.name for o in q.output] == [p.STAGE, p.ROW_INDEX, p.ROW_COUNT, p.ROW, p.ROW_LOGPROB, p.ACTIVE, p.CALL_BATCH]
    outputs = {o.name: list(o.dims) for o in q.output}  # several rows per response: B x C x R x W (runtime/protocol.py)
    assert outputs[p.ROW] == [-1, 3, -1, -1] and outputs[p.ROW_LOGPROB] == [-1, -1] and outputs[p.CALL_BATCH] == [-1]
    assert len(q.instance_group) == 1 and q.instance_group[0].count == 1


def test_unconditional_and_multiscale_models(tmp_path):
    m = manifest(name="ms", shape=(1, 8, 8), multiscale=True)
    write_repository(m, onnx_folder(tmp_path, m), tmp_path / "repo")
    sample = tmp_path / "repo" / "ms_sample"
    assert sorted(f.name for f in (sample / "1").iterdir()) == ["big_cell.onnx", "condition.onnx", "manifest.json", "model.py", "pixelrnn", "small_cell.onnx"]
    assert p.LABELS not in {i.name for i in config(sample / "config.pbtxt").input}
    score_inputs = config(tmp_path / "repo" / "ms_score" / "config.pbtxt").input
    # Grey images too in the one layout, required: perf_analyzer sends every declared input.
    assert [(i.name, list(i.dims), i.optional) for i in score_inputs] == [(p.IMAGES, [1, 8, 8], False)]


def test_rewriting_replaces_the_old_models(tmp_path):
    m = manifest()
    folder = onnx_folder(tmp_path, m)
    write_repository(m, folder, tmp_path / "repo")
    (tmp_path / "repo" / "tiny_sample" / "1" / "stale.onnx").write_bytes(b"")
    write_repository(m, folder, tmp_path / "repo", sequence_idle_s=3)
    assert not (tmp_path / "repo" / "tiny_sample" / "1" / "stale.onnx").exists()
    assert config(tmp_path / "repo" / "tiny_sample" / "config.pbtxt").sequence_batching.max_sequence_idle_microseconds == 3_000_000
    assert sorted(d.name for d in (tmp_path / "repo").iterdir()) == ["tiny_sample", "tiny_score"]


def test_missing_files_and_bad_names_are_refused(tmp_path):
    m = manifest()
    folder = onnx_folder(tmp_path, m)
    (folder / "cell.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="cell.onnx"):
        write_repository(m, folder, tmp_path / "repo")
    assert not (tmp_path / "repo" / "tiny_score").exists()
    with pytest.raises(ValueError, match="plain identifier"):
        write_repository(manifest(name="../x"), folder, tmp_path / "repo")


def test_command_line_rewrites_with_other_settings(tmp_path, capsys):
    from pixelrnn.server.repository import main

    m = manifest()
    folder = onnx_folder(tmp_path, m)
    (folder / "manifest.json").write_text(json.dumps(m))
    assert main(["--export", str(folder), "--repository", str(tmp_path / "repo"), "--sequence-idle-s", "5", "--max-sequences", "8"]) == 0
    q = config(tmp_path / "repo" / "tiny_sample" / "config.pbtxt")
    assert q.sequence_batching.max_sequence_idle_microseconds == 5_000_000 and q.sequence_batching.oldest.max_candidate_sequences == 8
    assert q.parameters["coalesce_ms"].string_value == "20"  # the row coalescing window, by default
    assert main(["--export", str(folder), "--repository", str(tmp_path / "repo"), "--coalesce-ms", "0"]) == 0
    assert config(tmp_path / "repo" / "tiny_sample" / "config.pbtxt").parameters["coalesce_ms"].string_value == "0"
    with pytest.raises(ValueError, match=r"coalesce_ms must be in \[0, 1000\], got -1"):
        write_repository(m, folder, tmp_path / "repo", coalesce_ms=-1)
    assert main(["--export", str(tmp_path / "nothing"), "--repository", str(tmp_path / "repo")]) == 2
    assert "error:" in capsys.readouterr().err


def test_configs_publish_what_clients_validate_against(tmp_path):
    for m, rows in ((manifest(levels=4, num_classes=3), "8"), (manifest(name="ms", shape=(1, 8, 8), multiscale=True), "4,8")):
        write_repository(m, onnx_folder(tmp_path, m), tmp_path / "repo")
        params = config(tmp_path / "repo" / f"{m['name']}_score" / "config.pbtxt").parameters
        assert params["levels"].string_value == str(m["levels"])
        assert params["num_classes"].string_value == str(m["num_classes"])
        assert params["stage_rows"].string_value == rows


