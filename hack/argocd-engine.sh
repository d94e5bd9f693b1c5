#!/usr/bin/env bash
# Build (once, into the cache) and locate argocd-engine: the driver in argocd/engine/ that runs
# the ScimDirectory health check and actions on Argo CD's own Lua engine
# (github.com/argoproj/argo-cd/v2/util/lua). Prints the path of the binary. tests/argocd.rs calls it.
#
#   argocd-engine.sh          builds if needed, prints the binary's path
#
# Environment:
#   ARGOCD_ENGINE_VERSION=2.14.21   the Argo CD release whose engine is built (default 2.14.21, with or
#                                   without the leading v). v2.x and v3.0-v3.2 build from the Go module
#                                   proxy; from v3.3 on, Argo CD's go.mod replaces gitops-engine with a
#                                   local directory, which a module from the proxy cannot have, and the
#                                   build stops with that message.
#
# Cache: ${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/argocd-engine/v<version>-<digest>/
#   argocd-engine    the binary; <digest> covers argocd/engine/*.go, this script, hack/lib/argocd-module.sh
#                    (the wrapper module, shared with hack/argocd.sh) and the Go version,
#                    so a change to any of them builds anew. A complete build is marked by a stamp
#                    file; later runs check the stamp only (milliseconds). The last three builds of a
#                    release are kept.
#   build/           the generated wrapper module: go.mod requiring argo-cd at that version and
#                    repeating the replace directives of Argo CD's own go.mod (`go install pkg@version`
#                    refuses a module with replaces); argocd/engine/*.go with the import path of that
#                    major version (built with -tags argocd_v3 for v3, see compat_v3.go); and Argo CD's
#                    stock manifests/base/config/argocd-cm.yaml (embedded in the binary).
#
# Why from Go modules: as for hack/envtest-assets.sh, the Go module proxy is reachable here while
# release downloads and container images are not. A cold build takes a few minutes (most of it
# compiling Kubernetes' client libraries that Argo CD's packages import).
set -euo pipefail

log() { printf 'argocd-engine: %s\n' "$*" >&2; }
die() { printf 'argocd-engine: error: %s\n' "$*" >&2; exit 1; }

case "${1:-}" in
  "") ;;
  -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
  *) die "unknown argument ${1}; usage: $0" ;;
esac

here="$(cd "$(dirname "$0")/.." && pwd)"
src="$here/argocd/engine"
[[ -f "$src/main.go" ]] || die "$src/main.go is missing"
# shellcheck source=hack/lib/argocd-module.sh
source "$here/hack/lib/argocd-module.sh"

argocd_module "${ARGOCD_ENGINE_VERSION:-2.14.21}"
version="$ARGOCD_VERSION" module="$ARGOCD_MODULE" tags="$ARGOCD_TAGS"
argocd_go_env
go_version="$GO_VERSION"

digest="$( { cat "$src"/*.go "$0" "$here/hack/lib/argocd-module.sh"; echo "$go_version"; } | sha256sum | cut -c1-12)"
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/argocd-engine"
dest="$cache_root/$version-$digest"
bin="$dest/argocd-engine"
stamp="$dest/.complete"
want_stamp="argo-cd=$version go=$go_version"
complete() { [[ -x "$bin" && -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]]; }

if complete; then
  printf '%s\n' "$bin"
  exit 0
fi

# Serialize builds: several test binaries and checkouts may ask at once. Re-check after the lock.
argocd_lock "$cache_root"
if complete; then
  printf '%s\n' "$bin"
  exit 0
fi

started=$SECONDS
work="$dest/build"
rm -rf "$work"
mkdir -p "$work"
cd "$work"

argocd_wrapper_gomod scim-token-operator/argocd-engine
moddir="$ARGOCD_MODDIR"
# The driver is written against the v2 import path; a v3 release only differs in the major version.
for file in "$src"/*.go; do
  sed "s#github.com/argoproj/argo-cd/v2/#$module/#g" "$file" >"$(basename "$file")"
done
cp "$moddir/manifests/base/config/argocd-cm.yaml" argocd-cm.yaml \
  || die "$module@$version has no manifests/base/config/argocd-cm.yaml"
chmod u+w argocd-cm.yaml

log "resolving the dependencies of $module/util/lua ($(grep -c '=>' go.mod) replace directives from Argo CD's go.mod)"
go mod tidy >&2 || die "go mod tidy failed (see above)"
log "building argocd-engine on Argo CD $version (a few minutes on a cold cache)"
go build -trimpath -tags "$tags" -ldflags "-s -w" -o "$bin.tmp" . >&2 || die "building argocd-engine failed (see above)"
mv "$bin.tmp" "$bin"
"$bin" version >&2 || die "$bin does not run"
printf '%s\n' "$want_stamp" >"$stamp"
log "built in $((SECONDS - started))s: $bin"
# Builds for earlier versions of the driver (other digests) of this release: keep the last three.
ls -dt "$cache_root/$version"-*/ 2>/dev/null | tail -n +4 | while read -r old; do rm -rf "$old"; done
printf '%s\n' "$bin"
