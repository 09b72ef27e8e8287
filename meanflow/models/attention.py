"""Multi-head self-attention that works under forward-mode differentiation.

PyTorch's fused ``scaled_dot_product_attention`` kernels (flash, memory-efficient, and the CPU
flash kernel) have no forward-mode AD rule, so ``torch.func.jvp`` through them raises. The
MeanFlow target needs exactly that JVP (Eq. 5). We keep the fused kernel for every ordinary
forward and switch to explicit softmax attention, which every autodiff mode supports, only while
a forward-mode transform is active.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad


def forward_mode_active(tensor: Tensor) -> bool:
    """True while ``tensor`` is being differentiated in forward mode.

    ``torch.func.jvp`` wraps its inputs at a functorch level; ``torch.autograd.forward_ad`` makes
    dual tensors. Both are checked; an ordinary forward sees neither and costs one C++ call.
    """
    if torch._C._functorch.maybe_current_level() is not None:
        return True
    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(tensor).tangent is not None


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v, written out. q, k, v: (B, H, N, D) -> (B, H, N, D)."""
    scale = q.shape[-1] ** -0.5
    weights = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)  # (B, H, N, N)
    return weights @ v


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Scaled dot-product attention, fused when possible. q, k, v: (B, H, N, D) -> (B, H, N, D)."""
    if forward_mode_active(q):
        return math_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
