"""The optional API key: OpenAI's `Authorization: Bearer <key>` on the /v1 endpoints.

The key is read once at start-up from the file the engine config's apiKeyFile names (a mounted
Secret); /health and /metrics never ask for it, so probes and scrapers need no key.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import Request

from dsworker.contract.engine_config import EngineConfigError
from dsworker.serving.protocol.errors import ApiError
from dsworker.serving.state import server_state

API_KEY_FILE_ENV = "DSWORKER_API_KEY_FILE"  # apiKeyFile when the config leaves it out
MAX_KEY_BYTES = 4096


def load_api_key(path: str) -> str:
    """The key in `path` (surrounding whitespace dropped), or an error naming apiKeyFile."""
    try:
        raw = Path(path).read_bytes()[: MAX_KEY_BYTES + 1]
    except OSError as exc:
        raise EngineConfigError(
            f"apiKeyFile {path}: cannot be read ({exc.strerror or exc}); mount the key there "
            f"or unset apiKeyFile (and {API_KEY_FILE_ENV})"
        ) from None
    key = raw.strip()
    if not key or len(key) > MAX_KEY_BYTES or not all(0x21 <= b <= 0x7E for b in key):
        raise EngineConfigError(
            f"apiKeyFile {path}: the key must be 1..{MAX_KEY_BYTES} printable ASCII characters "
            "without spaces (it is sent in an HTTP header)"
        )
    return key.decode("ascii")


def require_api_key(request: Request) -> None:
    """A dependency of the /v1 routers: 401 unless the request bears the server's key."""
    key = server_state(request).api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            "no API key: send it in an Authorization header as 'Bearer <key>'",
            status=401,
            code="invalid_api_key",
        )
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError("incorrect API key provided", status=401, code="invalid_api_key")
