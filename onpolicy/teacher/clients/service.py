"""Our own teacher service (`services/teacher`) as a remote teacher: `POST /v1/score`, `POST /v1/generate`,
`GET /v1/info`.

Scores come back as little-endian arrays (`Accept: application/x-onpolicy-scores`, `types.decode_scores`) unless
`wire_format="json"`; `wire_format="compact"` asks for the top-k as 3-byte ids and float16 log-probs (lossy, 5 bytes
a pair instead of 8: `teacher.wire_format`). A server that answers JSON anyway (one that predates the binary form)
is read as JSON.
Either way they are checked by `validate_scores` (remote.py) before any number reaches the loss."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ValidationError

from onpolicy.teacher.clients.remote import RemoteTeacher, describe_validation_error
from onpolicy.types import (
    SCORES_MEDIA_TYPE,
    GeneratedCompletion,
    GenerateRequest,
    GenerateResponse,
    ScoreRequest,
    ScoreRequestItem,
    ScoreResponse,
    TeacherInfo,
    TeacherScores,
    decode_scores,
)

WireFormat = Literal["binary", "compact", "json"]
ACCEPT = {"binary": f"{SCORES_MEDIA_TYPE}, application/json;q=0.5",
          "compact": f"{SCORES_MEDIA_TYPE}; topk=compact, application/json;q=0.5"}


class ServiceTeacher(RemoteTeacher):
    """Our teacher service (`services/teacher`): `POST /v1/score`, `POST /v1/generate`, `GET /v1/info`."""

    kind = "service"
    info_path = "/v1/info"
    fix_hint = "Serve the teacher with `onpolicy serve teacher --model DIR` (POST /v1/score)."

    def __init__(self, url: str, *, wire_format: WireFormat = "binary", **kwargs: Any) -> None:
        if wire_format not in ("binary", "compact", "json"):
            raise ValueError(f"wire_format must be 'binary', 'compact' or 'json', got {wire_format!r}")
        super().__init__(url, **kwargs)
        self.wire_format = wire_format

    def info(self) -> TeacherInfo:
        if self._info is None:
            body = self.client.get_json("/v1/info")
            try:
                self._info = TeacherInfo.model_validate(body)
            except ValidationError as err:
                raise self._bad(f"GET /v1/info returned a malformed TeacherInfo ({describe_validation_error(err)})") from None
        return self._info

    def _score_chunk(self, items: list[ScoreRequestItem], top_k: int, offset: int) -> list[TeacherScores]:
        req = ScoreRequest(sequences=items, top_k=top_k).model_dump(mode="json")
        if self.wire_format == "json":
            body = self.client.post_json("/v1/score", req)
        else:
            http = self.client.post_raw("/v1/score", req, accept=ACCEPT[self.wire_format])
            if http.headers.get("content-type", "").split(";")[0].strip() == SCORES_MEDIA_TYPE:
                try:
                    return decode_scores(http.content).scores
                except ValueError as err:
                    raise self._bad(f"POST /v1/score returned a malformed {SCORES_MEDIA_TYPE} body ({err})") from None
            try:
                body = http.json()
            except ValueError:
                raise self._bad(f"POST /v1/score returned a body that is neither {SCORES_MEDIA_TYPE} nor JSON "
                                f"({len(http.content)} bytes, content-type {http.headers.get('content-type')!r})"
                                ) from None
        try:
            resp = ScoreResponse.model_validate(body)
        except ValidationError as err:
            raise self._bad(f"POST /v1/score returned a malformed ScoreResponse ({describe_validation_error(err)})") from None
        return resp.scores

    def _generate_chunk(
        self, prompts: list[list[int]], offset: int, *, n: int, max_new_tokens: int, temperature: float,
        top_p: float, seed: int | None,
    ) -> list[GeneratedCompletion]:
        req = GenerateRequest(prompts=prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed)
        body = self.client.post_json("/v1/generate", req.model_dump(mode="json"))
        try:
            resp = GenerateResponse.model_validate(body)
        except ValidationError as err:
            raise self._bad(
                f"POST /v1/generate returned a malformed GenerateResponse ({describe_validation_error(err)})"
            ) from None
        return resp.completions
