#!/usr/bin/env bash
# Build .venv-mattergen: MatterGen 1.0.3, the baseline of xtalgen's side-by-side benchmarks.
#
# Usage (from anywhere; re-running is cheap and changes nothing once it has succeeded):
#   bash benchmarks/mattergen/setup.sh
#   .venv-mattergen/bin/python benchmarks/mattergen/run_mattergen.py params   # prints 44562043
#
# Why a separate environment: MatterGen pins numpy<2 and omegaconf 2.3, xtalgen uses numpy 2 and
# omegaconf 2.4, so the two never share a venv. The benchmarks start MatterGen with subprocess.
#
# What it does, in order:
#   1. a venv at $MATTERGEN_VENV (default: <repo>/.venv-mattergen);
#   2. torch==2.13.0 FIRST, the same CPU build xtalgen uses (anything else would pull a CUDA torch);
#   3. mattergen==1.0.3 with --no-deps (its metadata pins torch 2.2.1+cu118 and compiled
#      torch_scatter/torch_sparse/torch_cluster, none of which exist for torch 2.13);
#   4. requirements.lock with --no-deps: exactly the packages its GemNet-dT score model, diffusion
#      and sampling code import (found by importing them), at fixed versions;
#   5. a .pth file putting ./shims on the path: pure-PyTorch stand-ins for the few torch_scatter /
#      torch_sparse functions MatterGen calls (torch_cluster is never imported);
#   6. the GemNet-dT scaling factors (gemnet-dT.json of the v1.0.3 release, MIT) into the installed
#      package, where GemNetT reads them: the wheel does not ship that file.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${MATTERGEN_VENV:-$ROOT/.venv-mattergen}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.xtalgen-setup-done"
# The stamp records what was installed; a changed lock file or shim re-runs the install.
FINGERPRINT="$(cat "$HERE/requirements.lock" "$HERE/gemnet-dT.json" "$HERE/check_shims.py" "$0" | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$FINGERPRINT" ]]; then
    echo "MatterGen venv ready: $VENV"
    exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)

echo "[1/4] torch 2.13.0 (CPU) ..."
"${PIP[@]}" torch==2.13.0
echo "[2/4] mattergen 1.0.3 (no dependencies) ..."
"${PIP[@]}" --no-deps mattergen==1.0.3
echo "[3/4] pinned dependencies ..."
"${PIP[@]}" --no-deps -r "$HERE/requirements.lock"

echo "[4/4] torch_scatter/torch_sparse stand-ins and GemNet-dT scale factors ..."
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$HERE/shims" > "$SITE/xtalgen_mattergen_shims.pth"
cp "$HERE/gemnet-dT.json" "$SITE/mattergen/common/gemnet/gemnet-dT.json"

"$VENV/bin/python" - <<'EOF'
import torch
assert torch.__version__.startswith("2.13.0"), f"wrong torch in the MatterGen venv: {torch.__version__}"
import torch_scatter, torch_sparse  # noqa: F401,E401  (the stand-ins)
import mattergen.denoiser, mattergen.diffusion.sampling.classifier_free_guidance  # noqa: F401,E401
print("imports ok, torch", torch.__version__)
EOF
"$VENV/bin/python" "$HERE/check_shims.py"

echo "$FINGERPRINT" > "$STAMP"
echo "MatterGen venv ready: $VENV"
