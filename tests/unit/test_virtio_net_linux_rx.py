"""The userspace receive path against a model of Linux's mergeable-buffer receive side
(linux_rx_model.py): after every device call, nothing written outside the buffers outstanding
when it began; every frame whole, in order, with num_buffers and used lengths Linux trusts.
Then the same model run by threads (linux_rx_threads.py): driver, device and sender at once."""

import pytest
from linux_rx_model import run
from linux_rx_threads import run_threads

REGIMES = {
    "steady": {},
    "ring-low": dict(oom=0.7, budget=8, p_send=0.6, p_napi=0.1),
    "ring-low-saves": dict(oom=0.7, p_send=0.6, p_napi=0.15, p_quiesce=0.05),
    "kick-always": dict(kick_always=True, p_quiesce=0.05),
}


@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("seed", range(8))
def test_receive_writes_only_buffers_it_holds_linux_model(regime, seed):
    run(seed, **REGIMES[regime])


THREADED = {
    "steady": {},
    "ring-low": dict(oom=0.9, budget=8, slow=0.8),   # the refill short, the driver often busy
}


@pytest.mark.parametrize("regime", sorted(THREADED))
def test_receive_with_driver_device_and_sender_in_threads(regime):
    g = run_threads(7, seconds=2.0, **THREADED[regime])
    assert g.dev.counters.rx_packets > 100 and g.irqs > 10  # (traffic really flowed)
