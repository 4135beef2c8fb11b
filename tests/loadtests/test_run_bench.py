"""run_bench.py's command line: what it keeps, and what it hands to locust unchanged."""

from __future__ import annotations

from run_bench import Endpoint, default_run_name, locust_command, parse_args


def test_unknown_options_go_to_locust_and_name_the_run() -> None:
    args, extra = parse_args(
        [
            "--host",
            "http://h:1",
            "--duration",
            "2m",
            "--workload",
            "multi-turn",
            "--output-len",
            "64",
        ]
    )
    assert extra == ["--workload", "multi-turn", "--output-len", "64"]
    args.run_name = default_run_name(extra)
    assert args.run_name == "multi-turn-chat"
    command = locust_command(Endpoint("http://h:1", None), args, extra)
    assert command[command.index("--host") + 1] == "http://h:1"
    assert command[command.index("-t") + 1] == "2m"
    assert command[command.index("-u") + 1] == "8"
    assert command[-4:] == extra
    assert command[command.index("--run-name") + 1] == "multi-turn-chat"


def test_rate_mode_defaults_to_one_scheduling_user() -> None:
    args, extra = parse_args(["--request-rate", "4", "--api", "completions"])
    args.run_name = default_run_name(extra)
    command = locust_command(Endpoint("http://h:1", None), args, extra)
    assert command[command.index("-u") + 1] == "1"
    assert args.run_name == "random-completions"
