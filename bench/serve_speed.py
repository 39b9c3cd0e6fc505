"""Requests per second and latency of `predict.py --serve` under 1, 8 and 32 concurrent clients.

    python3 bench/serve_speed.py --model_dir checkpoint
    python3 bench/serve_speed.py --model_dir checkpoint --roots ../before,.  # two versions

Each root (a checkout of this repository) serves the same checkpoint on 127.0.0.1 in its own
process, one after another. Each client thread sends one distinct sentence per request (no two
alike, so nothing can be cached), `--requests` of them, stopping early after `--seconds` per level.
Printed per root and level: requests/s, p50 and p99 latency, and the load generator's own CPU use
(it shares the machine with the server).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REVIEW = "배우들 연기가 정말 좋았고 마지막 장면은 감동적이었다"


def start_server(root, model_dir, flags=()):
    proc = subprocess.Popen(
        [
            sys.executable,
            "predict.py",
            "--serve",
            "--port",
            "0",
            "--model_dir",
            os.path.abspath(model_dir),
            *flags,
        ],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    line = proc.stdout.readline()  # "serving on http://127.0.0.1:PORT (Ctrl-C stops)"
    if not line.startswith("serving on "):
        proc.kill()
        raise SystemExit(f"{root}: the server did not start ({line!r})")
    return proc, line.split()[2]


def ask(url, text):
    request = urllib.request.Request(
        url + "/api",
        data=json.dumps({"sentence": text}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        json.loads(response.read())


def load(url, clients, requests, seconds, tag):
    """(requests/s, p50 ms, p99 ms, generator CPU %) for `clients` threads asking at once."""
    latencies, deadline = [], time.perf_counter() + seconds

    def client(c):
        for k in range(requests):
            if time.perf_counter() > deadline:
                return
            start = time.perf_counter()
            ask(url, f"{REVIEW} {tag} {clients}-{c}-{k}")
            latencies.append(time.perf_counter() - start)

    cpu = resource.getrusage(resource.RUSAGE_SELF)
    begin = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
    ms = np.array(latencies) * 1000
    return len(ms) / wall, np.percentile(ms, 50), np.percentile(ms, 99), 100 * cpu_s / wall


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model_dir", default="checkpoint", help="checkpoint folder to serve")
    p.add_argument("--roots", default=ROOT, help="comma-separated checkouts to compare")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    p.add_argument("--requests", type=int, default=60, help="requests per client at most")
    p.add_argument("--seconds", type=float, default=20, help="time bound of each level")
    args = p.parse_args()
    results = {}
    for n, root in enumerate(args.roots.split(",")):
        proc, url = start_server(root, args.model_dir)
        try:
            for i in range(5):
                ask(url, f"warm-up {i}")
            for clients in map(int, args.clients.split(",")):
                results[root, clients] = load(url, clients, args.requests, args.seconds, n)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"{'root':<28}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'gen CPU':>9}")
    for (root, clients), (rps, p50, p99, cpu) in results.items():
        print(f"{root[-28:]:<28}{clients:>8}{rps:>9.1f}{p50:>9.1f}{p99:>9.1f}{cpu:>8.0f}%")


if __name__ == "__main__":
    main()
