#!/usr/bin/env bash
# Idempotent, no root needed: unpacks Debian's `prometheus` package (which ships both
# `prometheus` and `promtool`) into the git-ignored .deps/prometheus, for the deployment
# checks (`promtool check metrics|config|rules`) and the dashboard test, which runs a real
# Prometheus against a live `tessera serve` to evaluate every dashboard query.
#
# `apt-get download` uses the machine's package lists; where there are none (a fresh
# machine on which `apt-get update` never ran) it fetches private lists into a temporary
# folder instead, which also works without root. Prints the promtool path on success.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.deps/prometheus"
stamp="$dest/.installed"
promtool="$dest/usr/bin/promtool"
mkdir -p "$root/.deps"
# Two checks may start at once (cargo runs test binaries one after the other, but a
# developer may run the script by hand meanwhile): one installs, the other waits.
exec 9>"$root/.deps/.prometheus.lock"
flock 9
if [ ! -f "$stamp" ] || [ ! -x "$promtool" ]; then
  echo "tessera tools: installing Debian's prometheus package (promtool) into $dest" >&2
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  if ! (cd "$work" && apt-get -q download prometheus >"$work/download.log" 2>&1); then
    echo "tessera tools: no usable package lists here, fetching private ones" >&2
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
    apt_private=(-q -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
      -o Debug::NoLocking=1)
    apt-get "${apt_private[@]}" update >"$work/update.log" 2>&1 \
      || { cat "$work/update.log" >&2; exit 1; }
    (cd "$work" && apt-get "${apt_private[@]}" download prometheus) \
      || { cat "$work/download.log" >&2; exit 1; }
  fi
  deb="$(ls "$work"/prometheus_*.deb)"
  rm -rf "$dest"
  mkdir -p "$dest"
  dpkg-deb -x "$deb" "$dest"
  "$promtool" --version >/dev/null
  basename "$deb" >"$stamp"
fi
echo "$promtool"
