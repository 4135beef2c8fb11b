import redis

from fleet.embedded_redis import EmbeddedRedis


def test_fixture_server_sets_and_reads_a_key(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set("fleet:test:hello", "world")
    assert client.get("fleet:test:hello") == b"world"
    assert client.info("server")["redis_version"].count(".") == 2


def test_embedded_server_stops_cleanly() -> None:
    server = EmbeddedRedis().start()
    assert server.ping()
    process = server.process
    server.stop()
    assert process is not None and process.poll() is not None
    assert not server.ping()
