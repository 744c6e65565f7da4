"""Fakes at the network boundary: real HTTP servers with scripted or broken answers.

- `server.ServerThread`: run any ASGI app with uvicorn in a background thread on a free port
  (stop and start it again on the same port to simulate a teacher going down and coming back).
- `scripted`: our teacher service's API with a script of misbehaviours (5xx, 429, slow, bad bodies).
- `sglang`: SGLang's `/generate` response shape, values computed by a real `HFTeacher`.
- `vllm`: start a REAL vLLM OpenAI server as a subprocess; a proxy that strips `prompt_logprobs`.
"""
