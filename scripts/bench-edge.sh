#!/usr/bin/env bash
# The edge against nginx (both from this machine), proxying the same backend, with wrk.
#
# - backend: nginx, one worker, `return 200` of a small body, on 127.0.0.1:18081;
# - reference: nginx as a reverse proxy (keep-alive upstream pool, access log off), as many
#   workers as the machine has cores, on 127.0.0.1:18082;
# - edge: `berth up --components edge` (tokio: one worker thread per core; access log off by
#   BERTH_LOG=warn, like nginx), its routes from Postgres, on 127.0.0.1:18083; the database
#   also holds 10,000 other apps, so the edge's RSS is measured with 10,000 routes.
# wrk runs 16, 64 and 256 connections, 2 threads, 10 s each (after a 3 s warm-up),
# against both. Prints a table for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
source scripts/test-postgres.sh
for tool in wrk nginx; do
    if ! command -v "$tool" >/dev/null; then
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk nginx-light >/dev/null
    fi
done
DURATION=${BENCH_DURATION:-10s}
cargo build --release --locked --quiet
BERTH=$PWD/target/release/berth
work=$(mktemp -d /var/tmp/berth-bench-edge.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    psql "$BERTH_TEST_DATABASE_URL" -qc "drop database if exists berth_bench_edge with (force)" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
cores=$(nproc)

cat >"$work/backend.conf" <<EOF
worker_processes 1;
pid $work/backend.pid;
error_log $work/backend.err warn;
events { worker_connections 4096; }
http {
    access_log off;
    server {
        listen 127.0.0.1:18081 backlog=4096;
        keepalive_requests 100000;
        location / { return 200 "hello from the backend\n"; }
    }
}
EOF
cat >"$work/proxy.conf" <<EOF
worker_processes $cores;
pid $work/proxy.pid;
error_log $work/proxy.err warn;
events { worker_connections 4096; }
http {
    access_log off;
    upstream backend { server 127.0.0.1:18081; keepalive 256; keepalive_requests 100000; }
    server {
        listen 127.0.0.1:18082 backlog=4096;
        keepalive_requests 100000;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
        }
    }
}
EOF
nginx -c "$work/backend.conf" -g 'daemon off;' & pids+=($!)
nginx -c "$work/proxy.conf" -g 'daemon off;' & pids+=($!)

nats_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nats-server -a 127.0.0.1 -p "$nats_port" -js -sd "$work/nats" >"$work/nats.log" 2>&1 & pids+=($!)

psql "$BERTH_TEST_DATABASE_URL" -qc "drop database if exists berth_bench_edge with (force)" >/dev/null
psql "$BERTH_TEST_DATABASE_URL" -qc "create database berth_bench_edge" >/dev/null
DB=${BERTH_TEST_DATABASE_URL%/*}/berth_bench_edge
"$BERTH" migrate --database-url "$DB" >/dev/null
psql "$DB" -q <<'EOF'
insert into nodes (name, address, last_heartbeat_at) values ('bench', '127.0.0.1', now());
insert into apps (name, spec, spec_hash, source)
    select 'app' || g, '{"replicas": 1}', 'h', 'bench' from generate_series(0, 10000) g;
insert into deployments (app_id, generation, spec, spec_hash, status)
    select id, 1, '{"replicas": 1}', 'h', 'active' from apps;
update apps a set current_deployment_id = d.id from deployments d where d.app_id = a.id;
insert into domains (app_id, hostname) select id, name || '.localhost' from apps;
update domains set hostname = 'bench.localhost' where hostname = 'app0.localhost';
-- every app has a running instance; app0's is the backend
insert into instances (app_id, deployment_id, node_id, host, port, state)
    select a.id, a.current_deployment_id, (select id from nodes), '127.0.0.1',
           case when a.name = 'app0' then 18081 else 20000 + (a.id % 10000)::int end, 'running'
    from apps a;
insert into deployment_instances (deployment_id, instance_id) select deployment_id, id from instances;
EOF

BERTH_DATABASE_URL=$DB BERTH_NATS_URL=nats://127.0.0.1:$nats_port BERTH_EDGE_LISTEN=127.0.0.1:18083 \
    BERTH_API_LISTEN=127.0.0.1:0 BERTH_DATA_DIR=$work/berth BERTH_LOG=warn \
    "$BERTH" up --components edge >"$work/edge.log" 2>&1 & edge_pid=$!; pids+=($edge_pid)

for i in $(seq 1 100); do
    if curl -sf -H 'Host: bench.localhost' http://127.0.0.1:18083/ >/dev/null 2>&1 \
        && curl -sf http://127.0.0.1:18082/ >/dev/null 2>&1; then break; fi
    sleep 0.2
done
curl -sf -H 'Host: bench.localhost' http://127.0.0.1:18083/ >/dev/null || { cat "$work/edge.log"; exit 1; }

run() { # url connections -> "req/s p99"
    wrk -t2 -c"$2" -d3s -H 'Host: bench.localhost' "$1" >/dev/null 2>&1
    local out
    out=$(wrk -t2 -c"$2" -d"$DURATION" --latency -H 'Host: bench.localhost' "$1")
    local rps p99 errors
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
    echo "$rps $p99 ${errors:-none}"
}

log "machine: $cores cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(nginx -v 2>&1); $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)"
echo "| connections | nginx req/s | nginx p99 | edge req/s | edge p99 | edge/nginx req/s | edge/nginx p99 |"
echo "|---|---|---|---|---|---|---|"
for c in 16 64 256; do
    read -r n_rps n_p99 n_err <<<"$(run http://127.0.0.1:18082/ "$c")"
    read -r e_rps e_p99 e_err <<<"$(run http://127.0.0.1:18083/ "$c")"
    ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) print substr(v,1,length(v)-2)/1000; else if (v ~ /ms$/) print substr(v,1,length(v)-2); else if (v ~ /s$/) print substr(v,1,length(v)-1)*1000; else print v }'; }
    n_ms=$(ms "$n_p99"); e_ms=$(ms "$e_p99")
    ratio=$(awk -v a="$e_rps" -v b="$n_rps" 'BEGIN { printf "%.2fx", a/b }')
    pratio=$(awk -v a="$e_ms" -v b="$n_ms" 'BEGIN { printf "%.2fx", a/b }')
    echo "| $c | $n_rps | ${n_ms} ms | $e_rps | ${e_ms} ms | $ratio | $pratio |"
    [ "$n_err" = none ] || echo "  nginx errors: $n_err"
    [ "$e_err" = none ] || echo "  edge errors: $e_err"
done
rss=$(awk '/VmRSS/ {print $2}' /proc/$edge_pid/status)
echo "edge RSS with $(psql "$DB" -Atc 'select count(*) from domains') routes, after the runs: $((rss / 1024)) MB"
