#!/usr/bin/env bash
# The loopback harness used for the profiles in docs/benchmarks.md: four `icp-pod h2serve`
# backends and h2load on CPU 0, one proxy alone on CPU 1 (one worker thread), all on
# 127.0.0.1. Prints one line per contender: saturation req/s, the proxy's CPU per request
# (utime+stime from /proc over the measured run), its RSS and h2load's mean time per request
# (with CONNS=1 STREAMS=1: the single-stream latency; `direct` is the baseline to subtract).
#
#   tests/bench/loopback-harness.sh [CONTENDER...]   CONTENDER: relay | streams | haproxy | direct
#   env: CONNS (4), STREAMS (32), SECS (8), PERF=1 (perf record -g on the proxy),
#        BUSY_POLL=US (interceptor --busy-poll-us US, HAProxy `busy-polling`),
#        HALT_POLL_NS=NS (the guest's halt polling for the run: a machine setting, put back on exit),
#        WORKERS (1; with more, proxy, client and backends share both CPUs: no pinning),
#        BACKEND_STACK=h2 (the backends on h2's high-level server instead of frame level)
#
# Needs release builds (cargo build --release -p interceptor -p interceptor-tests --bins)
# and h2load, haproxy, taskset (cargo xtask setup installs them). Every load is bounded by
# SECS and every process started here is stopped on exit.
set -euo pipefail
. "$(dirname "$0")/loopback-common.sh"
conns=${CONNS:-4} streams=${STREAMS:-32} secs=${SECS:-8} workers=${WORKERS:-1}
load_cpu=0 proxy_cpu=1
if [ "$workers" -gt 1 ]; then load_cpu=0,1 proxy_cpu=0,1; fi
start_backends "$load_cpu"
target=19000
load() { taskset -c "$load_cpu" h2load "-c$conns" "-m$streams" "-D$1" -d "$work/body" \
  -H 'content-type: application/grpc' -H 'te: trailers' "http://127.0.0.1:$target/bench.Bench/Call"; }
run() {
  local who=$1 proxy busy=${BUSY_POLL:-0}
  target=19000
  case $who in
    relay|streams)
      taskset -c "$proxy_cpu" "$bin/interceptor" proxy --listen 127.0.0.1:19000 --endpoints "$endpoints" \
        --worker-threads "$workers" --h2-engine "$who" --busy-poll-us "$busy" >"$work/$who.log" 2>&1 & proxy=$! ;;
    haproxy)
      haproxy_config "$work/haproxy.cfg" "$workers"
      if [ "$busy" != 0 ]; then sed -i 's/^global$/global\n  busy-polling/' "$work/haproxy.cfg"; fi
      taskset -c "$proxy_cpu" haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 & proxy=$! ;;
    direct)
      # No proxy: h2load straight to one backend. The "proxy" measured is that backend.
      target=${ports[0]}
      proxy=$(pgrep -f "icp-pod h2serve --port ${ports[0]}" | head -1) ;;
    *) echo "unknown contender $who" >&2; return 1 ;;
  esac
  pids+=("$proxy")
  sleep 0.5
  load 1 >/dev/null 2>&1 || true
  local t0 out t1 perf=""
  t0=$(awk '{print $14+$15}' "/proc/$proxy/stat")
  if [ "${PERF:-0}" = 1 ]; then
    perf record -F 999 -g -p "$proxy" -o "$root/target/perf-$who.data" -- sleep "$secs" >/dev/null 2>&1 & perf=$!
  fi
  out=$(load "$secs" 2>&1)
  [ -n "$perf" ] && wait "$perf"
  t1=$(awk '{print $14+$15}' "/proc/$proxy/stat")
  local rss reqs rps
  rss=$(awk '/VmRSS/{print $2}' "/proc/$proxy/status")
  reqs=$(awk '/^requests:/{print $8}' <<<"$out")
  rps=$(awk '/^finished in/{print $4}' <<<"$out")
  mean=$(awk '/^time for request:/{print $4}' <<<"$out")
  python3 -c "import sys; t=($t1-$t0)/$(getconf CLK_TCK); r=max(int('${reqs:-0}'),1); print(f'{sys.argv[1]:8} w$workers c$conns m$streams busy $busy: {float(\"${rps:-0}\"):9.0f} req/s  {t*1e6/r:6.2f} us CPU/req  CPU {t/$secs:4.2f}  RSS {int(\"$rss\")/1024:5.1f} MiB  mean {sys.argv[2]}  ok {r}')" "$who" "$mean"
  grep -E '^requests:' <<<"$out" | sed 's/^/         /'
  [ "$who" = direct ] && return 0
  kill "$proxy"; wait "$proxy" 2>/dev/null || true
}
for who in "${@:-relay streams haproxy}"; do
  for w in $who; do run "$w"; done
done
