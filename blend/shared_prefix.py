"""Prompts of one packed pass that open with the same fresh rows compute those rows once.

A prompt's rows before its first chunk (the template's opening) attend only to themselves, so when
they are all fresh (not loaded from cache) and computed from layer 0, every prompt opening with the
same ids has the same hidden states, keys and values there. In a packed pass (`scout_many`,
`blend_many`) the first such prompt (the leader) computes them; each of the others (`follow`) copies
the leader's keys and values of those rows into its own buffers and computes only its other rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from .plan import BlendPlan


class SharesPrefix(Protocol):
    def fresh_prefix(self) -> tuple[int, ...]: ...

    def follow(self, leader: SharesPrefix, shared: int) -> None: ...


def fresh_prefix(plan: BlendPlan, cached: torch.Tensor, active: torch.Tensor) -> tuple[int, ...]:
    """The ids of `plan`'s rows before its first chunk when they are all fresh (`cached` [N] bool) and
    `active` [N] bool, and are not the whole prompt (its last row stays its own); else ()."""
    p = plan.prefix_len
    if not 0 < p < plan.num_tokens or bool(cached[:p].any()) or not bool(active[:p].all()):
        return ()
    return tuple(plan.input_ids[:p].tolist())


def share_prefixes(prompts: Sequence[SharesPrefix]) -> None:
    """Each prompt opening like an earlier one follows the first of them (its leader); one prompt alone
    is left as it is (no host read-back of its rows)."""
    if len(prompts) < 2:
        return
    leaders: dict[tuple[int, ...], SharesPrefix] = {}
    for p in prompts:
        prefix = p.fresh_prefix()
        if prefix and leaders.setdefault(prefix, p) is not p:
            p.follow(leaders[prefix], len(prefix))
