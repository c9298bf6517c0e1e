#!/bin/bash
# The PostgreSQL container's entrypoint (runs as the user postgres). On an empty data
# folder it makes the cluster and then the gateway's role and database from
#   POSTGRES_USER, POSTGRES_DB      their names (default: gateway, gateway)
#   POSTGRES_PASSWORD_FILE          the role's password (a secret file)
# and then serves on PGPORT (default 5432), on every address, password (SCRAM) only.
# A data folder that already holds a cluster is served as it is: the password file is
# read only when the cluster is made.
set -euo pipefail

fail() { echo "postgres-entrypoint: $*" >&2; exit 1; }
number() { [[ "$2" =~ ^[0-9]+$ ]] || fail "$1 must be a number, not '$2'"; }
name() { [[ "$2" =~ ^[a-z_][a-z0-9_]{0,62}$ ]] || fail "$1 must be a plain SQL name, not '$2'"; }

number PGPORT "$PGPORT"
name POSTGRES_USER "$POSTGRES_USER"
name POSTGRES_DB "$POSTGRES_DB"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    [ -r "$POSTGRES_PASSWORD_FILE" ] || fail "cannot read the password file $POSTGRES_PASSWORD_FILE"
    password="$(tr -d '\r\n' < "$POSTGRES_PASSWORD_FILE")"
    [ -n "$password" ] || fail "the password file $POSTGRES_PASSWORD_FILE is empty"
    echo "postgres-entrypoint: making a new cluster in $PGDATA"
    initdb --username=postgres --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=peer --auth-host=scram-sha-256 -D "$PGDATA" >/dev/null
    # clients of other containers and hosts: with the password only
    printf 'host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' \
        >> "$PGDATA/pg_hba.conf"
    # set up over the socket only, then stop
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    # the password goes to psql as a variable, quoted by psql itself (:'password')
    psql -v ON_ERROR_STOP=1 -v password="$password" -q -d postgres <<SQL
CREATE ROLE $POSTGRES_USER LOGIN PASSWORD :'password';
CREATE DATABASE $POSTGRES_DB OWNER $POSTGRES_USER;
SQL
    unset password
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "postgres-entrypoint: role $POSTGRES_USER and database $POSTGRES_DB made"
fi
exec postgres -D "$PGDATA" -c listen_addresses="$POSTGRES_LISTEN" "$@"
