#!/usr/bin/env bash
# Every GPU benchmark in one visit to a GPU node: `scripts/bench-gpu.sh OUTDIR [--dry-run]`.
#
# GPU nodes (hospital ones above all) often have no package index: `make wheelhouse` fetches the wheels
# on a machine that has one, and this script installs from wheelhouse/py3XX with no network, into
# .venv-bench (or uses the active environment when the package already imports there). Then each bench
# runs in its own process under `timeout`, writes OUTDIR/<bench>.json and OUTDIR/<bench>.log, and a table
# (bench, throughput, ratio, peak memory) is printed last and kept in OUTDIR/table.txt.
#
# Sizes: about ten minutes on one H100 in all (the timeouts below add up to 600 s; BENCH_TIMEOUT_SCALE
# scales them). --dry-run: tiny presets and sizes on whatever device is there, no install; the test
# suite runs it on CPU so the first GPU visit does not fail on an import or a flag.
set -uo pipefail

usage() { echo "usage: $0 OUTDIR [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1
DRY=0
case "${2:-}" in --dry-run) DRY=1 ;; "") ;; *) usage ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false  # no network: never wait on a hub

# The python that runs the benches: $PYTHON, else the active virtual environment's, else python3.
PYTHON=${PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}
PYTHON=${PYTHON:-python3}
IMPORTS="import medisyn.cli, torch, diffusers, open_clip, torchvision, torch_fidelity"

install_offline() {
  # A venv from the wheelhouse of this Python version, no index. Wheelhouses made with HAVE= hold only
  # what the node lacks: the venv then sees the node's own packages and installs without resolving.
  local ver wh venv=${BENCH_VENV:-$ROOT/.venv-bench}
  ver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")') || exit 2
  wh=$ROOT/wheelhouse/py$ver
  if [ ! -d "$wh" ]; then
    echo "bench-gpu: $wh not found: run \`make wheelhouse PY=${ver:0:1}.${ver:1}\` on a machine with an index" >&2
    exit 2
  fi
  if [ -e "$wh/node-has.txt" ]; then
    "$PYTHON" -m venv --system-site-packages "$venv" || exit 2
    "$venv/bin/python" -m pip install -q --no-index --no-deps --find-links "$wh" -r "$wh/requirements.txt" || exit 2
    "$venv/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" || exit 2
  else
    "$PYTHON" -m venv "$venv" || exit 2
    "$venv/bin/python" -m pip install -q --no-index --find-links "$wh" -e "$ROOT" || exit 2
  fi
  PYTHON=$venv/bin/python
}

if [ "$DRY" = 0 ] && ! "$PYTHON" -c "$IMPORTS" 2>/dev/null; then
  if [ -x "${BENCH_VENV:-$ROOT/.venv-bench}/bin/python" ] \
    && "${BENCH_VENV:-$ROOT/.venv-bench}/bin/python" -c "$IMPORTS" 2>/dev/null; then
    PYTHON=${BENCH_VENV:-$ROOT/.venv-bench}/bin/python  # installed on an earlier visit
  else
    echo "bench-gpu: installing from the wheelhouse (no network)"
    install_offline
  fi
fi

# What the figures were measured with.
{
  "$PYTHON" -c 'import platform, torch; print("python", platform.python_version(), "torch", torch.__version__,
    "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
} >"$OUT/env.txt" 2>&1
"$PYTHON" -m pip freeze >"$OUT/pip-freeze.txt" 2>/dev/null
cat "$OUT/env.txt"

SCALE=${BENCH_TIMEOUT_SCALE:-1}
: >"$OUT/status.tsv"
bench() {  # bench NAME TIMEOUT_S ARGS...: one benchmark, one process
  local name=$1 limit rc start
  limit=$(awk -v t="$2" -v s="$SCALE" 'BEGIN { print int(t * s) }')
  shift 2
  start=$(date +%s)
  echo "== $name (at most ${limit}s): medisyn bench $*"
  rm -f "$OUT/$name.json"
  timeout --kill-after=15 "$limit" "$PYTHON" -m medisyn.cli bench "$@" --json "$OUT/$name.json" 2>&1 \
    | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" >>"$OUT/status.tsv"
}

if [ "$DRY" = 1 ]; then  # tiny presets and sizes: every flag and import of the real run (limits: a busy CPU)
  bench train 300 train --preset tiny --ddp --accumulation 2 --batch 2 --resolution 64 --steps 1
  bench generate 300 generate --preset tiny --batch 2 --resolution 64 --steps 2
  bench select 300 select --preset tiny --images 4 --checkpoints 1 --steps 2 --resolution 64
  bench embed 300 embed --embedder tiny-embedder --images 8 --batch 4 --steps 1 --resolution 64
  bench classifier 300 classifier --arch resnet18 --resolution 32 --batch 4 --steps 1
else
  # Budget on one H100 (REFERENCES.md's figures), 600 s of limits in all; each process also imports for
  # ~10 s, and each random-weight SDXL build is ~10-30 s of CPU.
  # train: the paper's plan per worker (batch 16, accumulation 2, one-process DDP): 4 recipes x 10 steps
  #   x 32 samples at ~34 samples/s eager (~10 s each), 5 U-Net builds, torch.compile's compile: ~250 s.
  bench train 300 train --preset sdxl-random --ddp --accumulation 2 --batch 16 --steps 10
  # generate: 512², Euler 50 steps, CFG 7, 8 then 16 prompts at ~1.1-2.2 images/s: ~15 s of sampling.
  bench generate 90 generate --preset sdxl-random
  # select: 4 checkpoint scorings (2 arms x 2) of 64 images at 20 steps (~12 s each) + real features.
  bench select 120 select --preset sdxl-random --images 64 --checkpoints 2 --steps 20
  # embed: ViT-B/16 at ~10k images/s (40 batches of 256: ~1 s); 512 PNG decodes on one core: ~10 s.
  bench embed 40 embed
  # classifier: ResNet-50 at 224², 40 steps of 256 at ~3.7k images/s, after a warm-up: ~10 s.
  bench classifier 50 classifier --arch resnet50
fi

"$PYTHON" - "$OUT" <<'EOF' | tee "$OUT/table.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
UNITS = {"samples_per_s": "samples/s", "images_per_s": "images/s", "checkpoints_per_hour": "checkpoints/h"}
print(f"\n{'bench':11s} {'setting':32s} {'throughput':>24s} {'ratio':>7s} {'peak memory':>16s}")
failed = 0
for line in (out / "status.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    f = out / f"{name}.json"
    if rc != "0" or not f.exists():
        failed += 1
        why = "timed out" if rc in ("124", "137") else f"exit {rc}"
        print(f"{name:11s} FAILED ({why} after {secs} s; see {name}.log)")
        continue
    doc = json.loads(f.read_text())
    rows = doc if isinstance(doc, list) else doc.get("recipes") or doc.get("results") or []
    rows = [rows] if isinstance(rows, dict) else rows
    for r in rows:
        key = next((k for k in UNITS if k in r), None)
        size = [str(r.get("arch", "")), f"batch {r['batch']}" if "batch" in r else ""]
        label = str(r.get("recipe") or r.get("arm") or " ".join(x for x in size if x))
        if key is None:
            print(f"{name:11s} {label[:32]:32s} {r.get('error', 'no figure')[:60]}")
            continue
        peak = r.get("max_memory_allocated_gb")
        where = "GPU"
        if peak is None and isinstance(doc, dict):
            peak, where = (doc.get("peak_gpu_gb"), "GPU") if doc.get("peak_gpu_gb") else (doc.get("peak_rss_gb"), "RSS")
        memory = f"{peak:.1f} GB {where}" if peak is not None else "n/a"
        ratio = f"{r['ratio']:.2f}x" if isinstance(r.get("ratio"), (int, float)) else ""
        print(f"{name:11s} {label[:32]:32s} {r[key]:12.2f} {UNITS[key]:>11s} {ratio:>7s} {memory:>16s}")
    print(f"{'':11s} ({secs} s)")
sys.exit(1 if failed else 0)
EOF
exit "${PIPESTATUS[0]}"
