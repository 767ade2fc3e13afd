"""Whether a served model has an out-of-distribution detector (NAME_ood, runtime/protocol.py), and
the threshold its verdict uses: a config parameter of NAME_ood (server/detector.py writes it),
which PixelClient.ood does not return. Read as client.catalog reads NAME_score's config."""
from __future__ import annotations

import json

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from pixelrnn.client.connection import PLAIN, Credentials
from pixelrnn.client.library import ClientError, ServerGone
from pixelrnn.runtime import protocol as p
from pixelrnn.runtime.ood import Threshold


def detector_threshold(url: str, model: str, timeout: float = 10.0, credentials: Credentials = PLAIN) -> Threshold | None:
    """NAME_ood's threshold, or None when the server does not serve a ready NAME_ood."""
    name = p.detect_model(model)
    client: grpcclient.InferenceServerClient = credentials.connect(url)
    try:
        try:
            if not client.is_model_ready(name, client_timeout=timeout):
                return None
            config = client.get_model_config(name, as_json=True, client_timeout=timeout)["config"]
        except InferenceServerException as e:
            text = e.message() or str(e)
            if "UNAVAILABLE" in str(e.status() or "") or "Deadline" in text:
                raise ServerGone(f"cannot reach the Triton server at {url} ({text})") from None
            if "unknown model" in text or "not found" in text:
                return None  # unloaded between the two calls
            raise ClientError(f"reading {name}'s config: {text}") from None
        raw = config.get("parameters", {}).get("threshold", {}).get("string_value")
        try:
            return Threshold.from_json(json.loads(raw))
        except (TypeError, ValueError, KeyError) as e:
            raise ClientError(f"{name} has no readable threshold in its config ({type(e).__name__}: {e})") from None
    finally:
        client.close()
