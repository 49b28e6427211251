#!/usr/bin/env bash
# The project's test command (CI runs exactly this through .ci/run):
#   bash scripts/test.sh [extra pytest arguments]
# Sets up / updates .venv (fast when already up to date), lints with ruff, then runs the whole pytest suite.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup.sh
py="$root/.venv/bin/python"

echo "test.sh: ruff check" >&2
"$py" -m ruff check .
echo "test.sh: ruff format --check" >&2
"$py" -m ruff format --check .

echo "test.sh: pytest" >&2
status=0
"$py" -m pytest "$@" || status=$?
if [[ $status == 5 ]]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$status"
