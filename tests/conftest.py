from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_worker_niceness", "0")

from fixtures import build_tiny_llama, make_random_adapter  # noqa: E402


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", ROOT)


@pytest.fixture(scope="session")
def tiny_adapters(tiny_base, tmp_path_factory) -> Path:
    """A directory with two adapters of different ranks: `alpha` (r=8) and `beta` (r=16)."""
    d = tmp_path_factory.mktemp("adapters")
    make_random_adapter(tiny_base, d / "alpha", seed=1, r=8)
    make_random_adapter(tiny_base, d / "beta", seed=2, r=16, alpha=16, targets=("q_proj", "k_proj", "up_proj"))
    return d


def train_config_factory(tiny_base: Path, tmp_path: Path):
    """make(**over) -> a fast TrainConfig on the tiny model (a few steps); `section__key=value`."""
    def make(**over):
        from lorafleet.config import TrainConfig

        tree = {
            "base_model": str(tiny_base),
            "template": "seed",
            "data": {"train_file": str(ROOT / "examples/data/support.jsonl"), "format": "auto"},
            "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0},
            "training": {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1,
                         "save_steps": 2, "learning_rate": 1e-3, "max_seq_length": 128, "seed": 3},
            "output_dir": str(tmp_path / "adapter"),
        }
        for k, v in over.items():
            node = tree
            parts = k.split("__")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = v
        return TrainConfig.model_validate(tree)
    return make


@pytest.fixture()
def train_cfg(tiny_base, tmp_path):
    """A fast training config on the tiny model (a few steps)."""
    return train_config_factory(tiny_base, tmp_path)


@pytest.fixture(scope="session")
def tiny_tok(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)
