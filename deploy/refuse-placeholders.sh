#!/bin/sh
# refuse-placeholders.sh VARIABLE... -- COMMAND [ARGUMENT...]
#
# Runs COMMAND unless one of the named environment variables is empty or still holds an example
# file's placeholder (change-me, changeme, CHANGE_ME-...); then it says which, in one line, and
# exits 1. For images whose entrypoint keeps a secret for good on its first start (PostgreSQL
# keeps the password it was initialised with in its volume).
set -eu

fail() {
    echo "refuse-placeholders: $*" >&2
    exit 1
}

while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    name=$1
    shift
    case $name in
        "" | [0-9]* | *[!A-Za-z0-9_]*) fail "$name is not a variable name" ;;
    esac
    eval "value=\${$name:-}"
    [ -n "$value" ] || fail "$name is not set"
    if printf '%s' "$value" | grep -Eiq 'change[-_ ]?me'; then
        fail "$name still holds a placeholder secret (change-me...): set a real one before starting"
    fi
done
[ "${1:-}" = "--" ] && [ $# -ge 2 ] || fail "usage: refuse-placeholders.sh VARIABLE... -- COMMAND [ARGUMENT...]"
shift
exec "$@"
