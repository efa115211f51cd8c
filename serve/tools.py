"""Which vLLM tool parser reads tool calls from a model's text, from the chat template it is
served with.

vLLM needs `--tool-call-parser` named by hand (its docs' tool-calling page lists which parser
fits which model family); without one, every request with `tools` gets a 400. The parser must
match how the template asks the model to write a call, which the template's own markers tell:
"""

from __future__ import annotations

import json
from pathlib import Path

# (a marker only that family's template has, vLLM's parser for it): the first match wins, so the
# more specific marker comes first (Llama 4's header before Llama 3's).
TEMPLATE_PARSERS = (
    ("<|header_start|>", "llama4_pythonic"),  # Llama 4
    ("<|start_header_id|>", "llama3_json"),  # Llama 3.1 - 3.3
    ("[AVAILABLE_TOOLS]", "mistral"),  # Mistral (v3 tokenizer and later)
    ("[INST]", "mistral"),
    ("<|start_of_role|>", "granite"),  # IBM Granite 3
    ("<|im_start|>", "hermes"),  # ChatML: Qwen2.5/3, SmolLM2, Hermes, the tiny test models
)


def infer_tool_parser(template: str | None) -> str | None:
    """vLLM's tool parser for a chat template's text, or None when no family's marker is in it."""
    for marker, parser in TEMPLATE_PARSERS:
        if template and marker in template:
            return parser
    return None


def served_chat_template(model_dir: str | Path | None) -> str | None:
    """The chat template a model directory ships (chat_template.jinja, or tokenizer_config.json's
    chat_template, the first of several named ones), as vLLM would load it; None if it has none."""
    if model_dir is None:
        return None
    d = Path(model_dir)
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    try:
        tpl = json.loads((d / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
    if isinstance(tpl, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) else None
