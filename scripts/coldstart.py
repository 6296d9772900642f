"""Cold start of every function, measured against a local stand-in for the Lambda Runtime API.

Usage: coldstart.py BIN_DIR KEYS_FILE [RUNS]   (scripts/coldstart.sh builds and calls it)

For each function and run: start its release binary as Lambda would (AWS_LAMBDA_RUNTIME_API
pointing here, the function's variables from its Cargo.toml `[package.metadata.lambda.env]`, the
local stack's secrets in moto), then measure
  init    spawn → its first `GET /runtime/invocation/next` (secrets read, clients built);
  first   the first invocation: the event handed over → its response (connects included);
  warm    a second, identical invocation;
  RSS     the process's peak resident memory (VmHWM) after both;
  CPU     the CPU time (user + system) the process used for all of it.
Each function's event is a fixture from events/ that reads the database (and Redis where the
function has it). Prints the medians (peak RSS: the largest) beside the targets.
"""
import http.server
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
import tomllib
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUNCTIONS = {  # function → the event fixture of its invocations
    "admin": "events/admin/tenant-list.json",
    "ingest-usage": "events/ingest-usage/realtime.json",
    "verify-payment": "events/verify-payment/list-payments.json",
    "outbox-relay": "events/outbox-relay/scheduled.json",
    "aggregate-usage": "events/aggregate-usage/status.json",
}
INIT_TARGET_MS, RSS_TARGET_MB = 50, 64
LOG = os.environ.get("COLDSTART_LOG", "/tmp/coldstart-functions.log")


class Run:
    """One process's invocations: events to hand out, and when each thing happened."""

    def __init__(self, events):
        self.events = queue.Queue()
        for event in events:
            self.events.put(event)
        self.first_next = None
        self.handed = {}
        self.answered = {}
        self.errors = []
        self.done = threading.Event()
        self.expected = len(events)


class RuntimeApi(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    run = None

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        run = RuntimeApi.run
        if not self.path.endswith("/runtime/invocation/next"):
            return self.reply(404, b"{}")
        now = time.perf_counter()
        if run.first_next is None:
            run.first_next = now
        event = run.events.get()  # blocks until the next invocation (none after the last)
        request_id = str(uuid.uuid4())
        run.handed[request_id] = time.perf_counter()
        body = json.dumps(event).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("lambda-runtime-aws-request-id", request_id)
        self.send_header("lambda-runtime-deadline-ms", str(int(time.time() * 1000) + 30_000))
        self.send_header("lambda-runtime-invoked-function-arn", "arn:aws:lambda:us-east-1:123456789012:function:local")
        self.send_header("lambda-runtime-trace-id", "Root=1-00000000-000000000000000000000000;Sampled=0")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        run = RuntimeApi.run
        length = int(self.headers.get("content-length") or 0)
        payload = self.rfile.read(length)
        parts = self.path.split("/")
        if "invocation" in parts:
            request_id = parts[parts.index("invocation") + 1]
            run.answered[request_id] = time.perf_counter()
            if parts[-1] == "error":
                run.errors.append(payload.decode(errors="replace"))
            else:
                status = json.loads(payload or b"{}").get("statusCode", 200)
                if status != 200:  # an HTTP function's answer: the measurement needs a success
                    run.errors.append(f"HTTP {status}: {payload[:300]!r}")
        else:  # init/error
            run.errors.append(payload.decode(errors="replace"))
            run.done.set()
        self.reply(202, b"{}")
        if len(run.answered) >= run.expected:
            run.done.set()

    def reply(self, status, body):
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A killed function's keep-alive connection resets: expected, not worth a traceback.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


def render(path, values):
    text = open(os.path.join(ROOT, path)).read()
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    return json.loads(text)


def function_env(function, port):
    manifest = tomllib.load(open(os.path.join(ROOT, "functions", function, "Cargo.toml"), "rb"))
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "PATH", "HOME"))}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    env.update(manifest.get("package", {}).get("metadata", {}).get("lambda", {}).get("env", {}))
    env.update(
        AWS_LAMBDA_RUNTIME_API=f"127.0.0.1:{port}",
        AWS_LAMBDA_FUNCTION_NAME=function,
        AWS_LAMBDA_FUNCTION_VERSION="$LATEST",
        AWS_LAMBDA_FUNCTION_MEMORY_SIZE="512",
        AWS_LAMBDA_LOG_GROUP_NAME=f"/aws/lambda/{function}",
        AWS_LAMBDA_LOG_STREAM_NAME="coldstart",
        RUST_LOG="warn",
    )
    return env


def cpu_ms(pid):
    """CPU time the process's threads have used so far (schedstat: nanoseconds, unlike the
    10 ms ticks of /proc/<pid>/stat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
            total += int(schedstat.read().split()[0])
    return total / 1e6


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(binary, env, event):
    run = Run([event, event])
    RuntimeApi.run = run
    started = time.perf_counter()
    log = open(LOG, "ab")
    process = subprocess.Popen([binary], env=env, stdout=log, stderr=log)
    try:
        if not run.done.wait(60) or run.errors or len(run.answered) < 2:
            raise RuntimeError(f"{binary}: {run.errors or 'no answer'} (its output: {LOG})")
        rss = peak_rss_mb(process.pid)
        cpu = cpu_ms(process.pid)
    finally:
        process.kill()
        process.wait()
        log.close()
    (first_id, first_at), (warm_id, warm_at) = sorted(run.handed.items(), key=lambda kv: kv[1])
    return {
        "init": (run.first_next - started) * 1000,
        "first": (run.answered[first_id] - first_at) * 1000,
        "warm": (run.answered[warm_id] - warm_at) * 1000,
        "rss": rss,
        "cpu": cpu,
    }


def main():
    bin_dir, keys_file = sys.argv[1], sys.argv[2]
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    values = dict(line.strip().split("=", 1) for line in open(keys_file) if "=" in line)
    values.update(TODAY=time.strftime("%Y-%m-%d", time.gmtime()), RUN="coldstart")
    server = Server(("127.0.0.1", 0), RuntimeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    print(f"{runs} runs per function, release binaries in {bin_dir}, Runtime API stand-in on :{port}")
    print(f"{'function':<16} {'init ms':>8} {'first ms':>9} {'warm ms':>8} {'CPU ms':>7} {'peak RSS MB':>12}  targets (init < {INIT_TARGET_MS} ms, RSS <= {RSS_TARGET_MB} MB)")
    failed = False
    for function, fixture in FUNCTIONS.items():
        event = render(fixture, values)
        samples = [measure(os.path.join(bin_dir, function), function_env(function, port), event) for _ in range(runs)]
        init = statistics.median(s["init"] for s in samples)
        first = statistics.median(s["first"] for s in samples)
        warm = statistics.median(s["warm"] for s in samples)
        rss = max(s["rss"] for s in samples)
        cpu = statistics.median(s["cpu"] for s in samples)
        ok = init < INIT_TARGET_MS and rss <= RSS_TARGET_MB
        failed |= not ok
        print(f"{function:<16} {init:>8.1f} {first:>9.1f} {warm:>8.1f} {cpu:>7.0f} {rss:>12.1f}  {'met' if ok else 'MISSED'}")
    server.shutdown()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
