"""The fleet file: adapter aliases, their versions, the traffic between them, and their gate.

One YAML file (`fleet.yaml`; a ConfigMap on Kubernetes) that every serving replica follows
without a restart, and that `lorafleet fleet promote|rollback` edits:

    aliases:
      legal:
        versions:                 # version -> the adapter's source (a path, s3://..., hf://...)
          v3: /adapters/legal/v3
          v4: /adapters/legal/v4
        traffic: {v3: 90, v4: 10}  # percent of the alias's callers; whole numbers summing to 100
        require_eval:              # optional: what a version's recorded evaluation must show to
          metric: fact_match       #   take traffic (registry.require_eval's fields); default:
          min: 0.8                 #   the server's registry.require_eval
        history: [v2]              # earlier promoted versions, for rollback (written by promote)

Versions sit side by side as directories named by the file (`legal/v3/`, `legal/v4/` is the
suggested layout): a version is an immutable directory, and the file, not a manifest inside it,
says which version takes which traffic, so a rollout is one reviewed change to one file.

`"model": "legal"` goes to a version picked by its caller's bucket (`pick`), `"model": "legal@v4"`
pins a version. Errors name the file and line (FleetError).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorafleet.errors import UserError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ALIAS_KEYS = {"versions", "traffic", "require_eval", "history"}
BUCKETS = 100


class FleetError(UserError):
    """A fleet file that cannot be applied: `FILE:LINE: problem; fix`."""


@dataclass(frozen=True)
class Alias:
    """One alias: its versions (name -> source URI, in file order), traffic (version -> percent,
    summing to 100), the gate for versions with traffic (a config.RequireEval or None), and the
    versions promoted before the current one (oldest first)."""
    name: str
    versions: dict[str, str]
    traffic: dict[str, int]
    require_eval: Any = None
    history: tuple[str, ...] = ()
    lines: dict[str, int] = field(default_factory=dict, compare=False)  # "versions.v4", "traffic" -> line

    def pick(self, caller: str) -> str:
        """The version a caller gets: its bucket (sha256 of alias and caller, mod 100) falls in one
        version's share of [0, 100), shares laid out in file order. The same caller always gets the
        same version while the weights stay; with two versions in traffic, moving weight from one
        to the other moves only callers in the moved share."""
        bucket = int.from_bytes(hashlib.sha256(f"{self.name}\0{caller}".encode()).digest()[:8], "big") % BUCKETS
        edge = 0
        for version, weight in self.traffic.items():
            edge += weight
            if bucket < edge:
                return version
        raise AssertionError("traffic sums to 100")

    def adapter_name(self, version: str) -> str:
        """The name a version is served and pinned under: ALIAS@VERSION."""
        return f"{self.name}@{version}"

    @property
    def current(self) -> str:
        """The version with the most traffic (the first such, in file order)."""
        return max(self.traffic, key=lambda v: self.traffic[v])


@dataclass(frozen=True)
class Fleet:
    """A parsed, checked fleet file."""
    path: Path
    aliases: dict[str, Alias]
    digest: str  # sha256 of the file's bytes: what a replica compares to see a change



def read_fleet(path: str | Path, require_eval_default: Any = None, check_sources: bool = True) -> Fleet:
    """Parse and check `path`. Local version sources are resolved against the file's directory and
    must exist (`check_sources` False: taken as written, for a file checked away from the volumes
    its sources are on). Raises FleetError naming the line: YAML syntax, unknown keys, an alias or version
    name that is not [A-Za-z0-9._-], a missing source, traffic naming an unknown version, weights
    that are not whole numbers >= 0 or do not sum to 100, history naming an unknown version."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FleetError(f"{path}: cannot read the fleet file ({e.strerror}); fix fleet_file or create it") from None
    text = raw.decode("utf-8", errors="replace")
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise FleetError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e}); fix the syntax") from None
    if root is None:
        return Fleet(path, {}, hashlib.sha256(raw).hexdigest())
    top = _mapping(path, root, "the fleet file")
    unknown = [k for k in top if k != "aliases"]
    if unknown:
        raise FleetError(f"{path}:{_line(top[unknown[0]][0])}: unknown key {unknown[0]!r}; the file holds `aliases:`")
    aliases = {}
    if "aliases" in top:
        for name, (key_node, node) in _mapping(path, top["aliases"][1], "aliases").items():
            aliases[name] = _alias(path, name, key_node, node, require_eval_default, check_sources)
    return Fleet(path, aliases, hashlib.sha256(raw).hexdigest())


def _alias(path: Path, name: str, key_node, node, require_default: Any, check_sources: bool = True) -> Alias:
    at = f"{path}:{_line(key_node)}"
    if not NAME_RE.match(name):
        raise FleetError(f"{at}: alias {name!r}: use letters, digits, '.', '_' and '-' (no '@')")
    fields = _mapping(path, node, f"alias {name}")
    unknown = sorted(set(fields) - ALIAS_KEYS)
    if unknown:
        raise FleetError(f"{path}:{_line(fields[unknown[0]][0])}: alias {name}: unknown key {unknown[0]!r} "
                         f"(keys: {', '.join(sorted(ALIAS_KEYS))})")
    for required in ("versions", "traffic"):
        if required not in fields:
            raise FleetError(f"{at}: alias {name} has no `{required}`")
    lines = {"traffic": _line(fields["traffic"][0])}
    versions = {}
    for v, (vk, vn) in _mapping(path, fields["versions"][1], f"alias {name}: versions").items():
        lines[f"versions.{v}"] = _line(vk)
        if not NAME_RE.match(v):
            raise FleetError(f"{path}:{_line(vk)}: alias {name}: version {v!r}: use letters, digits, '.', '_' and '-'")
        source = yaml.safe_load(yaml.serialize(vn)) if vn.tag != "tag:yaml.org,2002:null" else None
        if not isinstance(source, str) or not source:
            raise FleetError(f"{path}:{_line(vk)}: alias {name}: version {v} needs its adapter's source (a path or URI)")
        versions[v] = _source(path, source, f"{path}:{_line(vk)}: alias {name}: version {v}") if check_sources \
            else source
    if not versions:
        raise FleetError(f"{at}: alias {name} has no versions")
    traffic = {}
    for v, (vk, vn) in _mapping(path, fields["traffic"][1], f"alias {name}: traffic").items():
        if v not in versions:
            raise FleetError(f"{path}:{_line(vk)}: alias {name}: traffic names version {v!r}, which is not under "
                             f"versions ({', '.join(versions)}); add it there or fix the name")
        w = yaml.safe_load(yaml.serialize(vn))
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise FleetError(f"{path}:{_line(vk)}: alias {name}: traffic for {v} must be a whole percent >= 0, not {w!r}")
        if w:
            traffic[v] = w
    if sum(traffic.values()) != 100:
        raise FleetError(f"{path}:{lines['traffic']}: alias {name}: traffic sums to {sum(traffic.values())}, not 100; "
                         "give each version a percent so that they add up to 100")
    traffic = {v: traffic[v] for v in versions if v in traffic}  # file order of versions: the buckets' layout
    require = require_default
    if "require_eval" in fields:
        from pydantic import ValidationError

        from lorafleet.config import RequireEval

        try:
            require = RequireEval.model_validate(yaml.safe_load(yaml.serialize(fields["require_eval"][1])))
        except ValidationError as e:
            raise FleetError(f"{path}:{_line(fields['require_eval'][0])}: alias {name}: require_eval: "
                             f"{e.errors()[0]['msg']}") from None
    history: list[str] = []
    if "history" in fields:
        hk, hn = fields["history"]
        history = yaml.safe_load(yaml.serialize(hn)) or []
        if not isinstance(history, list) or any(h not in versions for h in history):
            raise FleetError(f"{path}:{_line(hk)}: alias {name}: history must list versions under versions")
    return Alias(name, versions, traffic, require, tuple(history), lines)


def _source(path: Path, source: str, at: str) -> str:
    if "://" in source and not source.startswith("file://"):
        return source
    p = Path(source.removeprefix("file://"))
    p = p if p.is_absolute() else (path.parent / p)
    if not p.exists():
        raise FleetError(f"{at}: source {source} does not exist ({p.resolve()}); fix the path or copy the adapter there")
    return str(p.resolve())


def _mapping(path: Path, node, what: str) -> dict[str, tuple[Any, Any]]:
    if not isinstance(node, yaml.MappingNode):
        raise FleetError(f"{path}:{_line(node)}: {what} must be a mapping (key: value)")
    out: dict[str, tuple[Any, Any]] = {}
    for k, v in node.value:
        key = k.value if isinstance(k, yaml.ScalarNode) else None
        if not isinstance(key, str) or key in out:
            raise FleetError(f"{path}:{_line(k)}: {what}: {'duplicate' if key in out else 'bad'} key {key!r}")
        out[key] = (k, v)
    return out


def _line(node) -> int:
    return node.start_mark.line + 1


# ------------------------------------------------------------------------------ editing
class _KeysAsWritten(yaml.SafeLoader):
    """YAML's safe loader with mapping keys kept as written: version `1.10` stays "1.10" (not the
    float 1.1), as read_fleet reads them."""

    def construct_mapping(self, node, deep=False):
        return {(k.value if isinstance(k, yaml.ScalarNode) else self.construct_object(k, deep)):
                self.construct_object(v, deep) for k, v in node.value}



def edit_traffic(path: str | Path, alias: str, traffic: dict[str, int], history: list[str]) -> None:
    """Rewrite `alias`'s traffic and history in the file at `path` in one rename (the other keys as
    they were; YAML comments are not kept). The result is checked with `read_fleet` first."""
    from lorafleet.atomic import atomic_write_text

    path = Path(path)
    doc = yaml.load(path.read_text(), Loader=_KeysAsWritten) or {}
    entry = doc["aliases"][alias]
    entry["traffic"] = dict(traffic)
    entry["history"] = list(history)
    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
    probe = path.with_name(f".{path.name}.check")
    probe.write_text(text)
    try:
        read_fleet(probe)
    finally:
        probe.unlink(missing_ok=True)
    atomic_write_text(path, text)


# ------------------------------------------------------------------------- rollouts
def _manifest(source: str) -> dict | None:
    """A version's lorafleet.json (local or through fsspec), or None."""
    import json

    try:
        if "://" in source and not source.startswith("file://"):
            import fsspec

            with fsspec.open(source.rstrip("/") + "/lorafleet.json", "r") as f:
                return json.load(f)
        return json.loads((Path(source.removeprefix("file://")) / "lorafleet.json").read_text())
    except (OSError, ValueError, ImportError):
        return None


def check_candidate(alias: Alias, version: str, require_default: Any = None) -> None:
    """May `version` take traffic from the alias's current version? FleetError naming the numbers
    when its recorded evaluation misses the alias's require_eval, or is below the current
    version's on the same evaluation set (same data file), or the two cannot be compared."""
    from lorafleet.evaluation.gate import eval_refusal, recorded_eval

    if version not in alias.versions:
        raise FleetError(f"alias {alias.name} has no version {version} (versions: {', '.join(alias.versions)}); "
                         "add it under versions first")
    name, require = alias.adapter_name(version), alias.require_eval or require_default
    new = _manifest(alias.versions[version])
    why = eval_refusal(name, new, require)
    if why:
        raise FleetError(f"{why}; not promoted")
    current = alias.current
    if current == version:
        return
    metric = require.metric if require else "fact_match"
    new_ev, cur_ev = recorded_eval(new), recorded_eval(_manifest(alias.versions[current]))
    if cur_ev is None:
        return  # nothing recorded to compare with
    if new_ev is None:
        raise FleetError(f"{alias.name}@{current} has a recorded evaluation and {name} has none; run `lorafleet eval "
                         f"{alias.versions[version]} --data {cur_ev.get('data')}` first; not promoted")
    if new_ev.get("data") != cur_ev.get("data"):
        raise FleetError(f"{name} was evaluated on {new_ev.get('data')}, {alias.name}@{current} on "
                         f"{cur_ev.get('data')}: evaluate both on the same held-out file; not promoted")
    got, have = new_ev["adapter_scores"].get(metric), cur_ev["adapter_scores"].get(metric)
    if have is not None and got is None:
        raise FleetError(f"{name}'s recorded evaluation has no {metric} score and {alias.name}@{current}'s has "
                         f"{have:.3f}: evaluate {name} on {cur_ev.get('data')}; not promoted")
    if got is not None and have is not None and got < have:
        raise FleetError(f"{name} scores {metric} {got:.3f} on {new_ev.get('items')} items of {new_ev.get('data')}, "
                         f"below {alias.name}@{current}'s {have:.3f} on the same set; not promoted")


def promote(path: str | Path, alias_name: str, version: str, require_default: Any = None) -> str:
    """All of `alias_name`'s traffic to `version` (check_candidate first); the version it replaces
    goes on the history for rollback. Returns a line saying what changed."""
    alias = _alias_of(path, alias_name, require_default)
    check_candidate(alias, version, require_default)
    before = alias.current
    history = [*alias.history, before] if before != version else list(alias.history)
    edit_traffic(path, alias_name, {version: 100}, history)
    return f"{alias_name}: {version} takes 100% (was {_split(alias.traffic)})"


def canary(path: str | Path, alias_name: str, version: str, weight: int, require_default: Any = None) -> str:
    """Give `version` `weight` percent of the alias, the rest to its current version."""
    if not 0 < weight < 50:
        raise FleetError(f"--weight {weight}: a canary takes between 1 and 49 percent (the current version keeps "
                         "the most traffic); promote to give it all")
    alias = _alias_of(path, alias_name, require_default)
    check_candidate(alias, version, require_default)
    current = alias.current
    if current == version:
        raise FleetError(f"{alias_name}@{version} already has the most traffic; promote or roll back instead")
    traffic = {v: (100 - weight if v == current else weight) for v in alias.versions if v in (current, version)}
    edit_traffic(path, alias_name, traffic, list(alias.history))
    return f"{alias_name}: {_split(traffic)} (was {_split(alias.traffic)})"


def rollback(path: str | Path, alias_name: str) -> str:
    """Undo the last step: a running canary ends (its current version takes 100%); otherwise the
    version promoted before the current one takes 100% again."""
    alias = _alias_of(path, alias_name)
    if len(alias.traffic) > 1:
        traffic, history = {alias.current: 100}, list(alias.history)
    elif alias.history:
        traffic, history = {alias.history[-1]: 100}, list(alias.history[:-1])
    else:
        raise FleetError(f"{alias_name}: nothing to roll back to (no canary running, no earlier version in history)")
    edit_traffic(path, alias_name, traffic, history)
    return f"{alias_name}: {_split(traffic)} (was {_split(alias.traffic)})"


def _alias_of(path: str | Path, name: str, require_default: Any = None) -> Alias:
    fleet = read_fleet(path, require_default)
    if name not in fleet.aliases:
        raise FleetError(f"{path}: no alias {name} (aliases: {', '.join(fleet.aliases) or 'none'})")
    return fleet.aliases[name]


def _split(traffic: dict[str, int]) -> str:
    return ", ".join(f"{v} {w}%" for v, w in traffic.items())
