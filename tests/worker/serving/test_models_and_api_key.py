"""GET /v1/models/{id} (issue 16.17) and the optional API key of the /v1 endpoints (16.11)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from counting_model import counting_state
from fastapi.testclient import TestClient

from dsworker.contract.engine_config import EngineConfigError
from dsworker.serving.app import create_app
from dsworker.serving.auth import load_api_key

KEY = "sk-test-0123456789"


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient]:
    with (
        counting_state(tmp_path, modelName="org/tiny") as state,
        TestClient(create_app(state)) as c,
    ):
        c.state = state  # type: ignore[attr-defined]
        yield c


def test_a_model_by_id_is_the_listed_object_and_an_unknown_id_a_404(client: TestClient) -> None:
    listed = client.get("/v1/models").json()["data"][0]
    r = client.get("/v1/models/org/tiny")  # ids may hold a slash
    assert r.status_code == 200 and r.json() == listed
    assert listed["id"] == "org/tiny" and listed["object"] == "model"
    r = client.get("/v1/models/gpt-4")
    assert r.status_code == 404
    assert r.json()["error"] | {"message": ""} == {
        "message": "", "type": "invalid_request_error", "param": "model", "code": "model_not_found"
    }  # fmt: skip
    assert "'gpt-4' does not exist" in r.json()["error"]["message"]


def test_without_a_key_configured_nothing_asks_for_one(client: TestClient) -> None:
    assert client.get("/v1/models").status_code == 200
    assert client.post("/v1/completions", json={"prompt": "w1", "max_tokens": 1}).status_code == 200


def test_with_a_key_the_v1_endpoints_need_it_and_health_and_metrics_stay_open(
    client: TestClient,
) -> None:
    client.state.api_key = KEY  # type: ignore[attr-defined]
    body = {"prompt": "w1", "max_tokens": 1}
    chat = {"messages": [{"role": "user", "content": "w1"}], "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": "Basic " + KEY}, {"Authorization": "Bearer "}):  # fmt: skip
        for r in (
            client.get("/v1/models", headers=headers),
            client.get("/v1/models/org/tiny", headers=headers),
            client.post("/v1/completions", json=body, headers=headers),
            client.post("/v1/chat/completions", json=chat, headers=headers),
        ):
            assert r.status_code == 401, (headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key"
    good = {"Authorization": f"Bearer {KEY}"}
    assert client.get("/v1/models", headers=good).status_code == 200
    assert client.post("/v1/completions", json=body, headers=good).status_code == 200
    assert client.post("/v1/chat/completions", json=chat, headers=good).status_code == 200
    assert client.get("/health").status_code == 200
    metrics = client.get("/metrics").text
    assert 'dsworker_requests_total{endpoint="/v1/completions",status="401"} 5.0' in metrics


def test_the_key_file_is_checked_naming_apikeyfile(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(f"  {KEY}\n")  # a Secret's file often ends with a newline
    assert load_api_key(str(key_file)) == KEY
    for content in ("", "\n", "two words", "k\x00ey"):
        key_file.write_text(content)
        with pytest.raises(EngineConfigError, match="apiKeyFile .*printable ASCII"):
            load_api_key(str(key_file))
    with pytest.raises(EngineConfigError, match="apiKeyFile .*cannot be read"):
        load_api_key(str(tmp_path / "missing"))
