"""Running a plan's cells together on a fixed number of slots.

A plan is a list of chains `(selection phase or None, final phase)` (`per.sweep.plan`): a
cell's final runs wait for its lambda, chosen once all its selection runs hold a result,
but the cells are independent. `Scheduler` hands out units (parts of phases: one run, or
one multirun) in that order, all cells' ready units sharing the slots, the one on the
longest remaining path first (a selection run before a final run of the same length, the
longer model before the shorter). `simulate` times a plan on `k` slots with it, for
`DRY_RUN`; `launch` runs it with one process per unit (`scripts/reproduce.py`).
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import signal
import subprocess
import time
from typing import Callable

from per.sweep import Phase, SelectionError

Chain = tuple[Phase | None, Phase]
Split = Callable[[Phase], list[Phase]]


def each_run(phase: Phase) -> list[Phase]:
    """The runs of `phase` that hold no result yet, one unit each."""
    return [unit for part in phase.pending() for unit in _all_runs(part)]


def each_multirun(phase: Phase) -> list[Phase]:
    """The runs of `phase` that hold no result yet, as few multiruns as they allow."""
    return phase.pending()


class Scheduler:
    """Which unit goes next. `choose(selection phase)` gives the lambda of its final runs (a
    `sweep.SelectionError` from it is a failure that holds back that cell's final runs);
    `seconds(unit)` is a unit's expected duration, for the order (any consistent unit: the
    ratio between models is what counts)."""

    def __init__(self, chains: list[Chain], split: Split, choose: Callable[[Phase], float],
                 seconds: Callable[[Phase], float]):
        self._split, self._choose, self._seconds = split, choose, seconds
        self._ready: list[tuple[float, int, Phase]] = []       # (-priority, order, unit): a heap
        self._order = itertools.count()
        self._chain: dict[int, Chain] = {}                     # id(unit) -> its chain, until back
        self._left: dict[int, int] = {}                        # id(selection phase) -> units without result
        self.failures: list[str] = []
        for chain in chains:
            if chain[1].selection or (chain[0] is not None and not chain[0].selection):
                raise ValueError(f"{chain[1].preset.name}: a chain is (selection phase or None, final phase)")
            self._enqueue(chain, chain[0] if chain[0] is not None else chain[1])

    def next(self) -> Phase | None:
        """The ready unit on the longest remaining path (None when none is ready)."""
        return heapq.heappop(self._ready)[2] if self._ready else None

    def finished(self, unit: Phase, ok: bool, why: str = "") -> None:
        """`unit` is back: with a result (`ok`), or failed (`why`). A failed selection unit
        holds back its cell's final runs (they need every lambda's score); nothing else
        waits on a unit."""
        chain = self._chain.pop(id(unit))
        if not ok:
            self.failures.append(why)
        elif unit.selection:
            self._left[id(chain[0])] -= 1
            if self._left[id(chain[0])] == 0:
                self._selected(chain)

    def _enqueue(self, chain: Chain, phase: Phase) -> None:
        units = self._split(phase)
        if phase.selection:
            self._left[id(phase)] = len(units)
            if not units:                                      # every selection run done already
                self._selected(chain)
                return
        for unit in units:
            self._chain[id(unit)] = chain
            heapq.heappush(self._ready, (-self._path(unit), next(self._order), unit))

    def _selected(self, chain: Chain) -> None:
        select, final = chain
        try:
            final.lams = [self._choose(select)]
        except SelectionError as e:    # e.g. every selection run diverged: no final runs
            self.failures.append(str(e))
            return
        self._enqueue(chain, final)

    def _path(self, unit: Phase) -> float:
        """Seconds from the unit's start to its cell's end with free slots: its own, plus a
        final run's after a selection run."""
        own = self._seconds(unit)
        if not unit.selection:
            return own
        final = self._chain[id(unit)][1]
        return own + self._seconds(dataclasses.replace(final, lams=unit.lams[:1], seeds=final.seeds[:1]))


def simulate(chains: list[Chain], slots: int, seconds: Callable[[Phase], float]) -> float:
    """Wall-clock seconds of `chains` on `slots` slots as `launch` would run them, one run
    per unit, each taking `seconds(unit)`. Selection runs with a result are not rerun; every
    final run counts (its lambda is not chosen yet). The chains are not changed."""
    copies = [(s, dataclasses.replace(f)) for s, f in chains]
    finals = {id(f) for s, f in copies if s is not None}
    sched = Scheduler(copies, lambda ph: _all_runs(ph) if id(ph) in finals else each_run(ph),
                      lambda select: select.lams[0], seconds)
    now, running = 0.0, []           # heap of (end, order, unit)
    order = itertools.count()
    while True:
        while len(running) < slots and (unit := sched.next()) is not None:
            heapq.heappush(running, (now + seconds(unit), next(order), unit))
        if not running:
            return now
        now, _, unit = heapq.heappop(running)
        sched.finished(unit, ok=True)


def _all_runs(phase: Phase) -> list[Phase]:
    return [dataclasses.replace(phase, lams=[lam], seeds=[seed]) for lam in phase.lams for seed in phase.seeds]


@dataclasses.dataclass
class Running:
    unit: Phase
    slot: str
    process: subprocess.Popen
    output: str          # where its output goes, for a failure's message
    started: float
    signalled: int = 0   # how many of the stop signals it has been sent


# Stop signals `launch` passes on (SIGHUP, a closed terminal, as SIGTERM: the runs stop cleanly).
STOP_SIGNALS = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}


def launch(sched: Scheduler, slots: list[str], start: Callable[[Phase, str], tuple[subprocess.Popen, str]],
           say: Callable[[str], None], describe: Callable[[Phase], str], poll_s: float = 1.0) -> int:
    """Run `sched`'s units on `slots` (labels, e.g. GPU ids, one per concurrent unit) until
    none is left: `start(unit, slot)` starts a unit's process and says where its output goes;
    exit 0 means it holds its results, as does any exit of a unit whose runs all hold a result
    (`Phase.done`: a signal from elsewhere came as it finished); anything else is a failure
    (`Scheduler.finished`).

    A stop signal (SIGINT, SIGTERM, SIGHUP; not SIGHUP where this process started ignoring
    it, as under `nohup`) starts no more units and is passed on, within
    `poll_s`, once to each running unit, one started meanwhile included (SIGHUP as SIGTERM):
    the runs stop cleanly and resume on the next launch. A second one is passed on once
    more: the runs stop at once. An error here stops them as a SIGTERM would (unless a stop
    signal came first) and waits for them, passing on signals meanwhile, then raises.
    Returns the first stop signal's number, or 0."""
    running: list[Running] = []
    stops: list[int] = []        # the stop signals received, in order (the handler only records)

    def on_signal(signum, _frame):
        stops.append(signum)

    # SIGHUP ignored from the start stays so: `nohup` ignores it to outlive the terminal. (A
    # shell's background job ignores SIGINT too, but `kill -INT` still stops the sweep.)
    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS
                if not (s == signal.SIGHUP and signal.getsignal(s) == signal.SIG_IGN)}
    told = 0
    try:
        while True:
            while not stops and len(running) < len(slots) and (unit := sched.next()) is not None:
                slot = _least_used(slots, [r.slot for r in running])
                running.append(Running(unit, slot, *start(unit, slot), time.monotonic()))
                say(f"start {describe(unit)} on {slot} ({len(running)} of {len(slots)} slots busy)")
            if not running:
                return stops[0] if stops else 0
            time.sleep(poll_s)
            if len(stops) > told:
                told = len(stops)
                how = "cleanly (a second one stops them at once)" if told == 1 else "at once"
                say(f"signal {signal.Signals(stops[-1]).name}: stopping {len(running)} running unit(s) "
                    f"{how}; the same command resumes")
            _pass_on(running, stops)
            for r in [r for r in running if r.process.poll() is not None]:
                running.remove(r)
                code, took, name = r.process.returncode, _hms(time.monotonic() - r.started), describe(r.unit)
                if _stopped_by(code, stops[:r.signalled]):
                    say(f"stopped {name} after {took} (exit {code})")
                    continue
                # A stop signal from elsewhere (a scheduler, a kill) as the run finished: the
                # runner exits 128+signal, but the run holds its result.
                held = code != 0 and len(r.unit.done()) == r.unit.n_runs
                if code == 0 or held:
                    signalled = code < 0 or code > 128    # killed by, or exited 128+, a signal
                    say(f"done {name} in {took}" + (f" (exit {code}{': stopped as it finished' if signalled else ''}"
                                                    "; its result is written, so it counts)" if held else ""))
                else:
                    say(f"FAILED {name} after {took}: exit {code}" + (f"; see {r.output}" if r.output else ""))
                sched.finished(r.unit, ok=code == 0 or held,
                               why=f"{name} exited with {code}" + (f" (output: {r.output})" if r.output else ""))
    except BaseException:          # stop the runs cleanly; signals meanwhile are passed on too
        if not stops:
            stops.append(signal.SIGTERM)
        while any(r.process.poll() is None for r in running):
            _pass_on(running, stops)
            time.sleep(poll_s)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _pass_on(running: list[Running], stops: list[int]) -> None:
    """Send each running unit the stop signals it has not been sent yet."""
    for r in running:
        pending = stops[r.signalled:]
        for signum in pending:
            if r.process.poll() is None:
                r.process.send_signal(STOP_SIGNALS[signal.Signals(signum)])
        r.signalled += len(pending)


def _stopped_by(code: int, sent: list[int]) -> bool:
    """Whether exit `code` is that of a run stopped by one of the signals `sent` to it:
    128 + the signal passed on (the runners' clean or forced stop) or killed by it."""
    passed = {int(STOP_SIGNALS[signal.Signals(s)]) for s in sent}
    return any(code in (128 + s, -s) for s in passed)


def _least_used(slots: list[str], busy: list[str]) -> str:
    """A free slot of the label with the fewest busy slots (spreads runs over the GPUs)."""
    free = list(slots)
    for b in busy:
        free.remove(b)
    return min(free, key=busy.count)


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"

