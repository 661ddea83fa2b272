#!/usr/bin/env bash
# Install the Debian packages fashionlab uses that pip cannot provide, when they are missing.
#   system-deps.sh dataset   the Fashion-MNIST files (dataset-fashion-mnist)
#   system-deps.sh all       the dataset, PostgreSQL (search tests) and Chromium (report tests)
# On a machine without apt-get (or without root), nothing is installed: the data is then
# downloaded by `fashionlab data fetch`, and the tests name what is missing.
set -euo pipefail
what=${1:-all}

missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
if [ "$what" = all ]; then
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
  command -v chromium >/dev/null || missing+=(chromium)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
  echo "note: no apt-get here; not installing ${missing[*]}" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    echo "note: not root; install these yourself if you need them: ${missing[*]}" >&2
    exit 0
  fi
fi
echo "installing Debian packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
