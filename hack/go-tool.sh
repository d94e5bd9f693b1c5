#!/usr/bin/env bash
# Prints the path of a pinned Go tool, building it from its Go module into the cache on first use:
#
#   go-tool.sh crane        go-containerregistry's crane: `cargo xtask image` assembles and inspects
#                           the operator's OCI image with it (no Docker engine needed)
#   go-tool.sh actionlint   the GitHub Actions workflow linter (hack/lint-workflows.sh)
#
#   Always the pinned version, never one found on PATH:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/go-tools/<tool>-<version>/<tool>, built once
#   with `go install <module>@<version>` (tens of seconds on a warm module cache, about a minute cold);
#   later calls return in milliseconds.
#
# Why from Go modules: like the control plane (hack/envtest-assets.sh), there is no release-binary
# download here, but the Go module proxy is reachable, and a module version is pinned by go.sum's
# checksum database.
set -euo pipefail

log() { printf 'go-tool.sh: %s\n' "$*" >&2; }
die() { printf 'go-tool.sh: error: %s\n' "$*" >&2; exit 1; }

case "${1:-}" in
  crane)
    version=v0.22.1
    module=github.com/google/go-containerregistry/cmd/crane
    ldflags="-s -w -X github.com/google/go-containerregistry/cmd/crane/cmd.Version=$version"
    ;;
  actionlint)
    version=v1.7.12
    module=github.com/rhysd/actionlint/cmd/actionlint
    ldflags="-s -w -X github.com/rhysd/actionlint.version=$version"
    ;;
  -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
  *) die "usage: $0 crane|actionlint" ;;
esac
tool="$1"

cache="${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/go-tools/$tool-$version"
if [[ -x "$cache/$tool" ]]; then
  echo "$cache/$tool"
  exit 0
fi

command -v go >/dev/null 2>&1 || die "Go is not installed: install Go >= 1.24 (https://go.dev/doc/install) or put $tool $version on PATH"

mkdir -p "$cache"
# Serialize builds: the test command and `cargo xtask image` may ask at once.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$cache/.lock"
  flock 9
  if [[ -x "$cache/$tool" ]]; then
    echo "$cache/$tool"
    exit 0
  fi
fi
started=$SECONDS
log "building $tool $version from its Go module into $cache (once)"
gobin="$(mktemp -d)"
trap 'rm -rf "$gobin"' EXIT
GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOBIN="$gobin" \
  go install -trimpath -ldflags "$ldflags" "$module@$version" >&2 || die "building $tool failed (see above)"
mv "$gobin/$tool" "$cache/$tool"
log "built $tool in $((SECONDS - started))s"
echo "$cache/$tool"
