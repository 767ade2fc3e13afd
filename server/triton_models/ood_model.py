"""Triton Python-backend glue of NAME_ood (copied as model.py, beside the pixelrnn modules it
imports, by server/detector.py).

Business-logic scripting: for each batch of requests, one call to the model's own scorer per
class (one call for an unconditional model) and one to the background model's scorer, both
through Triton, so they keep their own instances and batching; the scores are then
runtime/ood.py's, the same numbers bench/ood.py computes in process. Protocol:
runtime/protocol.py, NAME_ood.
"""
import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# As in the scorer's glue: the copied pixelrnn modules first on sys.path, no __pycache__.
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pixelrnn.runtime import ood  # noqa: E402
from pixelrnn.runtime.manifest import model_params  # noqa: E402
from pixelrnn.runtime import protocol as p  # noqa: E402
from pixelrnn.runtime.request import score_images  # noqa: E402


class ScoringFailed(Exception):
    """A scorer this model calls answered with an error (its message says which)."""


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = model_params(config)
        self.foreground, self.background = params["foreground_model"], params["background_model"]
        self.levels, self.num_classes = int(params["levels"]), int(params["num_classes"])
        self.threshold = ood.Threshold.from_json(json.loads(params["threshold"]))
        if self.threshold.score not in ood.SCORES:
            raise pb_utils.TritonModelException(f"threshold score {self.threshold.score!r} is not one of {ood.SCORES}")

    def parse(self, request) -> np.ndarray:
        """-> images (N, C, H, W) uint8; raises ValueError (Triton checked dtype and shape)."""
        sent = pb_utils.get_input_tensor_by_name(request, p.IMAGES)
        return score_images(None if sent is None else sent.as_numpy(), self.levels)

    def nll(self, model: str, images: np.ndarray, label: int | None = None) -> np.ndarray:
        inputs = [pb_utils.Tensor(p.IMAGES, images)]
        if label is not None:
            inputs.append(pb_utils.Tensor(p.LABELS, np.full((len(images), 1), label, np.int64)))
        response = pb_utils.InferenceRequest(model_name=model, requested_output_names=[p.NLL_NATS], inputs=inputs).exec()
        if response.has_error():
            raise ScoringFailed(f"{model}: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, p.NLL_NATS).as_numpy().reshape(-1).astype(np.float64)

    def execute(self, requests):
        responses = [None] * len(requests)
        valid = []  # (index, images)
        for i, request in enumerate(requests):
            try:
                valid.append((i, self.parse(request)))
            except ValueError as e:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
        if not valid:
            return responses
        try:
            images = np.concatenate([v[1] for v in valid])
            if self.num_classes:
                nll = ood.marginal_nll(np.stack([self.nll(self.foreground, images, k) for k in range(self.num_classes)], 1))
            else:
                nll = self.nll(self.foreground, images)
            background = self.nll(self.background, images)
            scores = ood.scores(nll, images, self.levels, background)
            flags = self.threshold.flags(scores[self.threshold.score])
            a = 0
            for i, request_images in valid:
                b = a + len(request_images)
                column = lambda v: v[a:b, None].astype(np.float32)  # noqa: E731
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(p.NLL_NATS, column(nll)), pb_utils.Tensor(p.BACKGROUND_NLL_NATS, column(background)),
                    pb_utils.Tensor(p.LLR, column(scores["llr"])), pb_utils.Tensor(p.COMPLEXITY, column(scores["complexity"])),
                    pb_utils.Tensor(p.OOD, flags[a:b, None])])
                a = b
        except Exception as e:  # noqa: BLE001 - reported to the requests, never raised
            for i, _ in valid:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"out-of-distribution scoring failed: {e}"))
        return responses
