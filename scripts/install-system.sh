#!/usr/bin/env bash
# Install what a fresh Debian machine lacks to run aura-pg and its tests:
# PostgreSQL 15 with server headers, TimescaleDB (Debian package where one
# exists, otherwise built from Debian's own source package), the tools the
# tests drive (nats-server; prometheus and promtool; docker-compose, which
# only validates docker-compose.yml), and the Python virtual environment
# (the package with its extras and the "dev" dependency group).
# Idempotent: every step is skipped when already done.
set -euo pipefail

PG_MAJOR="${AURA_PG_MAJOR:-15}"
PG_BIN="/usr/lib/postgresql/${PG_MAJOR}/bin"
PG_LIBDIR="/usr/lib/postgresql/${PG_MAJOR}/lib"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AURA_PG_VENV:-$ROOT/.venv}"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

log() { printf '[install] %s\n' "$*" >&2; }

apt_updated=0
apt_update_once() {
  if [ "$apt_updated" -eq 0 ]; then
    $SUDO apt-get update -qq
    apt_updated=1
  fi
}

need_pkgs=()
for pkg in "postgresql-${PG_MAJOR}" "postgresql-client-${PG_MAJOR}" "postgresql-server-dev-${PG_MAJOR}" \
           cmake make gcc dpkg-dev libssl-dev nats-server prometheus docker-compose; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    need_pkgs+=("$pkg")
  fi
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  apt_update_once
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi

install_timescaledb_from_source() {
  # Debian 12 has no TimescaleDB package; Debian 13 ships its source (Apache
  # edition). Reuse the machine's own Debian mirror for a deb-src line.
  local sources=/etc/apt/sources.list.d/debian.sources uri list
  uri="$(awk '/^URIs:/ {print $2; exit}' "$sources" 2>/dev/null || true)"
  if [ -z "$uri" ]; then
    uri="$(awk '$1 == "deb" && $0 ~ /debian/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
  fi
  if [ -z "$uri" ]; then
    log "cannot find a Debian mirror URI to fetch the timescaledb source package"; exit 1
  fi
  list=/etc/apt/sources.list.d/aura-pg-timescaledb-src.sources
  if [ ! -f "$list" ]; then
    printf 'Types: deb-src\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" \
      | $SUDO tee "$list" >/dev/null
    apt_updated=0
  fi
  apt_update_once
  local work
  work="$(mktemp -d)"
  (
    cd "$work"
    apt-get source --download-only timescaledb >/dev/null
    dpkg-source --no-check -x timescaledb_*.dsc src >/dev/null
    cd src
    ./bootstrap -DAPACHE_ONLY=1 -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF -DWARNINGS_AS_ERRORS=OFF \
      -DPG_CONFIG="${PG_BIN}/pg_config" >/dev/null
    make -C build -j"$(nproc)" >/dev/null
    $SUDO make -C build install >/dev/null
  )
  rm -rf "$work"
}

if ! ls "${PG_LIBDIR}"/timescaledb*.so >/dev/null 2>&1; then
  apt_update_once
  if apt-cache show "postgresql-${PG_MAJOR}-timescaledb" >/dev/null 2>&1; then
    log "installing postgresql-${PG_MAJOR}-timescaledb"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "postgresql-${PG_MAJOR}-timescaledb"
  else
    log "building TimescaleDB (Apache edition) from Debian's source package"
    install_timescaledb_from_source
  fi
fi
log "TimescaleDB: $(ls "${PG_LIBDIR}"/timescaledb*.so | head -n 1)"

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
stamp="$VENV/.aura-pg-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  log "installing Python dependencies"
  # Dependency groups (PEP 735, pyproject.toml) need pip 25.1 or later.
  "$VENV/bin/python" -m pip install -q --upgrade "pip>=25.1"
  # The package with every extra the tests and load/ use, and the
  # development tools: tests, linters and benchmarks (group "dev").
  "$VENV/bin/python" -m pip install -q -e "$ROOT[binary,nats,webhook,chaos,testing]" \
    --group "$ROOT/pyproject.toml:dev"
  touch "$stamp"
fi
log "done"
