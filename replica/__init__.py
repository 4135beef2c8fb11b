"""fleetserve's replica: an inference engine for one model on one GPU or CPU.

`from replica import LLM, SamplingParams` needs only torch, transformers and safetensors: the
engine and its vocabulary live in `replica.engine`; the HTTP server lives in `replica.http_api` and
is imported only when served (`python -m replica`).
"""

from replica.engine.config import EngineArgs
from replica.engine.llm import LLM
from replica.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from replica.engine.sampling_params import SamplingParams, SamplingParamsError

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineArgs",
    "RequestOutput",
    "SamplingParams",
    "SamplingParamsError",
    "TokenLogprob",
]
