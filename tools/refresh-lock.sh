#!/usr/bin/env bash
# Regenerate requirements.lock (runtime dependencies + the `test` extra, every version pinned) from
# pyproject.toml with pip-tools, in a throwaway virtual environment:   bash tools/refresh-lock.sh
# torch is pinned to the release CI tests against (TORCH below). Where a CPU build of it lies in a local
# wheel folder (PIP_FIND_LINKS), its local tag (+cpu) is dropped so the lock installs anywhere: PyPI
# serves the same release (the CUDA build on Linux).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.13.0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet pip-tools
echo "torch==$TORCH" > "$work/torch.in"
PIP_CONSTRAINT= "$work/venv/bin/pip-compile" --quiet --extra test --strip-extras --allow-unsafe --no-emit-index-url \
  --no-emit-find-links --no-header --output-file "$work/requirements.lock" pyproject.toml "$work/torch.in"
{
  echo "# Pinned runtime + test dependencies. Regenerate with: bash tools/refresh-lock.sh"
  echo "# Install: pip install -r requirements.lock && pip install --no-deps -e ."
  sed -e "s/^torch==$TORCH+[a-z0-9.]*$/torch==$TORCH/" -e "s|$work/torch.in|torch pin (tools/refresh-lock.sh)|" "$work/requirements.lock"
} > requirements.lock
grep -q "^torch==$TORCH$" requirements.lock || { echo "requirements.lock: torch==$TORCH missing" >&2; exit 1; }
echo "requirements.lock: $(grep -c '==' requirements.lock) pinned packages"
