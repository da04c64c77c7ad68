#!/usr/bin/env bash
# The loopback harness used for the profiles in docs/benchmarks.md: four `icp-pod h2serve`
# backends and h2load on CPU 0, one proxy alone on CPU 1 (one worker thread), all on
# 127.0.0.1. Prints one line per contender: saturation req/s, the proxy's CPU per request
# (utime+stime from /proc over the measured run) and its RSS.
#
#   tests/bench/loopback-harness.sh [CONTENDER...]   CONTENDER: relay | streams | haproxy
#   env: CONNS (4), STREAMS (32), SECS (8), PERF=1 (perf record -g on the proxy),
#        WORKERS (1; with more, proxy, client and backends share both CPUs: no pinning)
#
# Needs release builds (cargo build --release -p interceptor -p interceptor-tests --bins)
# and h2load, haproxy, taskset (cargo xtask setup installs them). Every load is bounded by
# SECS and every process started here is stopped on exit.
set -euo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
bin=$root/target/release
conns=${CONNS:-4} streams=${STREAMS:-32} secs=${SECS:-8} workers=${WORKERS:-1}
load_cpu=0 proxy_cpu=1
if [ "$workers" -gt 1 ]; then load_cpu=0,1 proxy_cpu=0,1; fi
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
for f in "$bin/interceptor" "$bin/icp-pod"; do
  [ -x "$f" ] || { echo "missing $f: cargo build --release -p interceptor -p interceptor-tests --bins" >&2; exit 1; }
done
# A gRPC-shaped request: a 7-byte message behind the 5-byte length prefix.
printf '\x00\x00\x00\x00\x07bench!!' > "$work/body"
ports=(19001 19002 19003 19004)
for p in "${ports[@]}"; do
  taskset -c "$load_cpu" "$bin/icp-pod" h2serve --port "$p" >/dev/null 2>&1 & pids+=($!)
done
endpoints=$(printf '127.0.0.1:%s,' "${ports[@]}"); endpoints=${endpoints%,}
load() { taskset -c "$load_cpu" h2load "-c$conns" "-m$streams" "-D$1" -d "$work/body" \
  -H 'content-type: application/grpc' -H 'te: trailers' http://127.0.0.1:19000/bench.Bench/Call; }
run() {
  local who=$1 proxy
  case $who in
    relay|streams)
      taskset -c "$proxy_cpu" "$bin/interceptor" proxy --listen 127.0.0.1:19000 --endpoints "$endpoints" \
        --worker-threads "$workers" --h2-engine "$who" >"$work/$who.log" 2>&1 & proxy=$! ;;
    haproxy)
      { printf 'global\n  nbthread %s\n' "$workers"; printf 'defaults\n  mode http\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n'
        printf 'frontend f\n  bind 127.0.0.1:19000 proto h2\n  default_backend b\nbackend b\n  balance roundrobin\n  http-reuse always\n'
        for p in "${ports[@]}"; do printf '  server s%s 127.0.0.1:%s proto h2\n' "$p" "$p"; done
      } > "$work/haproxy.cfg"
      taskset -c "$proxy_cpu" haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 & proxy=$! ;;
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
  python3 -c "import sys; t=($t1-$t0)/$(getconf CLK_TCK); r=max(int('${reqs:-0}'),1); print(f'{sys.argv[1]:8} w$workers c$conns m$streams: {float(\"${rps:-0}\"):9.0f} req/s  {t*1e6/r:6.2f} us CPU/req  CPU {t/$secs:4.2f}  RSS {int(\"$rss\")/1024:5.1f} MiB  ok {r}')" "$who"
  grep -E '^requests:' <<<"$out" | sed 's/^/         /'
  kill "$proxy"; wait "$proxy" 2>/dev/null || true
}
for who in "${@:-relay streams haproxy}"; do
  for w in $who; do run "$w"; done
done
