#!/bin/sh
# Starts the compose deployment's broker with device credentials enforced by the dynamic-security
# plugin.
#
# The first start creates the plugin's file with the admin account, as which the API creates,
# rotates and revokes device accounts. Every start then sets, on a broker that listens on loopback
# only so that nobody connects meanwhile: the default access (whatever no role grants is denied),
# the gateway's account (subscribes to and receives ioc/v1/#, publishes nothing) and the
# simulator's account (publishes for the devices of its one city). Their passwords come from the
# environment: change one and restart the broker to rotate it. The admin's password is the one the
# file was created with; change it with `mosquitto_ctrl dynsec setClientPassword`.
set -eu

CONF=${MOSQUITTO_CONF:-/mosquitto/config/mosquitto.conf}
PROVISION_PORT=${MQTT_PROVISION_PORT:-1884}
ADMIN_USER=${MQTT_ADMIN_USER:-admin}
GATEWAY_USER=${MQTT_GATEWAY_USER:-ioc-gateway}
SIMULATOR_USER=${MQTT_SIMULATOR_USER:-ioc-simulator}
SIMULATOR_CITY=${MQTT_SIMULATOR_CITY:-ha-noi}

fail() {
    echo "mosquitto entrypoint: $*" >&2
    exit 1
}

# These end up in IOC_MQTT_URL and in the JSON below, so only URL- and JSON-safe characters; and
# never an example file's placeholder, which the admin account would keep for good.
safe() {
    case $2 in
        "") fail "$1 is not set" ;;
        *[!A-Za-z0-9._~-]*) fail "$1 may contain only letters, digits and . _ ~ -" ;;
    esac
    if printf '%s' "$2" | grep -Eiq 'change[-_]?me'; then
        fail "$1 still holds a placeholder secret (change-me...): set a real one before starting"
    fi
}
safe MQTT_ADMIN_USER "$ADMIN_USER"
safe MQTT_ADMIN_PASSWORD "${MQTT_ADMIN_PASSWORD:-}"
safe MQTT_GATEWAY_USER "$GATEWAY_USER"
safe MQTT_GATEWAY_PASSWORD "${MQTT_GATEWAY_PASSWORD:-}"
safe MQTT_SIMULATOR_USER "$SIMULATOR_USER"
safe MQTT_SIMULATOR_PASSWORD "${MQTT_SIMULATOR_PASSWORD:-}"
case $SIMULATOR_CITY in
    "" | *[!a-z0-9-]*) fail "MQTT_SIMULATOR_CITY must be a city slug like ha-noi" ;;
esac

DYNSEC=$(sed -n 's/^plugin_opt_config_file[[:space:]][[:space:]]*//p' "$CONF")
[ -n "$DYNSEC" ] || fail "$CONF sets no plugin_opt_config_file"
if [ ! -e "$DYNSEC" ]; then
    mosquitto_ctrl dynsec init "$DYNSEC" "$ADMIN_USER" "$MQTT_ADMIN_PASSWORD" >/dev/null
    [ -e "$DYNSEC" ] || fail "could not create $DYNSEC"
    echo "mosquitto entrypoint: created $DYNSEC with the admin account $ADMIN_USER"
fi
if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    # The broker drops to this user and rewrites the file after every change; when it may not,
    # the plugin only logs an error and every account change is lost at the next restart.
    chown mosquitto:mosquitto "$DYNSEC" "$(dirname "$DYNSEC")"
fi

work=$(mktemp -d)
{
    echo "listener $PROVISION_PORT 127.0.0.1"
    echo "allow_anonymous false"
    grep -E '^(user|plugin|plugin_opt_[a-z_]+)[[:space:]]' "$CONF"
} >"$work/provision.conf"
mosquitto -c "$work/provision.conf" >"$work/provision.log" 2>&1 &
provisioner=$!

rr() {
    mosquitto_rr -h 127.0.0.1 -p "$PROVISION_PORT" -u "$ADMIN_USER" -P "$MQTT_ADMIN_PASSWORD" \
        -t '$CONTROL/dynamic-security/v1' -e '$CONTROL/dynamic-security/v1/response' -W 10 -m "$1"
}

abort() {
    cat "$work/provision.log" >&2
    kill "$provisioner" 2>/dev/null || true
    rm -rf "$work"
    fail "$@"
}

tries=0
until probe=$(rr '{"commands": [{"command": "getDefaultACLAccess"}]}' 2>&1); do
    tries=$((tries + 1))
    case $probe in *"not authorised"* | *"not authorized"*) tries=30 ;; esac
    if [ "$tries" -ge 30 ] || ! kill -0 "$provisioner" 2>/dev/null; then
        abort "the broker did not accept $ADMIN_USER on 127.0.0.1:$PROVISION_PORT" \
            "(is MQTT_ADMIN_PASSWORD the one $DYNSEC was created with?)"
    fi
    sleep 1
done

# The gateway's role is the one api/device_accounts.py grants (GATEWAY_ACLS).
request=$(cat <<EOF
{"commands": [
  {"command": "setDefaultACLAccess", "acls": [
    {"acltype": "publishClientSend", "allow": false},
    {"acltype": "publishClientReceive", "allow": true},
    {"acltype": "subscribe", "allow": false},
    {"acltype": "unsubscribe", "allow": true}
  ]},
  {"command": "createRole", "rolename": "ioc-gateway", "textname": "ingest gateways"},
  {"command": "modifyRole", "rolename": "ioc-gateway", "acls": [
    {"acltype": "subscribePattern", "topic": "ioc/v1/#", "priority": 0, "allow": true},
    {"acltype": "subscribePattern", "topic": "\$share/+/ioc/v1/#", "priority": 0, "allow": true},
    {"acltype": "publishClientReceive", "topic": "ioc/v1/#", "priority": 0, "allow": true},
    {"acltype": "publishClientSend", "topic": "#", "priority": 0, "allow": false}
  ]},
  {"command": "createClient", "username": "$GATEWAY_USER", "textname": "ingest gateway"},
  {"command": "modifyClient", "username": "$GATEWAY_USER", "password": "$MQTT_GATEWAY_PASSWORD",
   "roles": [{"rolename": "ioc-gateway"}]},
  {"command": "enableClient", "username": "$GATEWAY_USER"},
  {"command": "createRole", "rolename": "ioc-simulator", "textname": "simulated city"},
  {"command": "modifyRole", "rolename": "ioc-simulator", "acls": [
    {"acltype": "publishClientSend", "topic": "ioc/v1/$SIMULATOR_CITY/#", "priority": 0, "allow": true}
  ]},
  {"command": "createClient", "username": "$SIMULATOR_USER", "textname": "city simulator"},
  {"command": "modifyClient", "username": "$SIMULATOR_USER", "password": "$MQTT_SIMULATOR_PASSWORD",
   "roles": [{"rolename": "ioc-simulator"}]},
  {"command": "enableClient", "username": "$SIMULATOR_USER"}
]}
EOF
)
answer=$(rr "$request") || abort "the dynamic-security plugin did not answer"
refused=$(printf '%s' "$answer" | sed -e 's/"error":"Role already exists"//g' \
    -e 's/"error":"Client already exists"//g')
case $refused in
    *'"error"'*) abort "the dynamic-security plugin refused the service accounts: $answer" ;;
esac

kill "$provisioner"
wait "$provisioner" || true
rm -rf "$work"
echo "mosquitto entrypoint: $GATEWAY_USER may read ioc/v1/#, $SIMULATOR_USER may publish under ioc/v1/$SIMULATOR_CITY/"
exec mosquitto -c "$CONF"
