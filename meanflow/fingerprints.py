"""One fingerprint of a state dict: the same name for bitwise the same weights.

Used wherever a result depends on a network's exact weights (the VAE of a latent cache, the
Inception or domain-classifier weights behind cached reference statistics), so a changed
network never reuses stale results.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch
from torch import Tensor


def state_fingerprint(state: Mapping[str, Tensor], prefix: bytes = b"") -> str:
    """sha256 over ``prefix`` and every (name, dtype, bytes) of ``state`` in name order."""
    digest = hashlib.sha256(prefix)
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
