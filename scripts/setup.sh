#!/usr/bin/env bash
# Installs and starts what berth needs on a fresh Debian or Ubuntu machine, as root:
# Postgres, nats-server (JetStream), the Docker engine and busybox-static. Idempotent: a
# second run skips what is installed and reuses services already running.
# Sourced by scripts/up.sh and scripts/test.sh; can also run on its own.
set -euo pipefail

log() { printf '\033[1msetup:\033[0m %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

pg_bindir() {
    local initdb
    initdb=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$initdb" ]; then dirname "$initdb"; elif command -v initdb >/dev/null; then dirname "$(command -v initdb)"; fi
}

busybox_is_static() {
    [ -x /bin/busybox ] && dpkg -s busybox-static >/dev/null 2>&1
}

missing=()
[ -n "$(pg_bindir)" ] || missing+=(postgresql)
command -v nats-server >/dev/null || missing+=(nats-server)
command -v dockerd >/dev/null || missing+=(docker.io)
busybox_is_static || missing+=(busybox-static)
command -v git >/dev/null || missing+=(git)
command -v openssl >/dev/null || missing+=(openssl)   # the edge's TLS tests make certificates
command -v cc >/dev/null || missing+=(gcc libc6-dev)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || { log "cargo is missing: install Rust (https://rustup.rs) first"; exit 1; }

# The Docker engine: use a running one; otherwise start it, through systemd when it runs
# the machine, else directly. Started by us, it gets no default bridge: berth and its tests
# use host networking only.
if ! docker info >/dev/null 2>&1; then
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        log "starting docker (systemd)"
        as_root systemctl start docker
    else
        log "starting dockerd (log: /var/log/berth-dockerd.log)"
        as_root sh -c 'nohup dockerd --bridge=none --iptables=false >/var/log/berth-dockerd.log 2>&1 &'
    fi
    for _ in $(seq 1 120); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { log "the Docker engine did not start; see /var/log/berth-dockerd.log"; exit 1; }
fi

PG_BINDIR=$(pg_bindir)
export PG_BINDIR
log "ready: postgres $("$PG_BINDIR/postgres" --version | awk '{print $3}'), $(nats-server --version), docker $(docker version --format '{{.Server.Version}}')"
