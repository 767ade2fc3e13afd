"""Triton Python-backend glue of NAME_score (copied as model.py, beside the pixelrnn modules it
imports, by server/repository.py).

Dynamic batching hands execute() several requests at once: the valid ones are scored in one
onnxruntime call (at most max_batch images per call), the others get their own error.
Protocol: runtime/protocol.py.
"""
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# The pixelrnn modules this file imports are copied beside it (server/repository.py): the
# repository needs no project checkout and no install. The stub runs Python in isolated mode
# (PYTHONPATH ignored), so the folder goes on sys.path here, first, ahead of any pixelrnn the
# environment may hold.
# No __pycache__ written into the repository: it may be read-only (a mounted volume).
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pixelrnn.runtime import protocol as p  # noqa: E402
from pixelrnn.runtime.manifest import model_folder  # noqa: E402
from pixelrnn.runtime.request import score_images  # noqa: E402
from pixelrnn.runtime.runner import scorer  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        model = model_folder(args)
        self.scorer = scorer(model.manifest, model.folder, threads=int(model.params.get("onnx_threads", "1")))
        self.levels, self.num_classes = int(model.manifest["levels"]), int(model.manifest["num_classes"])
        self.max_batch = int(model.config["max_batch_size"])

    def parse(self, request):
        """-> (images (N, C, H, W) uint8, labels (N,) int64 or None); raises ValueError.
        Triton has already checked the dtype and the shape against config.pbtxt."""
        sent = pb_utils.get_input_tensor_by_name(request, p.IMAGES)
        images = score_images(None if sent is None else sent.as_numpy(), self.levels)
        tensor = pb_utils.get_input_tensor_by_name(request, p.LABELS)
        if not self.num_classes:
            return images, None
        if tensor is None:
            raise ValueError(f"this model is class-conditional: send {p.LABELS} (N x 1 int64 class ids)")
        labels = tensor.as_numpy().reshape(-1).astype(np.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{p.LABELS} must hold one class id per image ({images.shape[0]}), got {labels.size}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"{p.LABELS} must be in [0, {self.num_classes}), got {labels.tolist()}")
        return images, labels

    def execute(self, requests):
        responses = [None] * len(requests)
        valid = []  # (index, images, labels)
        for i, request in enumerate(requests):
            try:
                valid.append((i, *self.parse(request)))
            except ValueError as e:  # the client's mistake: INVALID_ARGUMENT, as Triton's own checks say
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
        if valid:
            try:
                images = np.concatenate([v[1] for v in valid])
                labels = np.concatenate([v[2] for v in valid]) if self.num_classes else None
                # Per-pixel maps cost N x C x H x W floats each way: made only if a request asks.
                per_pixel = any(p.PIXEL_NLL in requests[i].requested_output_names() for i, *_ in valid)
                parts = [self.scorer.score(images[a:a + self.max_batch], None if labels is None else labels[a:a + self.max_batch],
                                           per_pixel=per_pixel) for a in range(0, len(images), self.max_batch)]
                nll, bpd = (np.concatenate([q[k] for q in parts]).astype(np.float32) for k in (0, 1))
                pixel = np.concatenate([q[2] for q in parts]).astype(np.float32) if per_pixel else None
                a = 0
                for i, request_images, _ in valid:
                    b = a + len(request_images)
                    outputs = [pb_utils.Tensor(p.NLL_NATS, nll[a:b, None]), pb_utils.Tensor(p.BITS_PER_DIM, bpd[a:b, None])]
                    if per_pixel and p.PIXEL_NLL in requests[i].requested_output_names():
                        outputs.append(pb_utils.Tensor(p.PIXEL_NLL, pixel[a:b]))
                    responses[i] = pb_utils.InferenceResponse(output_tensors=outputs)
                    a = b
            except Exception as e:  # noqa: BLE001 - reported to the requests, never raised
                for i, *_ in valid:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"scoring failed: {type(e).__name__}: {e}"))
        return responses
