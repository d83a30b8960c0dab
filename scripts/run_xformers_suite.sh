#!/usr/bin/env bash
# Run xFormers v0.0.35's own tests/test_mem_eff_attention.py against SparseKOp (exact mode):
# tests/xformers_suite/conftest.py appends our FwOp/BwOp to fmha.ALL_FW_OPS/ALL_BW_OPS and
# keeps only the parametrizations that involve our op (DESIGN.md section 3).
#
#   scripts/run_xformers_suite.sh [TESTS_DIR] [pytest args...]
#   scripts/run_xformers_suite.sh --fetch [DIR]      # only store the test files (default .xftests)
#
# Nothing of xFormers' test directory is committed. The files (test_mem_eff_attention.py and
# the utils.py / __init__.py it imports with `from .utils import ...`) come from, in order:
#   1. TESTS_DIR ($1, if it is a directory) or $XFORMERS_TESTS_DIR: a copy of xFormers' tests/;
#   2. $XFORMERS_GIT_DIR: a git directory of facebookresearch/xformers with tag v0.0.35;
#   3. a shallow git fetch of tag v0.0.35 from GitHub (needs network).
# The PyPI sdist (pip download --no-binary :all: xformers==0.0.35) is NOT enough: it ships
# tests/test_mem_eff_attention.py but not the tests/utils.py and tests/__init__.py it imports.
# Every file is checked against its v0.0.35 git blob id (XFORMERS_SUITE_ALLOW_MISMATCH=1 skips).
#
# GPU machine (no network): store the files here first, then carry them (the directory is
# git-ignored through .git/info/exclude, like .whl/):
#   scripts/run_xformers_suite.sh --fetch                      # -> .xftests/
#   device: carry [".whl", ".xftests", <the in-place build>] and run
#           bash scripts/run_xformers_suite.sh .xftests -x -q
# If xformers is not importable and .whl/ holds wheels, they are installed into /tmp/site
# (as in scripts/gpu_check.sh). scipy (imported by the test module for dropout tests only)
# is stubbed by the conftest when missing.
#
# Knobs read by the conftest: SPARSEK_SUITE_SAMPLE=N runs a fixed 1/N of the big
# parametrizations (the full CPU run takes ~12 min on 2 cores; N=4 about 3 min);
# SPARSEK_SUITE_ENABLE=0 skips xformers_sparsek.enable(); SPARSEK_SUITE_ALL=1 keeps every test
# of the module, not only our op's. Here: KEEP_TMP=1 keeps the temporary run directory;
# PYTHON (default python3). Extra arguments go to pytest (e.g. -x, -k, --junitxml=...).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TAG=v0.0.35
URL=https://github.com/facebookresearch/xformers
FILES=(__init__.py utils.py test_mem_eff_attention.py)
declare -A BLOB=(
  [__init__.py]=6677db08c0dcd87f7570a3249f61cc3eabe0532a
  [utils.py]=1fb4f876e284b2657bff91bc46d010faed534dd4
  [test_mem_eff_attention.py]=f4003f48176ba3c4b10403299afa1afcae544dfa
)

die() { echo "run_xformers_suite: $*" >&2; exit 2; }

# obtain DEST: put the xFormers test files into DEST
obtain() {
  local dest=$1 src=${XFORMERS_TESTS_DIR:-} f
  mkdir -p "$dest"
  if [ -n "$src" ]; then
    for f in "${FILES[@]}"; do
      [ -f "$src/$f" ] || die "$src/$f missing (need ${FILES[*]} from xFormers' tests/ at $TAG)"
      cp "$src/$f" "$dest/$f"
    done
  elif [ -n "${XFORMERS_GIT_DIR:-}" ]; then
    for f in "${FILES[@]}"; do git --git-dir="$XFORMERS_GIT_DIR" show "$TAG:tests/$f" > "$dest/$f"; done
  else
    local g
    g=$(mktemp -d /tmp/xformers_git.XXXXXX)
    echo "fetching $URL tag $TAG (shallow) ..." >&2
    git -C "$g" init -q
    git -C "$g" fetch -q --depth 1 "$URL" "refs/tags/$TAG" \
      || die "cannot fetch $URL (no network?): pass a copy of xFormers' tests/ as \$1 or XFORMERS_TESTS_DIR, or XFORMERS_GIT_DIR"
    for f in "${FILES[@]}"; do git -C "$g" show "FETCH_HEAD:tests/$f" > "$dest/$f"; done
    rm -rf "$g"
  fi
  for f in "${FILES[@]}"; do
    local h
    h=$(git hash-object "$dest/$f")
    if [ "$h" != "${BLOB[$f]}" ]; then
      [ "${XFORMERS_SUITE_ALLOW_MISMATCH:-0}" = 1 ] \
        || die "$f is not xFormers $TAG's (blob $h, expected ${BLOB[$f]})"
      echo "warning: $f differs from xFormers $TAG's" >&2
    fi
  done
}

if [ "${1:-}" = --fetch ]; then
  dest=${2:-$REPO/.xftests}
  obtain "$dest"
  if [ "$(cd "$dest" && pwd)" = "$REPO/.xftests" ]; then
    exclude=$(git -C "$REPO" rev-parse --git-path info/exclude)
    case $exclude in /*) ;; *) exclude=$REPO/$exclude ;; esac
    mkdir -p "$(dirname "$exclude")"
    grep -qxF /.xftests/ "$exclude" 2>/dev/null || echo /.xftests/ >> "$exclude"
  fi
  echo "stored xFormers $TAG tests in $dest" >&2
  exit 0
fi

if [ $# -gt 0 ] && [ -d "$1" ]; then XFORMERS_TESTS_DIR=$(cd "$1" && pwd); shift; fi

if ! "$PYTHON" -c 'import xformers' 2>/dev/null && compgen -G "$REPO/.whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$REPO"/.whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PYTHON" -c 'import xformers, sys; v = xformers.__version__; sys.exit(0) if v.startswith("0.0.35") else print(f"warning: installed xformers is {v}, tests are from 0.0.35", file=sys.stderr)'

tmp=$(mktemp -d /tmp/xformers_suite.XXXXXX)
[ "${KEEP_TMP:-0}" = 1 ] && echo "run directory: $tmp" >&2 || trap 'rm -rf "$tmp"' EXIT
obtain "$tmp/xformers_tests"
cp "$REPO/tests/xformers_suite/conftest.py" "$tmp/xformers_tests/conftest.py"
printf '[pytest]\n' > "$tmp/pytest.ini"  # pins rootdir; no config from elsewhere
# the repo root first: the in-place build of the package on the GPU machine
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
cd "$tmp"
set +e
"$PYTHON" -m pytest -p no:cacheprovider -rfE --tb=short xformers_tests/test_mem_eff_attention.py "$@"
rc=$?
set -e
exit $rc
