r"""The data stage: the splits a run trains and evaluates on, and the command line that writes them.

    afrl_fast.pairs      the pair schema every stage reads, its checks, atomic reads and writes
    afrl_fast.synthetic  the rule-grounded synthetic generator (the traces are the SFT targets)
    afrl_fast.trec       a loader for TREC-style graded relevance data
    table_import         labelled pairs from CSV, TSV, JSON Lines or Parquet, columns and grades mapped

CLI:
    python -m afrl_fast.data synth --n 1200 --seed 0 --out data/synth
    python -m afrl_fast.data trec --qrels Q --corpus C --queries Q --grade-map 0:0,1:2,2:4 --out F.parquet
    python -m afrl_fast.data import --input labels.csv --column label=rating --out F.parquet
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..files import atomic_write_many
from ..pairs import PAIR_COLUMNS, DataError
from ..rulebook import Rulebook, load_rulebook
from ..synthetic import check_synth_seed, check_synth_size, synth_sizes, synthesize
from .table_import import Imported, import_pairs  # noqa: F401 (the library's entry point for one's own files)

# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


RL_POOL = "rl_pool"
LABELS_ONLY_COLUMNS = PAIR_COLUMNS + ("rule", "tail")   # what a labels-only pool keeps: no trace, no steps


def synthetic_splits(n_train: int, seed: int, rulebook=None, n_industry: int | None = None,
                     n_longtail: int | None = None, progress: bool = False, reasons: bool = True,
                     train_tail_share: float | None = None, n_rl_pool: int = 0,
                     rl_pool_tail_share: float | None = None, labels_only: bool = False) -> dict[str, pa.Table]:
    """Synthesize train/industry/longtail in memory (eval splits default to n_train/4), every size
    and share checked first.

    The paper's split of roles (§3.3-3.5): SFT learns from a limited set of expert traces, RL from a
    larger labelled pool it never saw. `n_rl_pool` > 0 adds `rl_pool`: labels only (the trace and
    step columns dropped), its own random stream and query ids (`rl_pool-q...`, disjoint from
    `train-q...`). The tail shares set how common long-tail rules are in the SFT set (`train`) and the
    pool (None = the split's default: natural rarity). `labels_only` drops the trace and step columns
    of every split (labelled pairs as a search team has them; the same pairs as without it)."""
    sizes = synth_sizes(n_train, n_industry, n_longtail)
    if n_rl_pool:
        check_synth_size("n_rl_pool", n_rl_pool)
        sizes[RL_POOL] = n_rl_pool
    for name, share in (("train_tail_share", train_tail_share), ("rl_pool_tail_share", rl_pool_tail_share)):
        if share is not None and not 0.0 <= share <= 1.0:
            raise DataError(f"{name} must lie in [0, 1], got {share!r}")
    check_synth_seed("seed", seed)
    rb = rulebook if isinstance(rulebook, Rulebook) else load_rulebook(rulebook)
    shares = {"train": train_tail_share, RL_POOL: rl_pool_tail_share}
    tables = {split: synthesize(n, seed, rb, split, tail_share=shares.get(split), progress=progress, reasons=reasons)
              for split, n in sizes.items()}
    for split in tables:
        if split == RL_POOL or labels_only:
            tables[split] = tables[split].select(list(LABELS_ONLY_COLUMNS))
    return tables


def write_splits(out, tables: dict[str, pa.Table]) -> None:
    """out/{split}.parquet for every table, landing together (all or none); an RL pool left by an
    earlier call without one is removed."""
    atomic_write_many({Path(out) / f"{split}.parquet": (lambda f, t=table: pq.write_table(t, f))
                       for split, table in tables.items()})
    if RL_POOL not in tables:
        (Path(out) / f"{RL_POOL}.parquet").unlink(missing_ok=True)


def write_synthetic_splits(out, n_train: int, seed: int, rulebook=None, **kw) -> dict[str, pa.Table]:
    """synthetic_splits written to out/{split}.parquet; returns the tables. Everything is checked and
    generated before the first byte is written."""
    tables = synthetic_splits(n_train, seed, rulebook, **kw)
    write_splits(out, tables)
    return tables


def configured_splits(data_cfg, rulebook) -> dict[str, pa.Table]:
    """The synthetic splits a run config's `data` section asks for (train and the two evaluation
    splits of n_eval rows, the RL pool when n_rl_pool > 0), in memory. The trainer and the
    experiments runner both build their data with this."""
    d = data_cfg
    return synthetic_splits(d.n_train, d.seed, rulebook, n_industry=d.n_eval, n_longtail=d.n_eval, reasons=d.reasons,
                            train_tail_share=d.train_tail_share, n_rl_pool=d.n_rl_pool,
                            rl_pool_tail_share=d.rl_pool_tail_share)
