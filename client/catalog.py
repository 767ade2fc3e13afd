"""Which PixelRNN models a Triton server serves: every NAME with both NAME_score and NAME_sample
ready, described by NAME_score's config (client.library.model_info), as a PixelClient would.

    for info in served_models("localhost:8001"):
        print(info.name, info.shape, info.levels, info.conditional)

Used by whatever offers a choice of models (the web gateway's model list); a client of one known
model needs only PixelClient. Like the rest of client/, this imports no torch.
"""
from __future__ import annotations

from tritonclient.utils import InferenceServerException

from pixelrnn.client.connection import (PLAIN, Credentials, error_message, is_unauthenticated, is_unavailable, refused,
                                       unreachable)
from pixelrnn.client.library import ClientError, ModelInfo, model_info
from pixelrnn.runtime import protocol as p


def served_models(url: str, timeout: float = 10.0, credentials: Credentials | None = None) -> list[ModelInfo]:
    """The ready PixelRNN models at `url`, sorted by name. ServerGone if the server cannot be
    reached, Unauthenticated if it refuses the token; a ready NAME_score that does not look like
    a PixelRNN scorer is left out. `credentials`: TLS and a token, as PixelClient takes them."""
    credentials = credentials or PLAIN
    client = credentials.connect(url)
    try:
        try:
            index = client.get_model_repository_index(as_json=True, client_timeout=timeout).get("models", [])
        except InferenceServerException as e:
            if is_unavailable(e) or "Deadline" in error_message(e):
                raise unreachable(url, credentials, e) from None
            if is_unauthenticated(e):
                raise refused(url, credentials, e) from None
            raise ClientError(f"listing the models at {url}: {error_message(e)}") from None
        ready = {m["name"] for m in index if m.get("state") == "READY"}
        found = []
        for name in sorted(ready):
            base = name[: -len("_score")] if name.endswith("_score") else None
            if not base or p.sample_model(base) not in ready or p.score_model(base) != name:
                continue
            try:
                config = client.get_model_config(name, as_json=True, client_timeout=timeout)["config"]
                found.append(model_info(base, config))
            except ClientError:
                continue  # a model of another kind that happens to be named NAME_score
            except InferenceServerException as e:
                if is_unavailable(e):
                    raise unreachable(url, credentials, e) from None
                continue  # unloaded between the index and this call
        return found
    finally:
        client.close()
