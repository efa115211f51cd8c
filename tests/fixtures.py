"""Tiny models built on the fly: a real BPE tokenizer (trained here) and a random 2-layer Llama.

Small enough that a training step takes milliseconds, real enough that transformers, peft
and vLLM load them like any checkpoint (head_dim 64, which vLLM's CPU attention supports).
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS_FILES = ["examples/data/support.jsonl", "examples/data/legal.jsonl"]


def build_tokenizer(out: Path, repo_root: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["### 指令\n### 输入\n### 回答\n", "The quick brown fox jumps over the lazy dog. 0123456789"]
    for f in CORPUS_FILES:
        for line in (repo_root / f).read_text(encoding="utf-8").splitlines():
            texts.append(json.dumps(json.loads(line), ensure_ascii=False))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=768, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)


def build_tiny_llama(out: Path, repo_root: Path, seed: int = 0, hidden: int = 128) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, repo_root)
    tok = AutoTokenizer.from_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64,
                      max_position_embeddings=512, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    # Larger-than-default weights so a random model's greedy output is not one repeated token.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.to(torch.float32).save_pretrained(out, safe_serialization=True)
    return out


def make_random_adapter(base_dir: Path, out: Path, seed: int, r: int = 8, alpha: int = 16,
                        targets=("q_proj", "v_proj", "o_proj", "down_proj"), **extra) -> Path:
    """A PEFT adapter with non-zero random B, as other PEFT code would save it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tm = targets if isinstance(targets, str) else list(targets)  # a string: peft reads it as a regex
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=tm,
                                                 lora_dropout=0.0, **extra))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out
