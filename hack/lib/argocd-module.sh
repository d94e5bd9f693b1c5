# Sourced by hack/argocd-engine.sh and hack/argocd.sh: the wrapper module that builds Argo CD code from
# the Go module proxy. `go install github.com/argoproj/argo-cd/v2/cmd@v2.14.21` refuses a module whose
# go.mod has replace directives, and Argo CD's go.mod has a block of them (k8s.io/* staging modules,
# gitops-engine pins...). A module of our own that requires Argo CD and repeats that block builds.
#
# Needs log() and die() from the sourcing script.

# argocd_module VERSION: sets ARGOCD_MODULE (github.com/argoproj/argo-cd/v2 or /v3), ARGOCD_TAGS (the
# build tags the engine driver uses for that major version) and ARGOCD_VERSION (vX.Y.Z).
argocd_module() {
  ARGOCD_VERSION="v${1#v}"
  case "$ARGOCD_VERSION" in
    v2.*) ARGOCD_MODULE=github.com/argoproj/argo-cd/v2 ARGOCD_TAGS= ;;
    v3.*) ARGOCD_MODULE=github.com/argoproj/argo-cd/v3 ARGOCD_TAGS=argocd_v3 ;;
    *) die "Argo CD $ARGOCD_VERSION: only Argo CD v2.x and v3.x are supported" ;;
  esac
}

# argocd_go_env: checks Go is there, sets the build environment and GO_VERSION.
argocd_go_env() {
  command -v go >/dev/null 2>&1 || die "Go is not installed. Install Go >= 1.24 (https://go.dev/doc/install):
  Argo CD is built from the Go module proxy (see this script's header)."
  export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false
  GO_VERSION="$(go env GOVERSION)"
}

# argocd_wrapper_gomod NAME: in the current directory, downloads ARGOCD_MODULE@ARGOCD_VERSION and writes
# go.mod for module NAME requiring it with Argo CD's replace directives, verbatim. Sets ARGOCD_MODDIR
# (the release's sources in the module cache: manifests/, resource_customizations/...). Call
# argocd_module and argocd_go_env first.
argocd_wrapper_gomod() {
  local name="$1" info gomod replaces
  log "resolving $ARGOCD_MODULE@$ARGOCD_VERSION"
  info="$(go mod download -json "$ARGOCD_MODULE@$ARGOCD_VERSION")" \
    || die "could not download $ARGOCD_MODULE@$ARGOCD_VERSION from the Go module proxy"
  gomod="$(sed -n 's/.*"GoMod": "\(.*\)".*/\1/p' <<<"$info")"
  ARGOCD_MODDIR="$(sed -n 's/.*"Dir": "\(.*\)".*/\1/p' <<<"$info")"
  [[ -f "$gomod" && -d "$ARGOCD_MODDIR" ]] \
    || die "go mod download did not give the go.mod and sources of $ARGOCD_MODULE@$ARGOCD_VERSION"

  # The block form `replace ( ... )` and single `replace x => y` lines. A local path (`=> ./dir`) only
  # works inside Argo CD's own repository.
  replaces="$(sed -n '/^replace[[:space:]]*($/,/^)/{/^replace/d;/^)/d;p}; s/^replace[[:space:]]\{1,\}\([^(].*=>.*\)$/\t\1/p' "$gomod")"
  if grep -Eq '=>[[:space:]]*\.{1,2}/' <<<"$replaces"; then
    die "Argo CD $ARGOCD_VERSION replaces a module with a local directory in its go.mod:
$(grep -E '=>[[:space:]]*\.{1,2}/' <<<"$replaces")
  It cannot be built from the Go module proxy; choose a release without such a replace (v2.x, v3.0-v3.2)."
  fi

  {
    echo "module $name"
    echo
    echo "go $(sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/' <<<"$GO_VERSION")"
    echo
    echo "require $ARGOCD_MODULE $ARGOCD_VERSION"
    echo
    echo "replace ("
    printf '%s\n' "$replaces"
    echo ")"
  } >go.mod
}

# argocd_lock DIR: serializes builds into DIR (several test binaries and checkouts may ask at once).
argocd_lock() {
  mkdir -p "$1"
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$1/.lock"
    if ! flock -n 9; then
      log "waiting for another build in $1 to finish"
      flock 9
    fi
  fi
}
