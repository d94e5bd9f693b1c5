#!/usr/bin/env bash
# Fills in the krew manifest template (krew/scim.yaml) for a release and prints it:
#
#   krew-manifest.sh TAG DOWNLOAD_URL HOMEPAGE DIR
#
#   TAG           the release tag, v0.1.0 (krew wants the leading "v")
#   DOWNLOAD_URL  where the release's archives are, e.g.
#                 https://github.com/OWNER/REPO/releases/download/v0.1.0
#   HOMEPAGE      the project's page
#   DIR           the directory holding kubectl-scim_<version>_<os>_<arch>.tar.gz for linux and darwin,
#                 amd64 and arm64; each archive's SHA-256 is computed here
#
# The template stays a template in the repository (tests/kubectl_scim.rs checks its placeholders);
# the release workflow attaches the filled-in copy to the GitHub release, ready for krew-index.
# Fails if an archive is missing or a placeholder is left.
set -euo pipefail
cd "$(dirname "$0")/.."

[[ $# -eq 4 ]] || { echo "usage: $0 TAG DOWNLOAD_URL HOMEPAGE DIR" >&2; exit 2; }
tag="$1" url="$2" homepage="$3" dir="$4"
[[ "$tag" =~ ^v[0-9]+\.[0-9]+\.[0-9]+.*$ ]] || { echo "krew-manifest.sh: $tag is not a vX.Y.Z tag" >&2; exit 2; }
version="${tag#v}"

# The template's comment block (it documents the placeholders) gives way to a one-line header.
manifest="# kubectl scim ${tag}: krew/scim.yaml of scim-token-operator filled in by hack/krew-manifest.sh
$(sed -n '/^apiVersion:/,$p' krew/scim.yaml)"
manifest="${manifest//\{\{VERSION\}\}/$tag}"
manifest="${manifest//\{\{HOMEPAGE\}\}/$homepage}"
for os in linux darwin; do
  for arch in amd64 arm64; do
    archive="kubectl-scim_${version}_${os}_${arch}.tar.gz"
    [[ -f "$dir/$archive" ]] || { echo "krew-manifest.sh: $dir/$archive is missing" >&2; exit 1; }
    sum="$(sha256sum "$dir/$archive" | cut -d' ' -f1)"
    key="${os^^}_${arch^^}"
    manifest="${manifest//\{\{URI_${key}\}\}/$url/$archive}"
    manifest="${manifest//\{\{SHA256_${key}\}\}/$sum}"
  done
done
if grep -n '{{[A-Z0-9_]*}}' <<<"$manifest" >&2; then
  echo "krew-manifest.sh: placeholders left (above)" >&2
  exit 1
fi
printf '%s\n' "$manifest"
