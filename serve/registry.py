"""The adapter registry: which adapters exist, where, and whether this base can run them.

Sources are URIs: a local directory or PVC path (each subdirectory holding an
`adapter_config.json` is an adapter; the directory itself may be one), `s3://bucket/prefix`
(any fsspec filesystem works; S3 needs `s3fs`, endpoint from AWS_ENDPOINT_URL), or
`hf://org/name` for users with a network. Remote adapters are copied to a local cache on
first use. Every adapter passes the compatibility gate before an engine sees it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lorafleet.adapter import (AdapterInfo, check_against_base, name_some, parse_tensor_key, read_adapter,
                               unsupported)
from lorafleet.atomic import swap_in
from lorafleet.errors import UserError
from lorafleet.evaluation.gate import eval_refusal, recorded_eval
from serve.errors import OpenAIError, adapter_refused

log = logging.getLogger("lorafleet.serve")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Module names vLLM gives LoRA layers in decoder LLMs (its linear layers, by the names adapters
# use: vllm.lora.utils.get_supported_lora_modules on a built model). The front end has no model
# to ask; the engine's own load check stays the final word and its refusal is a 422 too.
ENGINE_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                  "gate_up_proj", "dense", "query_key_value", "dense_h_to_4h", "dense_4h_to_h", "c_attn", "c_proj",
                  "c_fc", "w1", "w2", "w3", "fc1", "fc2", "out_proj", "wqkv", "wo",
                  "embed_tokens", "lm_head"}  # the models' `embedding_modules`


@dataclass
class Adapter:
    name: str
    uri: str
    local_path: Path | None = None
    info: AdapterInfo | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    registered: bool = False  # added through the admin API, not found by scanning a source
    # Which bytes: a hash of the adapter's files, set by `prepare`. Replicas compare it with what
    # they hold, so an adapter replaced in place (load_inplace) is a new version to every
    # replica on its next request, not only to the one that took the admin call.
    version: str = ""
    eval: dict | None = None  # the manifest's recorded evaluation (lorafleet eval), shown by /v1/models
    # A fleet file's version (ALIAS@VERSION): its alias's require_eval judges it when it takes
    # traffic (serve/fleet.py), not the registry-wide gate, so a version can be staged unevaluated.
    fleet: bool = False

    @property
    def template(self) -> str | None:
        return self.info.template if self.info else None


def content_version(directory: Path) -> str:
    """A short hash of an adapter directory's top-level files (names and bytes): equal for equal
    adapters, different as soon as any byte of its config or weights differs."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(directory).iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def download_adapter(uri: str, dest: Path, max_bytes: int) -> None:
    """Copy a remote adapter's files into the directory `dest`: `hf://org/name` from the hub,
    anything else through fsspec (`s3://...`, with AWS_ENDPOINT_URL for S3-compatible stores).
    The front calls it to gate an adapter, and each engine replica to serve it: a replica on
    another node reads the source itself, never a path on the front's disk."""
    if uri.startswith("hf://"):
        from huggingface_hub import snapshot_download

        snapshot_download(uri[5:], local_dir=dest, allow_patterns=["adapter_config.json", "*.safetensors", "lorafleet.json",
                                                                 "edge_adapter.json", "*.onnx_adapter"])
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    for f in fs.ls(root, detail=True):
        if f["type"] == "file":
            if f.get("size", 0) > max_bytes:
                raise UserError(f"{f['name']} is larger than limits.max_adapter_bytes")
            fs.get(f["name"], str(dest / f["name"].rsplit("/", 1)[-1]))


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


class AdapterRegistry:
    """The adapters of a deployment's sources, each judged by the gate before it is listed or served.

    `base_shapes`: the base's weight name -> shape, or a function returning them (a hub id's
    weights are readable only once the engine has downloaded them; {} until then).
    `lora_target_modules`: the engine's deployment-time filter (vLLM's --lora-target-modules),
    with the base's `packed_modules` (vLLM's packed_modules_mapping): adapters with tensors the
    filter would leave out are refused, naming them.
    """

    def __init__(self, sources: list[str], cache_dir: Path,
                 base_shapes: dict[str, list[int]] | Callable[[], dict[str, list[int]]] | None = None,
                 base_fingerprint: str | None = None, max_lora_rank: int | None = None, allow_pickle: bool = False,
                 max_adapter_bytes: int = 2 * 1024**3, base_name: str | None = None, require_eval: Any = None,
                 lora_target_modules: list[str] | None = None, packed_modules: dict[str, list[str]] | None = None):
        self.sources = list(sources)
        self.cache_dir = Path(cache_dir)
        self._base_shapes = base_shapes or {}
        self.lora_target_modules = lora_target_modules
        self.packed_modules = packed_modules or {}
        self.base_fingerprint = base_fingerprint
        self.max_lora_rank = max_lora_rank
        self.allow_pickle = allow_pickle
        self.max_adapter_bytes = max_adapter_bytes
        self.base_name = base_name  # the base model's served name: no adapter may take it
        self.require_eval = require_eval  # config.RequireEval: the promotion gate (None: none)
        # Refused by the promotion gate: re-judged on every scan, so an adapter evaluated again
        # (its manifest rewritten) is served, or refused, without a restart.
        self.eval_refused: set[str] = set()
        self.adapters: dict[str, Adapter] = {}
        self.rejected: dict[str, str] = {}
        # Unloaded through the admin API: a scan does not bring them back (vLLM's unload means
        # "gone until loaded again"), a load_lora_adapter does.
        self.unloaded: set[str] = set()
        # Passed the gate, refused by the engine (vLLM's own checks): not sent to it again until
        # loaded again through the admin API (load_inplace for one that is listed).
        self.engine_refused: set[str] = set()
        self._lock = threading.Lock()

    # What an engine serves: the file that makes a directory an adapter, how one is read, and
    # the gate (`gate` below). The ONNX engine's registry (serve/edge/registry.py) changes these.
    marker = "adapter_config.json"
    reads_base_weights = True  # the gate reads the base's weight shapes (once they are downloaded)

    def read(self, local: Path) -> Any:
        """The adapter at `local`, read and checked (UserError naming the problem)."""
        return read_adapter(local, allow_pickle=self.allow_pickle)

    # ------------------------------------------------------------------------------ scanning
    def local_roots(self) -> list[Path]:
        return [Path(s.removeprefix("file://")).resolve() for s in self.sources if not is_remote(s)]

    def scan(self, gate: bool = True) -> dict[str, Adapter]:
        """(Re)list every source. Adapters found keep their cached state; vanished ones go; new
        ones go through the gate (`gate`; remote ones are copied here for it), so a refused
        adapter is never listed."""
        found: dict[str, Adapter] = {}
        for src in self.sources:
            for name, uri in self._list_source(src):
                if not NAME_RE.match(name):
                    self.rejected[name] = "name must match [A-Za-z0-9][A-Za-z0-9._-]*"
                    continue
                if name == self.base_name:
                    self.rejected[name] = (f"{uri} has the base model's served name {name!r}: rename the adapter "
                                           "directory or serve the base under another --served-model-name")
                    continue
                if name in self.unloaded:
                    continue
                found.setdefault(name, Adapter(name, uri))
        with self._lock:
            # keep adapters registered through the admin API that still exist
            for name, a in self.adapters.items():
                if a.registered and name not in found and (is_remote(a.uri) or Path(a.uri).exists()):
                    found[name] = a
            for name, a in found.items():
                old = self.adapters.get(name)
                if old and old.uri == a.uri:
                    found[name] = old
            self.adapters = found
        self._judge_evals(found)
        if gate:
            for a in found.values():
                if a.info is None and a.name not in self.unloaded:
                    try:
                        self.prepare(a)
                    except OpenAIError:
                        pass  # refused: recorded in self.rejected, which /v1/models leaves out
                    except Exception as e:  # a source that cannot be read now: unlisted, tried again next scan
                        log.warning("adapter %s at %s could not be read (%s); trying again on the next scan",
                                    a.name, a.uri, e)
        return found

    def _judge_evals(self, found: dict[str, Adapter]) -> None:
        """Read each local adapter's recorded evaluation; apply the promotion gate to it."""
        for name in [n for n in self.eval_refused if n not in found]:  # gone from the sources
            self.eval_refused.discard(name)
            self.rejected.pop(name, None)
        for name, a in found.items():
            if a.fleet:
                continue  # judged by its alias's require_eval (serve/fleet.py)
            if is_remote(a.uri) and a.local_path is None:
                continue  # judged in `prepare`, once its files are here
            man = _read_manifest(a.local_path or Path(a.uri))
            a.eval = recorded_eval(man)
            self._apply_eval_gate(name, man)

    def _require_eval(self, a: Adapter, manifest: dict | None) -> None:
        """The promotion gate for a request: 422 (adapter_refused) naming the numbers."""
        a.eval = recorded_eval(manifest)
        if a.fleet:
            return  # its alias's gate, when the fleet file gives it traffic
        self._apply_eval_gate(a.name, manifest)
        if a.name in self.eval_refused:
            raise adapter_refused(self.rejected[a.name])

    def _apply_eval_gate(self, name: str, manifest: dict | None) -> None:
        why = eval_refusal(name, manifest, self.require_eval)
        if why:
            self.rejected[name] = why
            self.eval_refused.add(name)
        elif name in self.eval_refused:
            self.eval_refused.discard(name)
            self.rejected.pop(name, None)

    def _list_source(self, src: str) -> list[tuple[str, str]]:
        if src.startswith("hf://"):
            repo = src[5:]
            return [(repo.rsplit("/", 1)[-1], src)]
        if is_remote(src):
            import fsspec

            fs, root = fsspec.core.url_to_fs(src)
            proto = src.split("://", 1)[0]
            out = []
            fs.invalidate_cache(root)  # a rescan must see adapters uploaded since the last listing
            try:
                entries = fs.ls(root, detail=False)
            except FileNotFoundError:
                return []
            if any(e.rstrip("/").endswith(self.marker) for e in entries):
                return [(root.rstrip("/").rsplit("/", 1)[-1], src)]
            for e in entries:
                if fs.exists(f"{e}/{self.marker}"):
                    out.append((e.rstrip("/").rsplit("/", 1)[-1], f"{proto}://{e}"))
            return out
        root = Path(src.removeprefix("file://"))
        if not root.exists():
            return []  # a PVC that is not mounted yet: listed as empty, retried on rescan
        if (root / self.marker).is_file():
            return [(root.name, str(root))]
        return sorted((d.name, str(d)) for d in root.iterdir() if (d / self.marker).is_file())

    # ------------------------------------------------------------------------------- lookup
    def get(self, name: str) -> Adapter | None:
        a = self.adapters.get(name)
        if a is None:
            # an adapter copied into a source after the last scan: found without a restart
            self.scan()
            a = self.adapters.get(name)
        return a

    def register(self, name: str, uri: str, refresh: bool = False) -> Adapter:
        """Admin load: a new adapter from a path inside a configured root, or a remote URI.

        `refresh` (load_inplace): fetch a remote adapter again even if a copy is cached."""
        if not NAME_RE.match(name):
            raise OpenAIError(400, f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-'",
                              param="lora_name")
        if not is_remote(uri):
            p = Path(uri.removeprefix("file://")).resolve()  # resolves symlinks: no escape through a link
            roots = self.local_roots()
            if not any(p == r or r in p.parents for r in roots):
                raise OpenAIError(403, f"lora_path {uri} is outside the configured adapter roots "
                                       f"{[str(r) for r in roots]}", param="lora_path")
            uri = str(p)
        a = Adapter(name, uri, registered=True)
        self.prepare(a, refresh=refresh)  # gate before it becomes visible
        with self._lock:
            self.adapters[name] = a
            self.unloaded.discard(name)
            self.engine_refused.discard(name)
        return a

    def prepare_version(self, name: str, uri: str) -> Adapter:
        """A fleet file's version (`ALIAS@VERSION`, lorafleet/fleet.py) from its source, through the
        compatibility gate, not yet listed (commit_versions lists a whole file's at once). The
        operator's file names the source, so it need not be under a configured root. OpenAIError
        (422) when the gate refuses it."""
        with self._lock:
            old = self.adapters.get(name)
        local = uri if is_remote(uri) else str(Path(uri).resolve())
        if old is not None and old.fleet and old.uri == local and old.info is not None:
            return self.prepare(old)
        return self.prepare(Adapter(name, local, registered=True, fleet=True))

    def commit_versions(self, versions: dict[str, Adapter], gone: set[str]) -> None:
        """List a fleet file's versions and drop those it no longer declares, in one step."""
        with self._lock:
            for name in gone:
                self.adapters.pop(name, None)
                self.rejected.pop(name, None)
            for name, a in versions.items():
                self.adapters[name] = a
                self.unloaded.discard(name)
                self.engine_refused.discard(name)

    def refused_by_engine(self, name: str, why: str) -> None:
        with self._lock:
            self.engine_refused.add(name)
            self.rejected[name] = why

    def unregister(self, name: str) -> Adapter | None:
        with self._lock:
            a = self.adapters.pop(name, None)
            if a is not None:
                self.unloaded.add(name)
            return a

    def servable(self) -> list[Adapter]:
        """What /v1/models lists: every adapter the gate has passed (scan runs it on new ones)."""
        return sorted((a for a in self.adapters.values() if a.name not in self.rejected and a.info is not None),
                      key=lambda a: a.name)

    # ---------------------------------------------------------------------- fetch and gate
    def prepare(self, a: Adapter, refresh: bool = False) -> Adapter:
        """Copy a remote adapter locally (once) and run the compatibility gate; the promotion gate
        (registry.require_eval) reads the manifest as it is now, every time."""
        if a.info is not None and a.local_path is not None and a.local_path.exists() and not refresh:
            self._require_eval(a, _read_manifest(a.local_path))
            return a
        try:
            local = self._materialize(a, refresh)
            size = sum(f.stat().st_size for f in local.iterdir() if f.is_file())
            if size > self.max_adapter_bytes:
                raise UserError(f"adapter {a.name} is {size / 2**20:.0f} MiB, above the limit "
                                f"limits.max_adapter_bytes={self.max_adapter_bytes}")
            info = self.read(local)
            self.gate(info)
        except UserError as e:
            self.rejected[a.name] = str(e)
            raise adapter_refused(str(e)) from None
        except FileNotFoundError as e:
            raise OpenAIError(404, f"adapter {a.name} is no longer at {a.uri} ({e}); rescan the sources",
                              param="model") from None
        a.local_path, a.info, a.version = local, info, content_version(local)
        self._require_eval(a, info.manifest)
        self.rejected.pop(a.name, None)
        return a

    def gate(self, info: AdapterInfo) -> None:
        """Refuse (UserError) what this server's engine cannot run: vLLM's own PEFTHelper answers
        for the config (DoRA, modules_to_save, biases, base-changing inits, rank), the module names
        and shapes are checked against the engine's LoRA layers and this base."""
        if self.max_lora_rank is not None and info.rank > self.max_lora_rank:
            raise UserError(f"adapter {info.name} has rank {info.rank}, above the server's max_lora_rank "
                            f"{self.max_lora_rank}; restart with engine.max_lora_rank >= {info.rank}")
        why = unsupported(info, "vllm", self.max_lora_rank)
        if why:
            raise UserError(f"adapter {info.name}: {why}")
        # Which modules it adapts, from its tensors: target_modules may be a regex or `all-linear`.
        # (Whole-module copies are PEFTHelper's to judge, as modules_to_save.)
        keys = [parse_tensor_key(k) for k in info.tensors]
        modules = {k.module.rsplit(".", 1)[-1] for k in keys if k.kind != "full"}
        if not info.tensors and isinstance(info.lora.target_modules, (list, set)):  # weights not read (pickle)
            modules = {m.rsplit(".", 1)[-1] for m in info.target_modules}
        bad = sorted(m for m in modules if m not in ENGINE_TARGETS)
        if bad:
            raise UserError(f"adapter {info.name} targets {bad}, which the engine cannot apply LoRA to; "
                            "merge it instead (lorafleet merge) and serve the merged model")
        check_against_base(info, self.base_shapes, self.base_fingerprint)
        self._check_target_filter(info)

    @property
    def base_shapes(self) -> dict[str, list[int]]:
        if callable(self._base_shapes):
            shapes = self._base_shapes()
            if shapes:  # read once they can be
                self._base_shapes = shapes
            return shapes
        return self._base_shapes

    def _check_target_filter(self, info: AdapterInfo) -> None:
        """Refuse an adapter with LoRA tensors on modules the engine's --lora-target-modules leaves
        without LoRA: vLLM would load it and apply only the rest (vllm.lora.utils.is_in_target_modules)."""
        if self.lora_target_modules is None:
            return
        from vllm.lora.utils import is_in_target_modules

        runtime = {child: parent for parent, children in self.packed_modules.items() for child in children}
        left_out = []
        for k in info.tensors:
            key = parse_tensor_key(k)
            if key.kind == "full":
                continue
            suffix = key.module.rsplit(".", 1)[-1]
            name = key.module.rsplit(".", 1)[0] + "." + runtime.get(suffix, suffix) if "." in key.module else suffix
            if not is_in_target_modules(name, self.lora_target_modules, self.packed_modules):
                left_out.append(k)
        if left_out:
            raise UserError(f"adapter {info.name} has {len(left_out)} LoRA tensors on modules the engine applies no "
                            f"LoRA to (--lora-target-modules {' '.join(self.lora_target_modules)}): "
                            f"{name_some(left_out)}; add their modules to --lora-target-modules in "
                            "engine.extra_args, or serve a merged model")

    def _materialize(self, a: Adapter, refresh: bool = False) -> Path:
        if not is_remote(a.uri):
            return Path(a.uri)
        key = hashlib.sha256(a.uri.encode()).hexdigest()[:16]
        dest = self.cache_dir / f"{a.name}-{key}"
        if (dest / self.marker).is_file() and not refresh:
            return dest
        tmp = self.cache_dir / f".{dest.name}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        download_adapter(a.uri, tmp, self.max_adapter_bytes)
        swap_in(tmp, dest)  # a refresh replaces the cached copy
        return dest

    def max_rank(self) -> int:
        ranks = []
        for a in self.adapters.values():
            try:
                if a.local_path is None and not is_remote(a.uri):
                    ranks.append(read_adapter(a.uri, allow_pickle=True, read_tensors=False).rank)
            except UserError:
                pass
        return max(ranks, default=16)


def log_adapters(registry: Any, model_path: str) -> None:
    """What an operator needs at start: which adapters will be served, which not and why."""
    served = [a.name for a in registry.servable()]
    log.info("adapters served (%d): %s", len(served), ", ".join(served) or "none")
    for name, why in sorted(registry.rejected.items()):
        log.warning("adapter %s is not served: %s", name, why)
    if registry.adapters and registry.reads_base_weights and not registry.base_shapes:
        log.warning("the weights of %s cannot be read yet (not downloaded): adapters' module names are checked "
                    "against the base once they can", model_path)


def _read_manifest(directory: Path) -> dict | None:
    """An adapter's lorafleet.json, or None (none, or not JSON: the gate's read reports that)."""
    import json

    try:
        return json.loads((directory / "lorafleet.json").read_text())
    except (OSError, ValueError):
        return None
