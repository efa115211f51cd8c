"""The running server's side of the fleet file (lorafleet/fleet.py): aliases resolved per request,
the file followed without a restart.

Each version is registered in the adapter registry as `ALIAS@VERSION` and passes its gate (the
engine's compatibility checks) before the file is applied; versions given traffic must also
pass the alias's `require_eval`. A file that fails any check is refused whole, naming the line,
and the state before it keeps serving. A file that passes replaces the state in one assignment:
a request resolves its version once, at its start, so it finishes on that version whatever the
file says later, and no answer mixes versions.

Callers stick to a version through the OpenAI `user` field (OpenAI's own "unique identifier
representing your end-user", sent by every SDK and framework without a custom header). Without
it, a chat request sticks by its conversation's first message, which every turn of that
conversation repeats; a completion without `user` is placed by its prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.evaluation.gate import eval_refusal
from lorafleet.fleet import Fleet, FleetError, read_fleet
from serve.errors import OpenAIError

log = logging.getLogger("lorafleet.serve")


@dataclass(frozen=True)
class Route:
    """Where one request goes: the registry's adapter name (ALIAS@VERSION), its alias and version."""
    adapter: str
    alias: str
    version: str


def caller_key(body: dict[str, Any] | None) -> str:
    """Who is asking, for sticky canaries: `user`, else the conversation's first message, else the prompt."""
    body = body or {}
    if isinstance(body.get("user"), str) and body["user"]:
        return "user:" + body["user"]
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        first = [m for m in messages if isinstance(m, dict) and m.get("role") in ("system", "developer")][:1]
        first += [m for m in messages if isinstance(m, dict) and m.get("role") == "user"][:1]
        return "conversation:" + hashlib.sha256(json.dumps(first, sort_keys=True, default=str).encode()).hexdigest()
    return "prompt:" + hashlib.sha256(json.dumps(body.get("prompt"), default=str).encode()).hexdigest()


class FleetRouter:
    """The fleet file at `path` applied to `registry`, followed every `poll_s` seconds.

    `apply()` raises FleetError when the file cannot be applied (the server refuses to start on
    one); afterwards a bad edit is logged and kept in `error`, and the last good state serves."""

    def __init__(self, path: str | Path, registry: Any, require_eval: Any = None, poll_s: float = 2.0):
        self.path = Path(path)
        self.registry = registry
        self.require_eval = require_eval
        self.poll_s = poll_s
        self.fleet: Fleet | None = None
        self.error: str | None = None
        self.applied_at: float | None = None
        self._apply_lock = threading.Lock()
        self._names: set[str] = set()  # the versions this router listed in the registry

    # ------------------------------------------------------------------ requests
    def route(self, model: str, body: dict[str, Any] | None) -> Route | None:
        """The version for `model` (an alias, or ALIAS@VERSION pinned), None when it is neither;
        404 naming the versions for a pinned version the file does not declare."""
        fleet = self.fleet  # one read: the whole request sees one state
        if fleet is None:
            return None
        if "@" in model:
            alias, version = model.split("@", 1)
            if alias not in fleet.aliases:
                return None
            if version not in fleet.aliases[alias].versions:
                raise OpenAIError(404, f"The model `{model}` does not exist: alias {alias} has versions "
                                       f"{', '.join(fleet.aliases[alias].versions)}.", param="model")
            return Route(model, alias, version)
        alias = fleet.aliases.get(model)
        if alias is None:
            return None
        version = alias.pick(caller_key(body))
        return Route(alias.adapter_name(version), model, version)

    def cards(self) -> list[dict[str, Any]]:
        """What /v1/models says of each alias: its versions, traffic and current version."""
        fleet = self.fleet
        if fleet is None:
            return []
        return [{"id": a.name, "fleet": {"versions": {v: a.adapter_name(v) for v in a.versions}, "traffic": a.traffic,
                                         "current": a.current}} for a in fleet.aliases.values()]

    def state(self) -> dict[str, Any]:
        fleet = self.fleet
        return {"file": str(self.path), "digest": fleet.digest if fleet else None, "applied_at": self.applied_at,
                "error": self.error,
                "aliases": {a.name: {"versions": a.versions, "traffic": a.traffic, "history": list(a.history)}
                            for a in (fleet.aliases.values() if fleet else [])}}

    # ------------------------------------------------------------------ following the file
    def apply(self) -> bool:
        """Read the file and, if it changed, check it whole and switch to it; True when switched.
        Raises FleetError (nothing changed) when it cannot be applied."""
        with self._apply_lock:
            fleet = read_fleet(self.path, self.require_eval)
            if self.fleet is not None and fleet.digest == self.fleet.digest:
                return False
            prepared = {}
            for alias in fleet.aliases.values():
                for version, source in alias.versions.items():
                    name = alias.adapter_name(version)
                    where = f"{self.path}:{alias.lines.get('versions.' + version, '?')}"
                    try:
                        adapter = self.registry.prepare_version(name, source)
                    except OpenAIError as e:
                        raise FleetError(f"{where}: version {name} cannot be served: {e.message}") from None
                    if version in alias.traffic:
                        why = eval_refusal(name, adapter.info.manifest if adapter.info else None, alias.require_eval)
                        if why:
                            raise FleetError(f"{self.path}:{alias.lines['traffic']}: {why}; it may not take traffic "
                                             f"(alias {alias.name} require_eval)")
                    prepared[name] = adapter
            # Every check passed: the versions are listed and the routes switch together.
            self.registry.commit_versions(prepared, self._names - set(prepared))
            self._names = set(prepared)
            self.fleet = fleet  # the switch: one assignment
            self.applied_at, self.error = time.time(), None
            log.info("fleet file %s applied: %s", self.path, "; ".join(
                f"{a.name} -> " + ", ".join(f"{v} {w}%" for v, w in a.traffic.items()) for a in fleet.aliases.values())
                or "no aliases")
            return True

    def poll(self) -> None:
        """Apply the file if it changed; a file that cannot be applied is logged and kept in `error`."""
        try:
            self.apply()
        except FleetError as e:
            if str(e) != self.error:
                log.error("fleet file not applied, the previous state keeps serving: %s", e)
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 - a watcher that dies would silently stop following the file
            log.exception("fleet file check failed")
            self.error = f"{type(e).__name__}: {e}"

    def start(self) -> None:
        """Follow the file from a daemon thread (every `poll_s` seconds)."""
        def run():
            while True:
                time.sleep(self.poll_s)
                self.poll()

        threading.Thread(target=run, name="fleet-file", daemon=True).start()



def start_router(path: str | None, registry: Any, require_eval: Any, poll_s: float) -> FleetRouter | None:
    """The router for a deployment's `fleet_file` (None without one), applied and followed.
    Raises FleetError when the file cannot be applied at start."""
    if not path:
        return None
    router = FleetRouter(path, registry, require_eval, poll_s)
    router.apply()
    router.start()
    return router
