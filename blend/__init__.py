"""The fusion: prompt plan, RoPE re-rotation, token selection, strategies and the one layer loop."""

from .cache import kv_tensor, to_dynamic_cache
from .config import STRATEGIES, BlendConfig
from .extend import extend
from .loader import LayerLoader
from .loop import BlendResult, blend
from .plan import BlendPlan, make_plan
from .registry import make_strategy
from .rerotate import rerotate, rotation
from .strategies import Strategy

__all__ = [
    "BlendConfig",
    "STRATEGIES",
    "BlendPlan",
    "make_plan",
    "BlendResult",
    "blend",
    "LayerLoader",
    "Strategy",
    "make_strategy",
    "extend",
    "rerotate",
    "rotation",
    "to_dynamic_cache",
    "kv_tensor",
]
