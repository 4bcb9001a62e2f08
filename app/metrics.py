"""Prometheus metrics, one registry per `Metrics` object (so each app, and each test, counts alone).

The service reports pages through `observe_page` / `observe_repetition`; the HTTP
middleware reports requests. Queue gauges are read from the service when scraped,
so they can never drift from the real counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from app.engines.base import EndpointState
from app.results import PageResult

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Reading = Callable[[], float]
EndpointReading = Callable[[], Sequence[EndpointState]]
PAGE_STATUSES = ("ok", "retried", "truncated", "repetitive", "failed")

# A page takes from ~0.2 s (GPU, vLLM) to minutes (CPU).
_PAGE_SECONDS = (0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
_REQUEST_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
_TOKENS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lightonocr_requests",
            "HTTP requests by route template and status (probes excluded).",
            ["method", "route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "lightonocr_request_duration_seconds",
            "HTTP request duration, body streamed included.",
            ["route"],
            buckets=_REQUEST_SECONDS,
            registry=r,
        )
        self.received_bytes = Counter(
            "lightonocr_received_bytes", "Request body bytes received (uploads), probes excluded.", registry=r
        )
        self.sent_bytes = Counter("lightonocr_sent_bytes", "Response body bytes sent, probes excluded.", registry=r)
        self.pages = Counter("lightonocr_pages", "Pages finished, by page status.", ["status"], registry=r)
        for status in PAGE_STATUSES:
            self.pages.labels(status)
        self.page_seconds = Histogram(
            "lightonocr_page_duration_seconds",
            "Wall time per page: rendering, queueing and every attempt.",
            buckets=_PAGE_SECONDS,
            registry=r,
        )
        self.page_tokens = Histogram(
            "lightonocr_page_tokens",
            "Tokens generated for the kept attempt of each page (failed pages excluded).",
            buckets=_TOKENS,
            registry=r,
        )
        self.retries = Counter(
            "lightonocr_page_retries", "Regenerations of pages that hit the token limit or looped.", registry=r
        )
        self.repetitions = Counter(
            "lightonocr_repetitions", "Generations detected as repetition loops (app/quality.py).", registry=r
        )
        self.queued = Gauge("lightonocr_queued_pages", "Pages admitted and not finished, across requests.", registry=r)
        self.in_flight = Gauge(
            "lightonocr_engine_pages_in_flight", "Pages holding an engine slot (rendering or generating).", registry=r
        )
        self.waiting = Gauge("lightonocr_engine_pages_waiting", "Pages waiting for an engine slot.", registry=r)

    def track(self, *, queued: Reading, in_flight: Reading, waiting: Reading) -> None:
        """Read the queue gauges from the service's own counters at every scrape."""
        self.queued.set_function(queued)
        self.in_flight.set_function(in_flight)
        self.waiting.set_function(waiting)

    def track_endpoints(self, read: EndpointReading) -> None:
        """Per-server series of the engine's remote servers (a vLLM fleet), read at every scrape.

        Labelled by the configured URL (credentials removed), so the label set is bounded by VLLM_BASE_URL.
        """
        self.registry.register(_EndpointCollector(read))

    def observe_page(self, page: PageResult) -> None:
        self.pages.labels(page.status).inc()
        self.page_seconds.observe(page.seconds)
        if page.status != "failed":
            self.page_tokens.observe(page.tokens)
        if page.attempts > 1:
            self.retries.inc(page.attempts - 1)

    def observe_repetition(self) -> None:
        self.repetitions.inc()

    def observe_request(self, method: str, route: str, status: int, seconds: float, received: int, sent: int) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)
        self.received_bytes.inc(received)
        self.sent_bytes.inc(sent)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EndpointCollector(Collector):
    """Reads the engine's endpoint states when scraped: the numbers can never drift from the engine's own."""

    def __init__(self, read: EndpointReading) -> None:
        self._read = read

    def describe(self) -> list[GaugeMetricFamily | CounterMetricFamily]:
        return []  # series depend on the engine; nothing to check at registration

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        endpoints = self._read()
        healthy = GaugeMetricFamily(
            "lightonocr_endpoint_healthy",
            "1 while the vLLM server is in the rotation, 0 while out.",
            labels=["endpoint"],
        )
        in_flight = GaugeMetricFamily(
            "lightonocr_endpoint_pages_in_flight", "Pages at the vLLM server now.", labels=["endpoint"]
        )
        capacity = GaugeMetricFamily(
            "lightonocr_endpoint_capacity", "Pages the vLLM server may hold in flight.", labels=["endpoint"]
        )
        pages = CounterMetricFamily("lightonocr_endpoint_pages", "Pages the vLLM server answered.", labels=["endpoint"])
        errors = CounterMetricFamily(
            "lightonocr_endpoint_errors",
            "Failed attempts at the vLLM server (connection errors, 5xx, 429, timeouts).",
            labels=["endpoint"],
        )
        for endpoint in endpoints:
            label = [endpoint.url]
            healthy.add_metric(label, 1.0 if endpoint.healthy else 0.0)
            in_flight.add_metric(label, endpoint.in_flight)
            capacity.add_metric(label, endpoint.capacity)
            pages.add_metric(label, endpoint.pages)
            errors.add_metric(label, endpoint.errors)
        yield from (healthy, in_flight, capacity, pages, errors)
