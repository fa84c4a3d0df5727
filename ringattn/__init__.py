"""ringattn: exact blockwise and Ring Attention in JAX."""

from ringattn.attention.blockwise import blockwise_attention
from ringattn.attention.reference import reference_attention

__all__ = ["blockwise_attention", "reference_attention"]
