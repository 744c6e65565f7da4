"""Our own teacher service (`services/teacher`) as a remote teacher: `POST /v1/score`, `POST /v1/generate`,
`GET /v1/info`."""

from __future__ import annotations

from pydantic import ValidationError

from onpolicy.teacher.clients.remote import RemoteTeacher, describe_validation_error
from onpolicy.types import (
    GeneratedCompletion,
    GenerateRequest,
    GenerateResponse,
    ScoreRequest,
    ScoreRequestItem,
    ScoreResponse,
    TeacherInfo,
    TeacherScores,
)


class ServiceTeacher(RemoteTeacher):
    """Our teacher service (`services/teacher`): `POST /v1/score`, `POST /v1/generate`, `GET /v1/info`."""

    kind = "service"
    info_path = "/v1/info"
    fix_hint = "Serve the teacher with `onpolicy serve teacher --model DIR` (POST /v1/score)."

    def info(self) -> TeacherInfo:
        if self._info is None:
            body = self.client.get_json("/v1/info")
            try:
                self._info = TeacherInfo.model_validate(body)
            except ValidationError as err:
                raise self._bad(f"GET /v1/info returned a malformed TeacherInfo ({describe_validation_error(err)})") from None
        return self._info

    def _score_chunk(self, items: list[ScoreRequestItem], top_k: int, offset: int) -> list[TeacherScores]:
        req = ScoreRequest(sequences=items, top_k=top_k)
        body = self.client.post_json("/v1/score", req.model_dump(mode="json"))
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
