#!/usr/bin/env python3
"""A fake OpenAI-compatible model server for the agent supervisor's tests.

It answers like llama-server (same /health semantics: 503 while "loading",
200 {"status":"ok"} when ready) but loads nothing, and it can misbehave on
demand so the failure paths of a process supervisor can be tested: never
ready, ready late, dying later, crashing at once, ignoring SIGTERM, or leaving
a child process behind in its process group.

Standard library only. Prints one startup line on stdout (with the bound port,
so --port 0 works) and logs each request on stderr.
"""

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROG = "fake-model-server"
REPLY = "Hello! This is a fake model server answering your request."
EMBEDDING_DIM = 8


def log(msg):
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    p.add_argument("--model", default="fake-model", help="model id it reports")
    p.add_argument("--never-ready", action="store_true", help="/health answers 503 forever")
    p.add_argument("--ready-after", type=float, default=0.0, metavar="SECONDS",
                   help="/health answers 503 until this long after start")
    p.add_argument("--exit-after-healthy", type=float, metavar="SECONDS",
                   help="exit with code 3 this long after /health first answered 200 "
                        "(the supervisor has then seen it ready, however slow the start)")
    p.add_argument("--exit-after", type=float, metavar="SECONDS",
                   help="exit with code 3 this long after start")
    p.add_argument("--crash-on-start", action="store_true",
                   help="print an error to stderr and exit 1 at once")
    p.add_argument("--ignore-sigterm", action="store_true",
                   help="ignore SIGTERM (and SIGINT): only SIGKILL stops it")
    p.add_argument("--child", action="store_true",
                   help="spawn a long-lived child in the same process group")
    p.add_argument("--log-bytes-per-sec", type=int, default=0, metavar="N",
                   help="write about N bytes of log lines per second to stderr")
    p.add_argument("--hold-file", metavar="PATH",
                   help="streamed replies stop after their first token until PATH exists "
                        "(at most 30 s, then an error chunk): shows that a proxy passes "
                        "chunks through as they come")
    return p.parse_args(argv)


def words(text):
    return text.split()


def prompt_tokens(messages_or_prompt):
    """A crude token count: whitespace-separated words of every text part."""
    if isinstance(messages_or_prompt, str):
        return len(words(messages_or_prompt))
    n = 0
    for item in messages_or_prompt or []:
        if isinstance(item, str):
            n += len(words(item))
        elif isinstance(item, dict):
            content = item.get("content")
            if isinstance(content, str):
                n += len(words(content))
            elif isinstance(content, list):
                n += sum(len(words(part.get("text", ""))) for part in content
                         if isinstance(part, dict))
    return n


def reply_tokens(max_tokens):
    """The canned reply as tokens (words with their leading space), cut to
    max_tokens, and the OpenAI finish_reason."""
    toks = [w if i == 0 else " " + w for i, w in enumerate(words(REPLY))]
    if isinstance(max_tokens, int) and 0 <= max_tokens < len(toks):
        return toks[:max_tokens], "length"
    return toks, "stop"


def embedding(text):
    """Deterministic unit-ish vector derived from the text."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round((b - 127.5) / 127.5, 6) for b in digest[:EMBEDDING_DIM]]


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr, handler, args):
        super().__init__(addr, handler)
        self.args = args
        self.started = time.monotonic()
        self.started_wall = time.time()

    def healthy_once(self):
        """With --exit-after-healthy: the first healthy answer starts the countdown."""
        after = self.args.exit_after_healthy
        if after is None or getattr(self, "countdown", None):
            return
        def die():
            log(f"exiting with code 3 {after}s after the first healthy answer")
            os._exit(3)
        self.countdown = threading.Timer(after, die)
        self.countdown.daemon = True
        self.countdown.start()

    def ready(self):
        if self.args.never_ready:
            return False
        return time.monotonic() - self.started >= self.args.ready_after


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = PROG

    # --- plumbing -------------------------------------------------------------

    def log_message(self, fmt, *args):
        log(f"{self.address_string()} {fmt % args}")

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, status, message, kind):
        # llama-server's error shape.
        self.send_json(status, {"error": {"code": status, "message": message, "type": kind}})

    def read_json(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self.send_error_json(400, "request body is not valid JSON", "invalid_request_error")
            return None
        if not isinstance(body, dict):
            self.send_error_json(400, "request body must be a JSON object", "invalid_request_error")
            return None
        return body

    def start_sse(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        # No length is known up front: the end of the stream is the end of the body.
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()

    def send_sse(self, obj):
        data = obj if isinstance(obj, str) else json.dumps(obj)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def hold(self):
        """With --hold-file: wait until the file exists; False if it never did."""
        path = self.server.args.hold_file
        if not path:
            return True
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def loading(self):
        """Like llama-server, every endpoint answers 503 until the model is loaded."""
        if self.server.ready():
            return False
        self.send_error_json(503, "Loading model", "unavailable_error")
        return True

    # --- routes ---------------------------------------------------------------

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            if not self.loading():
                self.send_json(200, {"status": "ok"})
                self.server.healthy_once()
        elif path in ("/v1/models", "/models"):
            if not self.loading():
                self.send_json(200, {"object": "list", "data": [{
                    "id": self.server.args.model, "object": "model",
                    "created": int(self.server.started_wall), "owned_by": PROG}]})
        else:
            self.send_error_json(404, f"no route GET {path}", "not_found_error")

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        routes = {
            "/v1/chat/completions": self.chat_completions,
            "/chat/completions": self.chat_completions,
            "/v1/completions": self.completions,
            "/completions": self.completions,
            "/v1/embeddings": self.embeddings,
            "/embeddings": self.embeddings,
        }
        route = routes.get(path)
        if route is None:
            self.send_error_json(404, f"no route POST {path}", "not_found_error")
            return
        if self.loading():
            return
        body = self.read_json()
        if body is not None:
            route(body)

    def chat_completions(self, body):
        model = self.server.args.model
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        toks, finish = reply_tokens(body.get("max_tokens", body.get("max_completion_tokens")))
        n_prompt = prompt_tokens(body.get("messages"))
        if body.get("stream"):
            self.start_sse()
            base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
            self.send_sse({**base, "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            try:
                for i, t in enumerate(toks):
                    self.send_sse({**base, "choices": [
                        {"index": 0, "delta": {"content": t}, "finish_reason": None}]})
                    if i == 0 and not self.hold():
                        self.send_sse({**base, "choices": [{"index": 0, "delta": {
                            "content": " [hold timed out]"}, "finish_reason": "stop"}]})
                        self.send_sse("[DONE]")
                        return
                self.send_sse({**base, "choices": [{"index": 0, "delta": {},
                                                    "finish_reason": finish}],
                               "usage": usage(n_prompt, len(toks))})
                self.send_sse("[DONE]")
            except (BrokenPipeError, ConnectionResetError):
                log("client went away during a stream")
            return
        self.send_json(200, {
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": "".join(toks)}}],
            "usage": usage(n_prompt, len(toks)),
        })

    def completions(self, body):
        model = self.server.args.model
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        toks, finish = reply_tokens(body.get("max_tokens"))
        n_prompt = prompt_tokens(body.get("prompt", ""))
        if body.get("stream"):
            self.start_sse()
            base = {"id": cid, "object": "text_completion", "created": created, "model": model}
            for t in toks:
                self.send_sse({**base, "choices": [
                    {"index": 0, "text": t, "logprobs": None, "finish_reason": None}]})
            self.send_sse({**base, "choices": [
                {"index": 0, "text": "", "logprobs": None, "finish_reason": finish}],
                "usage": usage(n_prompt, len(toks))})
            self.send_sse("[DONE]")
            return
        self.send_json(200, {
            "id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": "".join(toks), "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage(n_prompt, len(toks)),
        })

    def embeddings(self, body):
        inputs = body.get("input", "")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            self.send_error_json(400, "'input' must be a string or a list of strings",
                                 "invalid_request_error")
            return
        n = sum(len(words(i)) for i in inputs)
        self.send_json(200, {
            "object": "list", "model": self.server.args.model,
            "data": [{"object": "embedding", "index": i, "embedding": embedding(text)}
                     for i, text in enumerate(inputs)],
            "usage": {"prompt_tokens": n, "total_tokens": n},
        })


def usage(n_prompt, n_completion):
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
            "total_tokens": n_prompt + n_completion}


def spawn_child():
    # Same process group (no new session): a supervisor that signals only
    # this pid leaves the child behind; it has to signal the whole group.
    cmd = ["sleep", "1000"] if shutil.which("sleep") else \
        [sys.executable, "-c", "import time; time.sleep(1000)"]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL)


def chatter(bytes_per_sec):
    """Log lines at about bytes_per_sec, in bursts every 50 ms, for the log bound's tests."""
    line = "chatter " + "x" * 91 + "\n"  # 100 bytes
    per_burst = max(1, bytes_per_sec // 20 // len(line))
    n = 0
    while True:
        sys.stderr.write("".join(f"{n + i:08d} {line}" for i in range(per_burst)))
        sys.stderr.flush()
        n += per_burst
        time.sleep(0.05)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.crash_on_start:
        log("error: simulated crash on start (--crash-on-start)")
        return 1

    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        def stop(signum, _frame):
            log(f"received {signal.Signals(signum).name}, exiting")
            os._exit(0)
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    try:
        server = Server((args.host, args.port), Handler, args)
    except OSError as e:
        log(f"error: cannot listen on {args.host}:{args.port}: {e}")
        return 1

    child = spawn_child() if args.child else None

    if args.exit_after is not None:
        def die():
            log(f"exiting with code 3 after {args.exit_after}s (--exit-after)")
            os._exit(3)
        t = threading.Timer(args.exit_after, die)
        t.daemon = True
        t.start()

    if args.log_bytes_per_sec > 0:
        t = threading.Thread(target=chatter, args=(args.log_bytes_per_sec,), daemon=True)
        t.start()

    host, port = server.server_address[:2]
    extra = f" child_pid={child.pid}" if child else ""
    print(f"{PROG}: listening on http://{host}:{port} model={args.model} pid={os.getpid()}{extra}",
          flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
