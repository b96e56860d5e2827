#!/usr/bin/env bash
# Re-resolve the project's dependencies to the newest versions setup.py allows, in a throw-away
# virtual environment, and write them as requirements/lock-cpu.txt (the exact versions that
# `.ci/run` and the README's install command use as constraints).
#
#   bash scripts/refresh_lock.sh            # then: AFRL_FAST_LATEST_DEPS=0 bash .ci/run, and commit the lock
#
# The lock is for a CPU machine on the Python that runs this script (CI: 3.11). torch is pinned to the
# CPU build first, as everywhere: an open range would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH="${AFRL_FAST_TORCH:-torch==2.13.0}"
ENV="$(mktemp -d)/venv"
python3 -m venv "$ENV"
"$ENV/bin/python" -m pip install --quiet --upgrade pip
"$ENV/bin/python" -m pip install --quiet "$TORCH"
"$ENV/bin/python" -m pip install --quiet ".[dev,docs]"
{
  echo "# The exact versions CI passed with: constraints for \`pip install -c requirements/lock-cpu.txt\`."
  echo "# Resolved by scripts/refresh_lock.sh on $(date -u +%Y-%m-%d), $("$ENV/bin/python" -c 'import platform; print("Python", platform.python_version())'), CPU torch."
  echo "# tests/test_lock.py checks that every requirement of setup.py is pinned here within its range."
  # the local version label (+cpu) is dropped: ==2.13.0 accepts the CPU and the CUDA build alike
  "$ENV/bin/python" -m pip freeze --exclude-editable | grep -v '^afrl-fast' | grep -iv '^afrl_fast' | sed -E 's/\+[a-z0-9.]+$//' | sort -f
} > requirements/lock-cpu.txt
rm -rf "$(dirname "$ENV")"
echo "wrote requirements/lock-cpu.txt ($(grep -c '==' requirements/lock-cpu.txt) pins)"
