#!/usr/bin/env bash
# Scoring throughput of our teacher service vs an external vLLM server, both serving the toy teacher
# with vLLM on this machine, under 1, 4 and 16 concurrent clients. Usage: bench/run_teacher_bench.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
PY=.venv/bin/python
$PY -m onpolicy.cli toy build --out toy >/dev/null
export VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind
wait_up() { for _ in $(seq 240); do curl -sf "$1" >/dev/null && return 0; sleep 0.5; done; echo "not up: $1" >&2; return 1; }
$PY -m services.teacher --model toy/teacher --port 18100 >/tmp/onpolicy-bench-teacher.log 2>&1 & svc=$!
trap 'kill $svc ${vl:-} 2>/dev/null || true' EXIT
wait_up http://127.0.0.1:18100/healthz
echo "== our teacher service (POST /v1/score) =="
$PY bench/teacher_service_bench.py --url http://127.0.0.1:18100 --kind service --seconds "$secs"
kill $svc; wait $svc 2>/dev/null || true
$PY -m vllm.entrypoints.openai.api_server --model toy/teacher --port 18000 --dtype float32 --enforce-eager \
  --max-model-len 64 >/tmp/onpolicy-bench-vllm.log 2>&1 & vl=$!
wait_up http://127.0.0.1:18000/health
echo "== external vLLM OpenAI server (POST /v1/completions, prompt_logprobs) =="
$PY bench/teacher_service_bench.py --url http://127.0.0.1:18000 --kind vllm --seconds "$secs"
