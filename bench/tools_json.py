"""Tools and JSON out of the box: lorafleet's defaults against vLLM's, through the clients people use.

Two `lorafleet serve` runs on the embedded base with a fine-tuned adapter: lorafleet's defaults
(tool parser inferred from the chat template, auto tool choice on, tool_strict_level parameter,
structured outputs without free whitespace) and vLLM's (`tool_strict_level: auto`,
`structured_outputs_config: null`, the same parser, else vLLM would refuse every request with
tools). For the base and the adapter, each with the official `openai` SDK:

- tools: `tool_choice` auto and required with two tools whose schemas constrain the arguments,
  `strict` left out (as LangChain's `bind_tools` sends it): share of answers whose tool call's
  arguments are JSON that validates against the tool's schema;
- JSON: `response_format` json_object and json_schema: share of answers that parse (and
  validate), i.e. that closed the JSON before max_tokens;

and with LangChain (`langchain-openai`, in the interpreter given by --langchain-python, its
defaults): `bind_tools(...).invoke` and `with_structured_output(method="function_calling")`.

    python bench/tools_json.py --adapters DIR [--langchain-python /path/to/python] [--n 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, bars, save, table  # noqa: E402

CALC = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"},
                                                    "op": {"type": "string", "enum": ["+", "-", "*", "/"]}},
                   "required": ["a", "b", "op"], "additionalProperties": False}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}, "confidence": {"type": "integer"}},
          "required": ["answer", "confidence"], "additionalProperties": False}
QUESTIONS = ["What is 17 times 23?", "What is the weather in Paris in Celsius?", "Add 1200 and 34.",
             "Is it cold in Oslo right now? Use Fahrenheit.", "Divide 144 by 12.", "How warm is Rome today?",
             "What is 9 minus 30?", "Weather in Oslo, in C please."]

LANGCHAIN = r"""
import json, sys
import jsonschema
from langchain_openai import ChatOpenAI
a = json.loads(sys.argv[1])
llm = ChatOpenAI(base_url=a["url"] + "/v1", api_key="sk-bench", model=a["model"], temperature=0, max_tokens=120)
tools = [a["calc"], a["weather"]]
schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
ok = {"bind_tools": 0, "with_structured_output": 0}
for q in a["questions"]:
    try:
        msg = llm.bind_tools(tools).invoke(q)
        call = msg.tool_calls[0]
        jsonschema.validate(call["args"], schemas[call["name"]])
        ok["bind_tools"] += 1
    except Exception:
        pass
    try:
        out = llm.with_structured_output(a["weather"], method="function_calling").invoke(q)
        jsonschema.validate(out if not isinstance(out, list) else out[0]["args"], schemas["get_weather"])
        ok["with_structured_output"] += 1
    except Exception:
        pass
print("RESULT" + json.dumps({k: v / len(a["questions"]) for k, v in ok.items()}))
"""


def serve(adapters: Path, port: int, extra: list[str], log: Path):
    from lorafleet.net import wait_until_serving

    env = dict(os.environ, LORAFLEET_API_KEY="sk-bench", RAY_worker_niceness="0")
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model", "embedded:smollm2-135m-instruct",
                             "--served-model-name", "smollm2", "--adapters", str(adapters), "--port", str(port),
                             "--set", "engine.max_model_len=2048", *extra],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    wait_until_serving(f"http://127.0.0.1:{port}", proc, log, timeout=600)
    return proc


def sdk_scores(url: str, model: str, n: int) -> dict[str, float]:
    import jsonschema
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-bench", max_retries=0, timeout=300)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (CALC, WEATHER)}
    qs = QUESTIONS[:n]
    score = {"tools auto": 0, "tools required": 0, "json_object": 0, "json_schema": 0}
    for q in qs:
        msgs = [{"role": "user", "content": q}]
        for choice in ("auto", "required"):
            r = client.chat.completions.create(model=model, messages=msgs, tools=[CALC, WEATHER], tool_choice=choice,
                                               max_tokens=120, temperature=0)
            calls = r.choices[0].message.tool_calls or []
            try:
                args = json.loads(calls[0].function.arguments)
                jsonschema.validate(args, schemas[calls[0].function.name])
                score[f"tools {choice}"] += 1
            except (IndexError, ValueError, KeyError, jsonschema.ValidationError):
                pass
        for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}):
            r = client.chat.completions.create(
                model=model, max_tokens=150, temperature=0, response_format=fmt,
                messages=[{"role": "user", "content": q + " Answer in JSON with keys answer and confidence."}])
            try:
                obj = json.loads(r.choices[0].message.content)
                if fmt["type"] == "json_schema":
                    jsonschema.validate(obj, SCHEMA)
                score[fmt["type"]] += 1
            except (TypeError, ValueError, jsonschema.ValidationError):
                pass
    return {k: v / len(qs) for k, v in score.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=Path, required=True, help="a directory of adapters for the embedded base")
    ap.add_argument("--langchain-python", help="a Python with langchain-openai and jsonschema installed")
    ap.add_argument("--n", type=int, default=8)
    a = ap.parse_args()
    from lorafleet.net import free_port, stop_server

    from serve.registry import AdapterRegistry

    names = sorted(AdapterRegistry([str(a.adapters)], Path("/tmp")).scan(gate=False))
    assert names, f"no adapter in {a.adapters}"
    work = ROOT / "runs" / "bench" / "tools_json"
    work.mkdir(parents=True, exist_ok=True)
    configs = {"lorafleet defaults": [],
               "vLLM defaults": ["--set", "tool_strict_level=auto", "--set", "structured_outputs_config=null"]}
    rows = []
    for label, extra in configs.items():
        port = free_port()
        proc = serve(a.adapters, port, extra, work / f"{label.split()[0]}.log")
        url = f"http://127.0.0.1:{port}"
        try:
            for model in ("smollm2", names[0]):
                row = {"server": label, "model": model, **sdk_scores(url, model, a.n)}
                if a.langchain_python:
                    arg = json.dumps({"url": url, "model": model, "calc": CALC, "weather": WEATHER,
                                      "questions": QUESTIONS[:a.n]})
                    res = subprocess.run([a.langchain_python, "-c", LANGCHAIN, arg], capture_output=True, text=True,
                                         timeout=1800)
                    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")]
                    row |= {f"langchain {k}": v for k, v in json.loads(line[0][6:]).items()} if line else {}
                rows.append(row)
                print(row, flush=True)
        finally:
            stop_server(proc, grace_s=60)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    md = table(rows, cols, f"tools and JSON, share of valid answers ({a.n} questions each)")
    save("tools_json", {"questions": QUESTIONS[:a.n], "rows": rows, "markdown": md})
    metrics = [c for c in cols if c not in ("server", "model")]
    bars("tools_json", [f"{r['server'].split()[0]}\n{r['model']}" for r in rows],
         {m: [r.get(m, 0) for r in rows] for m in metrics[:4]}, "valid tool calls and JSON",
         {m: "share" for m in metrics})


if __name__ == "__main__":
    main()
