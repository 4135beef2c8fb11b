"""fleetserve's replica: an inference engine for one model on one GPU or CPU.

`from replica import LLM, SamplingParams` needs only torch, transformers and safetensors; the HTTP
server lives in `replica.server` and is imported only when served.
"""

from replica.config import EngineArgs
from replica.llm import LLM
from replica.outputs import CompletionOutput, RequestOutput, TokenLogprob
from replica.sampling_params import SamplingParams, SamplingParamsError

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineArgs",
    "RequestOutput",
    "SamplingParams",
    "SamplingParamsError",
    "TokenLogprob",
]
