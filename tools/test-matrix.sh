#!/usr/bin/env bash
# The test suite on every Python from 3.10 to 3.13 found under ~/.pyenv/versions (with the newest
# torch pip gives each), and on the oldest torch that setup.cfg claims (on Python 3.10).
# Virtual environments go to .matrix/ (torch comes from the registry: several GB each, slow the
# first time). MATRIX_INSTALL_ONLY=1 installs without testing; MATRIX="3.12 oldest" picks runs.
set -euo pipefail
cd "$(dirname "$0")/.."
oldest=$(sed -n 's/^ *torch>=\([0-9.]*\).*/\1/p' setup.cfg)
runs=${MATRIX:-"3.10 3.11 3.12 3.13 oldest"}
status=0
for run in $runs; do
    version=$run
    torch_spec="torch"
    if [ "$run" = oldest ]; then version=3.10; torch_spec="torch==$oldest.*"; fi
    python=$(ls -d "$HOME"/.pyenv/versions/"$version".* 2>/dev/null | sort -V | tail -1)/bin/python
    if [ ! -x "$python" ]; then echo "== $run: no Python $version under ~/.pyenv/versions, skipped"; continue; fi
    venv=.matrix/$run
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet "$torch_spec" -e ".[test]"
    echo "== $run: $("$venv/bin/python" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)')"
    [ "${MATRIX_INSTALL_ONLY:-0}" = 1 ] && continue
    OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest -q -n 2 -p no:cacheprovider tests || status=1
done
exit $status
