"""What an export folder's manifest.json is called, its format tag, and the checksum it records
for every file: export/build_engine.py writes them, server/ reads and checks them."""
from __future__ import annotations

import hashlib
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "pixelrnn-export/1"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # graphs and plans can be large: 1 MiB at a time
            digest.update(block)
    return digest.hexdigest()
