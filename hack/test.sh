#!/usr/bin/env bash
# `make test`: every test (pytest ARGS... narrows it).
#
# As root (the kind tests need it), the kind tests' cluster is set up in the background while the
# other tests run, at the lowest CPU priority: `hack/kind.sh up` is mostly downloads, image
# layers and image loads, ~15-20 minutes cold that used to sit in front of the kind tests. Their
# fixture calls `up` again, which waits on kind.sh's lock and then finds everything in place. The
# Docker engine it started is stopped at the end, as the fixture would (THAW_KIND_ENGINE_BEFORE).
# THAW_KIND_PRESTART=0 turns this off.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
prestart=
if [ "$(id -u)" = 0 ] && [ "${THAW_KIND_PRESTART:-1}" = 1 ]; then
  if hack/docker.sh env >/dev/null 2>&1; then export THAW_KIND_ENGINE_BEFORE=1; else export THAW_KIND_ENGINE_BEFORE=0; fi
  log=${TMPDIR:-/tmp}/thaw-kind-prestart.log
  echo "kind cluster setup in the background: $log"
  nice -n 19 hack/kind.sh up >"$log" 2>&1 &
  prestart=$!
fi
"$PY" -m pytest -q --durations=12 "${@:-tests}"
status=$?
if [ -n "$prestart" ]; then
  wait "$prestart" || true
  # The kind fixture deletes its cluster; one left by a run that never reached it goes here.
  if [ -z "${THAW_KIND_KEEP:-}" ]; then
    hack/kind.sh down >/dev/null 2>&1 || true
    [ "$THAW_KIND_ENGINE_BEFORE" = 1 ] || hack/docker.sh down >/dev/null 2>&1 || true
  fi
fi
exit $status
