"""ringattn: exact blockwise and Ring Attention in JAX."""

from ringattn.attention.blockwise import blockwise_attention
from ringattn.attention.reference import reference_attention
from ringattn.parallel.api import context_parallel_attention
from ringattn.parallel.layouts import LAYOUTS, from_layout, to_layout
from ringattn.parallel.ring import ring_attention

__all__ = [
    "LAYOUTS",
    "blockwise_attention",
    "context_parallel_attention",
    "from_layout",
    "reference_attention",
    "ring_attention",
    "to_layout",
]
