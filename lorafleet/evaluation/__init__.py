"""`lorafleet eval`: did an adapter learn, and what did it break?

items     held-out records of any training format -> (prompt messages, expected answer)
generate  greedy answers: transformers + peft in this process, or a served OpenAI endpoint
metrics   per-answer scores from well-kept metric code (rouge-score, sacrebleu) and the fact match
judge     an optional LLM judge behind any OpenAI-compatible endpoint
run       one evaluation: base vs adapter, eval.json + eval.md + eval.png, the manifest's summary
"""
