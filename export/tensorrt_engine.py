"""TensorRT engines from the exported ONNX graphs, and a parity check against onnxruntime.

UNVERIFIED IN THIS PROJECT: the machines this project is developed and tested on have no GPU
and no `tensorrt` wheel, so this code has never been run here. It is the standard TensorRT
Python API path (Builder -> ONNX parser -> builder config with an optimization profile for the
batch axis -> serialized engine; then Runtime -> execution context -> execute_async_v3),
written for TensorRT 10, and tests/test_build_engine.py's `gpu` test runs it where TensorRT and
a CUDA GPU exist. Everywhere else `tensorrt_available()` says why it cannot run, and
export/build_engine.py skips it (--tensorrt auto) or fails (--tensorrt on).

TensorRT has no float64. The row cells sample in float64 on purpose (export/cells/base.py: the
same inverse-CDF draw on every path), so they are not buildable as they are; `float64_tensors`
finds that up front and build_engine leaves the cells on onnxruntime and builds engines only
for the float32 graphs (the scorer, the multi-scale condition graph).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from pixelrnn.runtime import tensor_names as tn
from pixelrnn.export.onnx_export import compare
from pixelrnn.runtime.onnx_graphs import OnnxGraph

OPT_BATCH = 16
MAX_BATCH = 64


class EngineError(RuntimeError):
    """TensorRT could not build or run an engine."""


def tensorrt_available() -> tuple[bool, str]:
    """(True, what) when TensorRT and a CUDA GPU are both usable, else (False, why not)."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a wheel whose CUDA libraries fail to load
        return False, f"TensorRT is not installed (import tensorrt failed: {type(e).__name__}: {e})"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU is available (torch.cuda.is_available() is False)"
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(0)}"


def float64_tensors(onnx_path: str | Path) -> list[str]:
    """Names of the float64 tensors of a graph (inputs, outputs, intermediates): TensorRT cannot
    build a graph that has any."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    g, double = model.graph, onnx.TensorProto.DOUBLE
    found = [v.name for v in [*g.input, *g.output, *g.value_info] if v.type.tensor_type.elem_type == double]
    found += [t.name for t in g.initializer if t.data_type == double]
    found += [n.output[0] for n in g.node if n.op_type == "Cast" and any(a.name == "to" and a.i == double for a in n.attribute)]
    return sorted(set(found))


def build_engine(
    onnx_path: str | Path, engine_path: str | Path, max_batch: int = MAX_BATCH, opt_batch: int = OPT_BATCH,
    fp16: bool = False, workspace_mib: int = 1024,
) -> Path:
    """Parse the ONNX graph and serialize an engine with batch profile min 1 / opt / max."""
    import tensorrt as trt

    doubles = float64_tensors(onnx_path)
    if doubles:
        raise EngineError(f"{onnx_path}: TensorRT has no float64, and the graph has {len(doubles)} float64 tensors ({', '.join(doubles[:3])}, ...)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated); 8.x needs it.
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    flags = 1 << int(explicit) if explicit is not None and int(trt.__version__.split(".")[0]) < 10 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: the TensorRT ONNX parser failed: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    opt_batch = min(opt_batch, max_batch)
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if -1 in shape:  # the dynamic batch axis (UNIFORMS has it last, the others first)
            at = lambda n: [n if d == -1 else d for d in shape]  # noqa: E731
            profile.set_shape(tensor.name, at(1), at(opt_batch), at(max_batch))
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    engine_path = Path(engine_path)
    engine_path.write_bytes(bytes(serialized))
    return engine_path


def random_feed(graph: OnnxGraph, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid random inputs for an exported graph, from its declared inputs."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in graph.session.get_inputs():
        shape = [d if isinstance(d, int) else batch for d in inp.shape]
        if inp.name in (tn.IMAGES, tn.SMALL_IMAGES, tn.FORCED):
            dtype = np.uint8 if inp.name == tn.IMAGES else np.int64
            feed[inp.name] = rng.integers(0, graph.levels, shape).astype(dtype)
        elif inp.name == tn.LABELS:
            feed[inp.name] = rng.integers(0, max(graph.num_classes, 1), shape).astype(np.int64)
        elif inp.type == "tensor(bool)":
            feed[inp.name] = rng.random(shape) < 0.5
        else:
            feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def check_engine(engine_path: str | Path, onnx_path: str | Path, batch: int = 4, tol: float = 1e-3) -> float:
    """Run the engine and onnxruntime on the same random batch; raises ParityError past `tol`
    (use a looser one for FP16 engines); returns the max abs difference."""
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise EngineError(f"{engine_path}: TensorRT could not deserialize the engine")
    context = engine.create_execution_context()
    graph = OnnxGraph(onnx_path)
    feed = random_feed(graph, batch)
    keep = {}  # device buffers must outlive the launch
    for name, array in feed.items():
        keep[name] = torch.from_numpy(np.ascontiguousarray(array)).cuda()
        context.set_input_shape(name, array.shape)
        context.set_tensor_address(name, keep[name].data_ptr())
    for name in graph.output_names:
        dtype = trt.nptype(engine.get_tensor_dtype(name))
        keep[name] = torch.from_numpy(np.empty(tuple(context.get_tensor_shape(name)), dtype)).cuda()
        context.set_tensor_address(name, keep[name].data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise EngineError(f"{engine_path}: execution failed")
    stream.synchronize()
    want = graph.run(feed)
    return max(compare(name, keep[name].cpu().numpy(), w, tol) for name, w in zip(graph.output_names, want))
