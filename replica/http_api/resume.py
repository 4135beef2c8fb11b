"""The two extensions a fleet router uses to resume a stream whose replica died mid-way.

- `X-Fleet-Token-Ids: 1` (a header): every chunk of the stream carries the ids of the tokens it
  covers as its last member, `"fleet_token_ids":[...]` (tokens whose text is still held back ride
  on the next chunk sent). The router strips the member before forwarding, and remembers the ids.
- `"fleet_resume": {"token_ids": [...], "id": ..., "created": ...}` (a vLLM-style extra body
  field): the original request continued after those tokens, under the original response's id and
  `created`. The continuation streams only new text, sends no second role chunk, and its usage
  counts every generated token (router.stream_resume is the other side).

Only trusted callers (the routers' key, the replica's own `--api-key`, or no auth at all) may use
them; a fleet user key gets a 400 for `fleet_resume` and no ids. They are harmless anyway: the ids
are those of the text the caller receives (/tokenize gives them too), and a continuation is a
prompt the caller could send as its own assistant prefix, charged as completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request

from fleet.control.errors import APIError
from fleet.control.keys import KeyRecord
from replica.http_api.protocol import CompletionRequest, SamplingFields
from replica.http_api.responses import ResponseHead

TOKEN_IDS_HEADER = "x-fleet-token-ids"
TOKEN_IDS_FIELD = "fleet_token_ids"


@dataclass
class StreamResume:
    """One request's use of the extensions: what it continues, and ids owed to the next chunk."""

    generated_ids: list[int] | None = None  # None: not a continuation
    token_ids: bool = False  # tag chunks with their token ids
    held: dict[int, list[int]] = field(default_factory=dict)  # choice index -> ids not yet sent

    def head(self, body: SamplingFields, prefix: str, model: str) -> ResponseHead:
        """The original response's id and `created` for a continuation, else new ones."""
        resume = body.fleet_resume
        if resume is None or resume.id is None:
            return ResponseHead.new(prefix, model)
        if resume.created is None:
            return ResponseHead(resume.id, model)
        return ResponseHead(resume.id, model, resume.created)

    def hold(self, index: int, ids: list[int]) -> None:
        """Ids of an output that sent no chunk (its text is held back): they go on the next."""
        if self.token_ids and ids:
            self.held.setdefault(index, []).extend(ids)

    def tag(self, chunk: dict, index: int, ids: list[int]) -> dict:
        if self.token_ids:
            held = self.held.pop(index, None)
            chunk[TOKEN_IDS_FIELD] = held + ids if held else ids
        return chunk


def stream_resume(request: Request, record: KeyRecord | None, body: SamplingFields) -> StreamResume:
    """What the request asks of the extensions, checked (APIError 400)."""
    resume = body.fleet_resume
    trusted = record is None
    if resume is not None:
        if not trusted:
            raise APIError(400, "'fleet_resume' is only for the fleet's routers", "fleet_resume")
        if not body.stream:
            raise APIError(400, "'fleet_resume' needs 'stream': true", "fleet_resume")
        if isinstance(body, CompletionRequest) and (body.echo or len(body.prompts) != 1):
            raise APIError(400, "'fleet_resume' needs one prompt and no echo", "fleet_resume")
    wants_ids = trusted and bool(body.stream) and request.headers.get(TOKEN_IDS_HEADER) == "1"
    return StreamResume(resume.token_ids if resume is not None else None, wants_ids)
