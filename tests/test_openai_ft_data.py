"""Training records in OpenAI's chat fine-tuning format, read as the format says: text parts,
per-turn `weight`, `name`, tools and tool calls; the token ids and loss mask equal a rendering
built by hand from the template's own strings."""

from __future__ import annotations

import json

import pytest

from lorafleet.errors import UserError
from lorafleet.records import read_records
from train.data import tokenize_records

CHATML_TURN = "<|im_start|>{role}\n{content}<|im_end|>\n"
GEN = "<|im_start|>assistant\n"

# A template with tools, in the way tool-calling models' templates render them.
TOOLS_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\nTools: ' }}{% for t in tools %}{{ t.function.name }} {% endfor %}"
    "{{ '<|im_end|>\\n' }}{% endif %}"
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}{{ 'CALL ' + c.function.name + ' ' + "
    "(c.function.arguments | tojson) }}{% endfor %}{% else %}{{ m.content }}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _write(tmp_path, records):
    f = tmp_path / "ft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(f)


def _tokens(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_parts_weight_and_name_as_openai_documents_them(tiny_tok, tmp_path):
    from fixtures import CHATML

    rec = {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "You are the Kestrel support desk."}]},
        {"role": "user", "name": "customer", "content": [{"type": "text", "text": "How do I reset unit 3?"},
                                                         {"type": "text", "text": "It is a K9."}]},
        {"role": "assistant", "content": "Unplug it.", "weight": 0},
        {"role": "user", "content": "That did not work."},
        {"role": "assistant", "content": [{"type": "text", "text": "Hold the power button for ten seconds."}]},
    ]}
    rows = tokenize_records(read_records(_write(tmp_path, [rec])), "auto", tiny_tok, CHATML, 512).rows
    # By hand: parts joined with "\n" (as vLLM joins them), the weight-0 answer is prompt.
    segments = [
        (CHATML_TURN.format(role="system", content="You are the Kestrel support desk.")
         + CHATML_TURN.format(role="user", content="How do I reset unit 3?\nIt is a K9.") + GEN, 0),
        ("Unplug it.<|im_end|>\n", 0),
        (CHATML_TURN.format(role="user", content="That did not work.") + GEN, 0),
        ("Hold the power button for ten seconds.<|im_end|>\n", 1),
    ]
    ids = [i for text, _ in segments for i in _tokens(tiny_tok, text)]
    mask = [m for text, m in segments for _ in _tokens(tiny_tok, text)]
    assert rows[0]["input_ids"] == ids
    assert rows[0]["completion_mask"] == mask
    assert "[{" not in tiny_tok.decode(rows[0]["input_ids"])  # never the repr of a list


def test_every_weighted_assistant_turn_is_learned(tiny_tok, tmp_path):
    from fixtures import CHATML

    rec = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "one"},
                        {"role": "user", "content": "b"}, {"role": "assistant", "content": "two", "weight": 1}]}
    row = tokenize_records(read_records(_write(tmp_path, [rec])), "auto", tiny_tok, CHATML, 512).rows[0]
    learned = tiny_tok.decode([i for i, m in zip(row["input_ids"], row["completion_mask"]) if m])
    assert learned == "one<|im_end|>\ntwo<|im_end|>\n"


def test_tools_and_tool_calls_rendered_by_a_template_that_supports_them(tiny_tok, tmp_path):
    rec = {"tools": [{"type": "function", "function": {"name": "reset_unit", "parameters": {"type": "object"}}}],
           "messages": [
               {"role": "user", "content": "Reset unit 3."},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "reset_unit", "arguments": "{\"unit\": 3}"}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "done"},
               {"role": "assistant", "content": "Unit 3 was reset."}]}
    row = tokenize_records(read_records(_write(tmp_path, [rec])), "auto", tiny_tok, TOOLS_TEMPLATE, 512).rows[0]
    text = tiny_tok.decode(row["input_ids"])
    assert text.startswith("<|im_start|>system\nTools: reset_unit")
    learned = tiny_tok.decode([i for i, m in zip(row["input_ids"], row["completion_mask"]) if m])
    assert learned == 'CALL reset_unit {"unit": 3}<|im_end|>\nUnit 3 was reset.<|im_end|>\n'


@pytest.mark.parametrize("record,match", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     r"ft.jsonl:1: the record has 'tools' but the chat template does not render them"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "y"}]},
     r"ft.jsonl:1: messages\[1\] has tool_calls but the chat template does not render them"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "y"}]},
     r"ft.jsonl:1: messages\[0\].content\[0\] is a 'image_url' part"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "score": 3}]},
     r"ft.jsonl:1: messages\[1\] has key 'score'"),
    ({"messages": [{"role": "user", "content": "x", "weight": 0}, {"role": "assistant", "content": "y"}]},
     r"ft.jsonl:1: messages\[0\]: 'weight' is 0 or 1, on assistant messages only"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]},
     r"ft.jsonl:1: .*no assistant turn to learn from"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": {"text": "y"}}]},
     r"ft.jsonl:1: messages\[1\]: 'content' must be a string or a list of text parts"),
    ({"messages": [{"role": ["user"], "content": "x"}, {"role": "assistant", "content": "y"}]},
     r"ft.jsonl:1: messages\[0\] has role \['user'\]"),
    ({"messages": [{"role": "user", "name": 3, "content": "x"}, {"role": "assistant", "content": "y"}]},
     r"ft.jsonl:1: messages\[0\]: 'name' must be a string"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": True}]},
     r"ft.jsonl:1: messages\[1\]: 'weight' is 0 or 1"),
    ({"functions": [{"name": "f"}], "messages": [{"role": "user", "content": "x"},
                                                  {"role": "assistant", "content": "y"}]},
     r"ft.jsonl:1: 'functions' is OpenAI's legacy function calling"),
])
def test_structures_the_reader_does_not_understand_are_refused(tiny_tok, tmp_path, record, match):
    from fixtures import CHATML

    with pytest.raises(UserError, match=match):
        tokenize_records(read_records(_write(tmp_path, [record])), "auto", tiny_tok, CHATML, 512)
