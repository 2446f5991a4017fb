#!/usr/bin/env bash
# System packages the test suite needs: a redis-server binary (tests start their own on a free
# port) and Debian's Chromium (the playground page is tested in a real headless browser; no
# browser is ever downloaded). Installed with apt when missing and running as root; otherwise a
# clear message.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing: ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "The test suite needs: ${missing[*]}" >&2
  echo "Install them (e.g. sudo apt-get install ${missing[*]}) and run make test again." >&2
  exit 1
fi
