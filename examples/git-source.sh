#!/usr/bin/env bash
# berth on a Git source: copies examples/ into a local repository (a stand-in for your
# Git server), commits, and runs scripts/up.sh with BERTH_GIT_URL instead of a folder.
# Then edit a spec in the repository and commit: berth fetches every 5 s here (or at once on
# POST /v1/hooks/git) and rolls the change out; `git revert HEAD` rolls it back.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=${REPO:-/var/tmp/berth-example-repo}
if [ ! -d "$repo/.git" ]; then
    mkdir -p "$repo"
    cp -r examples/hello examples/exec-hello "$repo/"
    cp /bin/busybox "$repo/hello/busybox"
    git -C "$repo" init -q -b main
    git -C "$repo" add -A
    git -C "$repo" -c user.name=berth -c user.email=berth@localhost commit -qm "example apps"
    echo "created $repo"
fi
export BERTH_GIT_URL=file://$repo BERTH_GIT_BRANCH=main BERTH_GIT_INTERVAL=${BERTH_GIT_INTERVAL:-5s}
export BERTH_DATA_DIR=${BERTH_DATA_DIR:-.berth-git} BERTH_EDGE_LISTEN=${BERTH_EDGE_LISTEN:-127.0.0.1:8081}
export BERTH_API_LISTEN=${BERTH_API_LISTEN:-127.0.0.1:7071}
exec scripts/up.sh "$@"
