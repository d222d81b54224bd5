#!/usr/bin/env bash
# The whole device check, as one command, for a machine with an NVIDIA GPU (no internet needed).
#
#   bash benchmarks/gpu_check.sh            # results in $OUT when set, else ./bench-out/
#
# 1. makes a venv that sees the machine's CUDA torch, installs the wheels carried in ./wheels
#    (see benchmarks/fetch_wheels.sh) and offloadkit + turbowan from this checkout;
# 2. measures pinned and pageable host-to-device bandwidth (in the sweep's JSON "rates");
# 3. runs one DiT step (after one warm-up) of the full-size Wan2.2 A14B, int8 random weights,
#    SLA attention, 480p 16:9 81 frames: all-resident, adaptive at 8 GB and 16 GB budgets,
#    layerwise, and diffusers group offloading (block level, with and without streams);
# 4. runs plan mode with the bandwidth and block time measured on this card.
# Designed to finish in < 8 minutes on an H100 (each step is capped by `timeout`).
#
# Knobs for a smoke test on a CPU machine (what CI-less sessions can do):
#   PRESET=tiny DEVICE=cpu TOKENS=256 NO_VENV=1 SKIP_INSTALL=1 PYTHON=.venv/bin/python \
#       bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-./bench-out}"
WHEELS="${WHEELS:-wheels}"
PRESET="${PRESET:-wan2.2-i2v-a14b}"
DEVICE="${DEVICE:-cuda}"
ATTENTION="${ATTENTION:-sla}"
TOKENS="${TOKENS:-}"
STEP_TIMEOUT="${STEP_TIMEOUT:-360}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

# ---------------------------------------------------------------- 1. environment
PY="${PYTHON:-python3}"
VENV="${VENV:-$OUT_DIR/venv}"
if [ -n "${NO_VENV:-}" ]; then
    VPY="$PY"
else
    stamp "venv $VENV (system site-packages: reuse the machine's torch)"
    # without ensurepip (Debian's python3 without python3-venv) the venv borrows the
    # system's pip through --system-site-packages; pip still installs into the venv
    [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV" \
        || "$PY" -m venv --system-site-packages --without-pip --clear "$VENV" || exit 1
    VPY="$VENV/bin/python"
fi
"$VPY" - <<'EOF' || { echo "torch is missing: this script expects the GPU machine's own torch"; exit 1; }
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu:", torch.cuda.get_device_name(0))
EOF
if [ -n "${SKIP_INSTALL:-}" ]; then
    stamp "SKIP_INSTALL set: using the packages already installed"
elif [ -d "$WHEELS" ]; then
    stamp "installing wheels from $WHEELS"
    REQS=$(grep -v '^\s*#' benchmarks/gpu_requirements.txt | grep -v '^\s*$')
    # shellcheck disable=SC2086
    if ! "$VPY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" $REQS >/dev/null 2>&1; then
        echo "one install failed; installing one by one (a missing wheel is reported, not fatal)"
        for req in $REQS; do
            "$VPY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$req" >/dev/null 2>&1 \
                || echo "warning: could not install $req from $WHEELS"
        done
    fi
else
    stamp "no $WHEELS/ directory: using what is installed (peers may be skipped)"
fi
if [ -z "${SKIP_INSTALL:-}" ]; then
    stamp "installing offloadkit and turbowan from this checkout"
    "$VPY" -m pip install -q --no-index --no-deps --no-build-isolation \
        -e packages/offloadkit -e packages/turbowan >/dev/null \
        || { echo "could not install the local packages (is setuptools available?)"; exit 1; }
fi
"$VPY" -c "import offloadkit, turbowan.bench.cli; print('strategies:', offloadkit.list_strategies())" || exit 1

BENCH=("$VPY" -m turbowan.bench.cli)
if [ -n "$TOKENS" ]; then WORK=(--tokens "$TOKENS"); else WORK=(--resolution 480p --aspect-ratio 16:9 --frames 81); fi

# ---------------------------------------------------------------- 2+3. bandwidth and one DiT step
stamp "sweep: $PRESET int8 $ATTENTION on $DEVICE"
timeout "$STEP_TIMEOUT" "${BENCH[@]}" --preset "$PRESET" --quant int8 --attention "$ATTENTION" \
    "${WORK[@]}" --device "$DEVICE" --steps 1 --warmup 1 --no-resident-between \
    --strategies adaptive@8GB,adaptive@16GB,layerwise@8GB --home pinned \
    --peers diffusers_group_stream,diffusers_group \
    --json "$OUT_DIR/gpu_check_sweep.json" --plot "$OUT_DIR/gpu_check_sweep.png"
echo "sweep exit status: $?"

# ---------------------------------------------------------------- 4. plan with this card's rates
stamp "plan mode with the rates measured on this machine"
# block time: the all-resident step over the block count; bandwidth: the sweep's pinned copy
# rate (GB/s), so the plan measures neither again and models the sweep's preset and attention
read -r BLOCK_MS BANDWIDTH < <("$VPY" - "$OUT_DIR/gpu_check_sweep.json" <<'EOF'
import json, sys
try:
    doc = json.load(open(sys.argv[1]))
except Exception:
    doc = {}
try:
    base = [r for r in doc["runs"] if r["kind"] == "baseline"]
    block_ms = f"{1000 * base[0]['seconds_per_step'] / doc['num_blocks']:.1f}"
except Exception:
    block_ms = "-"
try:
    bandwidth = f"{doc['rates']['pinned_bandwidth_bytes_per_s'] / 1e9:.2f}"
except Exception:
    bandwidth = "-"
print(block_ms, bandwidth)
EOF
)
PLAN_ARGS=(--preset "$PRESET" --quant int8 --attention "$ATTENTION")
[ "${BLOCK_MS:--}" != "-" ] && PLAN_ARGS+=(--block-ms "$BLOCK_MS")
[ "${BANDWIDTH:--}" != "-" ] && PLAN_ARGS+=(--bandwidth "$BANDWIDTH")
timeout 120 "${BENCH[@]}" --plan "${WORK[@]}" "${PLAN_ARGS[@]}" --json "$OUT_DIR/gpu_check_plan.json"
echo "plan exit status: $?"
stamp "done; results in $OUT_DIR (gpu_check_sweep.json, gpu_check_plan.json, gpu_check.log)"
