"""The alerter and the notifier in threads of this process: for benches, tests and the demo.

Production runs them as their own processes (`dealpulse alerter`, `dealpulse notifier`); here the same classes run
in threads, so their metrics registries can be read directly.
"""

from __future__ import annotations

import asyncio
import threading

from dealpulse.agents.alerter import Alerter, AlerterMetrics
from dealpulse.agents.notifier import Notifier, NotifierMetrics
from dealpulse.pipelines.delivery import SubscriberConfig
from dealpulse.pipelines.settings import Settings


class AlertingThreads:
    """``start()`` both, ``restart_alerter()`` (resumes from its checkpoint), ``stop()`` both."""

    def __init__(self, settings: Settings, config: SubscriberConfig) -> None:
        self.settings, self.config = settings, config
        self.alerter_metrics = AlerterMetrics()
        self.notifier_metrics = NotifierMetrics()
        self.alerter: Alerter | None = None
        self.notifier: Notifier | None = None
        self._alerter_stop = threading.Event()
        self._alerter_thread: threading.Thread | None = None
        self._notifier_loop: asyncio.AbstractEventLoop | None = None
        self._notifier_stop: asyncio.Event | None = None
        self._notifier_thread: threading.Thread | None = None
        self._notifier_ready = threading.Event()

    def start(self) -> AlertingThreads:
        self._start_alerter()
        self._notifier_thread = threading.Thread(target=self._notify, name="notifier", daemon=True)
        self._notifier_thread.start()
        if not self._notifier_ready.wait(30):
            raise TimeoutError("the notifier did not start within 30 s")
        return self

    def _start_alerter(self) -> None:
        self._alerter_stop = threading.Event()
        self.alerter = Alerter(self.settings, self.alerter_metrics)
        self._alerter_thread = threading.Thread(target=self.alerter.run, args=(self._alerter_stop,), name="alerter",
                                                daemon=True)  # fmt: skip
        self._alerter_thread.start()

    def restart_alerter(self) -> None:
        self._stop_alerter()
        self._start_alerter()

    def _stop_alerter(self) -> None:
        self._alerter_stop.set()
        if self._alerter_thread is not None:
            self._alerter_thread.join(60)
            if self._alerter_thread.is_alive():
                raise TimeoutError("the alerter did not stop within 60 s")

    def _notify(self) -> None:
        async def main() -> None:
            self._notifier_loop = asyncio.get_running_loop()
            self._notifier_stop = asyncio.Event()
            self.notifier = Notifier(self.settings, self.config, self.notifier_metrics)
            task = asyncio.create_task(self.notifier.run(self._notifier_stop, port=0))
            while not getattr(self.notifier, "ready", False) and not task.done():
                await asyncio.sleep(0.05)
            self._notifier_ready.set()
            await task

        asyncio.run(main())

    def stop(self) -> None:
        self._stop_alerter()
        if self._notifier_loop is not None and self._notifier_stop is not None:
            self._notifier_loop.call_soon_threadsafe(self._notifier_stop.set)
        if self._notifier_thread is not None:
            self._notifier_thread.join(60)


class WebhookReceiver:
    """A local webhook endpoint that records what it receives; ``fail=True`` answers 500 to everything.

    For benches, tests and trying subscribers out; it verifies nothing itself (see ``verify_signature``).
    """

    def __init__(self, fail: bool = False) -> None:
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[float, dict[str, str], bytes]] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((time.time(), dict(self.headers), body))
                self.send_response(500 if fail else 200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True).start()

    def alerts(self) -> list[dict[str, object]]:
        import orjson

        return [alert for _, _, body in self.requests for alert in orjson.loads(body)["alerts"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
