"""Exercises the extension's main paths once; run by tools/asan-selfcheck.

Webhooks to a loopback receiver (one endpoint answers 500, so retries and a
dead letter happen), a live asyncio subscriber (Waker.dispatch), a channel
left registered, and close() with a delivery still pending.
"""

import asyncio
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import blueprint_notify as bn


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(500 if self.path == "/fail" else 204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


async def main(url: str) -> None:
    # The receiver is on loopback, which the SSRF guard blocks by default.
    notifier = bn.JobNotifier(
        signing_secret="k", allow_private_networks=True, retry_base_ms=1, max_retries=1
    )
    notifier.register_job("idle")
    sub = notifier.subscribe("job")
    for i in range(5):
        notifier.notify("job", bn.JobEvent("processing", progress=i * 25), url + "/ok")
        await asyncio.sleep(0)
    notifier.notify("job", bn.JobEvent("completed", result={"n": 1}), url + "/ok")
    notifier.notify("bad", bn.JobEvent("failed", error="x"), url + "/fail")
    seen = [event async for event in sub]
    assert len(seen) == 6, seen
    assert await notifier.drain(10)
    assert len(notifier.dead_letters()) == 1
    notifier.notify("late", bn.JobEvent("queued"), "http://127.0.0.1:9/")
    notifier.close(0.05)
    assert len(notifier.dead_letters()) == 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.CRITICAL)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    asyncio.run(main(f"http://127.0.0.1:{server.server_port}"))
    server.shutdown()
    server.server_close()
    print("scenario ok:", bn._core.__file__)
