"""What the sidecar's HTTP contract promises a hostile client (issue 26, items 2, 3, 4, 7): strict JSON
types, only finite numbers stored, echoed ids cut short, `/metrics` behind an admin key when API keys are
configured, and an OpenAPI document that lists the answers the server really gives and what it accepts."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from asgi_helpers import A, get, post, request, tiny_app

from ragkv.server.json_body import exact_number

Q = '"messages": [{"role": "user", "content": "q"}]'
ADMIN = {"Authorization": "Bearer admin-key"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app = tiny_app(tmp_path_factory.mktemp("contract"), metrics_key="admin-key")
    yield app
    app.state.worker.close()


@pytest.mark.parametrize(
    "path,body,field,accepted",
    [
        ("/v1/chat/completions", "{" + Q + ', "max_tokens": true}', "max_tokens", "integer"),
        ("/v1/chat/completions", "{" + Q + ', "max_tokens": "5"}', "max_tokens", "integer"),
        ("/v1/chat/completions", "{" + Q + ', "max_tokens": 2.5}', "max_tokens", "integer"),
        ("/v1/chat/completions", "{" + Q + ', "stream": "yes"}', "stream", "boolean"),
        ("/v1/chat/completions", "{" + Q + ', "stream": 1}', "stream", "boolean"),
        ("/v1/completions", '{"prompt": "q", "temperature": "0.5"}', "temperature", "number"),
        ("/v1/retrieve", '{"query": "q", "k": "3"}', "k", "integer"),
        ("/v1/chat/completions", "{" + Q + ', "retrieve": {"k": true}}', "retrieve.k", "integer"),
    ],
)
def test_types_are_strict_and_the_error_names_field_and_accepted_type(app, path, body, field, accepted):
    r = post(app, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"] and accepted in err["message"], err


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_metadata_is_refused_at_the_door(app, number):
    body = '{"documents": [{"id": "mn", "text": "x", "metadata": {"a": {"b": [1, NUMBER]}}}]}'.replace("NUMBER", number)
    r = post(app, "/v1/documents", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "metadata" in err["param"] and "finite" in err["message"], err
    assert get(app, "/v1/documents/mn").status_code == 404  # nothing was stored


def test_a_stored_documents_metadata_reads_back(app):
    body = {"documents": [{"id": "ok", "text": "some text", "metadata": {"a": 1.5, "b": [None, True, "s"]}}]}
    assert post(app, "/v1/documents", json.dumps(body)).status_code == 200
    r = get(app, "/v1/documents/ok")
    assert r.status_code == 200 and r.json()["metadata"] == body["documents"][0]["metadata"], r.text


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_a_long_id_is_cut_in_the_error_body(app, method):
    r = request(app, method, "/v1/documents/" + "x" * 60_000)  # httpx's URL limit is 64 KiB
    assert r.status_code == 404
    assert len(r.content) < 1000 and "60000 characters" in r.json()["error"]["message"], r.text[:300]


def test_metrics_need_the_admin_key_when_api_keys_are_configured(app):
    assert get(app, "/metrics", headers={}).status_code == 401
    tenant = get(app, "/metrics", headers=A)
    assert tenant.status_code == 401 and "metrics_key" in tenant.json()["error"]["message"]
    r = get(app, "/metrics", headers=ADMIN)
    assert r.status_code == 200 and b"ragkv_requests" in r.content


def test_metrics_refused_with_keys_but_no_admin_key_and_open_without_keys(tmp_path):
    closed = tiny_app(tmp_path / "closed")
    r = get(closed, "/metrics", headers=A)
    assert r.status_code == 401 and "metrics_key" in r.json()["error"]["message"]
    closed.state.worker.close()
    public = tiny_app(tmp_path / "public", metrics_public=True)
    assert get(public, "/metrics", headers={}).status_code == 200
    public.state.worker.close()
    open_ = tiny_app(tmp_path / "open", api_keys={})
    assert get(open_, "/metrics", headers={}).status_code == 200
    open_.state.worker.close()


def test_openapi_lists_the_real_responses(app):
    spec = app.openapi()
    paths = spec["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/documents", "/v1/retrieve"):
        codes = set(paths[path]["post"]["responses"])
        assert {"200", "400", "401", "413", "429"} <= codes, (path, codes)
        assert "422" not in codes  # validation failures answer 400
        assert "application/json" in paths[path]["post"]["requestBody"]["content"]
    for method in ("get", "delete"):
        assert {"200", "401", "404"} <= set(paths["/v1/documents/{doc_id}"][method]["responses"])
    assert "401" in paths["/metrics"]["get"]["responses"]
    err = spec["components"]["schemas"]["ErrorResponse"]
    assert "error" in err["properties"]


def test_openapi_schema_says_what_is_accepted(app):
    schemas = app.openapi()["components"]["schemas"]
    chat = schemas["ChatRequest"]["properties"]
    assert chat["messages"]["minItems"] == 1
    assert chat["max_tokens"]["anyOf"][0]["type"] == "integer" and chat["max_tokens"]["anyOf"][0]["minimum"] == 1
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]
    assert all(
        alt.get("minLength") == 1 or (alt.get("minItems") == 1 and alt.get("maxItems") == 1) for alt in prompt["anyOf"]
    ), prompt
    assert schemas["RetrieveRequest"]["properties"]["query"]["minLength"] == 1
    # int64 ids: an exact integer bound (a float one reads 2**63 and admits ids past the maximum)
    chunk_id = schemas["ChunkRef"]["properties"]["chunk_id"]
    assert chunk_id["maximum"] == 2**63 - 1 and type(chunk_id["maximum"]) is int, chunk_id
    assert chunk_id["minimum"] == 0 and type(chunk_id["minimum"]) is int, chunk_id


def test_retrieve_k_is_lowered_to_the_room_left_by_documents_with_a_warning(app):
    docs = json.dumps(["some text"] * 15)  # max_documents is 16
    r = post(app, "/v1/chat/completions", "{" + Q + f', "documents": {docs}, "retrieve": {{"k": 4}}}}')
    assert r.status_code == 200, r.text
    assert any("retrieve.k lowered from 4 to 1" in w for w in r.json()["ragkv"]["warnings"])


def test_an_unknown_chunk_id_is_not_found(app):
    r = post(app, "/v1/chat/completions", "{" + Q + ', "documents": [{"chunk_id": 987654}]}')
    assert r.status_code == 404 and "unknown chunk_id [987654]" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("literal", ["9223372036854775806.0", "9007199254740993.0", "9.007199254740993e15"])
def test_an_integral_chunk_id_written_with_a_fraction_is_read_exactly(app, literal):
    """JSON Schema calls 9223372036854775806.0 an integer within int64; a float parse would round it to
    2**63 (a 400) and 9007199254740993.0 to another chunk's id."""
    r = post(app, "/v1/chat/completions", "{" + Q + f', "documents": [{{"chunk_id": {literal}}}]}}')
    exact = int(Decimal(literal))
    assert r.status_code == 404 and f"unknown chunk_id [{exact}]" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize(
    "literal,expected",
    [
        ("2.0", 2.0),  # a float the parse does not change stays a float
        ("2.5", 2.5),
        ("1e300", 1e300),  # beyond any integer field: not spelled out as a 301-digit int
        ("9223372036854775806.5", float(2**63)),  # not integral: the float it always was
        ("9223372036854775806.0", 2**63 - 2),
        ("-9007199254740993.0", -(2**53) - 1),
        ("1e400", float("inf")),  # refused later, as before, by the fields (finite numbers only)
    ],
)
def test_exact_number_keeps_only_integers_a_float_would_change(literal, expected):
    value = exact_number(literal)
    assert value == expected and type(value) is type(expected), (literal, value)
