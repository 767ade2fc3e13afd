"""Names of the tensors crossing every exported graph, defined once.

The ONNX exporter names graph inputs and outputs with these, the manifest records them, and the
Triton model configs and the client read them from here (or from the manifest), so a rename is
one edit. Cell state tensors are named after the cell's own state names
(`RowCell.state_shapes`), with a prefix for the value going in and the value coming out.
"""
from __future__ import annotations

# -- scorer: whole images -> likelihood ------------------------------------------------------
IMAGES = "IMAGES"  # uint8 (N, C, H, W), values in [0, levels)
LABELS = "LABELS"  # int64 (N,), class-conditional models only (also a cell input)
NLL_NATS = "NLL_NATS"  # float32 (N,), -log p(x) in nats per image
BITS_PER_DIM = "BITS_PER_DIM"  # float32 (N,), NLL_NATS / (C * H * W * ln 2)
PIXEL_NLL = "PIXEL_NLL"  # float32 (N, C, H, W), -log p of each sub-pixel given those before it; sums to NLL_NATS

# -- row cell: one image row per call ---------------------------------------------------------
UNIFORMS = "UNIFORMS"  # float64 (W, C, B), the row's uniforms in [0, 1), batch LAST
TEMPERATURE = "TEMPERATURE"  # float64 (B,), <= 0 means greedy
FORCED = "FORCED"  # int64 (B, C, W), the row's values where FORCE (or FIXED) is set
FORCE = "FORCE"  # bool (B,), copy FORCED instead of sampling (completion, teacher forcing)
CONDITION = "CONDITION"  # float32 (B, cond, W), multi-scale big cell: this row of the condition map
FIXED = "FIXED"  # bool (W,), multi-scale big cell: the columns on the small image's grid
ROW = "ROW"  # int64 (B, C, W), the row's values
LOGPROB = "LOGPROB"  # float32 (B,), log p of the row (FIXED columns left out)
LOGITS = "LOGITS"  # float32 (B, C, K, W)

# -- multi-scale condition graph: the small image -> the big cell's condition map ------------
SMALL_IMAGES = "SMALL_IMAGES"  # int64 (B, C, H/f, W/f)
CONDITION_MAP = "CONDITION_MAP"  # float32 (B, cond, H, W); row i is the big cell's CONDITION

# Double underscore: plain identifiers in every config format, and never part of a state name.
STATE_IN_PREFIX = "STATE_IN__"
STATE_OUT_PREFIX = "STATE_OUT__"


def state_in(name: str) -> str:
    return STATE_IN_PREFIX + name


def state_out(name: str) -> str:
    return STATE_OUT_PREFIX + name


def state_name(tensor_name: str) -> str:
    """The cell's state name of a STATE_IN__/STATE_OUT__ tensor name."""
    for prefix in (STATE_IN_PREFIX, STATE_OUT_PREFIX):
        if tensor_name.startswith(prefix):
            return tensor_name[len(prefix):]
    raise ValueError(f"{tensor_name!r} is not a state tensor name")


def all_names() -> dict[str, str]:
    """Constant name -> tensor name, for the manifest."""
    return {k: v for k, v in globals().items() if k.isupper() and isinstance(v, str)}
