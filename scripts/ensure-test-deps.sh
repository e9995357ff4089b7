#!/usr/bin/env bash
# System packages the test suite needs beyond the Python dev extra: headless Chromium and its
# driver for the playground browser test. Idempotent and quick when everything is there.
# Installs with apt-get when missing and running as root; otherwise says what to install.
# Set COSYSERVE_SKIP_SYSTEM_DEPS=1 to skip (the browser test then skips with its reason).
set -euo pipefail

if [[ "${COSYSERVE_SKIP_SYSTEM_DEPS:-0}" == "1" ]]; then
    exit 0
fi

missing=()
command -v chromium >/dev/null 2>&1 || [[ -x /usr/bin/chromium ]] || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || [[ -x /usr/bin/chromedriver ]] || missing+=(chromium-driver)
# Without recommends nothing pulls in a font, and screenshots would show empty boxes.
if command -v dpkg-query >/dev/null 2>&1 \
    && ! dpkg-query -W -f='${Status}' fonts-dejavu-core 2>/dev/null | grep -q "ok installed"; then
    missing+=(fonts-dejavu-core)
fi

if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure-test-deps: installing ${missing[*]} (apt-get)..." >&2
    export DEBIAN_FRONTEND=noninteractive
    # A fresh container has no package lists: update once, then install.
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    echo "ensure-test-deps: installed ${missing[*]}" >&2
    exit 0
fi

cat >&2 <<MSG
ensure-test-deps: missing ${missing[*]}; the playground browser test will be skipped.
Install them with your system's package manager, e.g. on Debian/Ubuntu:
    sudo apt-get install chromium chromium-driver fonts-dejavu-core
MSG
