# Shared setup of the PostgreSQL benchmarks, sourced by pg_compare.sh,
# pg_cpu.sh and pg_callgrind.sh: a PostgreSQL 15 of their own with a
# scale-10 pgbench database `bench`, and PgBouncer in transaction mode in
# front of it, both on 127.0.0.1 and both run as the postgres user. Set
# WORK (a directory the postgres user owns) and POOL_SIZE before calling
# start_postgres, start_pgbouncer and start_skiff. The write_*_config
# functions write the poolers' configuration only, for scripts that start
# them another way. cleanup stops what the start functions started.

PG_BIN=/usr/lib/postgresql/15/bin

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cleanup() {
    [ -n "${SKIFF_PID:-}" ] && kill "$SKIFF_PID" 2>/dev/null || true
    [ -n "${BOUNCER_PID:-}" ] && kill "$BOUNCER_PID" 2>/dev/null || true
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}

# Starts PostgreSQL on PG_PORT and creates the pgbench database.
start_postgres() {
    runuser -u postgres -- "$PG_BIN/initdb" -D "$WORK/data" -A trust -U postgres --no-sync >/dev/null
    cat >> "$WORK/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK'
max_connections = 600
shared_buffers = 256MB
fsync = off
synchronous_commit = off
CONF
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start >/dev/null
    psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE DATABASE bench"
    pgbench -h 127.0.0.1 -p "$PG_PORT" -U postgres -i -q -s 10 bench >/dev/null 2>&1
}

# Writes $WORK/pgbouncer.ini: transaction mode on BOUNCER_PORT.
write_pgbouncer_config() {
    cat > "$WORK/pgbouncer.ini" <<CONF
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = 11000
logfile = $WORK/pgbouncer.log
CONF
    chown postgres:postgres "$WORK/pgbouncer.ini"
}

# Starts PgBouncer on BOUNCER_PORT and sets BOUNCER_PID.
start_pgbouncer() {
    write_pgbouncer_config
    runuser -u postgres -- pgbouncer "$WORK/pgbouncer.ini" >"$WORK/pgbouncer.out" 2>&1 &
    # runuser stays the parent, so the PID of PgBouncer itself is read
    # from its child list once it has started.
    local runner=$!
    for _ in $(seq 50); do
        BOUNCER_PID=$(pgrep -P "$runner" -x pgbouncer || true)
        [ -n "$BOUNCER_PID" ] && return
        sleep 0.1
    done
    echo "PgBouncer did not start; see $WORK/pgbouncer.out" >&2
    return 1
}

# Writes $WORK/skiff.toml: transaction mode on SKIFF_PORT.
write_skiff_config() {
    cat > "$WORK/skiff.toml" <<CONF
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[postgres]
listen = "127.0.0.1:$SKIFF_PORT"
pool_mode = "transaction"
default_pool_size = $POOL_SIZE
max_client_conn = 11000
[[postgres.databases]]
name = "bench"
host = "127.0.0.1"
port = $PG_PORT
CONF
}

# Starts skiff (binary $1) in transaction mode on SKIFF_PORT and sets
# SKIFF_PID.
start_skiff() {
    write_skiff_config
    SKIFF_LOG=warn "$1" --config "$WORK/skiff.toml" >"$WORK/skiff.log" 2>&1 &
    SKIFF_PID=$!
    sleep 1
}
