#!/usr/bin/env bash
# GPU check for zigzag-mamba: tests that need CUDA, then benchmarks. At most 8 minutes.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh      (default OUT: ./gpu_results)
#
# Optional, off by default: GPU_CHECK_MAMBA_SSM_SDISTS=<folder> first builds causal-conv1d and
# mamba-ssm from the source distributions in that folder (for sm_90, no network needed; the
# folder must also hold any of their Python dependencies the machine lacks, e.g. transformers),
# then tests their backends and adds mamba-ssm's fused Mamba to a block sweep. The build alone
# can take many minutes: raise GPU_CHECK_SECONDS with it (see section_build_mamba_ssm).
#
# Runs from a checkout without installing it (PYTHONPATH=src). Each section writes its results
# under $OUT and its log to $OUT/<section>.log; a failing section is recorded and the remaining
# ones still run (device time is scarce), and the script exits non-zero at the end if any failed.
# Each section has a time limit, and all of them together at most $GPU_CHECK_SECONDS (default
# 480), so that the summary and the archive are always written, even when a slow section is cut
# short (its status then reads "timed out").
# $OUT/summary.md collects the card, the status of every section and each section's Markdown;
# everything else (logs, CSV, JSON, plots) ends up in $OUT/gpu_check_results.tar.gz.
#
# To add a section: write a function `section_<name>` that writes under "$OUT", and add a
# `run_section <name> "<title>" <seconds>` line in the order it should run. $PY is the Python
# to use ($PYTHON, default python3).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_results}"
BUDGET="${GPU_CHECK_SECONDS:-540}"
RESERVE=20 # seconds kept for the summary and the archive
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export OUT PY
rm -f "$OUT/sections.md"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
FAILED=()

run_section() {
    local name="$1" title="$2" limit="$3" start=$SECONDS status=ok rc=0
    local left=$((BUDGET - RESERVE - SECONDS))
    ((limit > left)) && limit=$left
    echo "=== ${title} (at most ${limit} s) ==="
    if ((limit <= 0)); then
        status="skipped (out of time)"
        FAILED+=("$name")
    else
        export -f "section_${name}"
        timeout --kill-after=10 "$limit" bash -uo pipefail -c "section_${name}" 2>&1 |
            tee "$OUT/${name}.log" || rc=$?
        if ((rc == 124 || rc == 137)); then
            status="timed out"
        elif ((rc != 0)); then
            status=FAILED
        fi
        [[ $status == ok ]] || FAILED+=("$name")
    fi
    echo "| ${title} | ${status} | $((SECONDS - start)) s |" >>"$OUT/sections.md"
}

# --- environment: card, driver and library versions ---------------------------------------
section_environment() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$PY" - <<'PY' | tee "$OUT/environment.md"
import torch, triton
print(f"Card: **{torch.cuda.get_device_name()}**, torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}), triton {triton.__version__}")
PY
}

# --- Triton kernels: the interpreter tests of tests/triton, run on the GPU, and the ops and a
# ZigMa block end to end on CUDA (tests/triton/test_cuda.py) --------------------------------
# Compiling the kernels' variants (every flag combination of the scan's six kernels) takes most
# of the time: spread it over 8 processes when pytest-xdist is there.
section_triton_tests() {
    local workers=()
    "$PY" -c "import xdist" 2>/dev/null && workers=(-n 8)
    ZIGZAG_MAMBA_CUDA_TESTS=1 "$PY" -m pytest tests/triton "${workers[@]}" --maxfail=10 -q \
        -p no:cacheprovider --junitxml="$OUT/triton_tests.xml"
}

# --- permute_tokens: GB/s against a device-to-device copy ---------------------------------
section_bench_permute() {
    "$PY" benchmarks/bench_permute.py --out "$OUT/bench_permute.md"
}

# --- Triton selective scan: correctness at real sizes, speed against torch and SDPA, the
# backward's peak memory against the inputs, and a sweep of launch shapes (a compile per shape)
# ---------------------------------------------------------------------------------------------
section_bench_triton_scan() {
    "$PY" benchmarks/bench_triton_scan.py --out "$OUT/bench_triton_scan.md"
}

# --- the zigzag scan's cost: ZigMaBlock zigzag8 against pattern=None, interleaved calls --------
# L = 4096 and 16384, D = 768, bf16, forward and forward+backward. About a minute.
section_bench_order_cost() {
    "$PY" benchmarks/bench_order_cost.py --device cuda --out "$OUT/bench_order_cost.md"
}

# --- recomputing in the mixer's backward: Mamba.recompute on and off, interleaved calls, with
# peak memory; L = 4096 and 16384, D = 768, bf16. Under a minute. ---------------------------
section_bench_strategies() {
    "$PY" benchmarks/bench_strategies.py --device cuda --out "$OUT/bench_strategies.md"
}

section_bench_recompute() {
    "$PY" benchmarks/bench_recompute.py --device cuda --images 1024 --out "$OUT/bench_recompute.md"
}

# --- zigma bench: blocks, backbones and ops against attention ------------------------------
# The quick CUDA sweep of `zigma bench`: ZigMa (zigzag8), ZigMa (pattern=None), Vim and DiT blocks
# at L = 1024 to 65536, D = 768, bf16, forward and forward+backward, with peak memory; ZigMa-B/2
# against DiT-B/2 on 256^2 and 1024^2 images; permute_tokens, selective_scan and SDPA per
# backend. It includes the block-level scan cost: ZigMaBlock zigzag8 against pattern=None at
# L = 4096 and 16384. A few minutes. CSV, JSON and plots under $OUT/bench_blocks/<gpu>-quick/.
section_bench_blocks() {
    "$PY" benchmarks/bench_blocks.py --quick --device cuda --out "$OUT/bench_blocks" >/dev/null &&
        cp "$OUT"/bench_blocks/*-quick/summary.md "$OUT/bench_blocks.md"
}

# --- a training step at the paper's scale: ZigMa-B/2 against DiT-B/2, 1024^2 latents (L = 4096),
# batch 8 (halved until both fit), bf16 autocast, AdamW; time per step and peak memory --------
section_bench_train_step() {
    "$PY" benchmarks/bench_train_step.py --device cuda --out "$OUT/bench_train_step.md"
}

# --- launch overhead: the backbones at L = 256 and 4096 (256^2 and 1024^2 images), eager against
# torch.compile. First sampling with CUDA graphs (mode reduce-overhead, forward only), then the
# default mode forward and forward+backward; ZigMa-B/2 first, DiT-B/2 last (each compile of a
# 24-block graph takes tens of seconds, so what the time limit cuts is the least needed). Each
# run's rows are in this section's log as they are measured. ---------------------------------
section_bench_compile() {
    local common=(--device cuda --suites backbones --images 256 1024 --compile --min-time 0.2
        --no-plots)
    local runs=(
        "reduce-overhead zigma fwd"
        "default zigma fwd fwd+bwd"
        "default dit fwd fwd+bwd"
        "reduce-overhead dit fwd"
    )
    local run mode model modes status=0
    for run in "${runs[@]}"; do
        read -r mode model modes <<<"$run"
        # shellcheck disable=SC2086  # $modes is a list of words
        "$PY" benchmarks/bench_blocks.py "${common[@]}" --compile-mode "$mode" --backbones "$model" \
            --backbone-modes $modes --out "$OUT/bench_compile/$mode-$model" >/dev/null || status=1
        {
            printf '\n## %s, compile mode %s\n\n' "$model" "$mode"
            sed -n '/^## Backbones/,$p' "$OUT"/bench_compile/"$mode-$model"/*/summary.md
        } >>"$OUT/bench_compile.md" 2>/dev/null
    done
    return $status
}

# --- optional: mamba-ssm and causal-conv1d built from source here (GPU_CHECK_MAMBA_SSM_SDISTS),
# for sm_90 only, with 16 compile jobs; the log ends with the build's duration. ---------------
section_build_mamba_ssm() {
    local start=$SECONDS rc=0
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
        "$PY" -m pip install --no-build-isolation --no-index \
        --find-links "$GPU_CHECK_MAMBA_SSM_SDISTS" --no-binary causal-conv1d,mamba-ssm \
        causal-conv1d mamba-ssm || rc=$?
    echo "build: $((SECONDS - start)) s, exit status $rc" | tee "$OUT/build_mamba_ssm.md"
    return $rc
}

# --- optional, after the build: the mamba_ssm and causal_conv1d backends against the Triton
# kernels on CUDA, and mamba-ssm's fused Mamba as a block contender at L = 4096 and 16384 ------
section_mamba_ssm() {
    ZIGZAG_MAMBA_CUDA_TESTS=1 "$PY" -m pytest tests/triton/test_cuda_packages.py -q \
        -p no:cacheprovider -rs --junitxml="$OUT/mamba_ssm_tests.xml" &&
        "$PY" benchmarks/bench_blocks.py --device cuda --suites blocks \
            --blocks zigma zigma-mamba-ssm dit --lengths 4096 16384 --min-time 0.2 --no-plots \
            --out "$OUT/bench_mamba_ssm" >/dev/null &&
        cp "$OUT"/bench_mamba_ssm/*/summary.md "$OUT/bench_mamba_ssm.md"
}

# --- timm and transformers: replace_attention on their own models ---------------------------
# CI runs these in two CPU environments; here they run beside this machine's torch and timm
# (the section fails if timm does not import). Under a minute.
section_timm_tests() {
    "$PY" -c "import timm; print('timm', timm.__version__)" || return 1
    "$PY" -m pytest tests/integrations/test_timm_models.py tests/integrations/test_replace_attention.py \
        tests/integrations/test_transformers_models.py -q -rs -p no:cacheprovider \
        --junitxml="$OUT/timm_tests.xml"
}

# In order of what matters most now; the budget cuts the last ones when time runs out.
run_section environment "Environment" 30
if [[ -n ${GPU_CHECK_MAMBA_SSM_SDISTS:-} ]]; then
    export GPU_CHECK_MAMBA_SSM_SDISTS
    run_section build_mamba_ssm "Build mamba-ssm and causal-conv1d (optional)" 1200
fi
run_section triton_tests "Triton kernel tests on CUDA" 150
run_section timm_tests "replace_attention on timm models" 60
if [[ -n ${GPU_CHECK_MAMBA_SSM_SDISTS:-} ]]; then
    run_section mamba_ssm "mamba-ssm and causal-conv1d backends and block (optional)" 180
fi
run_section bench_triton_scan "Triton selective scan" 100
run_section bench_blocks "Blocks, backbones and ops against attention" 120
run_section bench_train_step "A training step at 1024^2: ZigMa-B/2 against DiT-B/2" 60
run_section bench_compile "torch.compile and CUDA graphs: backbones at L = 256 and 4096" 100
run_section bench_recompute "Recomputing in the mixer's backward" 50
run_section bench_order_cost "The zigzag scan's cost in a block" 40
run_section bench_permute "permute_tokens bandwidth" 30
run_section bench_strategies "Scan strategies: alternating, bidirectional and cross blocks" 40

{
    cat "$OUT/environment.md" 2>/dev/null || true
    printf '\n| section | status | time |\n|---|---|---:|\n'
    cat "$OUT/sections.md"
    for report in "$OUT"/bench_*.md; do
        if [[ -e "$report" ]]; then
            printf '\n'
            cat "$report"
        fi
    done
} >"$OUT/summary.md"
rm -f "$OUT/sections.md"
cat "$OUT/summary.md"
# Everything but the summary in one archive: few files are easier to carry off a lent machine.
# (Only the top-level summary stays out: the block sweep writes a summary.md of its own.)
archive="$(mktemp -d)/gpu_check_results.tar.gz"
tar czf "$archive" -C "$OUT" --exclude=./summary.md .
find "$OUT" -mindepth 1 -maxdepth 1 -not -name summary.md -exec rm -rf {} +
mv "$archive" "$OUT/"

if ((${#FAILED[@]})); then
    echo "failed sections: ${FAILED[*]}" >&2
    exit 1
fi
