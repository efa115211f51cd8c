"""Prompt templates, shared by training and serving so both produce the same token ids.

Every template is a Jinja chat template (the format HF tokenizers and vLLM already speak), so a
chat request at serve time and a training record at train time go through one renderer:
`render_prompt(tokenizer, template, messages)`. The adapter's manifest records the template
text itself, not just its name, so serving does not depend on a later lorafleet's defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafleet.errors import UserError

# The seed tutorial's alpaca layout. System turn = `### 指令` (the instruction/role), user turn =
# `### 输入`, assistant = `### 回答`. The answer ends with EOS so the model learns to stop.
SEED_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ '### 指令\\n' + m['content'] + '\\n\\n' }}"
    "{%- elif m['role'] == 'user' -%}{{ '### 输入\\n' + m['content'] + '\\n\\n' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ '### 回答\\n' + m['content'] + eos_token + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### 回答\\n' }}{%- endif -%}"
)

# Plain continuation: roles are ignored, turns joined by newlines (for base models without chat).
PLAIN_TEMPLATE = (
    "{%- for m in messages -%}{{ m['content'] }}"
    "{%- if m['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}{{ '\\n' }}{%- endfor -%}"
)

NAMED = {"seed": SEED_TEMPLATE, "plain": PLAIN_TEMPLATE}


def resolve_template(name_or_path: str, tokenizer: Any) -> tuple[str, str]:
    """Return (name, jinja text). `chat` is the tokenizer's own template."""
    if name_or_path in NAMED:
        return name_or_path, NAMED[name_or_path]
    if name_or_path == "chat":
        tpl = getattr(tokenizer, "chat_template", None)
        if not tpl:
            raise UserError(
                "template: chat asks for the base model's chat template, but its tokenizer has none; "
                "use `template: seed` or `template: plain`, or give a path to a Jinja template"
            )
        if isinstance(tpl, dict):  # some tokenizers keep several named templates
            tpl = tpl.get("default") or next(iter(tpl.values()))
        return "chat", tpl
    p = Path(name_or_path)
    if p.is_file():
        return p.name, p.read_text()
    raise UserError(f"template {name_or_path!r} is not one of chat, seed, plain, nor a file with a Jinja template")


def render(tokenizer: Any, template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
           tools: list[dict[str, Any]] | None = None) -> str:
    """The template's text for `messages` (OpenAI-shaped dicts; `tools` as a chat request sends
    them), through the tokenizer's own Jinja renderer, as vLLM renders a chat request."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools
    )


def encode(tokenizer: Any, text: str) -> list[int]:
    # Templates carry their own special tokens; adding BOS again here would differ from vLLM,
    # which tokenizes rendered chat prompts without special tokens.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_prompt_ids(tokenizer: Any, template: str, messages: list[dict[str, Any]],
                      tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of the prompt a model sees before it answers: used by train and serve alike."""
    return encode(tokenizer, render(tokenizer, template, messages, add_generation_prompt=True, tools=tools))


def split_prompt_completion(tokenizer: Any, template: str, messages: list[dict[str, Any]],
                            tools: list[dict[str, Any]] | None = None) -> tuple[list[int], list[int], list[int]]:
    """Token ids and a loss mask for a conversation ending with an assistant turn.

    Each assistant turn is the text its message adds to the rendering of the conversation
    before it (with the generation prompt); everything else is prompt. An assistant message
    with `"weight": 0` (OpenAI's fine-tuning format) is kept in the text but not in the loss;
    the key itself is never shown to the template. Returns
    (input_ids, completion_mask, prompt_ids_of_last_turn).
    """
    weights = [m.get("weight", 1) for m in messages]
    messages = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    ids: list[int] = []
    mask: list[int] = []
    prev_text = ""
    last_prompt: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt_text = render(tokenizer, template, messages[:i], add_generation_prompt=True, tools=tools)
        full_text = render(tokenizer, template, messages[: i + 1], add_generation_prompt=False, tools=tools)
        if not prompt_text.startswith(prev_text) or not full_text.startswith(prompt_text):
            raise UserError(
                "the template does not render conversations as growing prefixes, so answer tokens cannot "
                "be told from prompt tokens; use `template: seed` or a chat template without per-turn rewrites"
            )
        # Tokenize segment by segment so the prompt part equals what serving tokenizes.
        seg_prompt = encode(tokenizer, prompt_text[len(prev_text):])
        answer = full_text[len(prompt_text):]
        seg_answer = encode(tokenizer, answer)
        ids += seg_prompt
        mask += [0] * len(seg_prompt)
        last_prompt = list(ids)
        ids += seg_answer
        mask += [1 if weights[i] else 0] * len(seg_answer)
        prev_text = full_text
    if not any(mask):
        raise UserError("conversation has no assistant turn to learn from (none, or every one has weight 0)")
    return ids, mask, last_prompt


def prompt_and_answer(tokenizer: Any, template: str, prompt: list[dict[str, Any]], answer: str,
                      tools: list[dict[str, Any]] | None = None, where: str = "record") -> tuple[str, str]:
    """(the prompt's text with the generation prompt, the answer's text as the template writes it
    after it, end of turn included): the split `split_prompt_completion` makes, for one answer.
    Raises UserError naming `where` when the template does not render the answer after the prompt."""
    prompt_text = render(tokenizer, template, prompt, add_generation_prompt=True, tools=tools)
    full = render(tokenizer, template, [*prompt, {"role": "assistant", "content": answer}],
                  add_generation_prompt=False, tools=tools)
    if not full.startswith(prompt_text):
        raise UserError(f"{where}: the template does not render the answer after the prompt, so answer tokens "
                        "cannot be told from prompt tokens; use `template: seed` or another chat template")
    return prompt_text, full[len(prompt_text):]


def end_of_turn_ids(tokenizer: Any, template: str) -> list[int]:
    """Token ids that end an assistant turn in `template`: the special token the template writes
    right after an assistant message (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, EOS for
    the seed template). An adapter trained on the template learns to emit it, so serving stops
    there even where the base's EOS is another token. [] when the template writes plain text
    there (nothing to stop on but EOS and the request's own stops).
    """
    mark = "\u2063lorafleet-end\u2063"
    try:
        text = render(tokenizer, template, [{"role": "user", "content": "x"},
                                            {"role": "assistant", "content": mark}], add_generation_prompt=False)
    except Exception:  # a template that refuses this conversation has no turn end to find
        return []
    after = text.split(mark, 1)[1] if mark in text else ""
    ids = encode(tokenizer, after)[:1]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return [i for i in ids if i in special]
