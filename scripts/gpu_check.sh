#!/usr/bin/env bash
# GPU check, run from the repo root on the remote H100 (Python 3.12, torch 2.11+cu130,
# nvcc 13.0 at the default location, no internet, no xformers). Carry `.whl/` (made by
# scripts/fetch_xformers_wheel.sh) to get xformers there.
#   OUT=/some/dir SANITIZE=1 bash scripts/gpu_check.sh
# The full suite alone takes minutes on an H100; to fit a 10-minute device call, pick steps
# with STEPS (default "build info tests bench decode hf"; "decode" = the decode-C rows,
# ~1-1.5 min; "hf" = scripts/hf_gpu_check.py; "profile" = benchmarks/profile_calls.py;
# "ncu" = ncu's stall samples per instruction of one kernel (NCU_KERNEL, default the dk/dv pass);
# "bwd" = the 64K forward + backward's kernels, and BWD_VARIANTS="dir ..." (replacement sm90
# headers, each rebuilt into the extension and timed; ~30 s each; BWD_ARGS for
# benchmarks/bwd_kernels.py, e.g. "--super-rows 1024");
# "harness" = the standalone forward and selection harnesses, SELECT_BLOCKS="5 6" variants,
# FWD_VARIANTS="dir ..." forward kernel variants (each dir: replacement csrc/sparsek/sm90 headers);
# "suite" = xFormers' own tests, needs .xftests carried; >3 min for a 1/4 sample) and
# narrow pytest with PYTEST_ARGS, e.g.
#   STEPS="build tests" PYTEST_ARGS="-k cuda" bash scripts/gpu_check.sh
# then, on the same warm machine (the in-place build is git-ignored, so it is kept):
#   STEPS="bench decode hf" bash scripts/gpu_check.sh
# The device tool returns at most 8 files: every log is packed into gpu_check_logs.tgz
# (PACK=0 keeps them loose); summary.txt and the result sections/plots stay beside it.
# git inside the device's copy of the tree may report no commit or a stale one (2026-12-01:
# the decode record said 707211b, several commits old): pass the commit for the record with
#   BENCH_ARGS="--commit $(git rev-parse --short HEAD)" DECODE_ARGS="--commit ..." (expanded
# on this machine).
# Every step runs even if an earlier one failed; the exit code is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# scripts under benchmarks/ import the in-place build of the package
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

names=() statuses=() secs=()
step() {  # step NAME FUNC: run FUNC, record status and seconds
  local name=$1 t0 st; shift
  t0=$(date +%s)
  echo "=== $name" >&2
  if "$@"; then st=ok; else st="FAIL($?)"; fi
  names+=("$name") statuses+=("$st") secs+=($(( $(date +%s) - t0 )))
}

install_wheels() {
  # --target + PYTHONPATH: leaves the machine's site-packages (and its torch) alone.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  # a carried ninja wheel puts its launcher here; torch finds ninja on PATH
  if [ -d /tmp/site/bin ]; then export PATH=/tmp/site/bin:$PATH; fi
}

build() {
  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0a python3 setup.py build_ext --inplace \
    > "$OUT/build.log" 2>&1 || { local rc=$?; tail -n 60 "$OUT/build.log"; return $rc; }
}

info() { python3 -m xformers_sparsek info 2>&1 | tee "$OUT/info.log"; }
# --maxfail, not -x: a one-shot GPU run should report every failing area, not stop at the first
# shellcheck disable=SC2086  # PYTEST_ARGS is split on purpose
tests() { python3 -m pytest -q tests --maxfail=25 ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log"; }

sanitize() {  # sanitize TOOL
  local cs
  cs=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  # No caching allocator: otherwise out-of-bounds accesses inside cached blocks go unseen.
  # One small forward + backward through every kernel (the sanitizers slow kernels down a lot).
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool "$1" --error-exitcode 99 \
    python3 benchmarks/sanitize_small.py > "$OUT/$1.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/$1.log"
  return $rc
}

bench() { python3 benchmarks/bench.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"; }
# DESIGN.md section 5 decode-C rows (SparseKCache vs dense SDPA decoding)
decode() { python3 benchmarks/bench_decode.py --out "$OUT" ${DECODE_ARGS:-} 2>&1 | tee "$OUT/decode.log"; }

# xFormers' own test_mem_eff_attention.py against SparseKOp (carry .xftests, made by
# `scripts/run_xformers_suite.sh --fetch`); SUITE_SAMPLE=N runs 1/N of the big parametrizations.
# -rf --tb=line: every failure gets one line in the summary even when the run is cut short.
suite() {
  SPARSEK_SUITE_SAMPLE=${SUITE_SAMPLE:-4} bash scripts/run_xformers_suite.sh .xftests -q -rf \
    --tb=line -p no:cacheprovider 2>&1 | tee "$OUT/suite.log" | tail -n 40
}

# per-call breakdown (kernels vs host work): seed config, 64K forward and forward+backward,
# one decode step
profile() { python3 benchmarks/profile_calls.py --out "$OUT" 2>&1 | tail -n 120 > "$OUT/profile.log"; }

# the 64K forward + backward and its kernels (benchmarks/bwd_kernels.py) for the tree, then
# for each of BWD_VARIANTS (directories of replacement csrc/sparsek/sm90 headers): copied in,
# the extension rebuilt (only what includes them), timed; the tree's headers are put back
bwd_variants() { run_bwd_variants 2>&1 | tee "$OUT/bwd.log"; return "${PIPESTATUS[0]}"; }
run_bwd_variants() {
  local v rc=0 keep=/tmp/sm90_tree
  # shellcheck disable=SC2086  # BWD_ARGS is split on purpose (e.g. "--super-rows 1024")
  python3 benchmarks/bwd_kernels.py --label tree ${BWD_ARGS:-} || return
  rm -rf $keep && cp -r csrc/sparsek/sm90 $keep || return
  for v in ${BWD_VARIANTS:-}; do
    cp "$v"/*.cuh csrc/sparsek/sm90/ && touch csrc/sparsek/sm90/*.cu &&
      build && python3 benchmarks/bwd_kernels.py --label "$(basename "$v")" ${BWD_ARGS:-} || rc=1
    cp $keep/* csrc/sparsek/sm90/
  done
  if [ -n "${BWD_VARIANTS:-}" ]; then touch csrc/sparsek/sm90/*.cu && build || rc=1; fi
  return $rc
}

# where one kernel's warps stall, per instruction (benchmarks/ncu_source.py): NCU_KERNEL (a
# regex, default bwd_dkv_sm90), NCU_S tokens (default 32768), NCU_ARGS for ncu_fwd.py
# (default --bwd; "" for forward kernels); ~1-2 min
ncu_lines() {
  local k=${NCU_KERNEL:-bwd_dkv_sm90} rep=/tmp/ncu_lines
  ncu --clock-control none --kernel-name "regex:$k" --launch-count 1 --section SourceCounters \
    --section WarpStateStats --section SpeedOfLight -f -o $rep \
    python3 benchmarks/ncu_fwd.py "${NCU_S:-32768}" ${NCU_ARGS---bwd} > "$OUT/ncu.log" 2>&1 || return
  ncu -i $rep.ncu-rep --page details > "$OUT/ncu_details.txt" 2>&1
  ncu -i $rep.ncu-rep --page source --csv --print-source sass > /tmp/ncu_src.csv || return
  gzip -c /tmp/ncu_src.csv > "$OUT/ncu_src.csv.gz"
  python3 benchmarks/ncu_source.py /tmp/ncu_src.csv | tee "$OUT/ncu_source.txt" | tail -n 45
}

# transformers integration on a random Llama (exact bf16 vs sdpa, training step, generation)
hf_check() { python3 scripts/hf_gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/hf.log"; }

# the standalone kernel harnesses (no torch in the timed loop): the Hopper forward on the
# seed config and at D = 128 on the long-S work items (64K sparse, 32K exact), and the
# selection search at 64K against the package's own outputs; variants with SELECT_BLOCKS
# (pass 1's register cap, e.g. "5 6") and FWD_VARIANTS (directories of replacement
# csrc/sparsek/sm90 headers, each timed beside the tree's kernel and checked against its output)
harness() { run_harnesses 2>&1 | tee "$OUT/harness.log"; return "${PIPESTATUS[0]}"; }
run_harnesses() {
  local nv="nvcc -O3 --use_fast_math -std=c++17 --expt-relaxed-constexpr -arch=sm_90a"
  $nv -Icsrc -Icsrc/sparsek/sm90 -o /tmp/fwd_seed_h benchmarks/fwd_seed_harness.cu &&
    /tmp/fwd_seed_h seed-exact || return
  python3 benchmarks/select_dump.py /tmp/sel64k || return
  $nv -Icsrc -o /tmp/select_h benchmarks/select_harness.cu && /tmp/select_h /tmp/sel64k default ||
    return
  local b
  for b in ${SELECT_BLOCKS:-}; do
    $nv -Icsrc -DXSK_SELECT_PASS1_MIN_BLOCKS="$b" -o /tmp/select_h"$b" \
      benchmarks/select_harness.cu && /tmp/select_h"$b" /tmp/sel64k "pass1 x$b" || return
  done
  fwd_long_variants "$nv"
}
fwd_long_variants() {
  local nv=$1 v n d
  build_fwd_long_variants "$nv" || return
  python3 benchmarks/fwd_dump.py /tmp/fwd64k 65536 sparse &&
    python3 benchmarks/fwd_dump.py /tmp/fwd32k_exact 32768 exact || return
  for d in /tmp/fwd64k /tmp/fwd32k_exact; do
    /tmp/fwd_long_h "$d" "$(basename "$d") tree" save || return
    for v in ${FWD_VARIANTS:-}; do
      n=$(basename "$v")
      /tmp/fwd_long_h_"$n" "$d" "$(basename "$d") $n" check || return
    done
  done
}
build_fwd_long_variants() {  # the tree's harness and every variant's, compiled in parallel
  local nv=$1 v n pids=() pid rc=0
  $nv -Icsrc -Icsrc/sparsek/sm90 -o /tmp/fwd_long_h benchmarks/fwd_long_harness.cu &
  pids+=($!)
  for v in ${FWD_VARIANTS:-}; do
    n=$(basename "$v")
    rm -rf /tmp/fwdv_"$n" && mkdir -p /tmp/fwdv_"$n" && cp -r csrc /tmp/fwdv_"$n"/ &&
      cp "$v"/*.cuh /tmp/fwdv_"$n"/csrc/sparsek/sm90/ || { wait; return 1; }  # (no orphans)
    $nv -I/tmp/fwdv_"$n"/csrc -I/tmp/fwdv_"$n"/csrc/sparsek/sm90 -o /tmp/fwd_long_h_"$n" \
      benchmarks/fwd_long_harness.cu &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  return $rc
}

want() { [[ " ${STEPS:-build info tests bench decode hf} " == *" $1 "* ]]; }

nvidia-smi > "$OUT/nvidia-smi.log" 2>&1 || true
if compgen -G ".whl/*.whl" > /dev/null; then step "install wheels" install_wheels; fi
if want build; then step "build (sm_90a)" build; fi
if want info; then step "info" info; fi
if want tests; then step "tests" tests; fi
if [ "${SANITIZE:-0}" = 1 ]; then
  step "memcheck" sanitize memcheck
  step "racecheck" sanitize racecheck
fi
if want bench && [ -f benchmarks/bench.py ]; then step "bench" bench; fi
if want decode; then step "decode bench" decode; fi
if want hf; then step "hf check" hf_check; fi
if want profile; then step "profile" profile; fi
if want harness; then step "harness" harness; fi
if want bwd; then step "bwd variants" bwd_variants; fi
if want ncu; then step "ncu (per line)" ncu_lines; fi
if want suite && [ -d .xftests ]; then step "xformers suite" suite; fi

failed=0
{
  printf '\n%-16s %-10s %6s\n' step status seconds
  for i in "${!names[@]}"; do
    printf '%-16s %-10s %6s\n' "${names[$i]}" "${statuses[$i]}" "${secs[$i]}"
  done
} | tee "$OUT/summary.txt"
for st in "${statuses[@]}"; do [ "$st" = ok ] || failed=1; done

# The device tool brings back at most 8 files from $OUT: pack every log into one archive and
# keep only the archive, the summary and the result sections/plots next to it.
if [ "${PACK:-1}" = 1 ]; then
  tar czf /tmp/gpu_check_logs.tgz -C "$OUT" . &&
    find "$OUT" -mindepth 1 -maxdepth 1 ! -name summary.txt ! -name results_section.md \
      ! -name decode_section.md ! -name speedup.png ! -name decode.png ! -name profile.txt \
      ! -name ncu_source.txt -exec rm -rf {} + &&
    mv /tmp/gpu_check_logs.tgz "$OUT/"
fi
exit $failed
