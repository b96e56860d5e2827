"""configs/single_node.yaml, the config a team tries first, loads as written and runs end to end on
CPU at tiny shapes: the smoke overrides are the `# smoke:` lines of the file itself, so the command
its header documents is the one tested."""
import subprocess
import sys
from pathlib import Path

import pytest

from afrl_fast.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "single_node.yaml"


def smoke_overrides() -> list[str]:
    return [item for line in CONFIG.read_text(encoding="utf-8").splitlines()
            if line.startswith("# smoke:") for item in line.removeprefix("# smoke:").split()]


def test_the_config_is_the_single_machine_recipe():
    cfg = load_config(CONFIG)
    assert cfg.model.path and cfg.data.dir is None          # a real checkpoint; the data is the user's
    assert (cfg.run.engine, cfg.model.attn_implementation, cfg.run.device) == ("embedded", "sdpa", "cuda")
    assert cfg.model.dtype == "bfloat16" and cfg.rl.mode == "mode_balanced"
    for n_gpus in (1, 2, 4, 8):
        assert cfg.rl.batch_prompts % n_gpus == 0 and cfg.rl.sft_batch % n_gpus == 0


def test_without_data_dir_it_refuses_in_one_line(tmp_path):
    model = tmp_path / "Qwen3"
    model.mkdir()
    (model / "config.json").write_text("{}")
    proc = subprocess.run([sys.executable, str(ROOT / "afrl_fast" / "train.py"), "--config", str(CONFIG),
                           f"model.path={model}", f"run.out_dir={tmp_path / 'run'}", "run.device=cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.dir" in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cpu_smoke_variant_trains_end_to_end(tmp_path):
    overrides = smoke_overrides()
    assert "model.path=null" in overrides and "run.device=cpu" in overrides
    run = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, str(ROOT / "afrl_fast" / "train.py"), "--config", str(CONFIG),
                           f"run.out_dir={run}", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "final_model").is_dir() and (run / "results.json").is_file()
