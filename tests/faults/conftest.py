"""The fault suite's tally: every case it tries is counted, and the totals are printed at the end.

A *fault* is an injected failure (``SPPD_FAULT``: kill, full disk, unwritable file, a NaN, a
rollout server that dies, hangs or answers garbage, a second command on a directory) at a point
of a stage; a *corruption* is one damaged input handed to a tool by the fuzzer. Each case ends
``recovered`` (the same command again finished with the uninterrupted run's outputs, or the tool
went on and accounted for the bad record, e.g. in rejects.jsonl) or as a ``clean error`` (exit
status 2 and one line naming the file, and the line where there is one). Anything else fails its test.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from sppd_megatron import faults


class Tally:
    def __init__(self) -> None:
        self.faults: dict[tuple[str, str], set[str]] = defaultdict(set)  # (stage, point) -> outcomes
        self.fault_outcomes: dict[str, int] = defaultdict(int)  # outcome -> cases
        self.corruptions: dict[str, int] = defaultdict(int)  # outcome -> count
        self.inputs: set[str] = set()

    def fault(self, stage: str, point: str, outcome: str) -> None:
        """One injected fault at ``point`` of ``stage``, and how it ended (after its test's checks)."""
        assert outcome in ("recovered", "clean error"), outcome
        self.faults[(stage, point)].add(outcome)
        self.fault_outcomes[outcome] += 1

    def corruption(self, input_kind: str, outcome: str) -> None:
        """One damaged input of kind ``input_kind`` handed to a tool, and how it ended."""
        assert outcome in ("recovered", "clean error"), outcome
        self.inputs.add(input_kind)
        self.corruptions[outcome] += 1

    def lines(self) -> list[str]:
        stages = sorted({stage for stage, _ in self.faults})
        points = sorted({point for _, point in self.faults})
        tried = sum(self.corruptions.values())
        return [
            f"fault points x stages: {len(self.faults)} ({len(points)} points over {len(stages)} stages), "
            f"{sum(self.fault_outcomes.values())} cases: {self.fault_outcomes['recovered']} recovered, "
            f"{self.fault_outcomes['clean error']} clean errors",
            f"corruptions tried: {tried} over {len(self.inputs)} kinds of input: "
            f"{self.corruptions['recovered']} recovered, {self.corruptions['clean error']} clean errors",
        ]


TALLY = Tally()


@pytest.fixture(scope="session")
def tally() -> Tally:
    return TALLY


@pytest.fixture
def arm(monkeypatch):
    """``arm(spec)`` sets ``SPPD_FAULT`` for this test (``None`` clears it); reset again at teardown."""
    def set_fault(spec: str | None) -> None:
        if spec:
            monkeypatch.setenv(faults.ENV, spec)
        else:
            monkeypatch.delenv(faults.ENV, raising=False)
        faults.reset()

    yield set_fault
    faults.reset()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not TALLY.faults and not TALLY.corruptions:
        return
    terminalreporter.section("fault suite (tests/faults)")
    for line in TALLY.lines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(
        "every case recovered or ended in one clean line (no traceback, hang or silent acceptance)" if exitstatus == 0
        else "some tests failed: the totals count only the cases that passed their checks")
