"""The hand-written Prometheus exposition (runtime/server_metrics.py)."""
from protoedge.runtime.server_metrics import Counter, Gauge, Histogram, Registry, resident_memory_bytes


def parse(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_histogram_buckets_are_cumulative_with_sum_and_count():
    h = Histogram("lat_seconds", "latency", (0.001, 0.01, 0.1), ("route",))
    for v in (0.0005, 0.001, 0.005, 0.05, 5.0):
        h.observe(v, "/a")
    r = Registry()
    r.add(h)
    m = parse(r.render())
    assert m['lat_seconds_bucket{route="/a",le="0.001"}'] == 2  # le is inclusive
    assert m['lat_seconds_bucket{route="/a",le="0.01"}'] == 3
    assert m['lat_seconds_bucket{route="/a",le="0.1"}'] == 4
    assert m['lat_seconds_bucket{route="/a",le="+Inf"}'] == 5 == m['lat_seconds_count{route="/a"}']
    assert abs(m['lat_seconds_sum{route="/a"}'] - 5.0565) < 1e-9


def test_counters_gauges_and_label_escaping():
    r = Registry()
    c = r.add(Counter("reqs_total", "requests", ("route", "status")))
    plain = r.add(Counter("rejects_total", "rejections"))
    r.add(Gauge("depth", "queue depth", lambda: 7))
    c.inc('/v1/"x"\n', "200")
    c.inc('/v1/"x"\n', "200")
    text = r.render()
    assert "# TYPE reqs_total counter" in text and "# TYPE depth gauge" in text
    m = parse(text)
    assert m['reqs_total{route="/v1/\\"x\\"\\n",status="200"}'] == 2
    assert m["rejects_total"] == 0 and m["depth"] == 7  # an unlabelled counter shows 0 before any event
    plain.inc()
    assert parse(r.render())["rejects_total"] == 1


def test_resident_memory_is_plausible():
    assert 10 * 2**20 < resident_memory_bytes() < 16 * 2**30
