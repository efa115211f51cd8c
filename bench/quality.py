"""Time to learn the bundled facts: lorafleet's default settings vs the seed tutorial's recipe.

Both train LoRA on SmolLM2-135M-Instruct (the embedded base, float32 on CPU) on the same 20
facts (examples/data/legal.jsonl, the demo's `legal` domain), with the same step cap. Every
`--eval-every` optimizer steps the adapter answers all 20 questions greedily (the train-end
check's generation, the demo's fact match); the clock stops while it does. A run ends when
≥ 90 % of the facts come back, or at the cap.

- lorafleet: `TrainConfig`'s defaults, nothing set but the data, the template and the cap.
- seed: the tutorial's TrainingArguments and LoraConfig (r 16, alpha 32, dropout 0.05, the
  seven projections, lr 2e-4, linear decay, batch 4 x accumulation 4), scaled to the dataset: its
  100 warmup steps exceed a small run, so warmup is capped at 10 % of the steps (said in the
  output); its 3 epochs of 20 records would be 6 steps, so it gets the same cap.

Runs alternate (A B B A ... with --repeats) so drift of the machine hits both alike. Reported:
training seconds and optimizer steps to the target, per run and as medians; the ratio.

    python bench/quality.py [--cap 120] [--eval-every 10] [--repeats 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, RESULTS, save, table  # noqa: E402

DATA = ROOT / "examples/data/legal.jsonl"
TARGET = 0.9


def variants(cap: int) -> dict[str, dict]:
    """Config trees (TrainConfig fields) of the two recipes, and what was scaled."""
    warmup = min(100, int(0.1 * cap))
    return {
        "lorafleet": {"training": {"max_steps": cap}},
        "seed": {"lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                          "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]},
                 "training": {"max_steps": cap, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4,
                              "learning_rate": 2e-4, "lr_scheduler_type": "linear", "warmup_steps": warmup}},
    }


class FactClock:
    """A TrainerCallback: every `every` steps, answer the facts; stop at the target. The clock
    (training seconds) excludes the answering."""

    def __init__(self, items, template, every: int):
        from transformers import TrainerCallback

        self.items, self.template, self.every = items, template, every
        self.curve: list[dict] = []
        self.train_s, self.t0 = 0.0, None
        clock = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if clock.t0 is None:
                    clock.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, model=None, processing_class=None, **kw):
                if state.global_step % clock.every:
                    return
                clock.train_s += time.perf_counter() - clock.t0
                right = clock.measure(model, processing_class)
                clock.curve.append({"step": state.global_step, "train_s": round(clock.train_s, 1), "right": right})
                if right >= TARGET * len(clock.items):
                    control.should_training_stop = True
                clock.t0 = time.perf_counter()

        self.callback = CB()

    def measure(self, model, tokenizer) -> int:
        from lorafleet.evaluation.generate import generate_answers
        from lorafleet.quality import fact_match

        answers = generate_answers(model, tokenizer, self.template, self.items, max_new_tokens=40, batch_size=10)
        return sum(fact_match(it.expected, a) for it, a in zip(self.items, answers))


def one_run(name: str, tree: dict, every: int) -> dict:
    from transformers import AutoTokenizer

    from lorafleet.config import TrainConfig
    from lorafleet.evaluation.items import load_items
    from lorafleet.models import resolve_model
    from lorafleet.templates import resolve_template
    from train.recipe import run

    tok = AutoTokenizer.from_pretrained(resolve_model("embedded:smollm2-135m-instruct"))
    clock = FactClock(load_items(str(DATA)), resolve_template("chat", tok)[1], every)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.model_validate({"template": "chat", "data": {"train_file": str(DATA)},
                                          "output_dir": f"{tmp}/adapter", **tree} | {
            "training": {**tree.get("training", {}), "generation_check": 0, "save_steps": 10_000,
                         "logging_steps": every}})
        run(cfg, log=lambda m: None, callbacks=[clock.callback])
    hit = next((c for c in clock.curve if c["right"] >= TARGET * len(clock.items)), None)
    return {"variant": name, "reached": hit is not None, "steps_to_target": hit["step"] if hit else None,
            "train_s_to_target": hit["train_s"] if hit else None, "final_right": clock.curve[-1]["right"],
            "curve": clock.curve}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cap", type=int, default=120, help="optimizer steps at most, both recipes")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1, help="A B pairs, alternating order (A B B A ...)")
    a = ap.parse_args()
    vs = variants(a.cap)
    print(f"seed recipe scaled to the data: warmup_steps {vs['seed']['training']['warmup_steps']} (10% of the "
          f"{a.cap}-step cap; the tutorial's 100 would exceed the run), max_steps {a.cap} for both")
    order = []
    for i in range(a.repeats):
        order += ["lorafleet", "seed"] if i % 2 == 0 else ["seed", "lorafleet"]
    runs = []
    for name in order:
        r = one_run(name, vs[name], a.eval_every)
        print(f"{name}: {r['final_right']}/20 at the end; target at step {r['steps_to_target']} "
              f"after {r['train_s_to_target']} s of training")
        runs.append(r)

    def med(name, key):
        vals = [r[key] for r in runs if r["variant"] == name and r[key] is not None]
        return statistics.median(vals) if vals else None

    rows = [{"recipe": n, "runs": sum(r["variant"] == n for r in runs),
             "reached": sum(r["reached"] for r in runs if r["variant"] == n),
             "steps_to_90%": med(n, "steps_to_target"), "train_s_to_90%": med(n, "train_s_to_target")}
            for n in ("lorafleet", "seed")]
    lf, sd = rows[0]["train_s_to_90%"], rows[1]["train_s_to_90%"]
    ratio = round(lf / sd, 3) if lf and sd else None
    table(rows, ["recipe", "runs", "reached", "steps_to_90%", "train_s_to_90%"],
          f"time to 90% of the 20 facts (cap {a.cap} steps); lorafleet/seed time ratio: {ratio}")
    save("quality", {"cap": a.cap, "eval_every": a.eval_every, "target": TARGET, "data": str(DATA.relative_to(ROOT)),
                     "variants": vs, "runs": runs, "summary": rows, "time_ratio_lorafleet_over_seed": ratio})
    plot(runs, a.cap)


def plot(runs: list[dict], cap: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
    colors = {"lorafleet": "#2b7bba", "seed": "#f29e4c"}
    seen = set()
    for r in runs:
        xs = [c["train_s"] for c in r["curve"]]
        ys = [c["right"] for c in r["curve"]]
        ax.plot(xs, ys, "o-", color=colors[r["variant"]], label=None if r["variant"] in seen else r["variant"])
        seen.add(r["variant"])
    ax.axhline(TARGET * 20, ls="--", color="gray", lw=1)
    ax.set_xlabel("training seconds (answering excluded)")
    ax.set_ylabel("facts answered (of 20)")
    ax.set_title(f"learning the 20 legal facts, cap {cap} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "quality.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
