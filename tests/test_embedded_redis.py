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


def test_password_protected_server() -> None:
    with EmbeddedRedis(password="s3cret") as server:
        assert server.ping()
        assert redis.Redis.from_url(server.url).ping()
        bare = redis.Redis(host=server.host, port=server.port)
        try:
            bare.get("x")
            raise AssertionError("an unauthenticated client was served")
        except redis.AuthenticationError:
            pass


def test_server_dies_with_its_parent(tmp_path) -> None:
    import subprocess
    import sys
    import time

    script = (
        "import sys, time\n"
        "from fleet.embedded_redis import EmbeddedRedis\n"
        "s = EmbeddedRedis().start()\n"
        "print(s.process.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child_pid}/stat") as stat:
                if stat.read().split()[2] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("redis-server outlived its killed parent")
