# Sourced: starts the test Postgres cluster (after scripts/setup.sh) and exports
# BERTH_TEST_DATABASE_URL.
# One Postgres cluster for the tests (each test creates its own database in it): private,
# loopback only, trust auth, durability off for speed. Reused when already running.
PGDATA_TEST=${BERTH_TEST_PGDATA:-/var/tmp/berth-test-pg}
PGPORT_TEST=${BERTH_TEST_PGPORT:-54329}
run_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
if ! "$PG_BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PGPORT_TEST"; then
    if [ ! -f "$PGDATA_TEST/PG_VERSION" ]; then
        log "creating the test postgres in $PGDATA_TEST"
        mkdir -p "$PGDATA_TEST"
        [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$PGDATA_TEST"
        run_pg "$PG_BINDIR/initdb" -D "$PGDATA_TEST" -U postgres --auth=trust -E UTF8 >/dev/null
    fi
    log "starting the test postgres on 127.0.0.1:$PGPORT_TEST"
    run_pg "$PG_BINDIR/pg_ctl" -D "$PGDATA_TEST" -l "$PGDATA_TEST/server.log" -w -o \
        "-p $PGPORT_TEST -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400" \
        start >/dev/null
fi
export BERTH_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$PGPORT_TEST/postgres"
# Databases left by an interrupted earlier run (each test drops its own when it ends).
for db in $(psql "$BERTH_TEST_DATABASE_URL" -Atc "select datname from pg_database where datname like 'berth_t%'"); do
    psql "$BERTH_TEST_DATABASE_URL" -qc "drop database if exists $db with (force)" >/dev/null
done

