"""api_server.py under load: throughput and latency at 1, 4 and 16 concurrent clients, batched serving against
one-at-a-time serving (the same server with --max-batch 1).

Each client sends its requests one after another (a closed loop), greedy, a fixed number of new tokens asked
(the random-weight model rarely stops early; the table counts the tokens actually generated). Without --model,
the quick start's tiny model shape is built (4 layers, hidden 128, tokenizer trained on the bundled table).

    python benchmarks/bench_server.py                       # 1, 4, 16 clients; 4 requests each; 64 new tokens
    python benchmarks/bench_server.py --model THUDM/chatglm3-6b --clients 1 8 --max-tokens 128 --json
"""
import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import _common  # noqa: E402  (puts finetune_chatmodel_demo/ on sys.path)
import _docs  # noqa: E402
from _common import DATA_PROCESSING, DEMO, fail, progress  # noqa: E402

QUESTIONS = ["皮卡丘是什么属性？", "小火龙的弱点是什么？", "杰尼龟会进化成什么？", "请介绍一下超梦。",
             "喷火龙怕哪些属性？", "伊布有几种进化形态？", "卡比兽的特性是什么？", "妙蛙种子的属性是什么？"]
READY_TIMEOUT_S = 300


def parse_args(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="模型目录，默认构建快速上手的小模型 / model directory "
                                                       "(default: build the quick start's tiny model)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="并发客户端数 / concurrent clients")
    parser.add_argument("--requests-per-client", type=int, default=4, help="每个客户端的请求数 / requests per client")
    parser.add_argument("--max-tokens", type=int, default=64, help="每个请求的新 token 数 / new tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="轮数（取中位数）/ rounds per setting (the median is shown)")
    parser.add_argument("--threads", type=int, default=None,
                        help="服务进程的 torch 线程数 / torch threads of the server process (default: torch's own)")
    parser.add_argument("--json", action="store_true", help="最后一行输出 JSON / also print the results as JSON")
    _docs.add_flag(parser, "bench-server")
    args = parser.parse_args(argv)
    if min(args.clients) < 1 or args.requests_per_client < 1 or args.max_tokens < 1 or args.rounds < 1 or (args.threads or 1) < 1:
        fail("错误：--clients、--requests-per-client、--max-tokens、--rounds、--threads 须为正数 / Error: --clients, "
             "--requests-per-client, --max-tokens, --rounds and --threads must be positive")
    return args


def quickstart_model(workdir: Path) -> Path:
    from build_tiny_model import build_tiny_model

    progress("构建小模型 / building the quick start's tiny model shape")
    return build_tiny_model(DATA_PROCESSING / "data.csv", workdir / "tiny-base", layers=4, hidden=128, heads=8,
                            kv_groups=2, vocab_size=3000)


class Server:
    """api_server.py in a subprocess on a free localhost port."""

    def __init__(self, model: Path, max_batch: int, log: Path, threads=None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url, self.name = f"http://127.0.0.1:{port}", model.name
        self.log = open(log, "wb")
        self.process = subprocess.Popen(
            [sys.executable, str(DEMO / "api_server.py"), "--model", str(model), "--port", str(port),
             "--max-batch", str(max_batch), "--max-queue", "256"], stdout=self.log, stderr=self.log,
            env={**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})})
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=5).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    fail(f"错误：服务未能启动 / Error: the server did not start; its log:\n{log.read_text()[-2000:]}")
                time.sleep(0.3)

    def ask(self, question: str, max_tokens: int) -> tuple[float, int]:
        """(seconds, completion tokens) of one greedy request."""
        body = json.dumps({"model": self.name, "messages": [{"role": "user", "content": question}],
                           "temperature": 0, "max_tokens": max_tokens}).encode()
        request = urllib.request.Request(self.url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as r:
            usage = json.loads(r.read())["usage"]
        return time.perf_counter() - start, usage["completion_tokens"]

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def load(server: Server, clients: int, per_client: int, max_tokens: int) -> dict:
    """`clients` threads, each sending `per_client` requests in turn; throughput and latency over all."""
    results, errors = [], []

    def client(c: int):
        for r in range(per_client):
            try:
                results.append(server.ask(QUESTIONS[(c * per_client + r) % len(QUESTIONS)], max_tokens))
            except OSError as e:
                errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        fail(f"错误：{len(errors)} 个请求失败 / Error: {len(errors)} requests failed: {errors[0]}")
    latencies = sorted(seconds for seconds, _ in results)
    tokens = sum(n for _, n in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall,
            "p50_s": statistics.median(latencies), "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        _common.torch.set_num_threads(args.threads)  # so the machine line below reports the servers' setting
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else quickstart_model(Path(tmp))
        servers = {}
        try:
            for mode, max_batch in (("one at a time", 1), ("batched", max(args.clients))):
                progress(f"启动服务 / starting the server: {mode} (--max-batch {max_batch})")
                servers[mode] = Server(model, max_batch, Path(tmp) / f"server-{max_batch}.log", args.threads)
                servers[mode].ask(QUESTIONS[0], 4)  # warm-up
            for clients in args.clients:
                # The two servers take turns, round after round, so a change in the machine's load hits both alike;
                # each reports its median round.
                runs = {mode: [] for mode in servers}
                for _ in range(args.rounds):
                    for mode, server in servers.items():
                        runs[mode].append(load(server, clients, args.requests_per_client, args.max_tokens))
                for mode, results in runs.items():
                    rows.append({"serving": mode, **sorted(results, key=lambda r: r["tokens_per_s"])[len(results) // 2]})
                    progress(f"  {clients} clients, {mode}: {rows[-1]['tokens_per_s']:.1f} tokens/s")
        finally:
            for server in servers.values():
                server.stop()
    recorder = _docs.Recorder("bench-server", args, "bench_server.py", argv, markdown=True)
    print(_common.machine_line("cpu", "float32 (server)") + f"; {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"{args.requests_per_client} requests per client, {args.max_tokens} new tokens asked, greedy; "
          f"median of {args.rounds} rounds\n")
    print("| 客户端 / clients | 服务 / serving | 请求 / requests | tokens/s | requests/s | p50 延迟 / latency (s) | "
          "p95 延迟 / latency (s) | 加速 / speed-up |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    alone = {r["clients"]: r["tokens_per_s"] for r in rows if r["serving"] == "one at a time"}
    for r in sorted(rows, key=lambda r: (r["clients"], r["serving"] == "batched")):
        print(f"| {r['clients']} | {r['serving']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} "
              f"| {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['tokens_per_s'] / alone[r['clients']]:.2f}x |")
    if args.json:
        print(json.dumps(rows))
    recorder.publish()


if __name__ == "__main__":
    try:
        main()
    except _docs.DocsError as e:
        fail(str(e))
