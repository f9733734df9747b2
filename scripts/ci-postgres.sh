#!/usr/bin/env bash
# Start a throwaway PostgreSQL for the MLflow promotion tests (tests/mlflow, marker `postgres`) and
# print the one line that points the tests at it:
#
#   eval "$(bash scripts/ci-postgres.sh)"     # sets FEEDBACK_SYNTH_TEST_PG_URI
#
# - Installs Debian's `postgresql` (15) with apt-get when no initdb is found (needs root).
# - Inits a cluster in $FEEDBACK_SYNTH_PG_DIR (default: ${XDG_RUNTIME_DIR:-/tmp}/feedback-synth-pg),
#   trust auth, fsync off (test data only), and starts it on 127.0.0.1:$FEEDBACK_SYNTH_PG_PORT
#   (default 55432) with its socket in the same folder; creates the database $FEEDBACK_SYNTH_PG_DB
#   (default feedback_synth_test).
# - Idempotent: a cluster that is already running is left alone; a stopped one is started again.
# Only the `export ...` line goes to stdout; progress and errors go to stderr.
# Stop it with:  pg_ctl -D "$FEEDBACK_SYNTH_PG_DIR/data" stop   (as the postgres user when root)
set -euo pipefail

PORT="${FEEDBACK_SYNTH_PG_PORT:-55432}"
DB="${FEEDBACK_SYNTH_PG_DB:-feedback_synth_test}"
BASE="${FEEDBACK_SYNTH_PG_DIR:-${XDG_RUNTIME_DIR:-/tmp}/feedback-synth-pg}"
DATA="${BASE}/data"
LOGFILE="${BASE}/postgres.log"

say() { echo "ci-postgres: $*" >&2; }

find_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [[ -x "${d}/initdb" && -x "${d}/pg_ctl" ]]; then echo "${d}"; return 0; fi
  done
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"; return 0
  fi
  return 1
}

BIN="$(find_bindir || true)"
if [[ -z "${BIN}" ]]; then
  if [[ "$(id -u)" != 0 ]]; then
    say "PostgreSQL is not installed and installing it needs root (apt-get install postgresql)"
    exit 1
  fi
  say "installing Debian's postgresql with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends postgresql >&2
  BIN="$(find_bindir)"
fi

# As root, the server must run as the postgres user; otherwise as whoever runs this script.
if [[ "$(id -u)" == 0 ]]; then
  RUNAS=(runuser -u postgres --)
  DBUSER=postgres
else
  RUNAS=()
  DBUSER="$(id -un)"
fi

mkdir -p "${BASE}"
if [[ "$(id -u)" == 0 ]]; then chown postgres: "${BASE}"; fi
chmod 700 "${BASE}"

if [[ ! -s "${DATA}/PG_VERSION" ]]; then
  say "initdb ${DATA}"
  "${RUNAS[@]}" "${BIN}/initdb" -D "${DATA}" -A trust -U "${DBUSER}" --no-sync >"${BASE}/initdb.log" 2>&1 \
    || { cat "${BASE}/initdb.log" >&2; exit 1; }
fi

if "${RUNAS[@]}" "${BIN}/pg_ctl" -D "${DATA}" status >/dev/null 2>&1; then
  say "already running (${DATA})"
else
  say "starting on 127.0.0.1:${PORT}"
  "${RUNAS[@]}" "${BIN}/pg_ctl" -D "${DATA}" -l "${LOGFILE}" -w -t 60 \
    -o "-p ${PORT} -k ${BASE} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >&2 \
    || { tail -20 "${LOGFILE}" >&2; exit 1; }
fi

PSQL=("${BIN}/psql" -h 127.0.0.1 -p "${PORT}" -U "${DBUSER}" -d postgres -v ON_ERROR_STOP=1 -qtA)
if [[ "$("${PSQL[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '${DB}'")" != 1 ]]; then
  say "creating database ${DB}"
  "${PSQL[@]}" -c "CREATE DATABASE ${DB}" >&2
fi

echo "export FEEDBACK_SYNTH_TEST_PG_URI=postgresql+psycopg2://${DBUSER}@127.0.0.1:${PORT}/${DB}"
