#!/usr/bin/env bash
# Install the Debian packages the test suite uses, when missing and when root.
#
#   chromium               the dashboard's browser test (Playwright drives /usr/bin/chromium)
#   iproute2               the deployment test puts each SuperNode in a network namespace
#   dataset-fashion-mnist  the Fashion-MNIST end-to-end test (/usr/share/datasets/fashion-mnist)
#   nginx                  the SuperLink's public port (python -m deploy superlink) and its tests
#
# Idempotent and quiet: nothing is done when everything is present. Without root it
# installs nothing and says which tests will be skipped and the command that fixes it.
set -uo pipefail

declare -A CHECKS=(
    [chromium]="test -x /usr/bin/chromium"
    [iproute2]="command -v ip"
    [dataset-fashion-mnist]="test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
    [nginx]="test -x /usr/sbin/nginx"
)
PACKAGES=(chromium iproute2 dataset-fashion-mnist nginx)

missing=()
for package in "${PACKAGES[@]}"; do
    eval "${CHECKS[$package]}" >/dev/null 2>&1 || missing+=("$package")
done
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" != "0" ]; then
    echo "system-deps: missing Debian packages ${missing[*]}; the tests that need them will be" \
        "skipped. Install them with: sudo make system-deps"
    exit 0
fi

log="$(mktemp)"
started=$SECONDS
# Installing nginx must not leave Debian's default site running on port 80: where no
# policy forbids starting services during installs, one does for this install only.
policy=/usr/sbin/policy-rc.d
own_policy=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
fi
trap '[ -n "$own_policy" ] && rm -f "$policy"' EXIT
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        "${missing[@]}"; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "system-deps: apt-get install ${missing[*]} failed (output above); fix apt and run" \
        "make system-deps again" >&2
    rm -f "$log"
    exit 1
fi
rm -f "$log"
echo "system-deps: installed ${missing[*]} in $((SECONDS - started)) s"
