#!/bin/sh
# self-signed.sh HOST [HOST...]
#
# Makes a private certificate authority and a server certificate for the HOSTs (names or IPv4
# addresses), for trials and closed networks; where the hosts have public names, use a
# certificate from a public CA instead. Writes into this directory (or $TLS_DIR):
#   ca.crt             give it to devices and API clients, so they can check the server
#   ca.key             the CA's key: keep it offline once the certificates are made
#   mqtt.crt mqtt.key  the broker's (mounted at /mosquitto/certs)
#   api.crt api.key    the API's (mounted at /run/ioc-tls); the same certificate as the broker's
# The keys are left readable by their owner only: hand them to the containers' users with
#   sudo chown 1883 mqtt.key && sudo chown 10001 api.key
set -eu

[ $# -ge 1 ] || { echo "usage: self-signed.sh HOST [HOST...]" >&2; exit 2; }
dir=${TLS_DIR:-$(dirname "$0")}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

names=""
for host in "$@"; do
    case $host in
        *[!0-9.]*) entry="DNS:$host" ;;
        *) entry="IP:$host" ;;
    esac
    names="${names:+$names,}$entry"
done
printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
    "$names" >"$work/server.ext"

umask 077
curve="-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
# shellcheck disable=SC2086  # $curve is several options
openssl req -x509 $curve -days 3650 -subj "/CN=IOC private CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>"$work/log" || { cat "$work/log" >&2; exit 1; }
# shellcheck disable=SC2086
openssl req $curve -subj "/CN=$1" -keyout "$work/server.key" -out "$work/server.csr" 2>"$work/log" \
    || { cat "$work/log" >&2; exit 1; }
openssl x509 -req -in "$work/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -CAserial "$work/ca.srl" -days 825 -sha256 -extfile "$work/server.ext" -out "$work/server.crt" \
    2>"$work/log" || { cat "$work/log" >&2; exit 1; }
for use in mqtt api; do
    cp "$work/server.crt" "$dir/$use.crt"
    cp "$work/server.key" "$dir/$use.key"
done
chmod 644 "$dir/ca.crt" "$dir/mqtt.crt" "$dir/api.crt"
echo "self-signed.sh: made ca.crt, mqtt.crt/.key and api.crt/.key for $names in $dir"
