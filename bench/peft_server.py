"""Baseline for bench/serve.py: what the seed tutorial's inference code becomes as a server.

transformers + peft, one request at a time (generate() is not concurrent), the adapter switched
per request with `set_adapter`, the base model for `"model": "base"`. OpenAI-style
`/v1/completions` (non-streaming) so the same load generator can drive it.

    python bench/peft_server.py --base DIR --adapter NAME=DIR ... --port 8002
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch
import uvicorn
from fastapi import FastAPI
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def build(base: str, adapters: dict[str, str], base_name: str) -> FastAPI:
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    names = list(adapters)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapters[n], adapter_name=n)
    lock = asyncio.Lock()
    app = FastAPI()

    def run(body: dict) -> dict:
        ids = torch.tensor([tok(body["prompt"])["input_ids"]])
        max_new = body.get("max_tokens", 16)
        kw = dict(max_new_tokens=max_new, do_sample=False, pad_token_id=tok.eos_token_id)
        if body.get("ignore_eos"):  # vLLM's extension: generate exactly max_tokens
            kw["min_new_tokens"] = max_new
        with torch.no_grad():
            if body["model"] == base_name:
                with model.disable_adapter():
                    out = model.generate(ids, **kw)
            else:
                model.set_adapter(body["model"])
                out = model.generate(ids, **kw)
        new = out[0][ids.shape[1]:]
        return {"id": "cmpl", "object": "text_completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "text": tok.decode(new, skip_special_tokens=True), "finish_reason": "length",
                             "logprobs": None}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": len(new),
                          "total_tokens": ids.shape[1] + len(new)}}

    @app.post("/v1/completions")
    async def completions(body: dict):
        async with lock:
            return await asyncio.to_thread(run, body)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model"} for n in [base_name, *names]]}

    return app


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--base-name", default="base")
    ap.add_argument("--adapter", action="append", default=[])
    ap.add_argument("--port", type=int, default=8002)
    a = ap.parse_args()
    torch.set_num_threads(2)
    uvicorn.run(build(a.base, dict(x.split("=", 1) for x in a.adapter), a.base_name), host="127.0.0.1", port=a.port,
                log_level="warning")
