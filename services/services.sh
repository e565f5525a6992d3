#!/usr/bin/env bash
# Local backing services for development and tests: an MQTT broker
# (mosquitto), a single-node Kafka, a TimescaleDB server with the community
# licence, and for the tests of the other storage tiers an Apache-licence
# TimescaleDB server and a plain PostgreSQL server, all bound to 127.0.0.1 and
# run without Docker or systemd.
#
# TimescaleDB's community tier (continuous aggregates, compression, policies)
# is not in Debian's package, so it is built once from TimescaleDB's source
# tarball: $IOC_TIMESCALEDB_SOURCE, else ../shared/vendor/ beside the
# repository (checked against its sha256). Without one, Debian's Apache build
# serves, with a warning.
#
#   services.sh up       start whatever is not running yet, then print settings
#   services.sh down     stop the services this script started
#   services.sh stop S   stop one of them (mqtt, kafka, timescaledb, apache, postgres)
#   services.sh status   show whether each service is up
#   services.sh env      print the settings only
#   services.sh kafka-libs  fetch the Kafka jars if needed and print their
#                        directory (the three-node test cluster runs from it)
#
# Everything downloaded or generated lives under $IOC_SERVICES_HOME
# (default ~/.cache/ioc-services), never inside the source tree, and is reused
# on the next run. Progress goes to stderr; stdout carries only the settings,
# so `eval "$(services.sh up)"` works.
set -Eeuo pipefail

SERVICES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${IOC_SERVICES_HOME:-$HOME/.cache/ioc-services}
LOG_DIR=$CACHE/logs
RUN_DIR=$CACHE/run
WAIT_SECONDS=${IOC_SERVICES_WAIT_SECONDS:-90}

MQTT_PORT=1883
KAFKA_PORT=9092
PG_PORT=5432

MOSQ_DIR=$CACHE/mosquitto
MOSQ_CONF=$MOSQ_DIR/mosquitto.conf
MOSQ_PID=$RUN_DIR/mosquitto.pid
MOSQ_LOG=$LOG_DIR/mosquitto.log

KAFKA_DIR=$CACHE/kafka
KAFKA_LIBS=$KAFKA_DIR/libs
KAFKA_CONF=$KAFKA_DIR/server.properties
KAFKA_LOG4J=$KAFKA_DIR/log4j.properties
KAFKA_CLUSTER_ID_FILE=$KAFKA_DIR/cluster.id
KAFKA_PID=$RUN_DIR/kafka.pid
KAFKA_LOG_DIR=$LOG_DIR/kafka
KAFKA_LOG=$KAFKA_LOG_DIR/server.log
KAFKA_OUT=$KAFKA_LOG_DIR/kafka.out

# TimescaleDB is not packaged for bookworm, so PostgreSQL runs from a Debian
# trixie root filesystem via chroot. Paths below marked "in root" are as seen
# from inside that filesystem.
PG_MAJOR=17
PG_SUITE=trixie
PG_MIRROR=${IOC_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PG_ROOTFS=$CACHE/timescaledb/rootfs
PG_ROOTFS_STAMP=$CACHE/timescaledb/rootfs.complete
PG_BIN=/usr/lib/postgresql/$PG_MAJOR/bin        # in root
PG_DATA=/var/lib/ioc-pg                          # in root
PG_LOG_IN_ROOT=/var/log/ioc-pg/postgresql.log    # in root
PG_INIT_STAMP=$PG_ROOTFS/var/lib/ioc-pg.initialized
PG_LOG=$LOG_DIR/timescaledb.log                  # symlink into the root
PG_DB=ioc

# The source release built for the community tier, and where its tarball is
# looked for when IOC_TIMESCALEDB_SOURCE names none.
TSDB_VERSION=2.29.2
TSDB_SHA256=0f987b8c6a0ef996502b779d9c75ff38cc5057e11c7d3a2e3e4748e3607c0589
TSDB_TARBALL=timescaledb-$TSDB_VERSION.tar.gz
TSDB_BESIDE=$SERVICES_DIR/../../shared/vendor/$TSDB_TARBALL
TSDB_CACHED=$CACHE/timescaledb/$TSDB_TARBALL
TSDB_SRC=/usr/src/ioc-timescaledb                    # in root
# Holds "<sha256> <version>" of the source built into the root.
TSDB_BUILT=$PG_ROOTFS/var/lib/ioc-timescaledb.built

# Apache-licence TimescaleDB: the same binaries with the licence set to
# apache, its own data directory, for the tests of that tier.
APACHE_PORT=5434
APACHE_DATA=/var/lib/ioc-pg-apache                          # in root
APACHE_LOG_IN_ROOT=/var/log/ioc-pg-apache/postgresql.log    # in root
APACHE_INIT_STAMP=$PG_ROOTFS/var/lib/ioc-pg-apache.initialized
APACHE_LOG=$LOG_DIR/timescaledb-apache.log                  # symlink into the root

# Plain PostgreSQL: the same root's binaries, its own data directory, no
# TimescaleDB preloaded.
PLAIN_PORT=5433
PLAIN_DATA=/var/lib/ioc-pg-plain                          # in root
PLAIN_LOG_IN_ROOT=/var/log/ioc-pg-plain/postgresql.log    # in root
PLAIN_INIT_STAMP=$PG_ROOTFS/var/lib/ioc-pg-plain.initialized
PLAIN_LOG=$LOG_DIR/postgres.log                           # symlink into the root

say() { printf 'services: %s\n' "$*" >&2; }
fail() {
    printf 'services: FAILED: %s\n' "$*" >&2
    exit 1
}
trap 'fail "unexpected error running \"$BASH_COMMAND\" (services.sh line $LINENO)"' ERR

print_env() {
    echo "export IOC_MQTT_URL=mqtt://127.0.0.1:$MQTT_PORT"
    echo "export IOC_KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT"
    echo "export IOC_DATABASE_URL=postgresql://postgres@127.0.0.1:$PG_PORT/$PG_DB"
    echo "export IOC_TEST_APACHE_POSTGRES_URL=postgresql://postgres@127.0.0.1:$APACHE_PORT"
    echo "export IOC_TEST_PLAIN_POSTGRES_URL=postgresql://postgres@127.0.0.1:$PLAIN_PORT"
}

# ---------------------------------------------------------------- helpers

port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# Prints the pid stored in <pidfile> if that process is alive and its command
# line contains <marker>; a pid file left over from before a reboot can name
# an unrelated process that happens to reuse the number.
live_pid() {
    local file=$1 marker=$2 pid=
    [[ -r $file ]] || return 1
    read -r pid <"$file" || [[ -n $pid ]] || return 1
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$marker" || return 1
    echo "$pid"
}

# wait_until <service> <log> <liveness check> <readiness check...>
wait_until() {
    local what=$1 log=$2 alive=$3
    shift 3
    local deadline=$((SECONDS + WAIT_SECONDS))
    until "$@"; do
        "$alive" || fail "$what exited during startup (log: $log)"
        ((SECONDS < deadline)) || fail "$what not ready after ${WAIT_SECONDS}s (log: $log)"
        sleep 0.5
    done
}

# stop_pid <service> <pid> <seconds>: SIGTERM lets each server flush its
# state (mosquitto's snapshot, Kafka's clean-shutdown marker); SIGKILL is the
# last resort.
stop_pid() {
    local what=$1 pid=$2 grace=$3
    kill -TERM "$pid" 2>/dev/null || return 0
    local deadline=$((SECONDS + grace))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            say "$what: still running after ${grace}s, killing pid $pid"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.5
    done
}

need_root() {
    [[ $EUID -eq 0 ]] || fail "$1 needs root (run: sudo bash $0 ${COMMAND:-up})"
}

apt_install() {
    local log=$LOG_DIR/apt.log
    need_root "installing $*"
    say "installing $* with apt-get (log: $log)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >>"$log" 2>&1; then
        # Usually stale or missing package lists on a fresh machine.
        say "apt-get install failed, refreshing package lists and retrying"
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"; } >>"$log" 2>&1 ||
            fail "apt-get install $* failed (log: $log)"
    fi
}

# render <template> <destination> KEY=value...: fills in @KEY@ placeholders.
render() {
    local src=$1 dst=$2 kv value expr=()
    shift 2
    for kv in "$@"; do
        value=${kv#*=}
        value=${value//\\/\\\\}
        value=${value//&/\\&}
        value=${value//|/\\|}
        expr+=(-e "s|@${kv%%=*}@|${value}|g")
    done
    sed "${expr[@]}" "$src" >"$dst.tmp"
    mv "$dst.tmp" "$dst"
}

# ---------------------------------------------------------------- mosquitto

mosquitto_bin() {
    command -v mosquitto || { [[ -x /usr/sbin/mosquitto ]] && echo /usr/sbin/mosquitto; }
}

mqtt_pid() { live_pid "$MOSQ_PID" "$MOSQ_CONF"; }
# The daemonised broker writes its pid file a moment after `mosquitto -d`
# returns; until then there is nothing to check.
mqtt_alive() { [[ ! -s $MOSQ_PID ]] || mqtt_pid >/dev/null; }
mqtt_ready() { [[ -s $MOSQ_PID ]] && port_open "$MQTT_PORT"; }

mqtt_install() {
    apt_install mosquitto mosquitto-clients
    # On a machine with systemd the package starts its own broker on port
    # 1883 with the default (lossy) queue limits; ours must own that port.
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
        systemctl disable --now mosquitto >>"$LOG_DIR/apt.log" 2>&1 || true
    fi
}

mqtt_up() {
    local pid bin
    if pid=$(mqtt_pid); then
        say "mqtt: mosquitto already running (pid $pid), reusing it"
        return
    fi
    if port_open "$MQTT_PORT"; then
        say "mqtt: reusing the broker already listening on 127.0.0.1:$MQTT_PORT (not started by this script; its queue limits may be mosquitto's lossy defaults)"
        return
    fi
    bin=$(mosquitto_bin) || { mqtt_install && bin=$(mosquitto_bin); } ||
        fail "mqtt: no mosquitto binary after installing it (log: $LOG_DIR/apt.log)"
    mkdir -p "$MOSQ_DIR/data" "$RUN_DIR" "$LOG_DIR"
    render "$SERVICES_DIR/mosquitto/mosquitto.conf" "$MOSQ_CONF" \
        PID_FILE="$MOSQ_PID" DATA_DIR="$MOSQ_DIR/data" LOG_FILE="$MOSQ_LOG"
    rm -f "$MOSQ_PID"
    say "mqtt: starting mosquitto on 127.0.0.1:$MQTT_PORT (log: $MOSQ_LOG)"
    # Configuration errors are reported on stderr before the log file is
    # opened; mosquitto appends, so both end up in the same file.
    "$bin" -c "$MOSQ_CONF" -d >>"$MOSQ_LOG" 2>&1 9>&- ||
        fail "mqtt: mosquitto failed to start (log: $MOSQ_LOG)"
    wait_until "mqtt: mosquitto" "$MOSQ_LOG" mqtt_alive mqtt_ready
    say "mqtt: ready"
}

mqtt_down() {
    local pid
    if pid=$(mqtt_pid); then
        say "mqtt: stopping mosquitto (pid $pid)"
        stop_pid "mqtt: mosquitto" "$pid" 30
        rm -f "$MOSQ_PID"
    elif port_open "$MQTT_PORT"; then
        say "mqtt: the broker on port $MQTT_PORT was not started by this script, leaving it alone"
    else
        say "mqtt: not running"
    fi
}

# ---------------------------------------------------------------- kafka

kafka_pid() { live_pid "$KAFKA_PID" "$KAFKA_CONF"; }

# During startup the pid just written is our own child, and until it has
# exec'd java its command line is still this shell's (or empty mid-exec): a
# command-line check there reads a broker that is starting as one that exited.
KAFKA_STARTED_PID=
kafka_starting() {
    local state=
    [[ -r /proc/$KAFKA_STARTED_PID/status ]] || return 1
    state=$(awk '/^State:/ { print $2 }' "/proc/$KAFKA_STARTED_PID/status" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

KAFKA_LOG_OFFSET=0
kafka_ready() {
    port_open "$KAFKA_PORT" || return 1
    local size
    size=$(stat -c %s "$KAFKA_LOG" 2>/dev/null) || return 1
    # The log rolled over during startup: search the new file from the top.
    ((size >= KAFKA_LOG_OFFSET)) || KAFKA_LOG_OFFSET=0
    # Not `tail | grep -q`: under pipefail, grep leaving at the first match kills tail with SIGPIPE
    # whenever more than a pipe's worth of log follows the line, and the broker never looks ready.
    grep -q 'Kafka Server started' < <(tail -c "+$((KAFKA_LOG_OFFSET + 1))" "$KAFKA_LOG")
}

# The heap is capped well below Kafka's 1 GiB default: a test broker holds
# little, and the machine also runs PostgreSQL and the test suite. A broker
# out of heap exits rather than limping on.
KAFKA_JVM=(-Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
    -Dkafka.logs.dir="$KAFKA_LOG_DIR" -Dlog4j.configuration="file:$KAFKA_LOG4J"
    -cp "$KAFKA_LIBS/*")
kafka_java() { java "${KAFKA_JVM[@]}" "$@"; }

kafka_toolchain() {
    if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
        apt_install default-jre-headless maven
    fi
}

# Jars are resolved once per version of pom.xml; the copy is swapped in only
# when Maven finished, so an interrupted download is simply redone.
kafka_libs() {
    local pom=$SERVICES_DIR/kafka/pom.xml log=$KAFKA_LOG_DIR/maven.log want have=
    want=$(sha256sum <"$pom")
    want=${want%% *}
    [[ -r $KAFKA_LIBS/.pom.sha256 ]] && read -r have <"$KAFKA_LIBS/.pom.sha256"
    [[ $have == "$want" ]] && return
    kafka_toolchain
    say "kafka: fetching Kafka jars from Maven Central (log: $log)"
    rm -rf "$KAFKA_LIBS.tmp"
    mvn -B -f "$pom" -Dmaven.repo.local="$KAFKA_DIR/m2" \
        dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$KAFKA_LIBS.tmp" >"$log" 2>&1 ||
        fail "kafka: resolving jars with Maven failed (log: $log)"
    echo "$want" >"$KAFKA_LIBS.tmp/.pom.sha256"
    rm -rf "$KAFKA_LIBS"
    mv "$KAFKA_LIBS.tmp" "$KAFKA_LIBS"
}

# KRaft refuses to start on an unformatted log directory. The cluster id is
# kept next to the data so a re-format (after deleting data/) keeps it.
kafka_format() {
    local log=$KAFKA_LOG_DIR/format.log id
    [[ -f $KAFKA_DIR/data/meta.properties ]] && return
    if [[ ! -s $KAFKA_CLUSTER_ID_FILE ]]; then
        kafka_java kafka.tools.StorageTool random-uuid >"$KAFKA_CLUSTER_ID_FILE.tmp" 2>"$log" ||
            fail "kafka: generating a cluster id failed (log: $log)"
        mv "$KAFKA_CLUSTER_ID_FILE.tmp" "$KAFKA_CLUSTER_ID_FILE"
    fi
    read -r id <"$KAFKA_CLUSTER_ID_FILE"
    say "kafka: formatting storage for cluster $id"
    kafka_java kafka.tools.StorageTool format --ignore-formatted \
        -t "$id" -c "$KAFKA_CONF" >"$log" 2>&1 ||
        fail "kafka: formatting the storage directory failed (log: $log)"
}

kafka_up() {
    local pid
    if pid=$(kafka_pid); then
        say "kafka: broker already running (pid $pid), reusing it"
        return
    fi
    if port_open "$KAFKA_PORT"; then
        say "kafka: reusing the broker already listening on 127.0.0.1:$KAFKA_PORT (not started by this script)"
        return
    fi
    mkdir -p "$KAFKA_DIR/data" "$KAFKA_LOG_DIR" "$RUN_DIR"
    kafka_libs
    command -v java >/dev/null || kafka_toolchain
    render "$SERVICES_DIR/kafka/server.properties" "$KAFKA_CONF" LOG_DIRS="$KAFKA_DIR/data"
    cp "$SERVICES_DIR/kafka/log4j.properties" "$KAFKA_LOG4J"
    kafka_format
    KAFKA_LOG_OFFSET=$(stat -c %s "$KAFKA_LOG" 2>/dev/null || echo 0)
    say "kafka: starting the broker on 127.0.0.1:$KAFKA_PORT (log: $KAFKA_LOG)"
    # setsid + nohup: the broker must outlive the terminal that ran `make`.
    # Both exec in place, so $! is the JVM's own pid.
    setsid nohup java "${KAFKA_JVM[@]}" kafka.Kafka "$KAFKA_CONF" \
        </dev/null >"$KAFKA_OUT" 2>&1 9>&- &
    KAFKA_STARTED_PID=$!
    echo "$KAFKA_STARTED_PID" >"$KAFKA_PID"
    wait_until "kafka: broker" "$KAFKA_LOG and $KAFKA_OUT" kafka_starting kafka_ready
    say "kafka: ready"
}

kafka_down() {
    local pid
    if pid=$(kafka_pid); then
        say "kafka: stopping the broker (pid $pid)"
        stop_pid "kafka: broker" "$pid" 60
        rm -f "$KAFKA_PID"
    elif port_open "$KAFKA_PORT"; then
        say "kafka: the broker on port $KAFKA_PORT was not started by this script, leaving it alone"
    else
        say "kafka: not running"
    fi
}

# ---------------------------------------------------------------- timescaledb

# A clean environment inside the root: the caller's locale, HOME or
# PG* variables must not leak in. Proxy settings are kept so apt works.
root_env() {
    local v
    ROOT_ENV=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 LC_ALL=C.UTF-8)
    for v in http_proxy https_proxy HTTP_PROXY HTTPS_PROXY no_proxy NO_PROXY; do
        [[ -n ${!v:-} ]] && ROOT_ENV+=("$v=${!v}")
    done
    return 0
}

# Absolute path: the clean environment's PATH describes the root, not the host.
chroot_bin() {
    command -v chroot || echo /usr/sbin/chroot
}

in_root() {
    root_env
    "${ROOT_ENV[@]}" HOME=/root DEBIAN_FRONTEND=noninteractive "$(chroot_bin)" "$PG_ROOTFS" "$@"
}

# Numeric ids: user names are resolved against the host's passwd otherwise,
# and the host has no postgres user (or a different one).
pg_ids() {
    awk -F: '$1 == "postgres" { print $3 ":" $4; found = 1 } END { exit !found }' \
        "$PG_ROOTFS/etc/passwd"
}

as_postgres() {
    local ids
    ids=$(pg_ids) || fail "timescaledb: no postgres user in $PG_ROOTFS (delete $PG_ROOTFS_STAMP to rebuild)"
    root_env
    "${ROOT_ENV[@]}" HOME=/var/lib/postgresql PATH="$PG_BIN:/usr/bin:/bin" \
        "$(chroot_bin)" --userspec="$ids" "$PG_ROOTFS" "$@"
}

pg_psql() {
    as_postgres psql -X -q -w -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"
}

# Leftovers from an interrupted debootstrap (it mounts /proc and /sys, and
# may bind /dev) must be unmounted before the tree is deleted.
unmount_under() {
    local root m
    root=$(realpath -m "$1")
    awk -v r="$root/" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r m; do umount -l "$(printf '%b' "$m")" || true; done
}

pg_rootfs() {
    [[ -f $PG_ROOTFS_STAMP ]] && return
    local log=$LOG_DIR/timescaledb-rootfs.log
    need_root "building the TimescaleDB root filesystem"
    command -v debootstrap >/dev/null || apt_install debootstrap
    mkdir -p "$LOG_DIR"
    : >"$log"
    if [[ -e $PG_ROOTFS ]]; then
        say "timescaledb: removing an incomplete root filesystem from an earlier run"
        unmount_under "$PG_ROOTFS"
        rm -rf --one-file-system "$PG_ROOTFS"
    fi
    mkdir -p "$PG_ROOTFS"
    say "timescaledb: bootstrapping a Debian $PG_SUITE root filesystem, takes a minute or more (log: $log)"
    debootstrap --variant=minbase "$PG_SUITE" "$PG_ROOTFS" "$PG_MIRROR" >>"$log" 2>&1 ||
        fail "timescaledb: debootstrap $PG_SUITE failed (log: $log)"

    # Package scripts must not try to start anything inside the root, and the
    # stock "main" cluster would only cost time and disk: ours is created
    # separately with our own settings.
    printf '#!/bin/sh\nexit 101\n' >"$PG_ROOTFS/usr/sbin/policy-rc.d"
    chmod 755 "$PG_ROOTFS/usr/sbin/policy-rc.d"
    mkdir -p "$PG_ROOTFS/etc/postgresql-common/createcluster.d"
    echo 'create_main_cluster = false' >"$PG_ROOTFS/etc/postgresql-common/createcluster.d/no-main-cluster.conf"

    say "timescaledb: installing postgresql-$PG_MAJOR and TimescaleDB into it (log: $log)"
    {
        in_root apt-get update -q &&
            in_root apt-get install -y -q --no-install-recommends \
                "postgresql-$PG_MAJOR" "postgresql-$PG_MAJOR-timescaledb" &&
            in_root apt-get clean
    } >>"$log" 2>&1 ||
        fail "timescaledb: installing postgresql-$PG_MAJOR-timescaledb in the root filesystem failed (log: $log)"
    touch "$PG_ROOTFS_STAMP"
}

# PostGIS, for areas on the map (ioc_core.areas): Debian's build, in the same root, so every
# server there (community, Apache-licence and plain) offers it. Installed once; the servers need
# no restart, as an extension's files are read when a database creates it.
pg_postgis() {
    # postgis.control links through the root's /etc/alternatives, which the host cannot follow.
    [[ -f $PG_ROOTFS/usr/share/postgresql/$PG_MAJOR/extension/postgis-3.control ]] && return
    local log=$LOG_DIR/timescaledb-postgis.log
    mkdir -p "$LOG_DIR"
    say "timescaledb: installing PostGIS into the root filesystem (log: $log)"
    {
        in_root apt-get update -q &&
            in_root apt-get install -y -q --no-install-recommends "postgresql-$PG_MAJOR-postgis-3" &&
            in_root apt-get clean
    } >"$log" 2>&1 ||
        fail "timescaledb: installing postgresql-$PG_MAJOR-postgis-3 in the root filesystem failed (log: $log)"
}

# cluster_init NAME DATA LOG_IN_ROOT STAMP: one PostgreSQL cluster in the root
# filesystem (the TimescaleDB one and the plain one differ only in these).
cluster_init() {
    local name=$1 data=$2 log_in_root=$3 stamp=$4 log ids
    [[ -f $stamp ]] && return
    log=$LOG_DIR/$name-initdb.log
    ids=$(pg_ids) || fail "$name: no postgres user in $PG_ROOTFS (delete $PG_ROOTFS_STAMP to rebuild)"
    rm -rf "${PG_ROOTFS:?}$data"
    mkdir -p "$PG_ROOTFS$data" "$(dirname "$PG_ROOTFS$log_in_root")"
    chown "$ids" "$PG_ROOTFS$data" "$(dirname "$PG_ROOTFS$log_in_root")"
    chmod 700 "$PG_ROOTFS$data"
    say "$name: creating the database cluster (log: $log)"
    # Trust authentication: the server listens on loopback only and holds
    # throwaway test data, so a password would only get in the way.
    as_postgres initdb -D "$data" --username=postgres --auth=trust \
        --encoding=UTF8 --locale=C.UTF-8 --data-checksums >"$log" 2>&1 ||
        fail "$name: initdb failed (log: $log)"
    echo "include 'ioc.conf'" >>"$PG_ROOTFS$data/postgresql.conf"
    touch "$stamp"
}

pg_init() { cluster_init timescaledb "$PG_DATA" "$PG_LOG_IN_ROOT" "$PG_INIT_STAMP"; }

# cluster_pid DATA: the pid of the server of that data directory in our root.
cluster_pid() {
    local data=$1 pid root
    [[ -d $PG_ROOTFS ]] || return 1
    # The trailing space keeps one data directory from matching another that extends its name.
    pid=$(live_pid "$PG_ROOTFS$data/postmaster.pid" "-D $data ") || return 1
    # Another cache directory could run a server with the same data path.
    root=$(readlink "/proc/$pid/root") || return 1
    [[ $root == "$(realpath "$PG_ROOTFS")" ]] || return 1
    echo "$pid"
}

pg_pid() { cluster_pid "$PG_DATA"; }

# pg_ensure_db ours|foreign: creates the application database if missing and
# checks that TimescaleDB is installed. On a server this script did not start
# (other credentials, other setup) problems are reported but not fatal.
pg_ensure_db() {
    local mode=$1 log=$LOG_DIR/timescaledb-client.log exists version license psql
    problem() {
        [[ $mode == ours ]] && fail "timescaledb: $1 (log: $log)"
        say "timescaledb: warning: $1 on the existing server (log: $log)"
    }
    if [[ -f $PG_ROOTFS_STAMP && $EUID -eq 0 ]]; then
        psql=(pg_psql)
    elif command -v psql >/dev/null; then
        psql=(psql -X -q -w -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres)
    else
        say "timescaledb: no psql client here, database $PG_DB not checked"
        return 0
    fi
    if ! exists=$("${psql[@]}" -d postgres -tA -c "select 1 from pg_database where datname = '$PG_DB'" 2>>"$log"); then
        problem "cannot query the server as user postgres"
        return 0
    fi
    if [[ $exists != 1 ]]; then
        say "timescaledb: creating database $PG_DB"
        "${psql[@]}" -d postgres -c "create database $PG_DB" 2>>"$log" || {
            problem "creating database $PG_DB failed"
            return 0
        }
    fi
    version=$("${psql[@]}" -d "$PG_DB" -tA -c "select default_version from pg_available_extensions where name = 'timescaledb'" 2>>"$log") || version=
    if [[ -z $version ]]; then
        problem "the timescaledb extension is not installed"
        return 0
    fi
    if [[ $mode == foreign ]]; then
        say "timescaledb: database $PG_DB present (TimescaleDB $version available)"
        return 0
    fi
    # timescaledb.license only exists once the extension is loaded in some
    # database; which module is installed says the same thing up front.
    # Debian builds only the Apache-2 part: no compression, continuous
    # aggregates or policy jobs (those are in the Timescale-licensed module).
    if [[ -e $PG_ROOTFS/usr/lib/postgresql/$PG_MAJOR/lib/timescaledb-tsl-$version.so ]]; then
        license=timescale
    else
        license=apache
    fi
    say "timescaledb: ready, database $PG_DB (TimescaleDB $version available, license $license)"
}

pg_up() {
    local pid log=$LOG_DIR/timescaledb-ctl.log source=
    if [[ $EUID -eq 0 && -f $PG_ROOTFS_STAMP ]]; then
        source=$(tsdb_source) || exit 1
        pg_postgis
    fi
    if pid=$(pg_pid); then
        if [[ -z $source ]] || tsdb_built "$source"; then
            say "timescaledb: server already running (pid $pid), reusing it"
            pg_ensure_db ours
            return
        fi
        # The build replaces the libraries the running servers loaded.
        pg_down
        apache_down
    fi
    if port_open "$PG_PORT"; then
        say "timescaledb: reusing the server already listening on 127.0.0.1:$PG_PORT (not started by this script)"
        pg_ensure_db foreign
        return
    fi
    # chroot, and the files owned by the root's postgres user, need root.
    need_root "starting PostgreSQL in its chroot"
    mkdir -p "$LOG_DIR"
    pg_rootfs
    pg_postgis
    [[ -n $source ]] || source=$(tsdb_source) || exit 1
    tsdb_build "$source"
    pg_init
    cp "$SERVICES_DIR/timescaledb/postgresql.conf" "$PG_ROOTFS$PG_DATA/ioc.conf"
    chown "$(pg_ids)" "$PG_ROOTFS$PG_DATA/ioc.conf"
    ln -sfn "$PG_ROOTFS$PG_LOG_IN_ROOT" "$PG_LOG"
    say "timescaledb: starting PostgreSQL $PG_MAJOR on 127.0.0.1:$PG_PORT (log: $PG_LOG)"
    as_postgres pg_ctl -D "$PG_DATA" -l "$PG_LOG_IN_ROOT" -w -t "$WAIT_SECONDS" start >"$log" 2>&1 9>&- ||
        fail "timescaledb: PostgreSQL did not start within ${WAIT_SECONDS}s (log: $PG_LOG)"
    pg_ensure_db ours
    tsdb_update_databases "$PG_PORT"
}

# ---------------------------------------------------------------- timescaledb from source

# Prints the source tarball to build ("" when there is none, which is not an
# error: Debian's Apache build serves then). A tarball named but missing or
# not what its checksum says is an error.
tsdb_source() {
    local sum
    if [[ -n ${IOC_TIMESCALEDB_SOURCE:-} ]]; then
        [[ -f $IOC_TIMESCALEDB_SOURCE ]] ||
            fail "timescaledb: IOC_TIMESCALEDB_SOURCE names $IOC_TIMESCALEDB_SOURCE, which does not exist"
        echo "$IOC_TIMESCALEDB_SOURCE"
        return
    fi
    if [[ -f $TSDB_CACHED ]]; then
        sum=$(sha256sum "$TSDB_CACHED") && sum=${sum%% *}
        if [[ $sum == "$TSDB_SHA256" ]]; then
            echo "$TSDB_CACHED"
            return
        fi
        say "timescaledb: removing the cached $TSDB_TARBALL, whose checksum is wrong"
        rm -f "$TSDB_CACHED"
    fi
    [[ -f $TSDB_BESIDE ]] || return 0
    sum=$(sha256sum "$TSDB_BESIDE") && sum=${sum%% *}
    [[ $sum == "$TSDB_SHA256" ]] ||
        fail "timescaledb: $TSDB_BESIDE has sha256 $sum, not $TSDB_SHA256 (TimescaleDB $TSDB_VERSION's)"
    # Kept in the cache, so a clone elsewhere (CI's) still finds it.
    mkdir -p "$(dirname "$TSDB_CACHED")"
    cp "$TSDB_BESIDE" "$TSDB_CACHED.tmp" && mv "$TSDB_CACHED.tmp" "$TSDB_CACHED"
    echo "$TSDB_CACHED"
}

# tsdb_build_id TARBALL: what a build is made of, the tarball and the
# patches applied to it (services/timescaledb/patches/, each says why).
tsdb_build_id() {
    local id
    id=$({ sha256sum "$1" | cut -d' ' -f1; cat "$SERVICES_DIR"/timescaledb/patches/*.patch 2>/dev/null; } | sha256sum) &&
        echo "${id%% *}"
}

# tsdb_built TARBALL: whether that tarball's build is what the root has.
tsdb_built() {
    local id
    [[ -f $TSDB_BUILT ]] || return 1
    id=$(tsdb_build_id "$1")
    [[ $(cut -d' ' -f1 "$TSDB_BUILT") == "$id" ]]
}

# tsdb_build TARBALL: builds and installs TimescaleDB with its community
# (Timescale-licence) module into the root, once per tarball.
tsdb_build() {
    local tarball=$1 log=$LOG_DIR/timescaledb-build.log id version patch
    if [[ -z $tarball ]]; then
        if [[ -f $TSDB_BUILT ]]; then
            say "timescaledb: no source tarball, reusing the TimescaleDB built earlier ($(cut -d' ' -f2 "$TSDB_BUILT"))"
        else
            say "timescaledb: warning: no TimescaleDB source (set IOC_TIMESCALEDB_SOURCE to $TSDB_TARBALL), so Debian's Apache-licence build serves: no continuous aggregates, compression or retention policies"
        fi
        return 0
    fi
    tsdb_built "$tarball" && return 0
    id=$(tsdb_build_id "$tarball")
    : >"$log"
    say "timescaledb: building TimescaleDB from $(basename "$tarball") with its community module, once; takes a few minutes (log: $log)"
    {
        in_root apt-get update -q &&
            in_root apt-get install -y -q --no-install-recommends cmake gcc make \
                "postgresql-server-dev-$PG_MAJOR" libssl-dev libkrb5-dev libicu-dev &&
            in_root apt-get clean
    } >>"$log" 2>&1 || fail "timescaledb: installing the build tools in the root filesystem failed (log: $log)"
    rm -rf "${PG_ROOTFS:?}$TSDB_SRC"
    mkdir -p "$PG_ROOTFS$TSDB_SRC"
    tar -xzf "$tarball" -C "$PG_ROOTFS$TSDB_SRC" --strip-components=1 >>"$log" 2>&1 ||
        fail "timescaledb: cannot unpack $tarball (log: $log)"
    version=$(awk '$1 == "version" { print $3 }' "$PG_ROOTFS$TSDB_SRC/version.config")
    [[ -n $version ]] || fail "timescaledb: $tarball has no version.config; is it TimescaleDB's source? (log: $log)"
    command -v patch >/dev/null || apt_install patch
    for patch in "$SERVICES_DIR"/timescaledb/patches/*.patch; do
        [[ -e $patch ]] || continue
        patch -d "$PG_ROOTFS$TSDB_SRC" -p1 --forward <"$patch" >>"$log" 2>&1 ||
            fail "timescaledb: $(basename "$patch") does not apply to TimescaleDB $version (log: $log)"
    done
    in_root bash -c "cd $TSDB_SRC && ./bootstrap -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF \
        -DWARNINGS_AS_ERRORS=OFF -DCMAKE_BUILD_TYPE=Release -DPG_CONFIG=$PG_BIN/pg_config &&
        make -C build -j$(nproc) && make -C build install" >>"$log" 2>&1 ||
        fail "timescaledb: building TimescaleDB $version failed (log: $log)"
    [[ -e $PG_ROOTFS/usr/lib/postgresql/$PG_MAJOR/lib/timescaledb-tsl-$version.so ]] ||
        fail "timescaledb: the build of $version installed no community module (log: $log)"
    rm -rf "${PG_ROOTFS:?}$TSDB_SRC"
    echo "$id $version" >"$TSDB_BUILT"
    say "timescaledb: TimescaleDB $version built and installed"
}

# tsdb_update_databases PORT: brings every database's TimescaleDB to the
# version installed (a new build leaves existing databases on the old one,
# whose library may lack the community module). Each ALTER must be the first
# statement of its session.
tsdb_update_databases() {
    local port=$1 log=$LOG_DIR/timescaledb-client.log db
    [[ -f $TSDB_BUILT ]] || return 0
    local psql=(as_postgres psql -X -q -w -h 127.0.0.1 -p "$port" -U postgres)
    "${psql[@]}" -d postgres -tA -c "select datname from pg_database where datallowconn" 2>>"$log" |
        while read -r db; do
            if [[ $("${psql[@]}" -d "$db" -tA -c "select installed_version <> default_version from pg_available_extensions where name = 'timescaledb'" 2>>"$log") == t ]]; then
                say "timescaledb: updating TimescaleDB in database $db on port $port"
                "${psql[@]}" -d "$db" -c "ALTER EXTENSION timescaledb UPDATE" >>"$log" 2>&1 ||
                    say "timescaledb: warning: updating TimescaleDB in database $db failed (log: $log)"
            fi
        done
}

# ---------------------------------------------------------------- timescaledb, Apache licence

apache_init() { cluster_init timescaledb-apache "$APACHE_DATA" "$APACHE_LOG_IN_ROOT" "$APACHE_INIT_STAMP"; }

apache_pid() { cluster_pid "$APACHE_DATA"; }

apache_up() {
    local pid log=$LOG_DIR/timescaledb-apache-ctl.log
    if pid=$(apache_pid); then
        say "timescaledb-apache: server already running (pid $pid), reusing it"
        return
    fi
    if port_open "$APACHE_PORT"; then
        say "timescaledb-apache: reusing the server already listening on 127.0.0.1:$APACHE_PORT (not started by this script)"
        return
    fi
    need_root "starting the Apache-licence TimescaleDB in its chroot"
    mkdir -p "$LOG_DIR"
    pg_rootfs
    apache_init
    # The community server's settings, on another port and with the licence that
    # leaves the community module unloaded.
    {
        cat "$SERVICES_DIR/timescaledb/postgresql.conf"
        cat <<EOF

# The Apache-licence server (written by services.sh; later settings win).
port = $APACHE_PORT
timescaledb.license = 'apache'
max_connections = 50
shared_buffers = 64MB
EOF
    } >"$PG_ROOTFS$APACHE_DATA/ioc.conf"
    chown "$(pg_ids)" "$PG_ROOTFS$APACHE_DATA/ioc.conf"
    ln -sfn "$PG_ROOTFS$APACHE_LOG_IN_ROOT" "$APACHE_LOG"
    say "timescaledb-apache: starting TimescaleDB with the Apache licence on 127.0.0.1:$APACHE_PORT (log: $APACHE_LOG)"
    as_postgres pg_ctl -D "$APACHE_DATA" -l "$APACHE_LOG_IN_ROOT" -w -t "$WAIT_SECONDS" start >"$log" 2>&1 9>&- ||
        fail "timescaledb-apache: PostgreSQL did not start within ${WAIT_SECONDS}s (log: $APACHE_LOG)"
    tsdb_update_databases "$APACHE_PORT"
    say "timescaledb-apache: ready"
}

apache_down() {
    local pid log=$LOG_DIR/timescaledb-apache-ctl.log
    if pid=$(apache_pid); then
        say "timescaledb-apache: stopping PostgreSQL (pid $pid)"
        as_postgres pg_ctl -D "$APACHE_DATA" -m fast -w -t 60 stop >"$log" 2>&1 ||
            fail "timescaledb-apache: PostgreSQL did not stop (log: $log)"
    elif port_open "$APACHE_PORT"; then
        say "timescaledb-apache: the server on port $APACHE_PORT was not started by this script, leaving it alone"
    else
        say "timescaledb-apache: not running"
    fi
}

pg_down() {
    local pid log=$LOG_DIR/timescaledb-ctl.log
    if pid=$(pg_pid); then
        say "timescaledb: stopping PostgreSQL (pid $pid)"
        # "fast" rolls back open transactions and disconnects clients, then
        # checkpoints; "smart" would wait for idle test connections forever.
        as_postgres pg_ctl -D "$PG_DATA" -m fast -w -t 60 stop >"$log" 2>&1 ||
            fail "timescaledb: PostgreSQL did not stop (log: $log)"
    elif port_open "$PG_PORT"; then
        say "timescaledb: the server on port $PG_PORT was not started by this script, leaving it alone"
    else
        say "timescaledb: not running"
    fi
}

# ---------------------------------------------------------------- postgres (plain)

plain_init() { cluster_init postgres "$PLAIN_DATA" "$PLAIN_LOG_IN_ROOT" "$PLAIN_INIT_STAMP"; }

plain_pid() { cluster_pid "$PLAIN_DATA"; }

plain_up() {
    local pid log=$LOG_DIR/postgres-ctl.log
    if pid=$(plain_pid); then
        say "postgres: server already running (pid $pid), reusing it"
        return
    fi
    if port_open "$PLAIN_PORT"; then
        say "postgres: reusing the server already listening on 127.0.0.1:$PLAIN_PORT (not started by this script)"
        return
    fi
    need_root "starting plain PostgreSQL in its chroot"
    mkdir -p "$LOG_DIR"
    pg_rootfs
    plain_init
    cp "$SERVICES_DIR/postgres/postgresql.conf" "$PG_ROOTFS$PLAIN_DATA/ioc.conf"
    chown "$(pg_ids)" "$PG_ROOTFS$PLAIN_DATA/ioc.conf"
    ln -sfn "$PG_ROOTFS$PLAIN_LOG_IN_ROOT" "$PLAIN_LOG"
    say "postgres: starting plain PostgreSQL $PG_MAJOR (no TimescaleDB) on 127.0.0.1:$PLAIN_PORT (log: $PLAIN_LOG)"
    as_postgres pg_ctl -D "$PLAIN_DATA" -l "$PLAIN_LOG_IN_ROOT" -w -t "$WAIT_SECONDS" start >"$log" 2>&1 9>&- ||
        fail "postgres: PostgreSQL did not start within ${WAIT_SECONDS}s (log: $PLAIN_LOG)"
    say "postgres: ready"
}

plain_down() {
    local pid log=$LOG_DIR/postgres-ctl.log
    if pid=$(plain_pid); then
        say "postgres: stopping PostgreSQL (pid $pid)"
        as_postgres pg_ctl -D "$PLAIN_DATA" -m fast -w -t 60 stop >"$log" 2>&1 ||
            fail "postgres: PostgreSQL did not stop (log: $log)"
    elif port_open "$PLAIN_PORT"; then
        say "postgres: the server on port $PLAIN_PORT was not started by this script, leaving it alone"
    else
        say "postgres: not running"
    fi
}

# ---------------------------------------------------------------- chromium

# Not a service: the operations page's browser test drives Debian's headless Chromium.
chromium_ensure() {
    command -v chromium >/dev/null && return
    apt_install chromium
    command -v chromium >/dev/null || fail "chromium: not on PATH after installing it (log: $LOG_DIR/apt.log)"
    say "chromium: installed"
}

# ---------------------------------------------------------------- commands

# Two concurrent runs (e.g. parallel make targets) would race on downloads and
# ports. The servers are started with fd 9 closed, or they would hold the
# lock for as long as they run.
take_lock() {
    mkdir -p "$CACHE" "$LOG_DIR" "$RUN_DIR"
    exec 9>"$CACHE/.lock"
    if ! flock -n 9; then
        say "waiting for another services.sh run to finish"
        flock -w 900 9 || fail "another services.sh run still holds $CACHE/.lock"
    fi
}

status_line() {
    local name=$1 port=$2 pid=$3
    if [[ -n $pid ]]; then
        printf '%-12s up    127.0.0.1:%s (pid %s)\n' "$name" "$port" "$pid"
    elif port_open "$port"; then
        printf '%-12s up    127.0.0.1:%s (not started by services.sh)\n' "$name" "$port"
    else
        printf '%-12s down\n' "$name"
    fi
}

cmd_status() {
    status_line mqtt "$MQTT_PORT" "$(mqtt_pid || true)"
    status_line kafka "$KAFKA_PORT" "$(kafka_pid || true)"
    status_line timescaledb "$PG_PORT" "$(pg_pid || true)"
    status_line apache "$APACHE_PORT" "$(apache_pid || true)"
    status_line postgres "$PLAIN_PORT" "$(plain_pid || true)"
}

COMMAND=${1:-}
case $COMMAND in
up)
    take_lock
    say "cache directory: $CACHE"
    mqtt_up
    kafka_up
    pg_up
    apache_up
    plain_up
    chromium_ensure
    print_env
    ;;
down)
    take_lock
    plain_down
    apache_down
    pg_down
    kafka_down
    mqtt_down
    ;;
stop)
    # One service at a time, for tests that inject an outage; `up` brings it back.
    take_lock
    case ${2:-} in
    mqtt) mqtt_down ;;
    kafka) kafka_down ;;
    timescaledb) pg_down ;;
    apache) apache_down ;;
    postgres) plain_down ;;
    *)
        echo "usage: $0 stop mqtt|kafka|timescaledb|apache|postgres" >&2
        exit 2
        ;;
    esac
    ;;
status) cmd_status ;;
env) print_env ;;
kafka-libs)
    # The multi-broker cluster of the integration tests (tests/integration/kafka_cluster.py) runs
    # from the same jars as the single broker, so both use one cached download.
    take_lock
    mkdir -p "$KAFKA_LOG_DIR"
    kafka_libs
    command -v java >/dev/null || kafka_toolchain
    echo "$KAFKA_LIBS"
    ;;
*)
    echo "usage: $0 up|down|stop SERVICE|status|env|kafka-libs" >&2
    exit 2
    ;;
esac
