"""model_version: a hash of the architecture config and the weights.

Two encoders give the same embeddings iff they agree on both, so the table and the index
key everything on this string. Buffers (BatchNorm statistics) are weights here.
"""
from __future__ import annotations

import hashlib
import json

VERSION_CHARS = 16  # 64 bits of sha256: collisions are not a practical concern for model counts


def model_version(config: dict, module) -> str:
    import torch

    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:VERSION_CHARS]
