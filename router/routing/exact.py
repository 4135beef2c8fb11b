"""Exact prefix affinity: a request's KV block hashes, computed as its replica will compute them,
matched against what each publishing replica's cache holds (fleet/control/kv_reader.py).

A replica that publishes KV events names, in its membership record, the hashing scheme and block
size and where its tokenizer is (its folder or Hub id, and its `--chat-template` file if any;
`--tokenizer MODEL=PATH` overrides the folder). For a request to a model with such a replica in
sync, the router renders it as the replica does (chat: fleet/chat_prompt.py's template inputs
and call, then `encode(add_special_tokens=False)`; a completion's text: `encode` with special
tokens; token ids: as given), hashes its full blocks (fleet/control/kv_events.py's
`block_keys`) and hands them to the prefix policy, which reads each publishing replica's cached
prefix from its exact index and keeps estimating for the others.

Tokenizing costs far more than the rest of a routing decision (a chat template is a program;
loadtests/bench_exact.py measures it), so it runs on a worker thread, only for requests that can
use it: routed (not pinned, no sticky session) chat or single-prompt completions of a model with
a synced publishing replica, with the prefix policy and `--kv-events` on. Everything else, and
every fleet where no replica publishes, takes the old path without any of this work. Tokenizers
load on first use, on that thread; until one has loaded (or if it cannot) the estimate serves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from fleet.chat_prompt import Unrenderable, apply_template, template_inputs
from fleet.control.kv_events import ExactIndex, block_keys, readable
from fleet.control.kv_reader import KVEventReader
from fleet.control.membership import MembershipEvent
from router.backends.backend import Replica

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from router.plan import Plan

log = logging.getLogger(__name__)

MAX_PROMPT_BYTES = 4 * 1024 * 1024  # larger bodies are not tokenized here: the estimate serves


class Recipe(NamedTuple):
    """How a replica turns a request into token ids: its tokenizer and chat template file."""

    tokenizer: str
    chat_template: str | None


@dataclass
class _Renderer:
    tokenizer: PreTrainedTokenizerBase
    template: str | None  # the template file's text, None: the tokenizer's own

    def token_ids(self, route: str, body: dict[str, Any]) -> list[int] | None:
        if route == "chat":
            inputs = template_inputs(body)
            text = apply_template(
                self.tokenizer,
                inputs.messages,
                inputs.add_generation_prompt,
                inputs.continue_final_message,
                inputs.template_kwargs,
                self.template,
                inputs.tools,
            )
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            return prompt
        return None  # several prompts, or none: each would go its own way


def _load(recipe: Recipe) -> _Renderer:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(recipe.tokenizer)
    template = None
    if recipe.chat_template:
        with open(recipe.chat_template, encoding="utf-8") as f:
            template = f.read()
    return _Renderer(tokenizer, template)


@dataclass
class ExactStats:
    prepared: int = 0  # requests hashed
    unusable: int = 0  # requests the router could not render (the estimate served)
    cpu_s: float = 0.0  # thread CPU spent rendering, tokenizing and hashing


class ExactAffinity:
    def __init__(
        self, reader: KVEventReader, tokenizers: dict[str, str] | None = None, workers: int = 1
    ) -> None:
        self.reader = reader
        self.overrides = tokenizers or {}
        self.stats = ExactStats()
        self._recipes: dict[str, Recipe] = {}  # replica id -> its recipe
        self._renderers: dict[Recipe, _Renderer | None] = {}  # None: failed to load
        self._loading: set[Recipe] = set()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="exact-affinity")

    def on_membership(self, event: MembershipEvent) -> None:
        info = event.replica
        block_size = readable(info.kv_events) if event.kind != "leave" else None
        source = self.overrides.get(info.model) or info.tokenizer
        if block_size is None or not source:
            self.reader.untrack(info.id)
            self._recipes.pop(info.id, None)
            return
        self.reader.track(info.id, block_size)
        self._recipes[info.id] = Recipe(source, info.chat_template)

    @property
    def active(self) -> bool:
        """Whether any replica publishes (else no request pays for a look)."""
        return bool(self._recipes)

    def start(self) -> None:
        self.reader.start()

    async def stop(self) -> None:
        await self.reader.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict[str, int | float]:
        """For /admin/stats: the reader's counts and the prompts hashed."""
        return {
            **self.reader.stats(),
            "prepared": self.stats.prepared,
            "unusable": self.stats.unusable,
            "hash_cpu_s": round(self.stats.cpu_s, 3),
        }

    def recipe_for(self, replicas: list[Replica]) -> Recipe | None:
        """The recipe to hash with, if one of `replicas` publishes and is in sync now (starting
        to load its tokenizer if that has not been tried)."""
        for replica in replicas:
            recipe = self._recipes.get(replica.id)
            if recipe is None or self.reader.index(replica.id) is None:
                continue
            if recipe in self._renderers:
                if self._renderers[recipe] is not None:
                    return recipe
            elif recipe not in self._loading:
                self._loading.add(recipe)
                self._pool.submit(self._load_into, recipe)
        return None

    def _load_into(self, recipe: Recipe) -> None:
        try:
            renderer: _Renderer | None = _load(recipe)
        except Exception as exc:  # a path this host cannot read: estimate only, said once
            log.warning("exact affinity off for tokenizer %s: %s", recipe.tokenizer, exc)
            renderer = None
        self._renderers[recipe] = renderer
        self._loading.discard(recipe)

    def index_for(self, replica_id: str, recipe: object) -> ExactIndex | None:
        """The replica's exact index, if it is in sync and hashes prompts as `recipe` does."""
        if self._recipes.get(replica_id) != recipe:
            return None
        return self.reader.index(replica_id)

    def block_sizes(self, replicas: list[Replica], recipe: Recipe) -> set[int]:
        sizes = set()
        for replica in replicas:
            index = self.index_for(replica.id, recipe)
            if index is not None:
                sizes.add(index.block_size)
        return sizes

    async def prepare(self, plan: Plan, replicas: list[Replica], recipe: Recipe) -> None:
        """Hash the plan's prompt into its block keys for each block size its replicas use (on
        the worker thread); on any trouble the plan is left to the estimate."""
        renderer = self._renderers.get(recipe)
        sizes = self.block_sizes(replicas, recipe)
        if renderer is None or not sizes or len(plan.body) > MAX_PROMPT_BYTES:
            return
        loop = asyncio.get_running_loop()
        work = _Work(renderer, plan.route, plan.body, sizes)
        result = await loop.run_in_executor(self._pool, work.run)
        self.stats.cpu_s += work.cpu_s
        if result is None:
            self.stats.unusable += 1
            return
        token_count, blocks = result
        self.stats.prepared += 1
        routing = plan.routing
        routing.blocks = blocks
        routing.recipe = recipe
        routing.block_tokens = token_count
        routing.prompt_tokens = token_count


@dataclass
class _Work:
    renderer: _Renderer
    route: str
    body: bytes
    sizes: set[int]
    cpu_s: float = 0.0

    def run(self) -> tuple[int, dict[int, list[int]]] | None:
        started = time.thread_time()
        try:
            ids = self.renderer.token_ids(self.route, orjson.loads(self.body))
        except (Unrenderable, orjson.JSONDecodeError):
            ids = None
        except Exception as exc:  # the template refused it: so will the replica
            log.debug("exact affinity could not render a request: %s", exc)
            ids = None
        result = None
        if ids is not None:
            result = len(ids), {size: block_keys(ids, size) for size in self.sizes}
        self.cpu_s = time.thread_time() - started
        return result
