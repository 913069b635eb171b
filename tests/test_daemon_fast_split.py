"""The HTTP fast path (server_fast.FastHTTP) in-process against stubs: whatever the read
boundaries, requests of its own are answered in order, one at a time, and the first other request
reaches aiohttp's protocol with every byte from its start on (CR/LF that llhttp skips between
requests aside: aiohttp skips them too)."""
import random
import types

import pytest

from protoedge.runtime import server_fast as sf


class _Aiohttp:
    def __init__(self):
        self.data = b""

    def connection_made(self, transport):
        pass

    def data_received(self, data):
        self.data += data


class _Transport:
    def __init__(self):
        self.out, self.proto = [], None

    def get_extra_info(self, key):
        return None

    def write(self, data):
        self.out.append(data)

    def set_protocol(self, proto):
        self.proto = proto

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def close(self):
        pass


def _post(path: bytes, body: bytes) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\nContent-Length: %d\r\n\r\n"
            % (path, len(body)) + body)


@pytest.fixture
def stubs(monkeypatch):
    rng = random.Random(1)
    queue = []

    class Worker:
        def admit(self, nbytes):
            if rng.random() < 0.2:
                raise sf.Overloaded()

        def release(self, nbytes):
            pass

        def submit_nowait(self, job, nbytes, done):
            queue.append(done)

    class Metric:
        def observe(self, *a):
            pass

        def inc(self, *a):
            pass

    monkeypatch.setattr(sf, "decode_pixels", lambda body, *a: body)
    monkeypatch.setattr(sf, "Job", lambda op, pixels: None)
    daemon = types.SimpleNamespace(
        ready=True, draining=False, token=None, worker=Worker(), bundle=types.SimpleNamespace(input_spec=None),
        config=types.SimpleNamespace(max_body_bytes=1 << 20, max_images_per_request=64),
        metrics=types.SimpleNamespace(latency=Metric(), requests=Metric(), rejected=Metric()))
    return rng, queue, daemon


def test_answers_in_order_and_hands_over_from_the_first_byte_at_any_split(stubs):
    rng, queue, daemon = stubs
    others = [b"GET /x HTTP/1.1\r\n\r\n", _post(b"/v1/assign?q", b"abc"), b"GARBAGE\r\n\r\n",
              b"\r\nGET / HTTP/1.1\r\n\r\n", _post(b"/v1/assign", b"a" * ((1 << 20) + 1)), b""]
    for _ in range(3000):
        ours = [_post(b"/v1/assign", rng.randbytes(rng.choice([1, 50, 3000]))) for _ in range(rng.randrange(5))]
        other = rng.choice(others)
        after = rng.choice([b"", _post(b"/v1/assign", b"zz")])
        data = b"".join(ours) + other + after
        aiohttp = _Aiohttp()
        proto = sf.FastConnections(daemon, lambda: aiohttp)()
        transport = _Transport()
        proto.connection_made(transport)
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(8)))) if len(data) > 1 else []
        for a, b in zip([0] + cuts, cuts + [len(data)]):
            (transport.proto or proto).data_received(data[a:b])
            while queue and rng.random() < 0.5:  # answers come back at random moments
                queue.pop(0)([])
        while queue:
            queue.pop(0)([])
        answers = [w.split(b" ")[1] for w in transport.out]
        assert set(answers) <= {b"200", b"503"}
        if other:
            assert aiohttp.data.lstrip(b"\r\n") == (other + after).lstrip(b"\r\n"), (cuts, aiohttp.data[:80])
            assert len(answers) == len(ours)
        else:
            assert aiohttp.data == b"" and len(answers) == len(ours) + (1 if after else 0)


def test_kept_bytes_stay_bounded_when_every_read_ends_inside_a_header_block(stubs):
    rng, queue, daemon = stubs
    proto = sf.FastConnections(daemon, _Aiohttp)()
    transport = _Transport()
    proto.connection_made(transport)
    reqs = [_post(b"/v1/assign", rng.randbytes(1000)) for _ in range(300)]
    data = b"".join(reqs)
    starts = [sum(len(r) for r in reqs[:i]) for i in range(1, len(reqs))]
    cuts = [s + 20 for s in starts[::3]]  # every read ends 20 bytes into a header block
    peak = 0
    for a, b in zip([0] + cuts, cuts + [len(data)]):
        proto.data_received(data[a:b])
        peak = max(peak, len(proto.raw))
        while queue:
            queue.pop(0)([])
    assert len(transport.out) == len(reqs) and transport.proto is None
    assert peak <= sf.MAX_RAW + 2 * 3 * len(reqs[0]), peak
