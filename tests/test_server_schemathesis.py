"""The sidecar against its own OpenAPI document (issue 26, item 4): a bounded, derandomized schemathesis run
over every operation, positive and negative, in process over a tiny random model. Each generated request
must get no 5xx and a reply that conforms: a listed status code, content type, headers and body schema;
data the schema calls invalid is refused. (The runner is driven from hypothesis directly: schemathesis'
own pytest plugin does not load under this pytest.)"""

from __future__ import annotations

import os
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
from asgi_helpers import A, tiny_app  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402

# per operation and mode: about 110 requests over the 9 operations, under a minute on one core (the
# Hardening table in docs/BENCHMARKS.md ran more: RAGKV_TEST_SCHEMATHESIS_EXAMPLES=60)
EXAMPLES = int(os.environ.get("RAGKV_TEST_SCHEMATHESIS_EXAMPLES", "8"))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app = tiny_app(tmp_path_factory.mktemp("schemathesis"), metrics_key="admin-key")
    yield app
    app.state.worker.close()


def _run(operation, mode, headers: dict, failures: list, seen: list) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as it was found
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case):
        try:
            response = case.call_and_validate(headers=headers)
            seen.append((case.method, case.path, response.status_code))
        except (Exception, FailureGroup) as err:  # every failure is collected, then asserted on at once
            seen.append((case.method, case.path, "failed"))
            failures.append(f"{mode.value} {case.method} {case.path}: {str(err)[:600]}")

    try:
        check()
    except Unsatisfiable:  # no invalid request exists (e.g. GET /healthz takes no input)
        assert mode == schemathesis.GenerationMode.NEGATIVE


def test_every_operation_conforms_to_the_schema(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.generation.update(allow_x00=False)  # metadata's nested strings: NUL is refused (see schema)
    failures, seen = [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        key = "Bearer admin-key" if operation.path == "/metrics" else A["Authorization"]
        for mode in schemathesis.GenerationMode:
            _run(operation, mode, {"Authorization": key}, failures, seen)
    statuses = Counter(status for *_, status in seen)
    print(f"schemathesis: {len(seen)} cases, statuses {dict(sorted(statuses.items(), key=str))}")
    assert len({(m, p) for m, p, _ in seen}) == 9 and len(seen) >= 60
    assert not [s for s in statuses if isinstance(s, int) and s >= 500]
    assert failures == [], "\n".join(failures[:8]) + f"\n{len(failures)} failures"
