"""gRPC client of the Triton deployment (server/): library (client.library) and `python -m pixelrnn.client`."""
from pixelrnn.client.library import ClientError, ModelInfo, PixelClient, Row, Scores, assemble

__all__ = ["ClientError", "ModelInfo", "PixelClient", "Row", "Scores", "assemble"]
