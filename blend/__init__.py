"""The fusion: prompt plan, RoPE re-rotation, token selection, strategies and the one layer loop.

Names are exported lazily (lazy_exports.py): config.py (BlendConfig, the strategy names and parsers)
imports no torch, so the settings tree reads it without loading the fusion.
"""

from ..lazy_exports import lazy_exports

lazy_exports(
    __name__,
    {
        "BlendConfig": "config",
        "STRATEGIES": "config",
        "BlendPlan": "plan",
        "make_plan": "plan",
        "BlendResult": "loop",
        "blend": "loop",
        "blend_many": "loop",
        "PromptState": "prompt_state",
        "LayerLoader": "loader",
        "LayerBuffers": "layer_buffers",
        "Strategy": "strategies",
        "make_strategy": "registry",
        "extend": "extend",
        "extend_many": "extend",
        "rerotate": "rerotate",
        "rotation": "rerotate",
        "to_dynamic_cache": "cache",
        "kv_tensor": "cache",
    },
)
