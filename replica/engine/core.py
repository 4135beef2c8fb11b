"""The synchronous engine core: requests in, one scheduled model step at a time, outputs out.

Not thread-safe: `LLM` drives it directly and `AsyncEngine` from its one step thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch

from replica.engine.block_manager import BlockManager
from replica.engine.config import (
    EngineArgs,
    ModelConfig,
    compute_dtype,
    pick_dtype,
    resolve_model_path,
)
from replica.engine.cuda_graphs import DecodeGraphs
from replica.engine.detokenizer import IncrementalDetokenizer
from replica.engine.grammar_mask import SequenceGrammar
from replica.engine.memory import plan_kv_blocks
from replica.engine.model_runner import ModelRunner, StepResult
from replica.engine.outputs import CompletionOutput, EngineLoad, PoolingOutput, RequestOutput
from replica.engine.pooling import Pooler
from replica.engine.sampling_params import SamplingParams, SamplingParamsError
from replica.engine.scheduler import ScheduledBatch, Scheduler
from replica.engine.sequence import Request, Sequence
from replica.engine.structured import GrammarCompiler, GrammarError
from replica.kernels import get_ops
from replica.models import load_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from xgrammar import CompiledGrammar

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, args: EngineArgs) -> None:
        from transformers import AutoTokenizer

        self.args = args
        path = resolve_model_path(args.model)
        self.model_config = cfg = ModelConfig.from_folder(path)
        self.device = args.resolve_device()
        self.dtype = pick_dtype(args.dtype, cfg.dtype, self.device)
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            str(args.tokenizer or path)
        )
        self.max_model_len = _context_limit(args, cfg)
        self.eos_token_ids = list(cfg.eos_token_ids)
        if (
            self.tokenizer.eos_token_id is not None
            and self.tokenizer.eos_token_id not in self.eos_token_ids
        ):
            self.eos_token_ids.append(self.tokenizer.eos_token_id)
        self.vocab_size = cfg.vocab_size
        self.ops = get_ops(args.kernel_backend, self.device)
        torch.manual_seed(args.seed)
        wide = compute_dtype(self.dtype, self.device)
        model = load_model(path, cfg, self.ops, self.dtype, self.device, self.max_model_len, wide)
        max_batched = args.max_num_batched_tokens or (2048 if self.device.type == "cpu" else 8192)
        num_blocks = plan_kv_blocks(
            args, cfg, model, wide, self.device, self.max_model_len, max_batched
        )
        capacity = num_blocks * args.block_size
        if capacity < self.max_model_len:
            if args.max_model_len is not None or capacity < args.block_size:
                raise ValueError(
                    f"the KV cache holds {capacity} tokens, fewer than max_model_len "
                    f"{self.max_model_len}: give it more memory or lower max_model_len"
                )
            log.warning("max_model_len lowered to %d tokens: all the KV cache holds", capacity)
            self.max_model_len = capacity
        self.runner = ModelRunner(
            model,
            cfg,
            num_blocks,
            args.block_size,
            wide,
            self.device,
            self.eos_token_ids,
            args.seed,
        )
        # An embedding needs every prompt token's hidden state (mean pooling), so an embed
        # engine never skips a cached prefix; it never decodes, so it captures no decode graphs.
        self.pooler = Pooler(args.pooling) if args.task == "embed" else None
        if self.pooler is None:
            self.runner.graphs = DecodeGraphs.build(
                model, self.ops, self.device, args.max_num_seqs, self.max_model_len,
                args.block_size,
            )  # fmt: skip
        prefix_caching = args.enable_prefix_caching and self.pooler is None
        self.blocks = BlockManager(num_blocks, args.block_size, prefix_caching)
        self.scheduler = Scheduler(self.blocks, args.max_num_seqs, max_batched)
        self.requests: dict[str, Request] = {}
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self._decode = _make_decoder(self.tokenizer)
        log.info(
            "engine ready: %s on %s (%s, kernels=%s), %d KV blocks of %d tokens, max_model_len %d",
            path,
            self.device,
            str(self.dtype).removeprefix("torch."),
            self.ops.name,
            num_blocks,
            args.block_size,
            self.max_model_len,
        )

    # -- requests ---------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return list(prompt)

    def validate(
        self, prompt_ids: list[int], params: SamplingParams, generated_ids: list[int] | None = None
    ) -> None:
        """Raise SamplingParamsError (param, message) for a request this engine cannot serve.

        The one check of a request against the model (its context, vocabulary and logprobs), with
        OpenAI's wording for the context rule; each front-end runs it once per request, where it
        can still refuse: LLM before adding any prompt of a batch, AsyncEngine before a server's
        response starts. `generated_ids`: output tokens a resumed stream already has."""
        if self.pooler is not None:
            raise SamplingParamsError(
                "model", "this engine serves embeddings (task embed), not generation",
                code="wrong_task",
            )  # fmt: skip
        if not prompt_ids:
            raise SamplingParamsError(
                "prompt", "the prompt is empty: it must contain at least one token"
            )
        # Without max_tokens the completion may run to the end of the context, but needs a token.
        resumed = len(generated_ids or ())
        completion = resumed + 1 if params.max_tokens is None else params.max_tokens
        if len(prompt_ids) + completion > self.max_model_len:
            raise SamplingParamsError(
                "prompt" if params.max_tokens is None else "max_tokens",
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {len(prompt_ids) + completion} tokens ({len(prompt_ids)} in the "
                f"prompt, {completion} for the completion), which exceeds it. Please reduce the "
                "length of the prompt or the completion.",
                code="context_length_exceeded",
            )
        if generated_ids is not None:
            check_resumable(params, resumed)
        for name, tokens in (
            ("prompt", prompt_ids),
            ("fleet_resume", generated_ids or []),
            ("logit_bias", params.logit_bias or {}),
            ("stop_token_ids", params.stop_token_ids),
        ):
            for token in tokens:
                if not 0 <= token < self.vocab_size:
                    raise SamplingParamsError(
                        name, f"token id {token} is outside the vocabulary (size {self.vocab_size})"
                    )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.vocab_size:
                raise SamplingParamsError(name, f"{name} must be at most {self.vocab_size}")

    def validate_pooling(self, prompt_ids: list[int]) -> None:
        """Raise SamplingParamsError (param `input`) for an embedding input this engine cannot
        serve: it must fit the context and the vocabulary, and the engine must be an embedder."""
        if self.pooler is None:
            raise SamplingParamsError(
                "model", "this engine generates text (task generate); embeddings need task embed",
                code="wrong_task",
            )  # fmt: skip
        if not prompt_ids:
            raise SamplingParamsError(
                "input", "the input is empty: it must hold at least one token"
            )
        if len(prompt_ids) > self.max_model_len:
            raise SamplingParamsError(
                "input",
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {len(prompt_ids)} tokens in the input. Please reduce the length "
                "of the input.",
                code="context_length_exceeded",
            )
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise SamplingParamsError(
                "input", f"token id {bad} is outside the vocabulary (size {self.vocab_size})"
            )

    def enqueue_pooling(self, request_id: str, prompt_ids: list[int]) -> Request:
        """Queue an embedding request `validate_pooling` has passed: one sequence that runs its
        prompt (in chunks within the step budget, like any prefill) and is then pooled."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = SamplingParams(max_tokens=1)
        request = Request(request_id, None, prompt_ids, params, self._new_detokenizer)
        self.requests[request_id] = request
        self.scheduler.add(request.seqs[0])
        return request

    def compile_grammar(self, params: SamplingParams) -> CompiledGrammar | None:
        """The grammar `params.structured` asks for (None for free text), cached per schema;
        SamplingParamsError for a bad schema. Slow on a miss: servers call it off the event loop
        before submitting, so the step finds it cached (thread-safe)."""
        if params.structured is None:
            return None
        try:
            return self.grammars.compile(params.structured)
        except GrammarError as exc:
            raise SamplingParamsError("response_format", f"invalid schema: {exc}") from None

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
    ) -> Request:
        """Tokenize, validate and queue a request; a request the engine cannot serve raises
        SamplingParamsError and adds nothing."""
        prompt_ids = self.tokenize(prompt)
        self.validate(prompt_ids, params)
        text = prompt if isinstance(prompt, str) else None
        return self.enqueue(request_id, text, prompt_ids, params, cache_salt)

    def enqueue(
        self,
        request_id: str,
        prompt: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        generated_ids: list[int] | None = None,
    ) -> Request:
        """Queue a request `validate` has passed (`prompt`: its text, when it came as text;
        `generated_ids`: the output it continues, for a stream resumed from another replica)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        grammar = self.compile_grammar(params)
        request = Request(request_id, prompt, prompt_ids, params, self._new_detokenizer, cache_salt)
        self.requests[request_id] = request
        for seq in request.seqs:
            if grammar is not None:
                seq.grammar = SequenceGrammar(grammar)
            if generated_ids:
                seq.resume(generated_ids)
            self.scheduler.add(seq)
        return request

    def abort_request(self, request_id: str) -> bool:
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        if self.pooler is not None:
            self.pooler.forget(request_id)
        for seq in request.seqs:
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason = seq.finish_reason or "abort"
        return True

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- stepping ---------------------------------------------------------------------------

    def step(self, stream: bool = True) -> list[RequestOutput] | list[PoolingOutput]:
        """Run one step. Returns outputs of the requests it advanced (all of them when `stream`,
        else only the ones that finished); an embed engine's, the embeddings it finished."""
        batch = self.scheduler.schedule()
        if batch.empty:
            return []
        now = time.time()
        for seq in batch.seqs:
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
        if self.pooler is not None:
            return self._pool(batch, self.pooler)
        result = self.runner.execute(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
        touched = self._process(result)
        outputs = []
        for request in touched:
            if request.finished:
                self.requests.pop(request.request_id, None)
                outputs.append(self._output(request))
            elif stream:
                outputs.append(self._output(request))
        return outputs

    def _pool(self, batch: ScheduledBatch, pooler: Pooler) -> list[PoolingOutput]:
        """An embed step: the batch's hidden states, pooled per sequence; a sequence whose whole
        prompt has run is finished at once (its blocks freed) with its embedding."""
        hidden = self.runner.hidden_states(batch)
        outputs = []
        row = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            seq.num_computed_tokens += n
            request = seq.request
            embedding = pooler.add(request.request_id, hidden[row : row + n], start, seq.num_tokens)
            row += n
            if embedding is None:
                continue
            seq.finish_reason = "stop"
            self.scheduler.finish(seq)
            self.requests.pop(request.request_id, None)
            request.metrics.finished_time = time.time()
            outputs.append(
                PoolingOutput(request.request_id, request.prompt_token_ids, embedding.tolist())
            )
        return outputs

    def _process(self, result: StepResult) -> list[Request]:
        now = time.time()
        touched: dict[str, Request] = {}
        for seq, logprobs in result.prompt_logprobs.items():
            assert seq.request.prompt_logprobs is not None
            seq.request.prompt_logprobs.extend(logprobs)
        sampled = result.sampled
        for seq, token, logprob in zip(
            result.seqs, sampled.token_ids, sampled.logprobs, strict=True
        ):
            if seq.finished:  # aborted meanwhile
                continue
            request = seq.request
            touched[request.request_id] = request
            metrics = request.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
            seq.token_ids.append(token)
            if seq.logprobs is not None and logprob is not None:
                seq.logprobs.append(logprob)
            self._check_stop(seq, token)
            if seq.finish_reason is None and seq.grammar is not None:
                self._check_grammar(seq, token)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                if request.finished:
                    metrics.finished_time = now
        return list(touched.values())

    def _check_stop(self, seq: Sequence, token: int) -> None:
        params = seq.params
        ended = seq.num_output_tokens >= params.min_tokens
        if ended and token in params.stop_token_ids:
            if params.include_stop_str_in_output:
                seq.detokenizer.add_token(token)
            return self._finish(seq, "stop", token)
        if ended and not params.ignore_eos and token in self.eos_token_ids:
            return self._finish(seq, "stop", None)
        stop = seq.detokenizer.add_token(token, check_stop=ended)
        if stop is not None:
            return self._finish(seq, "stop", stop)
        if (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) or (
            seq.num_tokens >= self.max_model_len
        ):
            return self._finish(seq, "length", None)
        return None

    def _check_grammar(self, seq: Sequence, token: int) -> None:
        """Advance a constrained sequence's matcher; its grammar's end ends the sequence (also
        when the stop token came under ignore_eos)."""
        assert seq.grammar is not None
        if not seq.grammar.accept(token):  # only if every logit of its row was -inf
            log.error("request %s: the grammar refused token %d", seq.request.request_id, token)
            return self._finish(seq, "stop", None)
        if seq.grammar.ended:
            return self._finish(seq, "stop", None)
        return None

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if not isinstance(stop_reason, str):  # a stop string already cut the text
            seq.detokenizer.flush()

    def _output(self, request: Request) -> RequestOutput:
        choices = []
        for seq in request.seqs:
            detok = seq.detokenizer
            text = detok.text if seq.finished else detok.text[: detok.safe_length()]
            new_text = text[seq.emitted_chars :]
            new_ids = seq.token_ids[seq.num_prompt_tokens + seq.emitted_tokens :]
            new_logprobs = seq.logprobs[seq.emitted_tokens :] if seq.logprobs is not None else None
            seq.emitted_chars = len(text)
            seq.emitted_tokens = seq.num_output_tokens
            choices.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=seq.output_token_ids,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                    delta_text=new_text,
                    delta_token_ids=new_ids,
                    delta_logprobs=new_logprobs,
                )
            )
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=choices,
            finished=request.finished,
            num_cached_tokens=request.num_cached_tokens,
            prompt_logprobs=request.prompt_logprobs,
            metrics=request.metrics,
        )

    def _new_detokenizer(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(
            self._decode,
            prompt_ids,
            params.stop_matcher,
            params.include_stop_str_in_output,
            params.skip_special_tokens,
        )

    # -- introspection ----------------------------------------------------------------------

    def load(self) -> EngineLoad:
        blocks = self.blocks
        return {
            "running": len({s.request.request_id for s in self.scheduler.running}),
            "waiting": len({s.request.request_id for s in self.scheduler.waiting}),
            "kv_usage": blocks.usage,
            "num_blocks": blocks.num_blocks,
            "free_blocks": blocks.num_free_blocks,
            "block_size": blocks.block_size,
            "prefix_cache_queries": blocks.prefix_cache_queries,
            "prefix_cache_hits": blocks.prefix_cache_hits,
            "num_preemptions": self.scheduler.num_preemptions,
        }


def check_resumable(params: SamplingParams, generated: int) -> None:
    """A continuation (`fleet_resume`) has one choice, no logprobs (the resumed tokens' are
    gone) and something left to generate."""
    if params.n != 1 or params.logprobs is not None or params.prompt_logprobs is not None:
        raise SamplingParamsError(
            "fleet_resume", "a resumed request must have n=1 and no logprobs or echo"
        )
    if params.max_tokens is not None and generated >= params.max_tokens:
        raise SamplingParamsError(
            "fleet_resume", f"{generated} tokens already reach max_tokens ({params.max_tokens})"
        )


def _context_limit(args: EngineArgs, cfg: ModelConfig) -> int:
    """max_model_len: as asked, else the model's; never past its positions or attention window
    (we attend to the whole context, so a sliding-window model is exact only within its window)."""
    limit = cfg.max_position_embeddings
    if cfg.sliding_window is not None and cfg.sliding_window < limit:
        limit = cfg.sliding_window
    if args.max_model_len is not None and args.max_model_len > limit:
        raise ValueError(
            f"max_model_len {args.max_model_len} exceeds this model's limit of {limit} tokens"
            + (" (its sliding attention window)" if limit == cfg.sliding_window else "")
        )
    return args.max_model_len or limit


def _make_decoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[int], bool], str]:
    """The Rust tokenizer's decode when there is one (several times cheaper per call)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: cast(str, tokenizer.decode(ids, skip_special_tokens=skip))
