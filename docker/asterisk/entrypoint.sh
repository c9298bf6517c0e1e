#!/bin/bash
# The Asterisk container's entrypoint: renders the configuration that depends on the
# environment and on the secret files, waits until the gateway's database holds the
# cdr table, then runs Asterisk in the foreground as the user asterisk.
#
#   GW_*                      every one becomes a dialplan global (GW_AGI, GW_PBX, ...)
#   AMI_PORT, AMI_BINDADDR, AMI_PERMIT, AMI_SECRET_FILE
#                             the gateway's AMI account (dialplan/manager.conf.example)
#   CDR_PGSQL_HOST, _PORT, _DBNAME, _USER, _PASSWORD_FILE
#                             where cdr_pgsql writes (empty host: no cdr_pgsql)
#   CDR_WAIT_SECONDS          how long to wait for the cdr table (the gateway migrates)
#   RTP_START, RTP_END        the RTP port range
# /etc/asterisk/pjsip.conf (phones and trunks) is the operator's, mounted.
set -euo pipefail
etc=/etc/asterisk

fail() { echo "asterisk-entrypoint: $*" >&2; exit 1; }
read_secret() {
    [ -r "$1" ] || fail "cannot read the secret file $1"
    local value
    value="$(tr -d '\r\n' < "$1")"
    [ -n "$value" ] || fail "the secret file $1 is empty"
    # a ';' starts a comment in Asterisk's configuration files
    [[ "$value" != *";"* ]] || fail "the secret in $1 holds a ';' (Asterisk cannot read it)"
    printf '%s' "$value"
}
number() { [[ "$2" =~ ^[0-9]+$ ]] || fail "$1 must be a number, not '$2'"; }

[ -f "$etc/pjsip.conf" ] || fail "no $etc/pjsip.conf: mount the phones and trunks there" \
    "(dialplan/pjsip.conf.example shows them)"

# AMI: the shipped least-privilege account, with this stack's port and secret.
number AMI_PORT "$AMI_PORT"
AMI_SECRET="$(read_secret "$AMI_SECRET_FILE")" awk '
    /^port *=/     { print "port = " ENVIRON["AMI_PORT"]; next }
    /^bindaddr *=/ { print "bindaddr = " ENVIRON["AMI_BINDADDR"]; next }
    /^secret *=/   { print "secret = " ENVIRON["AMI_SECRET"]; next }
    /^permit *=/   { print "permit = " ENVIRON["AMI_PERMIT"]; next }
    { print }' "$etc/manager.conf.template" > "$etc/manager.conf"

# The dialplan: every GW_* variable is a global, then the shipped dialplan.
{
    printf '[general]\nstatic = yes\nwriteprotect = yes\n\n[globals]\n'
    for name in $(compgen -v GW_); do
        printf '%s=%s\n' "$name" "${!name}"
    done
    printf '\n#include extensions_gateway.conf\n'
} > "$etc/extensions.conf"

number RTP_START "$RTP_START"
number RTP_END "$RTP_END"
{ cat "$etc/rtp.conf.template"; printf 'rtpstart = %s\nrtpend = %s\n' "$RTP_START" "$RTP_END"; } \
    > "$etc/rtp.conf"

if [ -n "${CDR_PGSQL_HOST:-}" ]; then
    number CDR_PGSQL_PORT "$CDR_PGSQL_PORT"
    password="$(read_secret "$CDR_PGSQL_PASSWORD_FILE")"
    {
        cat "$etc/cdr_pgsql.conf.template"
        printf 'hostname=%s\nport=%s\ndbname=%s\nuser=%s\npassword=%s\n' "$CDR_PGSQL_HOST" \
            "$CDR_PGSQL_PORT" "$CDR_PGSQL_DBNAME" "$CDR_PGSQL_USER" "$password"
    } > "$etc/cdr_pgsql.conf"
    chmod 640 "$etc/cdr_pgsql.conf"
    chgrp asterisk "$etc/cdr_pgsql.conf"
    # cdr_pgsql reads the table's columns when it loads: the gateway's migrations must
    # have made it (Asterisk 22 aborts when it is missing).
    number CDR_WAIT_SECONDS "$CDR_WAIT_SECONDS"
    deadline=$((SECONDS + CDR_WAIT_SECONDS))
    until PGPASSWORD="$password" PGCONNECT_TIMEOUT=3 psql -qAt -h "$CDR_PGSQL_HOST" \
            -p "$CDR_PGSQL_PORT" -U "$CDR_PGSQL_USER" -d "$CDR_PGSQL_DBNAME" \
            -c 'SELECT 1 FROM cdr LIMIT 0' >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || fail "no table cdr in $CDR_PGSQL_DBNAME at" \
            "$CDR_PGSQL_HOST:$CDR_PGSQL_PORT after ${CDR_WAIT_SECONDS}s (is the gateway up?)"
        sleep 1
    done
    unset password
else
    printf 'noload => cdr_pgsql.so\n' >> "$etc/modules.conf"
fi
chmod 640 "$etc/manager.conf"
chgrp asterisk "$etc/manager.conf"

mkdir -p /var/run/asterisk
chown asterisk:asterisk /var/run/asterisk
exec asterisk -f -U asterisk -G asterisk "$@"
