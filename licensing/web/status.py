"""The HTTP side of a member: a status page, the JSON API and Prometheus metrics.

Read-only: nothing here changes the record, so the listener needs no client
certificate and can sit behind the site's own monitoring.
"""

from __future__ import annotations

import html
import json
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from twisted.web.resource import Resource

from ..server import LicenseServer


class StatusCollector:
    """Prometheus collector reading the server's state at scrape time."""

    def __init__(self, server: LicenseServer) -> None:
        self.license_server = server

    def collect(self):
        doc = self.license_server.status()
        up = GaugeMetricFamily("licensing_serving", "1 if this member answers requests", labels=["server"])
        up.add_metric([doc["server"]], 1.0 if doc["serving"] else 0.0)
        yield up
        leader = GaugeMetricFamily("licensing_is_leader", "1 if this member leads the pool", labels=["server"])
        leader.add_metric([doc["server"]], 1.0 if doc["role"] == "leader" else 0.0)
        yield leader
        term = GaugeMetricFamily("licensing_term", "current leadership term", labels=["server"])
        term.add_metric([doc["server"]], float(doc["term"]))
        yield term
        seq = GaugeMetricFamily("licensing_license_sequence", "installed license sequence", labels=["server"])
        if doc["license"]:
            seq.add_metric([doc["server"]], float(doc["license"]["sequence"]))
        yield seq
        count = GaugeMetricFamily("licensing_feature_seats", "seats the license grants", labels=["feature"])
        used = GaugeMetricFamily("licensing_feature_in_use", "seats in use", labels=["feature", "member"])
        alloc = GaugeMetricFamily("licensing_feature_allocation", "seats allocated", labels=["feature", "member"])
        for f in doc["features"]:
            count.add_metric([f["name"]], float(f["count"]))
            for member, usage in f["members"].items():
                used.add_metric([f["name"], member], float(usage["used"]))
                alloc.add_metric([f["name"], member], float(usage["allocation"]))
        yield count
        yield used
        yield alloc
        leases = GaugeMetricFamily("licensing_leases_held", "leases held by this member", labels=["server"])
        leases.add_metric([doc["server"]], float(len(self.license_server.seats)))
        yield leases


class JSONStatus(Resource):
    isLeaf = True

    def __init__(self, server: LicenseServer) -> None:
        super().__init__()
        self.license_server = server

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 - twisted.web API
        verbose = request.args.get(b"verbose", [b"0"])[0] in (b"1", b"yes", b"true")
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.license_server.status(verbose), indent=2).encode()


class Metrics(Resource):
    isLeaf = True

    def __init__(self, server: LicenseServer) -> None:
        super().__init__()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatusCollector(server))

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 - twisted.web API
        request.setHeader(b"content-type", b"text/plain; version=0.0.4")
        return generate_latest(self.registry)


class StatusPage(Resource):
    """A human-readable page of the same status document."""

    def __init__(self, server: LicenseServer) -> None:
        super().__init__()
        self.license_server = server

    def getChild(self, path: bytes, request: Any) -> Resource:  # noqa: N802 - twisted.web API
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 - twisted.web API
        doc = self.license_server.status()
        e = html.escape
        rows = "".join(
            f"<tr><td>{e(m['name'])}</td><td>{e(str(m['role']))}</td><td>{m['reachable']}</td>"
            f"<td>{e(str(m.get('license_sequence')))}</td></tr>"
            for m in doc["members"]
        )
        feats = "".join(
            f"<tr><td>{e(f['name'])}</td><td>{e(f['version'])}</td><td>{f['count']}</td>"
            f"<td>{f['in_use']}</td><td>{f['free']}</td><td>{e(f['expires'])}</td></tr>"
            for f in doc["features"]
        )
        body = (
            f"<!doctype html><title>licensing {e(doc['server'])}</title>"
            f"<h1>{e(doc['server'])}: {e(doc['role'])}</h1><p>leader: {e(str(doc['leader']))}, "
            f"term {doc['term']}</p><h2>Members</h2><table border=1><tr><th>member</th><th>role</th>"
            f"<th>reachable</th><th>license</th></tr>{rows}</table><h2>Features</h2><table border=1>"
            f"<tr><th>feature</th><th>version</th><th>count</th><th>in use</th><th>free</th>"
            f"<th>expires</th></tr>{feats}</table>"
        )
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return body.encode()


def status_resource(server: LicenseServer) -> Resource:
    """The root resource: ``/`` page, ``/api/status`` JSON, ``/metrics``."""
    root = StatusPage(server)
    api = Resource()
    api.putChild(b"status", JSONStatus(server))
    root.putChild(b"api", api)
    root.putChild(b"metrics", Metrics(server))
    return root
