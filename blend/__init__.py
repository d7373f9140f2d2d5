"""The fusion: prompt plan, RoPE re-rotation, token selection, strategies and the one layer loop."""

from .cache import kv_tensor, to_dynamic_cache
from .config import STRATEGIES, BlendConfig
from .extend import extend, extend_many
from .loader import LayerLoader
from .loop import BlendResult, blend, blend_many
from .plan import BlendPlan, make_plan
from .prompt_state import PromptState
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
    "blend_many",
    "PromptState",
    "LayerLoader",
    "Strategy",
    "make_strategy",
    "extend",
    "extend_many",
    "rerotate",
    "rotation",
    "to_dynamic_cache",
    "kv_tensor",
]
