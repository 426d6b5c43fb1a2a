"""nanochat.cpu's fast paths in tests, on whatever CPU runs them: the NANOCHAT_CPU_FASTPATHS switch
both ways (`fastpaths`), and nanochat's kernels loaded (`kernels_here`) with their calls counted
(`kernel_calls`), so a kernel test checks that the kernel ran and not torch's fallback beside it.
A pytest plugin: a test module that takes the fixtures lists it in `pytest_plugins`, and imports it
before pytest could rewrite its asserts: PYTEST_DONT_REWRITE."""

import collections
import copy

import pytest
import torch

from nanochat import cpu
from nanochat.cpu import kernels
from tests.support.stagerun import missing


@pytest.fixture(params=[True, False], ids=["fastpaths", "torch-ops"])
def fastpaths(request, monkeypatch):
    """NANOCHAT_CPU_FASTPATHS set both ways: a test that takes this runs with nanochat.cpu's fast
    paths (True) and as on a CPU without them (False). A test may pick one by indirect parametrization."""
    monkeypatch.setenv(cpu.SWITCH, "1" if request.param else "0")
    return request.param


def panel_weights(model):
    """A copy of an fp32 model (or layer) with the weight of each linear layer that PanelLinear takes
    (bias-free, its outputs in whole panels) rounded to bf16 and kept in fp32: what the model
    multiplies once nanochat.cpu has put those layers in panels, and so the oracle of its outputs."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for m in rounded.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is None and m.out_features % kernels.PANEL == 0:
                m.weight.copy_(m.weight.bfloat16())
    return rounded


def needs_kernels():
    """Where this machine lacks what nanochat's kernels need (AVX2 and FMA, a C compiler): missing(),
    a skip outside CI and a failure under CI=true."""
    if reason := kernels.lacking():
        missing(f"nanochat's CPU kernels cannot run here: {reason}")


def kernels_here():
    """nanochat's kernels, loaded as nanochat.cpu.apply loads them (see needs_kernels for a machine
    without them; on one with them, a failed build fails the test)."""
    needs_kernels()
    library = kernels.build()
    assert library is not None, "the CPU and compiler can build the kernels, yet they did not load (see the log)"
    return library


class Counted:
    """A loaded kernel library that counts the calls into each of its C functions, which still run."""

    def __init__(self, library):
        self.library, self.calls = library, collections.Counter()

    def __getattr__(self, name):
        function = getattr(self.library, name)
        if not callable(function):  # a flag the library carries (`amx`), not a C function
            return function

        def call(*args):
            self.calls[name] += 1
            return function(*args)

        return call


@pytest.fixture
def kernel_calls(monkeypatch):
    """The kernels loaded (kernels_here), and the calls into each during the test, by name."""
    counted = Counted(kernels_here())
    monkeypatch.setattr(kernels, "LIBRARY", counted)
    return counted.calls
