"""The gateway's one kind of refusal: an HTTP status and a one-line message, answered as JSON
{"error": message} (with Retry-After where the client should try again later)."""
from __future__ import annotations

import json


class GatewayError(Exception):
    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, " ".join(str(message).split()), retry_after

    def body(self) -> bytes:
        return json.dumps({"error": self.message}).encode()

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
