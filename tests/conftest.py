"""Shared fixtures: tiny random Llama models on disk and a Ray session.

- `build_tiny_model(out_dir, seed)`: a 2-layer Llama (hidden 64, ~60k parameters) over the toy
  character tokenizer, saved in Hugging Face format (weights, config, tokenizer). vLLM and
  transformers load it as they would a real model; it starts in a vLLM engine in ~20 s on CPU.
- `tiny_model_dir` (session): the student, seed 0. `tiny_teacher_dir` (session): same
  architecture and tokenizer, seed 1, so teacher and student disagree.
- `tiny_model_factory` (session): `build_tiny_model`, for variants.
- `ray_session` (session): a local Ray cluster (4 logical CPUs, no dashboard), shut down at
  the end. Each vLLM engine must live in its own actor (one engine per process).

Tests that start engines should share them through module- or session-scoped fixtures.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two test processes share two cores, and each starts engines, actors and servers of its own: OpenMP pools that
# spin while they wait steal the core a peer needs (measured on four run-level modules under `-n 2`: 171 s
# spinning, 131 s passive; one run 38.7 s -> 17.9 s). Set before anything loads torch, and inherited by every
# process the suite starts (Ray's actors, servers, the README's commands).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a seeded random tiny Llama + the toy tokenizer in `out_dir`; return the folder."""
    from onpolicy.kit.build import save_random_model
    from onpolicy.kit.spec import TINY_LLAMA
    from onpolicy.toy.tokenizer import build_tokenizer

    # The default init (std 0.02) gives near-uniform outputs; widen it so log-probs vary.
    return save_random_model(out_dir, TINY_LLAMA, build_tokenizer(), seed=seed, init_std=0.2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny student model folder (seed 0)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_student"), seed=0)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """A tiny teacher with the student's tokenizer and different weights (seed 1)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_teacher"), seed=1)


@pytest.fixture(scope="session")
def tiny_bpe_teacher_dir(tmp_path_factory) -> Path:
    """A tiny teacher with another tokenizer: the toy task's byte-level BPE (onpolicy/toy/bpe_teacher.py), seed 2."""
    from onpolicy.kit.build import save_random_model
    from onpolicy.kit.spec import TINY_LLAMA
    from onpolicy.toy.bpe_teacher import bpe_tokenizer

    return save_random_model(tmp_path_factory.mktemp("tiny_bpe_teacher"), TINY_LLAMA, bpe_tokenizer(), seed=2,
                             init_std=0.2)


@pytest.fixture(scope="session")
def tiny_model_factory():
    """`build_tiny_model` itself, for tests that need a variant (another seed or tokenizer)."""
    return build_tiny_model


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster for the whole test session (yields the `ray` module)."""
    import ray

    from onpolicy.ray_utils import LOCAL_SYSTEM_CONFIG

    # address "local": our own instance, never a cluster some `ray start` recorded in /tmp/ray. No idle workers
    # prestarted (as a run's own Ray): four of them cost ~0.9 CPU s to start and 1.3% of a core idling, per worker.
    ray.init(address="local", num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
             _system_config=LOCAL_SYSTEM_CONFIG)
    yield ray
    ray.shutdown()


# ---- started once per session and shared: servers and engines that tests only read from ----------------
# Only the modules of one work unit use them (SHARED: "teachers"), so they are stopped as soon as its last test
# on this process has run instead of at the end of the session: an idle vLLM engine still polls (~7% of a core
# for the server's, ~4% for the in-actor teacher's, measured), and the rest of the suite wants that CPU.

_RELEASE: dict[str, list] = {}  # work unit -> closers (each safe to call again at the session's end)


def release_after_unit(unit: str, close) -> None:
    """Call `close` once the last test of work unit `unit` on this process has run."""
    _RELEASE.setdefault(unit, []).append(close)


def pytest_runtest_teardown(item, nextitem):
    unit = unit_of(item.nodeid)
    if unit in _RELEASE and (nextitem is None or unit_of(nextitem.nodeid) != unit):
        for close in _RELEASE.pop(unit):
            close()

# (A test that kills, stops or reconfigures what it talks to starts its own: never one of these.)

TEACHER_SERVICE_KEY = "session-teacher-key"
TEACHER_SERVICE_KEY_ENV = "ONPOLICY_TEST_TEACHER_KEY"  # names the key for runs: teacher.api_key_env


@pytest.fixture(scope="session")
def vllm_server(tiny_teacher_dir):
    """A real vLLM OpenAI server over the tiny teacher (`--max-logprobs 8`), for every test that scores or
    samples through one (external-teacher adapter, check, generation, a run); with the toy's chat template, so
    /v1/chat/completions serves it as a hosted model would (test_text_teacher)."""
    from fakes.vllm import start_vllm_server

    from onpolicy.toy import CHAT_TEMPLATE

    with start_vllm_server(tiny_teacher_dir, max_logprobs=8, extra_args=("--chat-template", str(CHAT_TEMPLATE))) as srv:
        release_after_unit("teachers", srv.stop)
        yield srv


@pytest.fixture(scope="session")
def teacher_service(tiny_teacher_dir):
    """Our teacher service (`python -m services.teacher`, vLLM backend) over the tiny teacher, with a bearer
    key; its URL. The key is exported as $ONPOLICY_TEST_TEACHER_KEY for runs (teacher.api_key_env)."""
    import os

    from servers import free_port, start_teacher_server, stop_server, wait_healthy

    port = free_port()
    proc = start_teacher_server(tiny_teacher_dir, port, extra_env={"ONPOLICY_TEACHER_API_KEY": TEACHER_SERVICE_KEY})
    os.environ[TEACHER_SERVICE_KEY_ENV] = TEACHER_SERVICE_KEY
    release_after_unit("teachers", lambda: stop_server(proc))
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz", timeout=300, proc=proc)
        proc.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        yield proc
    finally:
        os.environ.pop(TEACHER_SERVICE_KEY_ENV, None)
        stop_server(proc)


@pytest.fixture(scope="session")
def vllm_local_teacher(ray_session, tiny_teacher_dir):
    """The in-process vLLM teacher (`teacher.kind=local, backend=vllm`) in its Ray actor, top-k up to the
    vocabulary; shared by the scoring, generation and numerics tests."""
    from onpolicy.config import load_config
    from onpolicy.teacher.factory import open_teacher

    cfg = load_config(None, [f"teacher.model={tiny_teacher_dir}", "teacher.backend=vllm"])
    teacher = open_teacher(cfg.teacher, seed=cfg.seed, resources=cfg.resources)
    release_after_unit("teachers", teacher.close)
    yield teacher
    teacher.close()


@pytest.fixture(scope="session")
def reference_run(ray_session, tiny_model_dir, tiny_teacher_dir, tmp_path_factory):
    """One undisturbed run of `runs.reference_cfg`, the yardstick of the driver, fault and learner-group tests
    (which run the same config with a fault, or with two learner ranks). What needs live actors is measured
    before they are closed (`runs.ReferenceRun`), so no test holds this run's engines."""
    from tests.runs import finish_reference

    return finish_reference(tiny_model_dir, tiny_teacher_dir, tmp_path_factory.mktemp("reference"))


# ---- two test processes (pytest-xdist: `-n 2` in pyproject.toml) ---------------------------------------
# The suite is mostly start-up (Python imports, Ray, engines), which leaves one core idle a third of the time
# (67% of 2 cores measured on one process); a second process fills it. Each module runs whole in one process
# (its module fixtures are built once), and modules that share a session fixture run in the same process so
# it is built once: SHARED names them. Work units are handed out longest first (EXPECTED_S), so the last one
# to start is short and neither process waits on the other at the end; xdist's own order (by number of tests)
# had left the 4-minute README test to start last. (xdist's `loadgroup` does not group under pytest 9 here,
# hence the scheduler below.)
SHARED = {
    # the undisturbed reference run
    "test_driver": "reference", "test_faults": "reference", "test_learner_group": "reference",
    # the session's vLLM server, teacher service and in-process vLLM teacher
    "test_external_vllm": "teachers", "test_teacher_generate": "teachers", "test_driver_remote": "teachers",
    "test_teacher_numerics": "teachers", "test_teacher_service": "teachers", "test_text_teacher": "teachers",
    "test_teachers_run": "teachers",
}
# Modules whose tests share nothing and are each long: every test is a work unit of its own.
SPLIT = {"test_readme_commands"}
# Seconds per work unit under `-n 2` (`--durations=0`, 2026-12-03, before OMP_WAIT_POLICY=PASSIVE): only the
# order matters; a unit not named counts as short.
EXPECTED_S = {
    "teachers": 436, "reference": 325, "tests/test_readme_commands.py::test_commands_verbatim": 244,
    "test_control_ray": 158, "test_working_run": 127, "test_compose_smoke": 92,
    "tests/test_readme_commands.py::test_control_plane_commands_verbatim": 89, "test_dashboard": 71,
    "test_ray_job": 61, "test_students": 57, "test_long_prompts": 56, "test_lora": 53, "test_teacher_pool": 44,
    "test_rollout_teacher": 39, "test_chat_data_run": 37, "test_eval_paths": 36, "test_managed_teachers": 31,
    "test_demo": 27, "test_dtypes": 25, "test_chunked_loss": 18, "test_teacher_http": 15, "test_checkpoints": 14,
    "test_security": 13, "test_quiet": 12,
}


def unit_of(nodeid: str) -> str:
    """The work unit a test belongs to: its test (SPLIT modules), its SHARED group, or its module."""
    module = Path(nodeid.split("::", 1)[0]).stem
    return nodeid if module in SPLIT else SHARED.get(module, module)


def pytest_collection_modifyitems(config, items):
    # stable: the order of modules and of tests within a module is kept inside a unit
    items.sort(key=lambda item: -EXPECTED_S.get(unit_of(item.nodeid), 0))


def pytest_xdist_make_scheduler(config, log):
    """Work units (`unit_of`) each sent whole to one process, in the order of the sorted collection."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # keep our order, not xdist's by number of tests

    class ByUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return ByUnit(config, log)
