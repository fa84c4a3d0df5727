"""ringattn: exact blockwise and Ring Attention in JAX, and context parallelism around it."""

from ringattn.attention.blockwise import blockwise_attention
from ringattn.attention.reference import reference_attention
from ringattn.attention.target import target_platform
from ringattn.parallel.allgather import allgather_attention
from ringattn.parallel.api import context_parallel_attention
from ringattn.parallel.compat import ring_attention_original_api
from ringattn.parallel.costs import (
    Estimate,
    Hardware,
    LayoutChoice,
    choose_layout,
    choose_strategy,
    estimate_costs,
)
from ringattn.parallel.hybrid import hybrid_attention
from ringattn.parallel.layouts import LAYOUTS, from_layout, to_layout
from ringattn.parallel.ring import ring_attention
from ringattn.parallel.schedule import Schedule, Tile, format_schedule, tile_schedule
from ringattn.parallel.ulysses import ulysses_attention
from ringattn.promises import debug_checks

__all__ = [
    "LAYOUTS",
    "Estimate",
    "Hardware",
    "LayoutChoice",
    "Schedule",
    "Tile",
    "allgather_attention",
    "blockwise_attention",
    "choose_layout",
    "choose_strategy",
    "context_parallel_attention",
    "debug_checks",
    "estimate_costs",
    "format_schedule",
    "from_layout",
    "hybrid_attention",
    "reference_attention",
    "ring_attention",
    "ring_attention_original_api",
    "target_platform",
    "tile_schedule",
    "to_layout",
    "ulysses_attention",
]
