#!/usr/bin/env bash
# Gather the wheels the GPU check needs on a lent GPU machine, and print the command to run there.
#
#   scripts/gpu_wheels.sh            # wheels into .whl/, size checked, command printed
#
# Why: the GPU machine has Python 3.12 with torch, accelerate, tokenizers, safetensors, numpy, pyarrow and
# matplotlib, but not trl, datasets, bitsandbytes, liger-kernel or pydantic, an older transformers than
# align needs, and no package registry. So the missing packages travel as wheels with the working tree,
# 64 MiB in all. Versions are the ones this checkout's .venv runs (what the tests passed with). The
# bitsandbytes wheel (43 MB) holds a library per CUDA/ROCm/XPU version; only CPU and CUDA 13 are kept
# (that machine's torch is cu130; BNB_KEEP changes it), which brings it to about 9 MB.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
WHL=.whl
LIMIT_MIB=64
BNB_KEEP=${BNB_KEEP:-'cpu|cuda13'}
LIGER_VERSION=${LIGER_VERSION:-0.8.5}
# The packages the GPU machine lacks, or has at versions align or its libraries were not tested with
# (transformers, peft; fsspec and regex, which datasets and transformers pin; all small).
PACKAGES=(trl datasets transformers peft pydantic pydantic-core annotated-types typing-inspection fsspec regex
          typing-extensions dill multiprocess bitsandbytes liger-kernel)

version_of() {  # the version this checkout's environment runs, else a pinned default
  "$PY" - "$1" <<'EOF' 2>/dev/null || true
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
EOF
}

pins() {
  for name in "${PACKAGES[@]}"; do
    version=$(version_of "$name")
    if [ -z "$version" ] && [ "$name" = liger-kernel ]; then version=$LIGER_VERSION; fi
    [ -n "$version" ] || { echo "gpu_wheels: $name is not installed in $PY's environment; run make setup" >&2; exit 2; }
    echo "$name==$version"
  done
}

download() {  # the device README's pip command: that machine's Python and platforms, no dependencies
  mkdir -p "$WHL"
  rm -f "$WHL"/*.whl  # one version of each: two stop the whole install there
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$WHL" "$@"
}

slim_bitsandbytes() {  # drop the native libraries for other CUDA/ROCm/XPU versions, and their RECORD lines
  "$PY" - "$BNB_KEEP" "$WHL"/bitsandbytes-*.whl <<'EOF'
import re, sys, zipfile
from pathlib import Path

keep, src = re.compile(sys.argv[1]), Path(sys.argv[2])

def dropped(name: str) -> bool:
    return name.startswith("bitsandbytes/libbitsandbytes_") and name.endswith(".so") and not keep.search(name)

tmp = src.with_name(src.name + ".tmp")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if dropped(item.filename):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(True) if not dropped(line.split(b",")[0].decode()))
        zout.writestr(item, data)
tmp.replace(src)
EOF
}

mib() { echo $(( ($1 + 1048575) / 1048576 )); }

tree_bytes() {  # what a device call sends: tracked and untracked-not-ignored files
  git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null \
    | awk '{s += $1} END {print s + 0}'
}

check_ignored() {
  git check-ignore -q "$WHL/x.whl" || { echo "/$WHL/" >> .git/info/exclude; echo "gpu_wheels: added /$WHL/ to .git/info/exclude"; }
}

main() {
  check_ignored
  mapfile -t wanted < <(pins)
  echo "gpu_wheels: downloading ${wanted[*]}"
  download "${wanted[@]}"
  slim_bitsandbytes
  wheels=$(du -cb "$WHL"/*.whl | tail -1 | cut -f1)
  tree=$(tree_bytes)
  total=$((wheels + tree))
  echo "gpu_wheels: $(ls "$WHL"/*.whl | wc -l) wheels, $(mib "$wheels") MiB; working tree $(mib "$tree") MiB;" \
       "$(mib "$total") MiB of the $LIMIT_MIB MiB a call carries"
  if [ "$total" -ge $((LIMIT_MIB * 1048576)) ]; then
    echo "gpu_wheels: over the limit; leave transformers out (PACKAGES) or ignore large untracked files" >&2
    exit 1
  fi
  cat <<'EOF'

On the GPU machine, one call of the device tool's `run` (the check writes gpu_check.json, .md and .log to $OUT):
  carry: [".whl"]
  timeout_s: 600
  command:
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; PYTHONUNBUFFERED=1 timeout 570 python3 benchmarks/gpu_check.py --out $OUT --budget 450
EOF
}

main "$@"
