"""gRPC client of the Triton deployment (server/): library (client.library) and `python -m pixelrnn.client`."""
from pixelrnn.client.library import ClientError, ModelInfo, OodScores, PixelClient, Row, Scores, assemble

__all__ = ["ClientError", "ModelInfo", "OodScores", "PixelClient", "Row", "Scores", "assemble"]
