"""Session fixtures shared by the tests that need a real model that writes valid AFRL traces."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serving import train_memorizing_judge  # noqa: E402

from afrl_fast.data import synthesize  # noqa: E402


@pytest.fixture(scope="session")
def memorized_pair() -> dict:
    """One synthetic training pair (with its trace) that the memorizing judge has learnt."""
    return synthesize(1, seed=11, split="train").to_pylist()[0]


@pytest.fixture(scope="session")
def memorizing_judge(tmp_path_factory, memorized_pair) -> Path:
    """An exported tiny Qwen3 whose greedy answer to `memorized_pair` is that pair's trace."""
    return train_memorizing_judge(tmp_path_factory.mktemp("memorizer") / "judge", memorized_pair["query"],
                                  memorized_pair["document"], memorized_pair["trace"])
