#!/usr/bin/env bash
# Prints the path of the oha (HTTP load generator) that `cargo xtask bench-verify` runs for the HTTP
# endpoint's published numbers (not in `--check`: the test command uses the benchmark's own
# verify-load instead, so it never builds oha), building a pinned one into the cache on first use:
#   SCIM_BENCH_OHA=/path/to/oha -> that one (it must support --output-format json);
#   else the pinned version in the cache, if complete;
#   else `cargo install --locked oha@VERSION` from crates.io into the cache (minutes of compiling on
#   two cores, once: see BENCHMARKS.md; needs a C compiler for aws-lc-sys, rustls' default crypto).
#   Default features: oha 1.16.0 does not compile without a TLS backend (--no-default-features),
#   although the benchmark speaks plain HTTP on loopback only.
#
# Why oha and not Debian's wrk: the benchmark needs an open-loop, rate-limited run (`-q RPS` with
# `--latency-correction`, so a stalled server is charged for the requests it delayed: no coordinated
# omission) to read the p99 at half of the peak load, and per-status counts to prove every answer
# was the right one. wrk has neither (only wrk2 has a rate, and Debian does not package it).
#
# Cache: ${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/oha-VERSION/bin/oha
set -euo pipefail

VERSION=1.16.0
cache="${XDG_CACHE_HOME:-$HOME/.cache}/scim-token-operator/oha-${VERSION}"

log() { printf 'oha.sh: %s\n' "$*" >&2; }

if [[ -n "${SCIM_BENCH_OHA:-}" ]]; then
  [[ -x "$SCIM_BENCH_OHA" ]] || { log "SCIM_BENCH_OHA=$SCIM_BENCH_OHA is not an executable"; exit 1; }
  echo "$SCIM_BENCH_OHA"
  exit 0
fi
if [[ -x "$cache/bin/oha" && -f "$cache/.complete" ]]; then
  echo "$cache/bin/oha"
  exit 0
fi

mkdir -p "$cache"
# Serialize installs: two benchmark runs may ask at once.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$cache/.lock"
  flock 9
  if [[ -x "$cache/bin/oha" && -f "$cache/.complete" ]]; then
    echo "$cache/bin/oha"
    exit 0
  fi
fi
started=$SECONDS
log "building oha ${VERSION} from crates.io into ${cache} (minutes, once)"
# Its own target dir (not the workspace's): nothing of the project's build cache is touched. Kept
# after a failed build, so that a retry reuses what was compiled; removed once installed.
cargo install --quiet --locked --root "$cache" --target-dir "$cache/build" "oha@${VERSION}" >&2
rm -rf "$cache/build"
"$cache/bin/oha" --version >"$cache/.complete"
log "built $(cat "$cache/.complete") in $((SECONDS - started))s"
echo "$cache/bin/oha"
