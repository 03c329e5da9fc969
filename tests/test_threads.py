"""minisd.perf.threads: the thread count sample.py picks from how busy the machine was while it started.

The expected counts are worked out by hand from the docstring's rule,
threads = clamp(floor(cores - busy_elsewhere + 1/4), 1, cores), with fake kernel counters, so each term
(the machine's CPU seconds, this process's own, the window's wall time, the quarter-core margin) can fail."""
import pytest

from minisd.perf import threads as th


def window(monkeypatch, machine0, own0, wall0, machine1, own1, wall1, n_cores=2):
    clock = {"machine": machine0, "own": own0, "wall": wall0}
    monkeypatch.setattr(th, "_machine_busy_seconds", lambda: clock["machine"])
    monkeypatch.setattr(th, "_own_seconds", lambda: clock["own"])
    monkeypatch.setattr(th.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(th, "cores", lambda: n_cores)
    w = th.LoadWindow()
    clock.update(machine=machine1, own=own1, wall=wall1)
    return w


@pytest.mark.parametrize("machine1, own1, expect_other, expect_threads", [
    # 1.5 s window; this process ran 1.4 CPU s of the machine's 1.5: others 0.1 / 1.5 = 0.067 cores -> 2
    (101.5, 11.4, 0.1 / 1.5, 2),
    # others 0.3 / 1.5 = 0.2 cores: 2 - 0.2 + 0.25 = 2.05 -> 2
    (101.7, 11.4, 0.3 / 1.5, 2),
    # others 0.45 / 1.5 = 0.3 cores: 1.95 -> 1 (a core 30 % taken is not free)
    (101.85, 11.4, 0.45 / 1.5, 1),
    # another process on a full core: 1.5 + 1.4 machine s -> others 1.0 -> 1
    (102.9, 11.4, 1.0, 1),
    # both cores busy elsewhere (and this process squeezed): never below 1
    (103.6, 11.1, 2.5 / 1.5, 1),
])
def test_threads_from_counters(monkeypatch, machine1, own1, expect_other, expect_threads):
    w = window(monkeypatch, 100.0, 10.0, 50.0, machine1, own1, 51.5)
    assert w.busy_elsewhere() == pytest.approx(expect_other, abs=1e-12)
    assert w.threads() == expect_threads


def test_more_cores_and_unknown(monkeypatch):
    # 8 cores, others 2.4 / 1.2 = 2 cores busy: 8 - 2 + 0.25 -> 6
    w = window(monkeypatch, 0.0, 0.0, 0.0, 3.6, 1.2, 1.2, n_cores=8)
    assert w.threads() == 6
    # a window too short to read (ticks are 10 ms) or no /proc/stat: one thread, the safe answer
    w = window(monkeypatch, 0.0, 0.0, 0.0, 0.05, 0.05, 0.1)
    assert w.busy_elsewhere() is None and w.threads() == 1
    w = window(monkeypatch, None, 0.0, 0.0, None, 1.0, 1.5)
    assert w.threads() == 1


def test_proc_stat_parse(monkeypatch, tmp_path):
    """The `cpu` line: busy = all ticks but idle and iowait, over the clock tick rate."""
    import builtins
    stat = tmp_path / "stat"
    #              user nice system idle  iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  700 30 200 5000 70 10 20 40 99 9\ncpu0 1 2 3 4\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(stat if p == "/proc/stat" else p, *a, **k))
    monkeypatch.setattr(th.os, "sysconf", lambda name: 100)
    assert th._machine_busy_seconds() == pytest.approx((700 + 30 + 200 + 10 + 20 + 40) / 100)
