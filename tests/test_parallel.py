"""The scheduler that runs all cells of a plan at once on a fixed number of slots: its order,
its dependencies (final runs after the cell's selection), failures that end one cell only,
its wall-clock simulation, and `launch` with real processes (slot limit, GPU spread, signals)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from per import parallel, sweep


def _phase(tmp_path, name: str, lams: list[float], seeds: list[int], selection: bool = False,
           cost: float = 1.0) -> sweep.Phase:
    """A phase of a stand-in preset whose runs take `cost` seconds each (`_seconds`)."""
    cell = f"{name}-val" if selection else name          # as data.val_size names the folder
    cfg = {"task": "cifar", "run_dir": str(tmp_path / cell / "run"), "cost": cost,
           "method": {"lam_grid": lams}}
    return sweep.Phase(sweep.Preset(name, cfg), (), lams, seeds, selection)


def _seconds(unit: sweep.Phase) -> float:
    return unit.preset.cfg["cost"] * unit.n_runs


def _cell(tmp_path, name, grid, seeds, select_cost, final_cost):
    return (_phase(tmp_path, name, grid, [0], True, select_cost),
            _phase(tmp_path, name, [], seeds, False, final_cost))


def _drain(sched: parallel.Scheduler) -> list[tuple[str, bool, float]]:
    """Units in the order handed out with one slot, each finished before the next."""
    out = []
    while (unit := sched.next()) is not None:
        out.append((unit.preset.name, unit.selection, unit.lams[0]))
        sched.finished(unit, ok=True)
    return out


def test_selection_runs_come_first_then_the_chosen_lambdas_final_runs(tmp_path):
    chosen = []

    def choose(select):
        chosen.append(select.preset.name)
        return select.lams[-1]

    long = _cell(tmp_path, "long", [1e-3, 1e-4], [0, 1], 2.0, 3.0)
    short = _cell(tmp_path, "short", [0.1, 0.2], [0], 1.0, 1.0)
    plain = (None, _phase(tmp_path, "plain", [0.0], [0, 1, 2], cost=1.5))
    sched = parallel.Scheduler([short, plain, long], parallel.each_run, choose, _seconds)
    order = _drain(sched)
    # The longest remaining path first: a selection run of `long` (2 + 3 s) before one of
    # `short` (1 + 1 s) or a lone 1.5 s run; a final run only after its cell's selection.
    assert order[:2] == [("long", True, 1e-3), ("long", True, 1e-4)]
    assert order[2:4] == [("long", False, 1e-4)] * 2   # 3 s each, at the chosen lambda (the grid's last)
    assert chosen == ["long", "short"]
    finals = [i for i, (n, sel, _) in enumerate(order) if n == "short" and not sel]
    selects = [i for i, (n, sel, _) in enumerate(order) if n == "short" and sel]
    assert len(finals) == 1 and max(selects) < finals[0]
    assert len(order) == 2 + 2 + 2 + 1 + 3 and sched.failures == []
    assert long[1].lams == [1e-4]                     # the final phase carries its lambda


def test_a_failed_selection_run_holds_back_only_its_cells_final_runs(tmp_path):
    a, b = _cell(tmp_path, "a", [1.0, 2.0], [0, 1], 3.0, 3.0), _cell(tmp_path, "b", [1.0], [0, 1], 1.0, 1.0)
    sched = parallel.Scheduler([a, b], parallel.each_run, lambda s: s.lams[0], _seconds)
    first = sched.next()
    assert (first.preset.name, first.selection) == ("a", True)
    sched.finished(first, ok=False, why="a lam=1 seed=0 exited with 1")
    rest = _drain(sched)
    assert ("a", True, 2.0) in rest                   # a's other selection run still runs
    assert not any(n == "a" and not sel for n, sel, _ in rest)     # a's final runs wait
    assert ("b", False, 1.0) in rest
    assert sched.failures == ["a lam=1 seed=0 exited with 1"]


def test_a_failed_final_run_holds_back_nothing(tmp_path):
    plain = (None, _phase(tmp_path, "p", [0.0], [0, 1, 2]))
    sched = parallel.Scheduler([plain], parallel.each_run, lambda s: s.lams[0], _seconds)
    first = sched.next()
    sched.finished(first, ok=False, why="p seed=0 exited with 1")
    assert len(_drain(sched)) == 2 and sched.failures == ["p seed=0 exited with 1"]


def test_a_selection_that_cannot_choose_ends_its_cell_with_the_reason(tmp_path):
    def choose(select):
        raise sweep.SelectionError(f"lambda diverged in every selection run under {select.preset.name}")
    a = _cell(tmp_path, "a", [1.0], [0], 1.0, 1.0)
    sched = parallel.Scheduler([a], parallel.each_run, choose, _seconds)
    assert [(n, s) for n, s, _ in _drain(sched)] == [("a", True)]
    assert sched.failures == ["lambda diverged in every selection run under a"]


def test_runs_with_a_result_are_not_handed_out(tmp_path):
    select, final = _cell(tmp_path, "a", [1.0, 2.0], [0], 1.0, 1.0)
    for lam in (1.0, 2.0):                              # both selection runs hold a result
        run = select.run_dir(lam, 0)
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"status": "finished"}))
        (run / "config.yaml").write_text(json.dumps({**select.preset.cfg, "seed": 0,
                                                     "method": {"lam_grid": [1.0, 2.0], "lam": lam}}))
    sched = parallel.Scheduler([(select, final)], parallel.each_run, lambda s: 2.0, _seconds)
    assert _drain(sched) == [("a", False, 2.0)]         # chosen at once; only the final run
    units = parallel.each_multirun(_phase(tmp_path, "b", [1.0, 2.0], [0, 1]))
    assert [(u.lams, u.seeds) for u in units] == [([1.0, 2.0], [0, 1])]   # one multirun


def test_simulated_wall_clock_by_hand(tmp_path):
    # Cell A: 2 selection runs of 2 s, then 2 final runs of 3 s. Cell B: 3 lone runs of 1 s.
    a = _cell(tmp_path, "a", [1.0, 2.0], [0, 1], 2.0, 3.0)
    b = (None, _phase(tmp_path, "b", [0.0], [0, 1, 2], cost=1.0))
    # One slot: everything after everything (4 + 6 + 3 s).
    assert parallel.simulate([a, b], 1, _seconds) == pytest.approx(13.0)
    # Two slots: A's selection (0-2 s on both), A's finals (2-5 s on both), then B's runs
    # (5-6, 5-6, 6-7 s): 7 s. The longest path first beats B first (B on 0-1, 0-1, 1-2; A's
    # selection 1-3, 2-4; finals 4-7: also 7 here), and never goes below sum / slots = 6.5 s.
    assert parallel.simulate([a, b], 2, _seconds) == pytest.approx(7.0)
    # Enough slots: the longest chain, 2 + 3 s.
    assert parallel.simulate([a, b], 8, _seconds) == pytest.approx(5.0)
    assert a[1].lams == []                              # the plan itself is not changed


CHILD = """
import json, os, signal, sys, time
out, name, code, wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
term_code = int(sys.argv[5])     # the exit code after a SIGTERM (143: a clean stop)
def record(event):
    with open(out, "a") as f:
        f.write(json.dumps({"name": name, "event": event, "t": time.time(),
                            "gpu": os.environ.get("GPU")}) + "\\n")
terms = []
def on_term(*_):
    record("TERM")
    terms.append(1)
signal.signal(signal.SIGTERM, on_term)
record("start")
end = time.time() + wait
while time.time() < end and not terms:
    time.sleep(0.01)
if terms:
    time.sleep(0.5)          # a second SIGTERM meanwhile is recorded too
    sys.exit(term_code)
record("end")
if len(sys.argv) > 6:        # a run folder and its config: write them as a finished run's
    os.makedirs(sys.argv[6])
    with open(os.path.join(sys.argv[6], "config.yaml"), "w") as f:
        f.write(sys.argv[7])
    with open(os.path.join(sys.argv[6], "summary.json"), "w") as f:
        json.dump({"status": "finished"}, f)
sys.exit(code)
"""


def _launch_units(tmp_path, chains, slots, codes=None, wait=0.3, term_codes=None, results=()):
    """Launch `chains` with a child process per unit that logs to events.jsonl; a unit
    exits with `codes[name]` (0), or `term_codes[name]` (143) after a SIGTERM; a unit
    named in `results` writes its run folder as a finished run's before it exits."""
    events = tmp_path / "events.jsonl"
    lines = []

    def start(unit, slot):
        name = f"{unit.preset.name}:{unit.lams[0]:g}:{unit.seeds[0]}"
        code = (codes or {}).get(name, 0)
        cmd = [sys.executable, "-c", CHILD, str(events), name, str(code), str(wait),
               str((term_codes or {}).get(name, 143))]
        if name in results:
            config = {**unit.preset.cfg, "seed": unit.seeds[0], "method": {**unit.preset.cfg["method"],
                                                                         "lam": unit.lams[0]}}
            cmd += [str(unit.run_dir(unit.lams[0], unit.seeds[0])), yaml.safe_dump(config)]
        return subprocess.Popen(cmd, env={**os.environ, "GPU": slot}), ""

    sched = parallel.Scheduler(chains, parallel.each_run, lambda s: s.lams[0], _seconds)
    stop = parallel.launch(sched, slots, start, say=lines.append,
                           describe=lambda u: f"{u.preset.name}:{u.lams[0]:g}:{u.seeds[0]}", poll_s=0.05)
    rows = [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []
    return sched, stop, rows, lines


def _most_at_once(rows) -> int:
    now, most = 0, 0
    for r in sorted(rows, key=lambda r: (r["t"], r["event"] != "end")):
        now += {"start": 1, "end": -1, "TERM": -1}[r["event"]]
        most = max(most, now)
    return most


def test_launch_keeps_to_its_slots_and_spreads_them_over_the_gpus(tmp_path):
    chains = [_cell(tmp_path, "a", [1.0, 2.0], [0, 1], 1.0, 1.0),
              (None, _phase(tmp_path, "b", [0.0], [0, 1, 2]))]
    sched, stop, rows, lines = _launch_units(tmp_path, chains, ["GPU 0", "GPU 0", "GPU 1", "GPU 1"])
    assert stop == 0 and sched.failures == []
    starts = [r for r in rows if r["event"] == "start"]
    assert len(starts) == 2 + 2 + 3 and _most_at_once(rows) <= 4
    first_two = [line.split(" on ")[1].split(" (")[0] for line in lines if line.startswith("start ")][:2]
    assert first_two == ["GPU 0", "GPU 1"]                  # as launched: one run on each GPU first
    # a's final runs (chosen lambda 1; seed 1 is a final run only) start after both of its
    # selection runs (seed 0) ended.
    select_end = max(min(r["t"] for r in rows if r["name"] == n and r["event"] == "end")
                     for n in ("a:1:0", "a:2:0"))
    assert min(r["t"] for r in starts if r["name"] == "a:1:1") >= select_end
    assert sum(line.startswith("done ") for line in lines) == 7


def test_launch_goes_on_after_a_failure_and_names_it(tmp_path):
    chains = [_cell(tmp_path, "a", [1.0, 2.0], [0, 1], 1.0, 1.0), (None, _phase(tmp_path, "b", [0.0], [0, 1]))]
    sched, stop, rows, lines = _launch_units(tmp_path, chains, ["GPU 0"], codes={"a:1:0": 3}, wait=0.05)
    assert stop == 0 and sched.failures == ["a:1:0 exited with 3"]
    assert {r["name"] for r in rows} == {"a:1:0", "a:2:0", "b:0:0", "b:0:1"}      # a's finals never ran
    assert any(line.startswith("FAILED a:1:0") for line in lines)


def test_a_unit_stopped_from_elsewhere_as_it_finished_keeps_its_result(tmp_path):
    """The runner exits 143 after a SIGTERM that came during its last steps (a scheduler,
    a kill), with its result written: done, and its cell's final runs go ahead."""
    chains = [_cell(tmp_path, "a", [1.0, 2.0], [0], 1.0, 1.0)]
    chains.append((None, _phase(tmp_path, "b", [0.0], [0])))
    sched, stop, rows, lines = _launch_units(tmp_path, chains, ["GPU 0"], wait=0.05, results=("a:1:0", "b:0:0"),
                                             codes={"a:1:0": 143, "a:2:0": 143, "b:0:0": 1})
    assert stop == 0 and sched.failures == ["a:2:0 exited with 143"]       # a:2:0 holds no result
    assert "done a:1:0 in 0m00s (exit 143: stopped as it finished; its result is written, so it counts)" in lines
    assert "done b:0:0 in 0m00s (exit 1; its result is written, so it counts)" in lines
    assert any(line.startswith("FAILED a:2:0") for line in lines)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_launching_and_reaches_each_running_unit_once(tmp_path, signum):
    chains = [(None, _phase(tmp_path, "b", [0.0], [0, 1, 2, 3]))]
    # A handler of the caller's, whatever the test runs under (`nohup` ignores SIGHUP).
    original = signal.signal(signum, before := lambda *_: None)
    threading.Timer(1.0, os.kill, (os.getpid(), signum)).start()
    t0 = time.time()
    try:
        sched, stop, rows, lines = _launch_units(tmp_path, chains, ["GPU 0", "GPU 1"], wait=30)
    finally:
        restored = signal.signal(signum, original)
    assert stop == signum and time.time() - t0 < 20 and sched.failures == []
    # 2 ran and got one SIGTERM each (SIGHUP is passed on as SIGTERM); 2 never started.
    assert sorted(r["event"] for r in rows) == ["TERM", "TERM", "start", "start"]
    assert any("stopping 2 running unit(s) cleanly" in line for line in lines)
    assert sum(line.startswith("stopped b:0:") for line in lines) == 2
    assert restored is before                                  # the handler is restored


def test_a_signal_ignored_from_the_start_stays_ignored(tmp_path):
    """Under `nohup` (SIGHUP ignored) a closed terminal does not stop the sweep."""
    chains = [(None, _phase(tmp_path, "b", [0.0], [0, 1]))]
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGHUP)).start()
        sched, stop, rows, lines = _launch_units(tmp_path, chains, ["GPU 0"], wait=1.5)
        assert stop == 0 and sched.failures == [] and "TERM" not in {r["event"] for r in rows}
        assert sum(line.startswith("done b:0:") for line in lines) == 2
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_unit_that_fails_during_a_stop_is_a_failure_not_a_stop(tmp_path):
    """Exit 143 after the SIGTERM passed on is a clean stop; any other code is a failure."""
    chains = [(None, _phase(tmp_path, "b", [0.0], [0, 1]))]
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    sched, stop, rows, lines = _launch_units(tmp_path, chains, ["GPU 0", "GPU 1"], wait=30,
                                             term_codes={"b:0:1": 1})
    assert stop == signal.SIGTERM and sched.failures == ["b:0:1 exited with 1"]
    assert any(line.startswith("stopped b:0:0") for line in lines)
    assert any(line.startswith("FAILED b:0:1") for line in lines)


def test_a_signal_while_a_unit_starts_reaches_it(tmp_path):
    events = tmp_path / "events.jsonl"

    def start(unit, slot):
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(events), "b", "0", "30", "143"])
        while not events.exists():                       # its SIGTERM handler is in place
            assert p.poll() is None, "the child died before it started"
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)              # before `launch` knows of the unit
        return p, ""

    sched = parallel.Scheduler([(None, _phase(tmp_path, "b", [0.0], [0, 1]))], parallel.each_run,
                               lambda s: s.lams[0], _seconds)
    t0 = time.time()
    stop = parallel.launch(sched, ["GPU 0"], start, say=lambda line: None, describe=str, poll_s=0.05)
    assert stop == signal.SIGINT and time.time() - t0 < 10
    # SIGINT is passed on as it came; the child's only handler is SIGTERM's, so it ends at once.
    assert [json.loads(line)["event"] for line in events.read_text().splitlines()] == ["start"]


STUBBORN = """
import json, signal, sys, time
out = sys.argv[1]
got = []
def on(signum, _):
    got.append(signal.Signals(signum).name)
    with open(out, "a") as f:
        f.write(json.dumps({"event": got[-1]}) + "\\n")
signal.signal(signal.SIGTERM, on)
signal.signal(signal.SIGINT, on)
with open(out, "a") as f:
    f.write(json.dumps({"event": "start"}) + "\\n")
end = time.time() + 30
while len(got) < 2 and time.time() < end:        # stops at the second signal
    time.sleep(0.01)
sys.exit(143)
"""


def test_an_error_in_the_launcher_stops_the_running_units_and_passes_on_signals_meanwhile(tmp_path):
    events = tmp_path / "events.jsonl"
    started = []

    def start(unit, slot):
        if started:
            raise OSError("cannot write the log")
        started.append(subprocess.Popen([sys.executable, "-c", STUBBORN, str(events)]))
        while not events.exists():                       # its handlers are in place
            time.sleep(0.02)
        return started[0], ""

    sched = parallel.Scheduler([(None, _phase(tmp_path, "b", [0.0], [0, 1]))], parallel.each_run,
                               lambda s: s.lams[0], _seconds)
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()   # a Ctrl-C while it waits
    t0 = time.time()
    with pytest.raises(OSError, match="cannot write the log"):
        parallel.launch(sched, ["GPU 0", "GPU 1"], start, say=lambda line: None, describe=str, poll_s=0.05)
    assert time.time() - t0 < 10 and started[0].returncode == 143
    assert [json.loads(line)["event"] for line in events.read_text().splitlines()] == ["start", "SIGTERM", "SIGINT"]
