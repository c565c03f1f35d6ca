# shellcheck shell=bash
# ops/lib.sh -- helpers shared by the Ferry ops scripts. Source it, do not run it:
#
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Environment variables (all optional, defaults in brackets):
#   FERRY_STACK_DIR          state dir for brokers: data, logs, pid files [<repo>/ops/.data]
#   FERRY_BROKER_HOST        address both brokers listen on / advertise [127.0.0.1]
#   FERRY_ORIGIN_PORT        Kafka port of the "origin" broker [19092]
#   FERRY_DEST_PORT          Kafka port of the "destination" broker [29092]
#   FERRY_TANSU_VERSION      pinned tansu version [0.6.0]
#   FERRY_TANSU_FEATURES     cargo features for the tansu install [dynostore,libsql]
#   FERRY_TANSU_BIN          tansu binary to use [tansu on PATH, else $CARGO_HOME/bin/tansu]
#   FERRY_PG_VERSION         PostgreSQL major version [newest in /etc/postgresql, else
#                            /usr/lib/postgresql]
#   FERRY_PG_CLUSTER         Debian cluster name [main]
#   FERRY_PG_HOST            host for TCP connections to Postgres [127.0.0.1]
#   FERRY_PG_PORT            Postgres port [the cluster's port from pg_lsclusters, else 5432]
#   FERRY_PG_USER            superuser for TCP connections [postgres]
#   FERRY_PG_ORIGIN_DB       origin database [ferry_origin]
#   FERRY_PG_DEST_DB         destination database [ferry_dest]
#   FERRY_PG_MIN_SLOTS       minimum max_replication_slots [32]
#   FERRY_PG_MIN_WAL_SENDERS minimum max_wal_senders [32]
#   FERRY_NO_APT             if set non-empty, never run apt-get; fail with a hint instead
#   CI                       if set, ferry_build_env exports CARGO_INCREMENTAL=0
#
# Functions: log, warn, die, wait_port, port_open, ensure_apt_pkg, apt_install, apt_update_once,
#            ensure_build_deps, ferry_build_env, as_root.

if [[ -n "${FERRY_LIB_SOURCED:-}" ]]; then
    return 0
fi
FERRY_LIB_SOURCED=1

FERRY_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FERRY_STACK_DIR="${FERRY_STACK_DIR:-$FERRY_REPO_ROOT/ops/.data}"
FERRY_BROKER_HOST="${FERRY_BROKER_HOST:-127.0.0.1}"
FERRY_ORIGIN_PORT="${FERRY_ORIGIN_PORT:-19092}"
FERRY_DEST_PORT="${FERRY_DEST_PORT:-29092}"
FERRY_ORIGIN_BROKERS="$FERRY_BROKER_HOST:$FERRY_ORIGIN_PORT"
FERRY_DEST_BROKERS="$FERRY_BROKER_HOST:$FERRY_DEST_PORT"
export FERRY_REPO_ROOT FERRY_STACK_DIR FERRY_BROKER_HOST FERRY_ORIGIN_PORT FERRY_DEST_PORT \
    FERRY_ORIGIN_BROKERS FERRY_DEST_BROKERS

FERRY_LOG_PREFIX="${FERRY_LOG_PREFIX:-$(basename "$0")}"

log() {
    printf '[%s] %s\n' "$FERRY_LOG_PREFIX" "$*" >&2
}

warn() {
    printf '[%s] WARNING: %s\n' "$FERRY_LOG_PREFIX" "$*" >&2
}

die() {
    printf '[%s] ERROR: %s\n' "$FERRY_LOG_PREFIX" "$*" >&2
    exit 1
}

# port_open HOST PORT -- true when something accepts TCP connections there.
port_open() {
    local host=$1 port=$2
    # shellcheck disable=SC2016 # expanded by the inner shell
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$host" "$port" 2>/dev/null
}

# wait_port HOST PORT TIMEOUT_S -- wait until HOST:PORT accepts connections.
wait_port() {
    local host=$1 port=$2 timeout_s=${3:-30}
    local deadline=$((SECONDS + timeout_s))
    while ! port_open "$host" "$port"; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.2
    done
}

# as_root CMD... -- run CMD as root (directly when already root, else via sudo).
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root for: $* (run as root or install sudo)"
    fi
}

# apt_update_once -- 'apt-get update' at most once per run (also across child scripts).
apt_update_once() {
    if [[ -n "${FERRY_APT_UPDATED:-}" ]]; then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found: this is not a Debian-like system; install the missing packages by hand"
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 ||
        die "apt-get update failed (check network/apt sources)"
    FERRY_APT_UPDATED=1
    export FERRY_APT_UPDATED
}

# apt_install PKG... -- apt-get install -y PKG... (after one apt-get update per run).
apt_install() {
    if [[ -n "${FERRY_NO_APT:-}" ]]; then
        die "missing packages; install them with: apt-get install -y $* (FERRY_NO_APT is set)"
    fi
    apt_update_once
    log "installing $* with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2 ||
        die "apt-get install -y $* failed; install it by hand"
}

# ensure_apt_pkg CMD PKG -- install Debian package PKG unless command CMD exists.
# CMD may be an absolute path (for binaries not on PATH).
ensure_apt_pkg() {
    local cmd=$1 pkg=$2
    if [[ $cmd == /* ]]; then
        [[ -x $cmd ]] && return 0
    elif command -v "$cmd" >/dev/null 2>&1; then
        return 0
    fi
    log "'$cmd' is missing"
    apt_install "$pkg"
    if [[ $cmd == /* ]]; then
        [[ -x $cmd ]] || die "installed $pkg but $cmd is still missing"
    else
        command -v "$cmd" >/dev/null 2>&1 || die "installed $pkg but '$cmd' is still not on PATH"
    fi
}

# ensure_build_deps -- tools needed to build rdkafka (librdkafka is built from source).
ensure_build_deps() {
    ensure_apt_pkg make make
    ensure_apt_pkg gcc gcc
    ensure_apt_pkg perl perl
    ensure_apt_pkg pkg-config pkg-config
}

# ferry_build_env -- export build settings for cargo: CARGO_INCREMENTAL=0 on CI, and the
# mold linker when available (installing it is attempted; failure is only a warning).
ferry_build_env() {
    ensure_build_deps
    if [[ -n "${CI:-}" ]]; then
        export CARGO_INCREMENTAL=0
    fi
    if ! command -v mold >/dev/null 2>&1; then
        if [[ -z "${FERRY_NO_APT:-}" ]]; then
            (ensure_apt_pkg mold mold) || warn "could not install mold; linking with the default linker"
        fi
    fi
    if command -v mold >/dev/null 2>&1; then
        local flag="-C link-arg=-fuse-ld=mold"
        case " ${RUSTFLAGS:-} " in
            *" $flag "*) ;;
            *) export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }$flag" ;;
        esac
    fi
}
