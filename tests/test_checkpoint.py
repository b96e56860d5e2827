"""Checkpoints: atomic writes, stale-temp cleanup, the RNG round trip, and refusal of files that are
truncated, not checkpoints, or carry pickled objects that would run code when loaded."""
import os
import pickle
import random
import zipfile

import numpy as np
import pytest
import torch

from afrl_fast import checkpoint as C
from afrl_fast import files
from afrl_fast.errors import ConfigError
from afrl_fast.dist import DistInfo

INFO = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


def trained_module(seed=0):
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    for _ in range(2):
        module(torch.randn(5, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return module, opt


def draws() -> tuple:
    """A few numbers from every RNG a run uses."""
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(2).tolist(),
            [random.random() for _ in range(3)], random.gauss(0, 1))


# ---------------------------------------------------------------- atomic writes

def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    files.atomic_write_bytes(path, lambda f: f.write(b"first"))
    files.atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def broken(f):
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_bytes(path, broken)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_stale_temp_files_are_removed(tmp_path):
    """Temp files a SIGKILL left behind go; the checkpoint and unrelated files stay."""
    (tmp_path / C.LATEST).write_bytes(b"ckpt")
    (tmp_path / f".{C.LATEST}.abc123.tmp").write_bytes(b"torn")
    (tmp_path / ".other.x9.tmp").write_bytes(b"torn")
    (tmp_path / "notes.tmp").write_bytes(b"keep: not a hidden temp of ours")
    C.remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [C.LATEST, "notes.tmp"]


# ---------------------------------------------------------------- round trip

def test_save_load_restore_round_trip(tmp_path):
    module, opt = trained_module()
    progress = {"phase": "rl", "step": 7, "phase_step": 3, "history": {"sft": {"acc5": np.float64(0.5),
                                                                              "n": np.int64(4)}},
                "config": {"rl": {"beta": 0.001}}}
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    np.random.randn()                          # a cached Gaussian in numpy's state
    C.save_checkpoint(tmp_path, module, opt, progress, INFO)
    expected = draws()
    raw = zipfile.ZipFile(tmp_path / C.LATEST)  # a torch.save archive (what the loader checks)
    assert any(n.endswith("data.pkl") for n in raw.namelist())

    state = C.load_checkpoint(tmp_path)
    fresh, fresh_opt = trained_module(seed=1)
    assert not torch.equal(fresh[0].weight, module[0].weight)
    fresh_opt.load_state_dict(opt.state_dict())  # same param groups; the states are overwritten
    progress_back = C.restore(state, fresh, fresh_opt)
    assert draws() == expected
    for a, b in zip(module.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    for p_old, p_new in zip(module.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p_old][key], fresh_opt.state[p_new][key])
    # numpy scalars became plain Python numbers (weights_only cannot load numpy objects)
    assert progress_back["history"]["sft"] == {"acc5": 0.5, "n": 4}
    assert type(progress_back["history"]["sft"]["acc5"]) is float


def test_missing_checkpoint_is_none(tmp_path):
    assert C.load_checkpoint(tmp_path) is None


def test_objects_that_weights_only_cannot_load_fail_at_save(tmp_path):
    module, opt = trained_module()
    with pytest.raises(TypeError, match=r"checkpoint\['progress'\]\['when'\].*set"):
        C.save_checkpoint(tmp_path, module, opt, {"when": {1, 2}}, INFO)
    assert not (tmp_path / C.LATEST).exists()


# ---------------------------------------------------------------- refusals

class RunsACommand:
    """Unpickling this calls os.system: what a crafted latest.pt would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_payload_is_refused_without_running(tmp_path):
    marker = tmp_path / "payload_ran"
    module, opt = trained_module()
    C.save_checkpoint(tmp_path, module, opt, {"phase": "rl"}, INFO)
    state = torch.load(tmp_path / C.LATEST, weights_only=True)
    state["progress"]["phase"] = RunsACommand(marker)
    torch.save(state, tmp_path / C.LATEST)

    # the payload is live: an unrestricted unpickler runs it (in a scratch copy of the marker)
    probe = tmp_path / "probe_ran"
    pickle.loads(pickle.dumps(RunsACommand(probe)))
    assert probe.exists()

    with pytest.raises(C.CheckpointError) as err:
        C.load_checkpoint(tmp_path)
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / C.LATEST) in message and "refused" in message
    assert isinstance(err.value, ConfigError)      # the trainer prints it as one line, exit code 2


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "zip_not_torch", "not_a_dict",
                                    "missing_keys"])
def test_damaged_checkpoint_is_one_clear_line(tmp_path, damage):
    module, opt = trained_module()
    C.save_checkpoint(tmp_path, module, opt, {"phase": "sft"}, INFO)
    path = tmp_path / C.LATEST
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "zip_not_torch":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "hello")
    elif damage == "not_a_dict":
        torch.save([torch.zeros(2)], path)
    else:
        torch.save({"model": {}, "progress": {}}, path)
    with pytest.raises(C.CheckpointError) as err:
        C.load_checkpoint(tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)) and "start the run over" in message
    if damage == "missing_keys":
        assert "missing optimizer, rng" in message
