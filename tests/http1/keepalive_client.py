"""An HTTP/1.1 REST client as services write them: one requests.Session, whose urllib3 pool
keeps ONE keep-alive connection to the Service, sending GETs one after another. Counts the
replies per backend (the `x-backend` header) and prints the greet client's progress format:

    TALLY <ms since start> <errors> <backend>=<count> ...   (cumulative, every --report-ms)
    LAST_ERROR <error>                                      (after a failed request)
    CONNECTIONS <n>                                         (connections the pool opened)
    DONE

Stops after --count requests or --seconds, whichever comes first (at least one is given).
"""

import argparse
import sys
import time

import requests
from requests.adapters import HTTPAdapter


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--report-ms", type=int, default=25)
    a = p.parse_args()
    if not a.count and not a.seconds:
        sys.exit("give --count or --seconds")
    if a.seconds <= 0 or a.seconds > 120:
        a.seconds = 120.0  # every load loop stops by itself

    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
    session.mount("http://", adapter)
    counts = {}
    errors = 0
    start = time.monotonic()
    last_report = start
    sent = 0

    def report():
        ms = int((time.monotonic() - start) * 1000)
        pods = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        print(f"TALLY {ms} {errors} {pods}", flush=True)

    while True:
        now = time.monotonic()
        if a.count and sent >= a.count:
            break
        if now - start >= a.seconds:
            break
        sent += 1
        try:
            r = session.get(a.url, timeout=5)
            name = r.headers.get("x-backend")
            if r.status_code != 200 or not name:
                errors += 1
                print(f"LAST_ERROR status {r.status_code}: {r.text.strip()[:200]}", flush=True)
            else:
                counts[name] = counts.get(name, 0) + 1
        except requests.RequestException as e:
            errors += 1
            print(f"LAST_ERROR {e}", flush=True)
        if (time.monotonic() - last_report) * 1000 >= a.report_ms:
            report()
            last_report = time.monotonic()
    report()
    pools = adapter.poolmanager.pools
    opened = sum(pools[k].num_connections for k in pools.keys())
    print(f"CONNECTIONS {opened}", flush=True)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
