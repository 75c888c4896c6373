#!/usr/bin/env bash
# TRL 1.12 (its last release with PPO) in a virtual environment of its own, for benchmarks/vs_trl.py:
#
#     bash benchmarks/setup_trl.sh [DEST]        # DEST defaults to /work/trl-venv
#
# The same torch and transformers as tether's environment, so the two sides differ only in the library.
set -euo pipefail
dest="${1:-/work/trl-venv}"
here_python="$(dirname "$0")/../.venv/bin/python"
versions=$("$here_python" -c "import torch, transformers; print(torch.__version__.split('+')[0], transformers.__version__)")
read -r torch_version transformers_version <<<"$versions"
python3 -m venv "$dest"
"$dest/bin/pip" install -q "torch==$torch_version"
"$dest/bin/pip" install -q "trl==1.12.0" "transformers==$transformers_version"
"$dest/bin/python" -c "import trl, transformers, torch; print('trl', trl.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
