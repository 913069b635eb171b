"""protoedge.client against the real daemon: both transports, error mapping, reconnecting after the
daemon restarted under a kept-alive connection."""
import numpy as np
import pytest

from protoedge.client import Client, ClientError, Overloaded

from daemon_support import Server, images


def test_url_schemes_are_checked():
    with pytest.raises(ValueError, match="unix"):
        Client("ftp://host/x")
    with pytest.raises(ValueError):
        Client().add_examples(images(1))  # neither label nor labels


def test_errors_carry_status_and_message_and_the_connection_survives(tmp_path):
    with Server(tmp_path, state=False) as srv:
        for url in (srv.tcp_url, srv.unix_url):
            with Client(url) as c:
                with pytest.raises(ClientError) as e:
                    c.cluster(np.zeros((1, 1, 28, 28), np.float32))
                assert e.value.status == 400 and "uint8" in e.value.message
                with pytest.raises(ClientError) as e:
                    c.label(12345, "x")
                assert e.value.status == 404
                with pytest.raises(ClientError) as e:
                    c.add_examples(images(2), labels=["a"])
                assert e.value.status == 400 and "2 images" in e.value.message
                # the same keep-alive connection still serves good requests
                assert len(c.cluster(images(3))) == 3
                assert c.embed(images(1)).shape == (1, 64)


def test_overloaded_is_its_own_error_with_retry_after(tmp_path):
    import threading

    caught, other = [], []
    with Server(tmp_path, "--max-queue", "1", "--max-wait-ms", "0", state=False) as srv:
        def flood():
            with Client(srv.tcp_url, timeout=60) as c:
                for _ in range(4):
                    try:
                        c.assign(images(256))
                    except Overloaded as e:
                        caught.append(e)
                    except Exception as e:  # noqa: BLE001 - anything else is a failure
                        other.append(e)

        threads = [threading.Thread(target=flood) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not other, other[:3]
    assert caught and all(e.status == 503 and e.retry_after == 1.0 and "queue" in e.message for e in caught)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_after_a_daemon_restart_reads_reconnect_and_updates_are_not_resent(tmp_path, transport):
    srv = Server(tmp_path)
    try:
        srv.start()
        url = srv.tcp_url if transport == "tcp" else srv.unix_url
        with Client(url) as c:
            first = c.cluster_full(images(2, seed=1))
            assert srv.terminate() == 0
            srv.start()  # same port / socket path, state restored from the final snapshot
            # A read on the dead kept-alive connection is retried once on a new one ...
            assert sum(x["seen"] for x in c.clusters()) == 2
            second = c.cluster_full(images(2, seed=2))
            assert second["seq"] == first["seq"] + 1
            assert srv.terminate() == 0
            srv.start()
            # ... an update is not: it may have been applied before the connection dropped.
            with pytest.raises(ConnectionError):
                c.cluster(images(2, seed=3))
            assert sum(x["seen"] for x in c.clusters()) == 4
    finally:
        srv.stop()
