#!/usr/bin/env bash
# The project's tests (the README's test command; CI runs it right after scripts/install.sh):
#   1. timm's own tests/test_models.py (from the sdist of the installed timm) for every model we register,
#   2. the declared minimum timm in a separate venv: import, build, forward, backward,
#   3. our suite (pytest; extra arguments go to it).
# All three run; the exit status is non-zero when any of them failed.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
t=$(date +%s)
python tests/timm_suite/run_timm_model_tests.py || status=1
echo "timm model tests took $(( $(date +%s) - t )) s"
t=$(date +%s)
bash tests/timm_suite/floor_smoke.sh || status=1
echo "floor smoke test took $(( $(date +%s) - t )) s"
t=$(date +%s)
python -m pytest -q -ra --timeout 1200 "$@" || status=1
echo "pytest took $(( $(date +%s) - t )) s"
exit $status
