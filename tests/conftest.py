"""The summary tables of the opt-in suites (``./run test-gpu``, ``test-real``, ``test-vllm``), printed at
the end of the run: see :mod:`sppd_megatron.testing.suite`."""

from sppd_megatron.testing import suite


def pytest_sessionstart(session):
    suite.session_started()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    suite.print_tables(terminalreporter)


def pytest_runtest_logfinish(nodeid, location):
    suite.write_tables()
