#!/usr/bin/env bash
# Checks the operations files: the systemd units (systemd-analyze verify, with the unit's
# binary path pointed at the built berth) and the Nix files (nix-instantiate --parse), each
# when its tool is on this machine. Called by scripts/test.sh after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-$PWD/target/debug/berth}
if command -v systemd-analyze >/dev/null; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    for unit in contrib/systemd/*.service; do
        sed -e "s#/usr/local/bin/berth#$bin#" -e 's#^EnvironmentFile=/#EnvironmentFile=-/#' "$unit" >"$tmp/$(basename "$unit")"
    done
    systemd-analyze verify "$tmp"/*.service
    echo "systemd units: ok"
else
    echo "systemd units: skipped (no systemd-analyze)"
fi
if command -v nix-instantiate >/dev/null; then
    for f in flake.nix nix/*.nix; do nix-instantiate --parse "$f" >/dev/null; done
    echo "nix files: ok"
else
    echo "nix files: skipped (no nix-instantiate)"
fi
