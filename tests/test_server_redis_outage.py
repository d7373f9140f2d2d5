"""A sidecar whose shared Redis tier is unreachable still answers 200: from its local tier, misses
recomputed, with a warning in the `ragkv` member and the outage on /metrics and /v1/cache/stats.
Needs the real SmolLM2 (slow marker); no Redis needed (the tier points at a closed loopback port)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from test_storage_redis import closed_port_url

from ragkv.engine import Engine
from ragkv.storage import MemoryTier, RedisTier, TieredStore

pytestmark = pytest.mark.slow


def test_answers_200_with_a_warning_while_redis_is_down(smollm2, tmp_path):
    from ragkv.server.app import create_app
    from ragkv.server.settings import load_settings

    store = TieredStore([MemoryTier(1 << 30), RedisTier(closed_port_url(), 1 << 30, "lz4", prefix="ragkv-down")])
    app = create_app(load_settings(data_dir=str(tmp_path), max_new_tokens=3), Engine(smollm2, store))
    body = {
        "messages": [{"role": "user", "content": "Where does the Rhine bend north?"}],
        "max_tokens": 3,
        "documents": ["The Rhine bends north at Basel.", "Lake Constance feeds the Rhine."],
    }

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
            first, second = [await c.post("/v1/chat/completions", json=body) for _ in range(2)]
            metrics = (await c.get("/metrics")).text
            stats = (await c.get("/v1/cache/stats")).json()
        return first, second, metrics, stats

    first, second, metrics, stats = asyncio.run(main())
    app.state.worker.close()
    assert first.status_code == 200 and second.status_code == 200
    r1, r2 = first.json()["ragkv"], second.json()["ragkv"]
    assert r1["misses"] == 2 and r2["hits"] == {"cpu": 2}  # the local tier still serves the second request
    assert "'redis' is unreachable" in r1["warnings"][0] and r2["warnings"]
    assert 'ragkv_remote_tier_up{tier="redis"} 0.0' in metrics and "ragkv_degraded_answers_total 2.0" in metrics
    assert 'ragkv_compute_leases{outcome="unleased"} 2.0' in metrics  # computed without a lease, counted
    assert 'ragkv_compute_leases{outcome="duplicates"} 0.0' in metrics
    assert stats["remote"]["redis"]["up"] is False and stats["remote"]["redis"]["outages"] == 1
