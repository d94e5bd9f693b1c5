#!/usr/bin/env bash
# Lints the GitHub Actions workflows (.github/workflows/*.yml) with actionlint v1.7.12, built from its
# Go module into the cache once by hack/go-tool.sh (then this takes well under a second).
#
# actionlint runs shellcheck on every `run:` block when shellcheck is installed; Debian's package
# (`apt-get install shellcheck`) is used when present. Without it the workflows' YAML, expressions,
# action inputs and permissions are still checked, and this says that the shell was not.
set -euo pipefail
cd "$(dirname "$0")/.."

actionlint="$(bash hack/go-tool.sh actionlint)"
args=(-no-color -pyflakes=)
if command -v shellcheck >/dev/null 2>&1; then
  args+=(-shellcheck="$(command -v shellcheck)")
else
  echo "lint-workflows.sh: shellcheck is not installed: run: blocks are not shellchecked (apt-get install shellcheck)" >&2
  args+=(-shellcheck=)
fi
workflows=(.github/workflows/*.yml)
"$actionlint" "${args[@]}" "${workflows[@]}"
checked="actionlint $("$actionlint" -version | sed -n 1p)"
if command -v shellcheck >/dev/null 2>&1; then
  checked+=", shellcheck $(shellcheck --version | sed -n 's/^version: //p')"
fi
echo "lint-workflows.sh: ${#workflows[@]} workflow(s) clean ($checked)" >&2
