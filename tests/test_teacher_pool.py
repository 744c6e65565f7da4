"""The teacher pool (`teacher.urls`): the routing as pure functions, then replicas as real servers on
loopback (scripted ones, then our teacher service in a real run) that are stopped and started again."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fakes.scripted import Script, make_scripted_teacher_app
from fakes.server import ServerThread
from test_teacher_http import items, same_scores

from onpolicy.config import RemoteTeacherConfig
from onpolicy.protocols import Teacher
from onpolicy.teacher.clients.pool import Router, TeacherPool, info_mismatch, pick_replica, pool_state, usable
from onpolicy.teacher.errors import TeacherRequestError, TeacherResponseError, TeacherUnavailable
from onpolicy.teacher.factory import open_teacher
from onpolicy.teacher.fingerprint import TeacherIncompatible
from onpolicy.types import TeacherInfo

INFO = TeacherInfo(model="scripted", vocab_size=16, tokenizer_fingerprint="0" * 64, eos_token_ids=[2], max_top_k=16)
FAST = {"timeout_s": 5.0, "max_retries": 1, "backoff_base_s": 0.02, "backoff_max_s": 0.05, "breaker_failures": 2,
        "breaker_cooldown_s": 0.3, "max_wait_s": 30.0}


# ---------------------------------------------------------------------------------------------
# Pure pieces


def test_a_replica_is_usable_while_closed_or_when_its_probe_is_due():
    assert usable("closed", 0.0)
    assert not usable("open", 0.2) and usable("open", 0.0)
    assert not usable("half_open", 0.0)  # its probe is already in flight


def test_pick_replica_takes_the_fewest_in_flight_and_breaks_ties_round_robin():
    assert pick_replica([2, 0, 1], [True] * 3, 0) == 1
    assert pick_replica([2, 0, 1], [True, False, True], 0) == 2  # skipped: breaker open
    assert pick_replica([1, 1, 1], [True] * 3, 2) == 2 and pick_replica([1, 1, 1], [True] * 3, 3) == 0
    assert pick_replica([0, 0], [False, False], 0) is None


def test_router_spreads_sequential_calls_and_follows_the_queues():
    router = Router(3)
    firsts = []
    for _ in range(6):  # one call at a time: round robin
        i = router.acquire([True] * 3)
        firsts.append(i)
        router.release(i)
    assert firsts == [0, 1, 2, 0, 1, 2]
    held = [router.acquire([True] * 3) for _ in range(3)]  # one in flight on each
    router.release(held[1])
    assert router.acquire([True] * 3) == 1  # the one whose call came back
    assert router.in_flight == [1, 1, 1] and router.calls == [3, 4, 3]


def test_the_pool_is_down_only_when_every_replica_is():
    assert pool_state(["open", "closed"]) == "closed"
    assert pool_state(["open", "half_open"]) == "open"


def test_info_mismatch_names_each_differing_field():
    other = INFO.model_copy(update={"tokenizer_fingerprint": "1" * 64, "eos_token_ids": [3]})
    assert info_mismatch(INFO, INFO) == []
    assert info_mismatch(INFO, other) == [f"tokenizer_fingerprint: {'0' * 16!r} != {'1' * 16!r}",
                                          "eos_token_ids: [2] != [3]"]


# ---------------------------------------------------------------------------------------------
# Scripted replicas on loopback


class Replicas:
    """Two scripted teacher services and a pool over them (`teacher.urls`), with the pool's state changes."""

    def __init__(self, *, info: list[TeacherInfo] | None = None, **cfg):
        self.scripts = [Script(), Script()]
        self.servers = [ServerThread(make_scripted_teacher_app(s, info=i)).start()
                        for s, i in zip(self.scripts, info or [INFO, INFO])]
        self.states: list[str] = []
        self.cfg = RemoteTeacherConfig(kind="service", urls=[s.url for s in self.servers], **{**FAST, **cfg})

    def open(self) -> TeacherPool:
        pool = open_teacher(self.cfg, on_state_change=self.states.append)
        assert isinstance(pool, TeacherPool) and isinstance(pool, Teacher)
        return pool

    def scored(self) -> list[int]:
        return [s.requests["score"] for s in self.scripts]

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


@pytest.fixture
def replicas():
    made: list[Replicas] = []

    def make(**kw) -> Replicas:
        made.append(Replicas(**kw))
        return made[-1]

    yield make
    for r in made:
        r.stop()


def test_concurrent_calls_spread_across_both_replicas(replicas):
    reps = replicas()
    for s in reps.scripts:  # a slow answer, so calls overlap and the in-flight counts matter
        s.default = ("sleep", 0.02)
    batch = items(3)
    with reps.open() as pool, ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda _: pool.score(batch), range(80)))
        usage = pool.usage()
    assert all(same_scores(r, batch) for r in results)
    a, b = reps.scored()
    assert a + b == 80 and min(a, b) >= 30, (a, b)  # both served, about evenly
    sent = [s.requests["score"] + s.requests["info"] for s in reps.scripts]  # info: the model check
    assert [usage["replica_0_requests"], usage["replica_1_requests"]] == sent
    assert usage["requests"] == sum(sent) and usage["replicas_live"] == 2 and usage["breaker"] == "closed"


def test_a_large_call_is_split_across_the_replicas_in_order(replicas):
    reps = replicas()
    batch = items(150)  # three chunks of up to 64 sequences
    with reps.open() as pool:
        assert same_scores(pool.score(batch), batch)
        out = pool.generate([[1, 4 + i % 5] for i in range(130)], n=1, max_new_tokens=3, seed=7)
    assert [c.prompt_index for c in out] == list(range(130))
    assert sorted(reps.scored()) == [1, 2]
    assert min(s.requests["generate"] for s in reps.scripts) >= 1


def test_one_replica_stopped_the_other_serves_without_waiting(replicas):
    reps = replicas()
    batch = items(2)
    with reps.open() as pool:
        for _ in range(4):
            assert same_scores(pool.score(batch), batch)
        assert min(reps.scored()) > 0
        reps.servers[1].stop()
        before = reps.scored()[0]
        slowest = 0.0
        for _ in range(20):
            t0 = time.monotonic()
            assert same_scores(pool.score(batch), batch)
            slowest = max(slowest, time.monotonic() - t0)
        usage = pool.usage()
    assert slowest < 2.0, slowest  # a refused connection, then the other replica: never max_wait_s
    assert reps.scored()[0] - before == 20  # the survivor served every call
    assert reps.states == [] and usage["breaker"] == "closed"  # never degraded
    assert usage["replica_1_breaker"] == "open" and usage["replicas_live"] == 1


def test_every_replica_down_degrades_then_one_back_resumes(replicas):
    reps = replicas()
    batch = items(2)
    with reps.open() as pool:
        assert same_scores(pool.score(batch), batch)
        for s in reps.servers:
            s.stop()
        result: dict = {}
        waiting = threading.Thread(target=lambda: result.update(out=pool.score(batch)))
        waiting.start()
        deadline = time.monotonic() + 10
        while "open" not in reps.states and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reps.states == ["open"] and pool.state == "open"
        time.sleep(0.5)
        assert waiting.is_alive()  # the call waits for a replica instead of failing
        reps.servers[0].start()  # back on the same port
        waiting.join(timeout=10)
        assert not waiting.is_alive() and same_scores(result["out"], batch)
    assert reps.states == ["open", "closed"]


def test_every_replica_down_past_max_wait_s_fails_the_call_naming_each(replicas):
    reps = replicas(max_wait_s=0.5)
    with reps.open() as pool:
        assert pool.info() == INFO
        for s in reps.servers:
            s.stop()
        t0 = time.monotonic()
        with pytest.raises(TeacherUnavailable, match="max_wait_s=0.5") as err:
            pool.score(items(1))
    assert time.monotonic() - t0 < 5.0
    assert all(s.url in str(err.value) for s in reps.servers)


def test_a_replica_serving_another_tokenizer_is_refused(replicas):
    other = INFO.model_copy(update={"tokenizer_fingerprint": "1" * 64})
    reps = replicas(info=[INFO, other])
    with pytest.raises(TeacherIncompatible, match="tokenizer_fingerprint") as err:
        reps.open().info()
    assert reps.servers[0].url in str(err.value) and reps.servers[1].url in str(err.value)


def test_a_replica_down_at_open_is_checked_when_it_comes_back(replicas):
    other = INFO.model_copy(update={"model": "another"})
    reps = replicas(info=[INFO, other])
    reps.servers[1].stop()
    with reps.open() as pool:
        assert pool.info() == INFO
        reps.servers[1].start()
        time.sleep(FAST["breaker_cooldown_s"])  # its breaker may let a probe through
        with pytest.raises(TeacherIncompatible, match="another"):
            for _ in range(10):
                pool.score(items(1))


@pytest.mark.parametrize("action,error", [(("status", 400), TeacherRequestError), ("short", TeacherResponseError)])
def test_a_refused_or_malformed_answer_is_not_sent_to_the_other_replica(replicas, action, error):
    reps = replicas()
    with reps.open() as pool:
        reps.scripts[0].actions.append(action)
        with pytest.raises(error):
            pool.score(items(2))  # the first call goes to replica 0
    assert reps.scored() == [1, 0]


# ---------------------------------------------------------------------------------------------
# A real run over two replicas of our teacher service: one killed mid-run, then the other


@pytest.mark.slow
class Pacer:
    """Holds every score call while `hold_when()` is true, until the test moves on (`hold` again): the test
    kills a replica while the run cannot advance, so a fast host cannot finish the run before the kill lands
    (CI did, with 10 steps in 0.7 s). A held call goes on when the hold changes; later calls check the new one."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.hold_when = None
        self.generation = 0
        self.waiting = 0

    def admit(self) -> None:
        with self.cond:
            generation = self.generation
            while self.hold_when is not None and self.generation == generation and self.hold_when():
                self.waiting += 1
                self.cond.notify_all()
                self.cond.wait()
                self.waiting -= 1

    def hold(self, when) -> None:
        with self.cond:
            self.hold_when, self.generation = when, self.generation + 1
            self.cond.notify_all()

    def wait_held(self, done, timeout_s: float) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.waiting > 0 or done.done(), timeout_s), "no score call held"
        assert not done.done(), done.result()


def _die(server: ServerThread) -> threading.Thread:
    """Stop `server` the way a dying one stops: new connections are refused at once, while the call it holds
    (a held score) still gets its answer once released. Returns the stopping thread, to join after the release."""
    import socket

    port = server.port
    stopping = threading.Thread(target=server.stop)
    stopping.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return stopping
        time.sleep(0.02)
    raise AssertionError(f"port {port} still accepts connections")


def test_run_absorbs_one_replica_dying_and_waits_out_both(ray_session, tiny_model_dir, tiny_teacher_dir, tmp_path):
    """One replica dies mid-run: the other serves at once (never degraded, nothing scored twice). Then the
    second dies too: the run is `degraded` with the reason and waits instead of failing; when a replica comes
    back on its port the run carries on and finishes, every step once and every sequence scored once."""
    from test_driver_remote import PROMPTS, CountingTeacher, _cfg, _wait

    from onpolicy.driver import Run
    from onpolicy.metrics import read_metrics
    from onpolicy.status import read_status
    from onpolicy.teacher.local.engines import HFTeacher
    from services.teacher.app import create_app

    steps, evals = 10, 16
    pacer = Pacer()

    class PacedTeacher(CountingTeacher):
        def score(self, items, top_k=0):
            pacer.admit()
            return super().score(items, top_k)

    counting = [PacedTeacher(HFTeacher(str(tiny_teacher_dir))) for _ in range(2)]
    servers = [ServerThread(create_app(c, model_name="tiny-teacher")).start() for c in counting]
    urls = ",".join(s.url for s in servers)
    # teacher.url=null: the pool's URLs replace the one _cfg sets
    cfg = _cfg(tiny_model_dir, tmp_path, "service", "null", f"teacher.urls=[{urls}]", f"schedule.steps={steps}",
               f"eval.num_prompts={evals}", "teacher.breaker_failures=5")
    metrics = tmp_path / "metrics.jsonl"

    def trained() -> int:
        return len(read_metrics(metrics, kind="train"))

    run = Run(cfg, show_progress=False)
    ex = ThreadPoolExecutor(1)
    degraded = None
    try:
        pacer.hold(lambda: trained() >= 3)
        done = ex.submit(run.run)
        pacer.wait_held(done, 300)
        before = [c.scored["sequences"] for c in counting]
        steps_at_kill = trained()
        stopping = _die(servers[1])  # one replica dies mid-run
        killed_at = time.monotonic()
        pacer.hold(lambda: trained() >= steps_at_kill + 3)
        stopping.join()
        at_kill = counting[1].scored["sequences"]  # with the call it held, if it held one
        pacer.wait_held(done, 120)
        absorbed_s = time.monotonic() - killed_at
        one_down = read_metrics(metrics, kind="train")[steps_at_kill:]
        stopping = _die(servers[0])  # ...and then the other: nobody scores
        pacer.hold(None)
        stopping.join()
        _wait(lambda: (read_status(tmp_path) or {}).get("status") == "degraded" or done.done(), 60, "degraded")
        degraded = read_status(tmp_path)
        time.sleep(2.0)  # the run waits instead of failing
        assert not done.done(), done.result()
        servers[0].start()  # back on the same port
        done.result(timeout=300)  # the run's own error, if it failed
    finally:
        pacer.hold(None)
        for s in servers:
            s.stop()
        run.close()
        ex.shutdown(wait=False)
    assert degraded["status"] == "degraded" and "unreachable" in degraded["reason"]
    assert read_status(tmp_path)["status"] == "finished"
    recs = read_metrics(metrics, kind="train")
    assert [r["step"] for r in recs] == list(range(1, steps + 1)) and all(r["sequences"] == PROMPTS for r in recs)
    assert min(before) > 0, before  # both replicas served while both lived
    assert counting[1].scored["sequences"] == at_kill  # the dead one got nothing more...
    total = steps * PROMPTS + 2 * evals  # ...and the survivor scored the rest, every sequence once
    assert counting[0].scored["sequences"] + at_kill == total
    # the first death was absorbed: the steps after it never saw the breaker open
    assert len(one_down) >= 3 and all(r["teacher_breaker"] == "closed" for r in one_down)
    assert one_down[-1]["teacher_breaker_opened"] == 0 and one_down[-1]["teacher_failures"] >= 1  # tried, skipped
    print(f"\nserved before the kill: {before}; three more steps within {absorbed_s:.2f}s of it; "
          f"step seconds: {[round(r['step_seconds'], 2) for r in recs]}")
