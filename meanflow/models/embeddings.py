"""Embeddings of the conditioning inputs: times (t, t - r) and class labels (spec section 4)."""

from __future__ import annotations

from torch import Tensor, nn

from .tangent import linear_with_tangent, silu_with_tangent, sinusoidal_embedding_with_tangent


def sinusoidal_embedding(values: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of raw scalars (no x1000 scaling: times stay in [0, 1]).

    Args:
        values: (B,) the scalars, typically ``t`` or ``t - r``.
        dim: the number of features (even).
        max_period: the longest period among the frequencies.
    Returns:
        (B, dim) ``[cos(values * f_k), sin(values * f_k)]`` with ``f_k = max_period^(-k / (dim/2))``.
    """
    return sinusoidal_embedding_with_tangent(values, None, dim, max_period)[0]


class ScalarEmbedder(nn.Module):
    """A scalar in [0, 1] -> sinusoidal features -> two-layer MLP. (B,) -> (B, hidden)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, values: Tensor) -> Tensor:
        return self.forward_with_tangent(values, None)[0]

    def forward_with_tangent(self, values: Tensor, dvalues: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The embedding and its derivative along ``dvalues``. (B,), (M,) -> (B, hidden), (M, hidden).

        The tangent of the leading M rows, without gradient (see :mod:`meanflow.models.tangent`);
        ``dvalues`` None: the plain embedding and None.
        """
        dtype = self.mlp[0].weight.dtype
        features, dfeatures = sinusoidal_embedding_with_tangent(values, dvalues, self.frequency_size)
        h, dh = linear_with_tangent(features.to(dtype), dfeatures, self.mlp[0].weight, self.mlp[0].bias)
        h, dh = silu_with_tangent(h, dh)
        return linear_with_tangent(h, dh, self.mlp[2].weight, self.mlp[2].bias)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with one extra row for the null class (id ``num_classes``).

    Label dropout for classifier-free guidance is decided by the objective, which passes the
    null id; the embedder itself is deterministic.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: Tensor) -> Tensor:
        return self.table(labels)


class TimeConditioning(nn.Module):
    """The conditioning vector of a (t, t - r) model: embed(t) + embed(t - r) [+ embed(y)].

    Embedding ``t - r`` rather than ``r`` is the paper's best choice (spec section 4); the
    subtraction happens here, inside the network, so a JVP with tangent (dr, dt) = (0, 1)
    differentiates through it.
    """

    def __init__(self, hidden_size: int, num_classes: int | None, frequency_size: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.t_embedder = ScalarEmbedder(hidden_size, frequency_size)
        self.gap_embedder = ScalarEmbedder(hidden_size, frequency_size)
        self.label_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes else None

    def forward(self, r: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """r, t: (B,); y: (B,) int64 or None -> (B, hidden)."""
        return self.forward_with_tangent(r, t, y, None, None)[0]

    def forward_with_tangent(
        self, r: Tensor, t: Tensor, y: Tensor | None, dr: Tensor | None, dt: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The conditioning vector c and its derivative along (dr, dt) for the leading rows.

        ``t - r`` moves by ``dt - dr``; the label embedding is constant (zero tangent). The
        tangent is computed without gradient (see :mod:`meanflow.models.tangent`).

        Args:
            r, t: (B,) the times; y: (B,) int64 labels or None, as in :meth:`forward`.
            dr, dt: (M,) the tangents of the leading M rows' times (0 and 1 for Eq. 5), or None.
        Returns:
            c: (B, hidden); dc: (M, hidden) or None.
        """
        label = self._label_embedding(y)
        moving = dt is not None
        e_t, de_t = self.t_embedder.forward_with_tangent(t, dt)
        e_gap, de_gap = self.gap_embedder.forward_with_tangent(t - r, dt - dr if moving else None)
        c = e_t + e_gap
        return (c if label is None else c + label), (de_t + de_gap if moving else None)

    def _label_embedding(self, y: Tensor | None) -> Tensor | None:
        """(B, hidden) label embedding, or None for an unconditional model; checks y against the model."""
        if self.label_embedder is not None:
            if y is None:
                raise ValueError(
                    f"this model is class-conditional ({self.num_classes} classes): pass labels y, "
                    f"or the null class id {self.num_classes} for unconditional predictions"
                )
            return self.label_embedder(y)
        if y is not None:
            raise ValueError("this model is unconditional (num_classes=None) but labels y were given")
        return None
