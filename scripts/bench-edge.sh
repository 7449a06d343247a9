#!/usr/bin/env bash
# The edge against nginx (both from this machine), proxying the same backend, with wrk.
#
# - backend: nginx, one worker, `return 200` of a small body, on 127.0.0.1:18081;
# - reference: nginx as a reverse proxy (keep-alive upstream pool, access log off, the same
#   forwarding headers as the edge), as many workers as the machine has cores, on 127.0.0.1:18082;
# - edge: `berth up --components edge` (tokio: one worker thread per core; access log off by
#   BERTH_LOG=warn, like nginx), its routes from Postgres, on 127.0.0.1:18083; the database
#   also holds 10,000 other apps, so the edge's RSS is measured with 10,000 routes.
# wrk runs 16, 64 and 256 connections, 2 threads, 10 s each (after a 3 s warm-up), three
# rounds in which nginx and the edge take turns; each cell is the median of its rounds (runs
# on a shared 2-core machine move by 20% from one to the next). Prints a table for
# BENCHMARKS.md.
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
ROUNDS=${BENCH_ROUNDS:-3}
# BERTH_BIN: compare another build of berth (otherwise this tree's release build).
if [ -z "${BERTH_BIN:-}" ]; then cargo build --release --locked --quiet; fi
BERTH=${BERTH_BIN:-$PWD/target/release/berth}
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
            # what the edge also adds to every request, so both do the same work
            proxy_set_header X-Forwarded-Host \$host;
            proxy_set_header Forwarded "for=\$remote_addr;host=\"\$host\";proto=\$scheme";
            proxy_set_header X-Request-Id \$request_id;
        }
    }
}
EOF
nginx -c "$work/backend.conf" -g 'daemon off;' & pids+=($!)
nginx -c "$work/proxy.conf" -g 'daemon off;' & proxy_pid=$!; pids+=($proxy_pid)

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

rss_mb() { echo $(( $(awk '/VmRSS/ {print $2}' /proc/$edge_pid/status) / 1024 )); }
idle_rss=$(rss_mb)

# CPU time (user + system, in clock ticks) of the given processes and all their threads.
cpu_ticks() { cat "${@/#//proc/}" 2>/dev/null | awk '{ t += $14 + $15 } END { print t + 0 }'; }
hz=$(getconf CLK_TCK)
run() { # url connections warmup pid... -> "req/s p99-in-ms cpu-us-per-request errors"
    [ "$3" = warm ] && wrk -t2 -c"$2" -d3s -H 'Host: bench.localhost' "$1" >/dev/null 2>&1
    local out stats before after
    stats=(); for p in "${@:4}"; do stats+=("$p/stat"); done
    before=$(cpu_ticks "${stats[@]}")
    out=$(wrk -t2 -c"$2" -d"$DURATION" --latency -H 'Host: bench.localhost' "$1")
    after=$(cpu_ticks "${stats[@]}")
    local rps p99 errors requests cpu
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    # CPU per request: unlike req/s, it does not depend on how the shared cores were split
    # between wrk, the backend and the proxy during the run.
    cpu=$(awk -v t="$((after - before))" -v hz="$hz" -v n="$requests" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    p99=$(awk -v v="$p99" 'BEGIN { if (v ~ /us$/) print substr(v,1,length(v)-2)/1000; else if (v ~ /ms$/) print substr(v,1,length(v)-2); else if (v ~ /s$/) print substr(v,1,length(v)-1)*1000; else print v }')
    errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ' | tr ' ' '_')
    echo "$rps $p99 $cpu ${errors:-none}"
}
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

log "machine: $cores cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(nginx -v 2>&1); $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)"
log "each cell: the median of $ROUNDS runs of $DURATION, nginx and the edge taking turns"
nginx_pids=("$proxy_pid" $(pgrep -P "$proxy_pid"))
echo "| connections | nginx req/s | nginx p99 | edge req/s | edge p99 | edge/nginx req/s | edge/nginx p99 | runs (edge/nginx req/s) | CPU µs/request nginx, edge |"
echo "|---|---|---|---|---|---|---|---|---|"
for c in ${BENCH_CONNECTIONS:-16 64 256}; do
    n_rps=(); n_p99=(); e_rps=(); e_p99=(); ratios=(); n_cpu=(); e_cpu=()
    for r in $(seq 1 "$ROUNDS"); do
        warm=$([ "$r" = 1 ] && echo warm || echo cold)
        read -r a b nc n_err <<<"$(run http://127.0.0.1:18082/ "$c" "$warm" "${nginx_pids[@]}")"
        n_rps+=("$a"); n_p99+=("$b"); n_cpu+=("$nc")
        read -r x y ec e_err <<<"$(run http://127.0.0.1:18083/ "$c" "$warm" "$edge_pid")"
        e_rps+=("$x"); e_p99+=("$y"); e_cpu+=("$ec")
        ratios+=("$(awk -v a="$x" -v b="$a" 'BEGIN { printf "%.2f", a/b }')")
        [ "$n_err" = none ] || echo "  nginx errors: $n_err"
        [ "$e_err" = none ] || echo "  edge errors: $e_err"
    done
    nr=$(printf '%s\n' "${n_rps[@]}" | median); np=$(printf '%s\n' "${n_p99[@]}" | median)
    er=$(printf '%s\n' "${e_rps[@]}" | median); ep=$(printf '%s\n' "${e_p99[@]}" | median)
    ratio=$(awk -v a="$er" -v b="$nr" 'BEGIN { printf "%.2fx", a/b }')
    pratio=$(awk -v a="$ep" -v b="$np" 'BEGIN { printf "%.2fx", a/b }')
    nc=$(printf '%s\n' "${n_cpu[@]}" | median); ec=$(printf '%s\n' "${e_cpu[@]}" | median)
    echo "| $c | $nr | $np ms | $er | $ep ms | $ratio | $pratio | ${ratios[*]} | $nc, $ec |"
done
routes=$(psql "$DB" -Atc 'select count(*) from domains')
echo "edge RSS with $routes routes: $idle_rss MB once they are loaded, $(rss_mb) MB after the runs (its upstream connections still pooled)"
