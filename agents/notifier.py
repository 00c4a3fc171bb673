"""`dealpulse notifier`: alerts from Kafka to webhook subscribers — grouped, signed, retried, isolated.

Each subscriber has its own grouper and its own sender task: a dead or slow subscriber retries (exponential
backoff with jitter, for its retry window) without delaying anyone else; its notifications stay in order. What no
retry could deliver goes to ``dealpulse.alerts.dead`` and shows as ``dead`` in the delivery log
(``alert_deliveries``). Offsets are committed only up to alerts whose notifications finished (delivered or dead):
a restarted notifier re-delivers the rest (receivers deduplicate on ``notification_id`` / ``alert_id``).

``POST /feedback`` takes a subscriber's verdict on an alert (signed like the webhooks) and publishes it as a
``feedback`` event, which the models learn from and ``rule_precision`` counts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dealpulse.agents.alerter import SOURCE_TS_HEADER, load_silences, take_messages
from dealpulse.pipelines.delivery import (
    Grouper,
    Notification,
    Silence,
    Subscriber,
    SubscriberConfig,
    backoff_delays,
    notification_body,
    signature_headers,
    silenced_by,
    verify_signature,
)
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import connect

log = logging.getLogger(__name__)

DELIVERY_COLUMNS = ("notification_id", "subscriber", "group_key", "alert_ids", "attempt", "outcome", "http_status",
                    "error", "latency_ms", "event_to_delivery_ms", "attempted_at")  # fmt: skip


class NotifierMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.attempts = Counter("dealpulse_webhook_attempts_total", "webhook requests", ["subscriber", "outcome"],
                                registry=r)  # fmt: skip
        self.dead = Counter("dealpulse_webhook_dead_total", "notifications given up after the retry window",
                            ["subscriber"], registry=r)  # fmt: skip
        self.queue = Gauge("dealpulse_webhook_queue", "notifications waiting per subscriber", ["subscriber"],
                           registry=r)  # fmt: skip
        self.latency = Histogram(
            "dealpulse_event_to_webhook_seconds", "Kafka append of the triggering event to its webhook delivered",
            ["subscriber"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300), registry=r,
        )  # fmt: skip
        self.silenced = Counter("dealpulse_notifier_silenced_total", "alerts not delivered: silenced", registry=r)
        self.feedback = Counter("dealpulse_feedback_total", "feedback posted by subscribers", ["verdict"],
                                registry=r)  # fmt: skip


@dataclass
class Position:
    """Which subscribers still owe a delivery for one alerts-topic message."""

    waiting: set[str] = field(default_factory=set)


@dataclass
class SubscriberLane:
    subscriber: Subscriber
    grouper: Grouper
    queue: asyncio.Queue[Notification] = field(default_factory=asyncio.Queue)


class Notifier:
    def __init__(self, settings: Settings, config: SubscriberConfig, metrics: NotifierMetrics | None = None,
                 clock_ms: Any = None) -> None:  # fmt: skip
        self.settings = settings
        self.config = config
        self.metrics = metrics or NotifierMetrics()
        self.store = connect(settings)
        self.lanes = {s.name: SubscriberLane(s, Grouper(s.policy)) for s in config.subscribers}
        self.positions: dict[int, dict[int, Position]] = defaultdict(dict)  # partition -> offset -> who owes
        self.log_rows: list[tuple[Any, ...]] = []
        self.silences: list[Silence] = []
        self.producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
        self.rng = random.Random()
        self.now_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.delivered = 0

    # intake ----------------------------------------------------------------------------------------------------

    def take(self, partition: int, offset: int, alert: dict[str, Any], kafka_ts_ms: int) -> None:
        position = self.positions[partition].setdefault(offset, Position())
        now = self.now_ms()
        if alert.get("silenced_by") or silenced_by(alert, self.silences, now):
            self.metrics.silenced.inc()
            return
        for subscriber in self.config.route(alert):
            lane = self.lanes[subscriber.name]
            previous = _current(lane.grouper, alert["fingerprint"])
            # an unsent earlier state that this one replaces is settled by this one's notification
            positions = [*(previous or {}).get("_pos", ()), (partition, offset)]
            routed = {**alert, "_pos": positions, "_kafka_ms": kafka_ts_ms}
            lane.grouper.add(routed, now)
            if _current(lane.grouper, alert["fingerprint"]) is routed:
                position.waiting.add(subscriber.name)

    def release(self, subscriber: str, notification: Notification) -> None:
        for alert in notification.alerts:
            for partition, offset in alert["_pos"]:
                position = self.positions[partition].get(offset)
                if position is not None:
                    position.waiting.discard(subscriber)

    def committable(self) -> list[TopicPartition]:
        """Per partition, the offset after the longest finished prefix."""
        out = []
        for partition, by_offset in self.positions.items():
            done_until = None
            for offset in sorted(by_offset):
                if by_offset[offset].waiting:
                    break
                done_until = offset
                del by_offset[offset]
            if done_until is not None:
                out.append(TopicPartition(self.settings.alerts_topic, partition, done_until + 1))
        return out

    def flush_due(self) -> None:
        now = self.now_ms()
        for lane in self.lanes.values():
            for notification in lane.grouper.due(now):
                lane.queue.put_nowait(notification)
            self.metrics.queue.labels(lane.subscriber.name).set(lane.queue.qsize())

    # delivery --------------------------------------------------------------------------------------------------

    async def sender(self, lane: SubscriberLane, session: aiohttp.ClientSession) -> None:
        """One subscriber's notifications, in order, each retried until delivered or its window ends."""
        subscriber = lane.subscriber
        while True:
            notification = await lane.queue.get()
            await self.deliver(subscriber, notification, session)
            self.release(subscriber.name, notification)
            lane.queue.task_done()

    async def deliver(self, subscriber: Subscriber, notification: Notification,
                      session: aiohttp.ClientSession) -> bool:  # fmt: skip
        feedback_url = (
            f"{self.settings.notifier_public_url.rstrip('/')}/feedback" if self.settings.notifier_public_url else ""
        )
        public = tuple({k: v for k, v in a.items() if not k.startswith("_")} for a in notification.alerts)
        body_json = notification_body(subscriber.name, Notification(notification.group_key, notification.labels,
                                                                    public, notification.sent_ms), feedback_url)  # fmt: skip
        body = orjson.dumps(body_json)
        newest_source = max(a.get("_kafka_ms", 0) for a in notification.alerts)
        delays = backoff_delays(subscriber.retry_initial_s, subscriber.retry_max_s, subscriber.retry_window_s,
                                self.rng)  # fmt: skip
        attempt = 0
        while True:
            attempt += 1
            headers = {"Content-Type": "application/json", "X-Dealpulse-Notification": body_json["notification_id"],
                       **signature_headers(subscriber.secret, body, int(time.time()))}  # fmt: skip
            started = time.perf_counter()
            status, error = 0, ""
            try:
                timeout = aiohttp.ClientTimeout(total=subscriber.timeout_s)
                async with session.post(subscriber.url, data=body, headers=headers, timeout=timeout) as response:
                    status = response.status
                    await response.read()
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
            latency_ms = (time.perf_counter() - started) * 1000
            ok = 200 <= status < 300
            retry_delay = None if ok else next(delays, None)
            outcome = "delivered" if ok else ("retry" if retry_delay is not None else "dead")
            now_ms = int(time.time() * 1000)
            self.log_rows.append((body_json["notification_id"], subscriber.name, notification.group_key,
                                  [a["alert_id"] for a in public], attempt, outcome, status, error or
                                  ("" if ok else f"HTTP {status}"), latency_ms, max(0, now_ms - newest_source),
                                  datetime.fromtimestamp(now_ms / 1000, UTC)))  # fmt: skip
            self.metrics.attempts.labels(subscriber.name, outcome).inc()
            if ok:
                self.delivered += 1
                if newest_source:
                    self.metrics.latency.labels(subscriber.name).observe(max(0.0, now_ms - newest_source) / 1000)
                return True
            if retry_delay is None:
                self.metrics.dead.labels(subscriber.name).inc()
                self.producer.produce(self.settings.alerts_dead_topic, key=subscriber.name.encode(), value=body,
                                      headers=[("dealpulse.subscriber", subscriber.name.encode()),
                                               ("dealpulse.attempts", str(attempt).encode()),
                                               ("dealpulse.last_error", (error or f"HTTP {status}").encode())])  # fmt: skip
                self.producer.flush(10)
                log.error("subscriber %s: gave up on notification %s after %d attempts (%s)",
                          subscriber.name, body_json["notification_id"], attempt, error or status)  # fmt: skip
                return False
            await asyncio.sleep(retry_delay)

    async def _housekeeping(self, consumer: Consumer, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            await asyncio.sleep(1.0)
            await loop.run_in_executor(None, self.flush_log)
            commits = self.committable()
            if commits:
                consumer.commit(offsets=commits, asynchronous=True)
            try:
                self.silences = await loop.run_in_executor(None, load_silences, self.store)
            except Exception as exc:  # keep the last known silences while the store is away
                log.warning("could not reload silences: %s", exc)

    def flush_log(self) -> None:
        if not self.log_rows:
            return
        rows, self.log_rows = self.log_rows, []
        try:
            self.store.insert("alert_deliveries", rows, DELIVERY_COLUMNS)
        except Exception as exc:  # keep them for the next flush: the log is never silently dropped
            log.warning("delivery log insert failed (%s); will retry", exc)
            self.log_rows = rows + self.log_rows

    # feedback --------------------------------------------------------------------------------------------------

    async def feedback(self, request: web.Request) -> web.Response:
        """A subscriber's verdict on an alert -> a ``feedback`` event on the events topic."""
        body = await request.read()
        name = request.headers.get("X-Dealpulse-Subscriber", "")
        lane = self.lanes.get(name)
        if lane is None or not verify_signature(lane.subscriber.secret, dict(request.headers), body, int(time.time())):
            return web.json_response({"error": "unknown subscriber or bad signature"}, status=401)
        try:
            data = orjson.loads(body)
            alert_id, account_id, verdict = str(data["alert_id"]), str(data["account_id"]), str(data["verdict"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return web.json_response(
                {"error": "send {alert_id, account_id, verdict: accepted|rejected} (and entity, entity_id)"}, status=400
            )
        if verdict not in ("accepted", "rejected"):
            return web.json_response({"error": "verdict is accepted or rejected"}, status=400)
        props: dict[str, Any] = {"ref_id": alert_id, "verdict": verdict}
        event: dict[str, Any] = {
            "event_id": f"fb-{alert_id}-{name}"[:64], "type": "feedback",
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "account_id": account_id,
            "source": f"subscriber:{name}", "props": props,
        }  # fmt: skip
        for key in ("lead_id", "opportunity_id"):
            if data.get(key):
                event[key] = str(data[key])
        if data.get("entity") in ("lead", "account") and data.get("entity_id"):
            # the models learn from it too: it labels the entity's newest snapshot from before the alert began
            starts_ms = alert_id.rpartition("-")[2]
            props.update(entity_ref=f"{data['entity']}:{data['entity_id']}",
                                  at_ms=int(starts_ms) if starts_ms.isdigit() else None)  # fmt: skip
        self.producer.produce(self.settings.events_topic, key=account_id.encode(), value=orjson.dumps(event))
        self.producer.flush(10)
        self.metrics.feedback.labels(verdict).inc()
        return web.json_response({"accepted": True, "event_id": event["event_id"]}, status=202)

    async def metrics_page(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), content_type="text/plain")

    # the loop --------------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, port: int | None = None) -> int:
        s = self.settings
        app = web.Application()
        app.router.add_post("/feedback", self.feedback)
        app.router.add_get("/metrics", self.metrics_page)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "0.0.0.0", s.notifier_port if port is None else port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.warning("notifier: /metrics and POST /feedback on http://127.0.0.1:%d", self.port)
        consumer = Consumer({"bootstrap.servers": s.kafka_bootstrap, "group.id": s.notifier_group,
                             "enable.auto.commit": False, "auto.offset.reset": "earliest",
                             "session.timeout.ms": int(s.kafka_session_timeout_s * 1000),
                             "fetch.wait.max.ms": s.kafka_fetch_wait_ms})  # fmt: skip
        consumer.subscribe([s.alerts_topic])
        self.ready = True
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session:
            senders = [asyncio.create_task(self.sender(lane, session)) for lane in self.lanes.values()]
            # the delivery log, commits and silences on their own task: store round trips never hold up intake
            housekeeping = asyncio.create_task(self._housekeeping(consumer, stop))
            try:
                while not stop.is_set():
                    messages = await loop.run_in_executor(None, take_messages, consumer, 500, 0.05)
                    for message in messages:
                        if message.error():
                            continue
                        try:
                            alert = orjson.loads(message.value() or b"")
                        except orjson.JSONDecodeError:
                            log.error(
                                "alerts topic: unreadable message at %s[%s]", message.partition(), message.offset()
                            )
                            continue
                        source = dict(message.headers() or ()).get(SOURCE_TS_HEADER)
                        source_ms = int(source) if source else message.timestamp()[1]
                        self.take(message.partition() or 0, message.offset() or 0, alert, source_ms)
                    self.flush_due()
                    await asyncio.sleep(0)
            finally:
                for task in [*senders, housekeeping]:
                    task.cancel()
                await loop.run_in_executor(None, self.flush_log)
                commits = self.committable()
                if commits:
                    consumer.commit(offsets=commits, asynchronous=False)
                consumer.close()
                await runner.cleanup()
        return self.port


def _current(grouper: Grouper, fingerprint: str) -> dict[str, Any] | None:
    for group in grouper.groups.values():
        if fingerprint in group.alerts:
            return group.alerts[fingerprint]
    return None


def serve_notifier(settings: Settings) -> None:
    """`dealpulse notifier`: deliver until SIGTERM/SIGINT."""
    import signal

    config = SubscriberConfig.load(settings.subscribers_file)
    if not config.subscribers:
        log.warning("no subscribers configured (DEALPULSE_SUBSCRIBERS_FILE): alerts stay on %s", settings.alerts_topic)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Notifier(settings, config).run(stop)

    asyncio.run(main())
