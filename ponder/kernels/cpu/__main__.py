"""`python -m ponder.kernels.cpu`: build the CPU kernels now, before anything needs them (`make test`
and `make run` do: a first build takes most of a minute of CPU, which a worker would otherwise spend
before it takes jobs, and a test's clock). A no-op once built. Without a compiler it says so and
succeeds: the torch reference serves."""

from ponder.kernels import cpu

module = cpu.load()
if module is None:
    print("CPU kernels unavailable: the torch reference serves")
else:
    print(f"CPU kernels: {module.__file__}")
