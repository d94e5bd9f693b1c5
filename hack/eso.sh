#!/usr/bin/env bash
# Prints the directory holding External Secrets Operator, the peer `cargo xtask bench --peer eso`
# compares with, building a pinned version from the Go module proxy into the cache on first use:
#   <dir>/external-secrets   the controller binary (the module's main package, as its image runs it)
#   <dir>/bundle.yaml        its CRDs (the module's deploy/crds/bundle.yaml)
#
#   SCIM_BENCH_ESO_DIR=/path -> that directory (it must hold both files);
#   else the pinned version in the cache, if complete;
#   else built once (about 6 minutes on two cores, module download included; a ~220 MB binary).
#
# Why a wrapper module: ESO's go.mod carries `replace github.com/Masterminds/sprig/v3 =>
# github.com/external-secrets/sprig/v3 v3.3.0`, and `go install module@version` refuses a module with
# replaces. A main module that requires ESO at the pinned version and repeats that one replace builds
# exactly ESO's dependency graph (MVS over ESO's own requirements), the way hack/envtest-assets.sh
# does for Kubernetes' staging modules.
#
# Cache: ${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/eso-VERSION/
set -euo pipefail

VERSION=v0.16.2
MODULE=github.com/external-secrets/external-secrets
cache="${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/eso-${VERSION}"

log() { printf 'eso.sh: %s\n' "$*" >&2; }
die() { printf 'eso.sh: error: %s\n' "$*" >&2; exit 1; }

if [[ -n "${SCIM_BENCH_ESO_DIR:-}" ]]; then
  [[ -x "$SCIM_BENCH_ESO_DIR/external-secrets" && -f "$SCIM_BENCH_ESO_DIR/bundle.yaml" ]] \
    || die "SCIM_BENCH_ESO_DIR=$SCIM_BENCH_ESO_DIR must hold external-secrets and bundle.yaml"
  echo "$SCIM_BENCH_ESO_DIR"
  exit 0
fi
complete() { [[ -x "$cache/external-secrets" && -f "$cache/bundle.yaml" && -f "$cache/.complete" ]]; }
if complete; then
  echo "$cache"
  exit 0
fi

command -v go >/dev/null 2>&1 || die "Go is not installed; ESO ${VERSION} is built from the Go module proxy (Go >= 1.24)"
mkdir -p "$cache"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$cache/.lock"
  flock 9
  if complete; then
    echo "$cache"
    exit 0
  fi
fi
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false
started=$SECONDS
work="$cache/build"
mkdir -p "$work"
log "resolving ${MODULE}@${VERSION}"
gomod="$(cd "$work" && go mod download -json "${MODULE}@${VERSION}" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
srcdir="$(cd "$work" && go mod download -json "${MODULE}@${VERSION}" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
[[ -f "$gomod" && -d "$srcdir" ]] || die "could not download ${MODULE}@${VERSION} from the Go module proxy"
replaces="$(sed -n 's/^replace \(.*\)$/\1/p' "$gomod")"
[[ -n "$replaces" ]] || die "expected ESO's go.mod to carry its sprig replace; found none in $gomod"
{
  echo "module scim-token-operator/eso-build"
  echo
  echo "go $(go env GOVERSION | sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/')"
  echo
  echo "require ${MODULE} ${VERSION}"
  echo
  # The module's own replaces, repeated (one today: sprig).
  while IFS= read -r line; do echo "replace $line"; done <<<"$replaces"
} >"$work/go.mod"
(
  cd "$work"
  log "resolving dependencies"
  go get "${MODULE}@${VERSION}" >&2
  log "building external-secrets ${VERSION} (minutes on a cold cache)"
  go build -trimpath -ldflags "-s -w" -o "$cache/external-secrets.tmp" "${MODULE}" >&2
) || die "building ESO ${VERSION} failed (see above)"
mv "$cache/external-secrets.tmp" "$cache/external-secrets"
cp "$srcdir/deploy/crds/bundle.yaml" "$cache/bundle.yaml"
chmod u+w "$cache/bundle.yaml"
rm -rf "$work"
echo "${MODULE} ${VERSION}" >"$cache/.complete"
log "built in $((SECONDS - started))s"
echo "$cache"
