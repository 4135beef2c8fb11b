"""The load test's own options, in one table: locust gets them (with an environment variable
each) and run_bench.py shows them in its --help (it passes them through to locust unparsed)."""

from __future__ import annotations

import argparse
from typing import Any

from llm_stream import API_PATHS
from llm_workloads import WORKLOADS

GROUP = "LLM load test (locustfile options)"

# (flag, argparse keywords); each option's environment variable is LOCUST_<FLAG>.
OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--api", dict(choices=sorted(API_PATHS), default="chat", help="chat or completions")),
    ("--model", dict(default="", help="model name (default: the first one /v1/models lists)")),
    ("--workload", dict(choices=WORKLOADS, default="random", help="shape of the traffic")),
    ("--output-len", dict(type=int, default=128, help="max_tokens per request")),
    (
        "--no-ignore-eos",
        dict(
            action="store_true",
            help="do not send ignore_eos/min_tokens (which make vLLM-like servers produce exactly --output-len tokens)",
        ),
    ),
    ("--temperature", dict(type=float, default=0.0, help="sampling temperature")),
    ("--prompt-len", dict(type=int, default=256, help="random: prompt tokens")),
    ("--num-tenants", dict(type=int, default=8, help="shared-prefix: tenants")),
    (
        "--system-prompt-len",
        dict(type=int, default=1024, help="shared-prefix: tokens of each tenant's system prompt"),
    ),
    ("--question-len", dict(type=int, default=32, help="shared-prefix: tokens per question")),
    ("--turns", dict(type=int, default=5, help="multi-turn: user turns per conversation")),
    ("--turn-len", dict(type=int, default=64, help="multi-turn: tokens per user turn")),
    (
        "--request-rate",
        dict(
            type=float,
            default=0.0,
            help="requests/s in total, Poisson arrivals (0: fixed concurrency, one request in flight per user)",
        ),
    ),
    (
        "--max-concurrency",
        dict(type=int, default=0, help="with --request-rate: cap on requests in flight (0: none)"),
    ),
    ("--goodput", dict(default="", help="SLOs in ms for goodput, e.g. ttft:500,tpot:50,e2e:10000")),
    (
        "--tokenizer",
        dict(
            default="",
            help="local HF tokenizer folder to size prompts with (default: the server's /tokenize)",
        ),
    ),
    ("--seed", dict(type=int, default=0, help="seed of prompts and arrivals")),
    ("--request-timeout", dict(type=float, default=300.0, help="seconds a socket read may wait")),
    ("--results-dir", dict(default="bench-results", help="folder for records, summary and plot")),
    (
        "--run-name",
        dict(default="", help="file name stem of the results (default: <workload>-<api>)"),
    ),
)


def env_var(flag: str) -> str:
    return "LOCUST_" + flag.removeprefix("--").replace("-", "_").upper()


def add_options(parser: Any, with_env: bool = True) -> None:
    """Add the options to locust's parser (configargparse: `env_var`) or to a plain argparse one."""
    group = parser.add_argument_group(GROUP)
    for flag, keywords in OPTIONS:
        keywords = {**keywords, "help": f"{keywords['help']} [env {env_var(flag)}]"}
        if with_env:
            keywords["env_var"] = env_var(flag)
        group.add_argument(flag, **keywords)


def help_text() -> str:
    parser = argparse.ArgumentParser(add_help=False, usage=argparse.SUPPRESS)
    add_options(parser, with_env=False)
    return parser.format_help()
