#!/usr/bin/env bash
# Runs a study's job list on this machine, N jobs at a time.
#
# usage: launch/local_sweep.sh JOBS_TXT [N]        (N defaults to 1)
#
# JOBS_TXT has one shell command per line (`jaxrepro study ... --jobs_only` writes it; blank
# lines and lines starting with # are skipped). Each job runs in a shell of its own; a failed
# job is reported and the others go on; the exit status is 1 if any failed. Jobs run in the
# directory of JOBS_TXT: `jaxrepro study` writes their paths relative to it.
# SIGTERM/SIGINT to this script reach every running job: each checkpoints and exits, and
# running the same command again resumes them (finished runs do nothing).
set -uo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 JOBS_TXT [N]" >&2
  exit 2
fi
JOBS=$1
N=${2:-1}
if [ ! -f "$JOBS" ]; then
  echo "local_sweep: no job list at $JOBS" >&2
  exit 2
fi
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then
  echo "local_sweep: N must be a positive integer, got '$N'" >&2
  exit 2
fi

JOBS="$(cd "$(dirname -- "$JOBS")" && pwd)/$(basename -- "$JOBS")"
cd "$(dirname -- "$JOBS")" || exit 2

# Forward a stop to the whole process group (xargs and every job), then wait for them.
trap 'trap - TERM INT; kill -TERM 0 2>/dev/null; wait; exit 143' TERM INT

total=$(grep -cvE '^[[:space:]]*(#|$)' "$JOBS" || true)
echo "local_sweep: $total jobs from $JOBS, $N at a time"
grep -vE '^[[:space:]]*(#|$)' "$JOBS" \
  | xargs -d '\n' -P "$N" -I{} bash -c 'bash -c "$1" || { echo "local_sweep: FAILED ($?): $1" >&2; exit 1; }' _ {} &
wait $!
status=$?
if [ "$status" -ne 0 ]; then
  echo "local_sweep: some jobs failed (xargs status $status)" >&2
  exit 1
fi
echo "local_sweep: all $total jobs done"
