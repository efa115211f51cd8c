"""What the HTTP front sends to an engine replica, and what comes back: the typed contract
between the two halves of `serve/`, in both topologies (in one process, or across Ray).

The front has already checked the key, the body size, the drain state and the adapter (the
registry's gate); the replica answers the OpenAI request with vLLM's own serving classes. The
body travels as the client sent it, so vLLM parses and validates it exactly as its own server
does. Everything here is plain data: Ray pickles it between processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

# Routes the replica answers with vLLM's serving classes (method, path). Everything else the
# front answers itself (models, admin, health, metrics) or refuses.
OPENAI_ROUTES = {
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/responses"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
}
# Routes whose prompt is rendered with a chat template (the adapter's) and so stop at its
# end-of-turn token; /v1/completions takes the prompt as it is.
TEMPLATED_ROUTES = {"/v1/chat/completions", "/v1/responses", "/tokenize"}


@dataclass(frozen=True)
class AdapterRef:
    """One version of one adapter, as the registry passed it through the gate.

    `name` is what clients send as `model`; `version` identifies the bytes (a hash of the
    config and weights), so an adapter replaced in place is a new identity to the engine.
    `uri` is its source; a replica fetches a remote one (s3://, hf://) itself, and reads a local
    one (a shared volume) at `path`. `template` is the Jinja chat template recorded in its
    manifest (None: the base's). `fleet_version`: the fleet file's version name when `name` is
    ALIAS@VERSION (serve/fleet.py), else None; `served_as` then the alias the client named, which
    the engine's serving classes see as the model (answers name the model as the client did).
    """
    name: str
    path: str
    version: str
    template: str | None = None
    uri: str = ""
    fleet_version: str | None = None
    served_as: str | None = None  # the `model` the client sent (an alias), when it is not `name`

    @property
    def label(self) -> str:
        """Which version answered, for the response header and the metrics' `version` label: the
        fleet's version name, or the content hash of an adapter outside the fleet."""
        return self.fleet_version or self.version


@dataclass
class ReplicaRequest:
    """One OpenAI request for a replica: route, the client's body bytes, and what the front
    resolved (the adapter, or None for the base model)."""
    method: str
    path: str
    body: bytes
    adapter: AdapterRef | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    # adapters unloaded through the admin API on another replica: free them here too
    unloaded: list[str] = field(default_factory=list)


@dataclass
class Start:
    """First event of every answer: the HTTP status and headers vLLM's route returned, and what
    the replica's adapter cache did for this request."""
    status: int
    headers: list[tuple[bytes, bytes]]
    loaded: bool = False
    evicted: list[str] = field(default_factory=list)


@dataclass
class End:
    """Last event of every answer: tokens the engine read and generated for it."""
    prompt_tokens: int = 0
    completion_tokens: int = 0


class AdapterLoadError(RuntimeError):
    """The engine refused an adapter that passed the registry's gate: the adapter's fault (a 422;
    the registry marks it refused), not the engine's (a 503)."""


class LoadLoRAAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter's body, vLLM's fields (vllm.entrypoints.serve.lora.protocol; a
    test keeps the two equal), here so that a server without vLLM takes the same bodies."""
    lora_name: str
    lora_path: str
    load_inplace: bool = False
    is_3d_lora_weight: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter's body, vLLM's fields."""
    lora_name: str
    lora_int_id: int | None = None
