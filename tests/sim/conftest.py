"""Seed selection for the simulation, and soak runs kept out of the default test run.

``--sim-seed N`` (or ``SIM_SEED=N``) runs just seed N, to reproduce a failure;
``--sim-seeds N`` (or ``SIM_SEEDS=N``) runs seeds 0..N-1. The command-line
options exist when pytest is pointed at tests/sim; the environment variables
work from anywhere. Tests marked ``soak`` are skipped unless ``-m`` selects them.
"""

from __future__ import annotations

import os

import pytest

CI_SEEDS = 150
SOAK_SEEDS = 1000


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("simulation")
    group.addoption("--sim-seed", type=int, default=None,
                    help="run only this simulation seed (also SIM_SEED)")
    group.addoption("--sim-seeds", type=int, default=None,
                    help="run simulation seeds 0..N-1 (also SIM_SEEDS)")
    group.addoption("--sim-shard", default=None,
                    help="K/N: run only the seeds s with s %% N == K, to split a soak over "
                         "processes (also SIM_SHARD)")


def _setting(config: pytest.Config, option: str, variable: str) -> int | None:
    try:
        value = config.getoption(option)
    except ValueError:
        value = None
    if value is None and os.environ.get(variable):
        value = int(os.environ[variable])
    return value


def shard(config: pytest.Config, seeds: list[int]) -> list[int]:
    """The seeds of this process's shard (``--sim-shard K/N``); all of them without one.

    pytest-twisted's reactor greenlet does not survive pytest-xdist workers,
    so a long soak is split over processes by hand, one shard each.
    """
    try:
        value = config.getoption("sim_shard")
    except ValueError:
        value = None
    value = value or os.environ.get("SIM_SHARD")
    if not value:
        return seeds
    try:
        k, n = (int(part) for part in value.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--sim-shard/SIM_SHARD must be K/N, not {value!r}") from None
    if not 0 <= k < n:
        raise pytest.UsageError(f"--sim-shard {value}: K must be in 0..N-1")
    return [seed for seed in seeds if seed % n == k]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "sim_seed" not in metafunc.fixturenames:
        return
    config = metafunc.config
    seed = _setting(config, "sim_seed", "SIM_SEED")
    if seed is not None:
        seeds = [seed]
    else:
        soak = metafunc.definition.get_closest_marker("soak") is not None
        if soak and not _soak_selected(config):
            # It is skipped anyway: one placeholder, not a thousand skips.
            metafunc.parametrize("sim_seed", [0], ids=["seed0"])
            return
        count = _setting(config, "sim_seeds", "SIM_SEEDS")
        seeds = list(range(count if count is not None else SOAK_SEEDS if soak else CI_SEEDS))
        if soak:
            seeds = shard(config, seeds)
    metafunc.parametrize("sim_seed", seeds, ids=[f"seed{seed}" for seed in seeds])


def _soak_selected(config: pytest.Config) -> bool:
    return "soak" in (config.getoption("markexpr", default="") or "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _soak_selected(config):
        return
    skip = pytest.mark.skip(reason="soak run: select it with -m soak (SIM_SEEDS=N for N seeds)")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(skip)
