"""Multi-process training for real: `torchrun --nproc_per_node 2` and `accelerate launch` (gloo, on
CPU) run `lorafleet train`; the adapter equals the one-process run with the same global batch,
and only rank 0 speaks and writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lorafleet.net import free_port

pytestmark = pytest.mark.timeout(900)
BIN = Path(sys.executable).parent
# Token-weighted losses agree across process counts because the Trainer sums the token count
# over processes (average_tokens_across_devices); what is left is float summation order.
TOLERANCE = 1e-4


def _config(train_cfg, tmp_path: Path, name: str, per_device: int) -> Path:
    cfg = train_cfg(training__per_device_train_batch_size=per_device, training__group_by_length=False,
                    training__max_steps=16, training__save_steps=2, training__learning_rate=3e-3,
                    output_dir=str(tmp_path / name))
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return f


def _run(cmd: list[str], log: Path) -> str:
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    import os

    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **env), timeout=800,
                         cwd=Path(__file__).resolve().parents[1])
    log.write_text(res.stdout + res.stderr)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return res.stdout + res.stderr


def _diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


@pytest.fixture(scope="module")
def single(tmp_path_factory, train_cfg_module):
    d = tmp_path_factory.mktemp("one-process")
    _run([str(BIN / "lorafleet"), "train", str(_config(train_cfg_module, d, "one", 4))], d / "log")
    return d / "one"


@pytest.fixture(scope="module")
def train_cfg_module(tiny_base, tmp_path_factory):
    from conftest import train_config_factory

    return train_config_factory(tiny_base, tmp_path_factory.mktemp("cfg"))


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_train_the_same_adapter(single, train_cfg_module, tmp_path, launcher):
    cfg = _config(train_cfg_module, tmp_path, "two", 2)
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", port,
               "-m", "train", str(cfg)]  # as the README says
    else:
        # accelerate's torch-elastic launcher is the `--multi_gpu` one; on a CPU machine its
        # processes form a gloo group (accelerate's `--cpu` alone starts one process)
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
               "--main_process_port", port, "-m", "train", str(cfg)]
    out = _run(cmd, tmp_path / "log")
    assert out.count("done: adapter at") == 1 and "data parallel over 2 processes" in out  # rank 0 alone speaks
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in single.iterdir())
    assert not (tmp_path / "two.checkpoints").exists()
    trained = load_file(single / "adapter_model.safetensors")
    assert max(float(v.abs().max()) for k, v in trained.items() if "lora_B" in k) > 1e-3  # B left its zero init
    diff = _diff(single, tmp_path / "two")
    assert diff < TOLERANCE, diff


def test_two_processes_resume_after_a_kill(single, train_cfg_module, tmp_path):
    """Killed (every process, SIGKILL) once its step-2 checkpoint is written, `--resume` under
    torchrun ends at the adapter of an uninterrupted run (the one-process run: the previous test
    shows the two agree)."""
    import os
    import signal
    import time

    cfg = _config(train_cfg_module, tmp_path, "two", 2)
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), "-m", "train", str(cfg)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    root = Path(__file__).resolve().parents[1]
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
        marker = tmp_path / "two.checkpoints" / "checkpoint-2" / "trainer_state.json"
        deadline = time.time() + 600
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        # torchrun starts its workers in sessions of their own: kill the whole tree, workers first
        import psutil

        tree = psutil.Process(proc.pid).children(recursive=True)
        for p in tree:
            p.send_signal(signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        psutil.wait_procs(tree, timeout=30)
    assert marker.exists() and not (tmp_path / "two").exists(), (tmp_path / "killed.log").read_text()[-3000:]
    cmd[cmd.index("--master_port") + 1] = str(free_port())
    out = _run([*cmd, "--resume"], tmp_path / "log")
    assert "resuming from" in out and out.count("done: adapter at") == 1
    assert _diff(single, tmp_path / "two") < TOLERANCE
