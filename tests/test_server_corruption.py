"""Corruption is visible (issue 26, item 6): entries dropped because they failed their checks are counted
in the tenant's `/v1/cache/stats` (`corrupt`, its own only) and in `/metrics` (`ragkv_corrupt_entries`)."""

from __future__ import annotations

import json

from asgi_helpers import A, B, get, post, tiny_app
from storage_helpers import payloads_of

from ragkv.storage import DiskTier, TieredStore

Q = '"messages": [{"role": "user", "content": "q"}]'
DOCS = [f"passage number {i} about rivers and mountains" for i in range(4)]


def test_dropped_corrupt_entries_are_counted_per_tenant_and_in_metrics(tmp_path):
    store = TieredStore([DiskTier(tmp_path / "cache", catalog_url=f"sqlite:///{tmp_path}/c.sqlite")])
    app = tiny_app(tmp_path / "data", store=store, metrics_key="admin")
    body = "{" + Q + f', "documents": {json.dumps(DOCS)}}}'
    try:
        assert post(app, "/v1/chat/completions", body, A).status_code == 200
        engine = app.state.engine
        keys = [engine.supply.key(c, "tenant-a") for c in engine.tokenize_chunks(DOCS)]
        payloads = payloads_of(tmp_path / "cache", keys)  # the chunks' (not the prompt prefix's)
        assert len(payloads) == len(DOCS)
        for path in payloads[:3]:
            data = bytearray(path.read_bytes())
            data[-10] ^= 0xFF  # the checksum no longer matches
            path.write_bytes(bytes(data))
        again = post(app, "/v1/chat/completions", body, A)
        assert again.status_code == 200 and again.json()["ragkv"]["misses"] == 3  # dropped and recomputed
        mine, other = get(app, "/v1/cache/stats", A).json(), get(app, "/v1/cache/stats", B).json()
        assert mine["store"]["corrupt"] == 3 and mine["store"]["tiers"][0]["corrupt"] == 3
        assert other["store"]["corrupt"] == 0
        metrics = get(app, "/metrics", {"Authorization": "Bearer admin"}).text
        assert 'ragkv_corrupt_entries{tier="disk"} 3.0' in metrics
    finally:
        app.state.worker.close()
