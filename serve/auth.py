"""API keys around the whole HTTP app.

Every route takes a key when keys are configured, except the probes (/health, /ready) and
/metrics; the admin routes take the admin key. vLLM's own `--api-key` check covers only some
path prefixes (it leaves /tokenize open, for one), so lorafleet checks keys itself, in front of
every route it serves.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from starlette.requests import Request

from lorafleet.errors import UserError
from serve.errors import OpenAIError

OPEN_PATHS = ("/health", "/ready", "/metrics")
ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/adapters/rescan", "/v1/fleet",
               "/v1/fleet/reload")


def read_keys(env: str, path: str | None) -> list[str]:
    """Keys from the environment variable `env` (comma-separated) and the file `path` (one a line,
    # comments). Fails closed: a configured file that is missing, unreadable or holds no key
    raises UserError naming it, instead of serving with no key at all."""
    keys = [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    if path:
        p = Path(path)
        try:
            lines = p.read_text().splitlines()
        except OSError as e:
            raise UserError(f"the key file {p} cannot be read ({e.strerror or e}); fix the path or mount, or remove "
                            "the setting to serve without keys") from None
        found = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not found:
            raise UserError(f"the key file {p} holds no key; add one key a line, or remove the setting")
        keys += found
    return keys


def key_matches(presented: str | None, keys: list[str]) -> bool:
    if presented is None:
        return False
    ok = False
    for k in keys:  # every key, always: the time taken does not tell which key nearly matched
        ok |= hmac.compare_digest(presented.encode(), k.encode())
    return ok


def bearer(request: Request) -> str | None:
    h = request.headers.get("authorization", "")
    return h[7:].strip() if h.lower().startswith("bearer ") else None


def refusal(path: str, key: str | None, api_keys: list[str], admin_keys: list[str]) -> OpenAIError | None:
    """Why a request for `path` with `key` may not go on, or None."""
    if path in OPEN_PATHS:
        return None
    if path in ADMIN_PATHS:
        if admin_keys:
            if not key_matches(key, admin_keys):
                return OpenAIError(401 if key is None else 403, "admin routes need the admin key "
                                   "(LORAFLEET_ADMIN_KEY) as 'Authorization: Bearer <key>'")
        elif api_keys:
            return OpenAIError(403, "admin routes are disabled: no admin key is configured (set LORAFLEET_ADMIN_KEY)")
        return None
    if api_keys and not key_matches(key, api_keys) and not key_matches(key, admin_keys):
        return OpenAIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'")
    return None


class KeyCheck:
    """ASGI middleware (plain ASGI: FastAPI's @middleware("http") would copy every streamed chunk
    through an extra in-memory stream and task). Puts the key in scope["state"]["key"] for the
    per-key limits."""

    def __init__(self, app, api_keys: list[str], admin_keys: list[str]):
        self.app, self.api_keys, self.admin_keys = app, api_keys, admin_keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        key = bearer(Request(scope))
        err = refusal(scope["path"], key, self.api_keys, self.admin_keys)
        if err is not None:
            return await err.response()(scope, receive, send)
        scope.setdefault("state", {})["key"] = key or "anonymous"
        await self.app(scope, receive, send)
