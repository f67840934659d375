"""pytest setup shared by test_boe.py and test_kernel.py.

Without a GPU the Triton kernels run in Triton's CPU interpreter. It reads TRITON_INTERPRET when a
@triton.jit function is decorated, that is when attn_kernel is first imported, so it is set here,
before anything imports it.

Where triton is not installed (macOS, Windows), its interpreter cannot run with the installed NumPy
(Triton 3.6 with NumPy 2.4), or the GPU predates compute capability 8.0, tests marked `needs_triton` skip
and say so; every other test runs.
`run_without_triton` runs code in a fresh Python in which `import triton` fails, so that the no-triton
case is tested on machines that have it too.
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import attn_kernel  # noqa: E402  (after TRITON_INTERPRET is set)


def _why_no_triton():
    """Why the Triton tests cannot run here (a message), or None."""
    if not attn_kernel.HAS_TRITON:
        return "triton is not installed (no triton wheels for macOS or Windows; on Linux: pip install triton)"
    if attn_kernel.INTERPRETER_CONFLICT:
        return attn_kernel.INTERPRETER_CONFLICT
    if HAS_GPU and torch.cuda.get_device_capability() < (8, 0):
        return "the Triton kernels need a GPU of compute capability 8.0 or newer (Ampere on)"
    return None


NO_TRITON_REASON = _why_no_triton()
needs_triton = pytest.mark.skipif(NO_TRITON_REASON is not None, reason=NO_TRITON_REASON or "")

# Setting a module's entry in sys.modules to None makes importing it raise ImportError.
HIDE_TRITON = "import sys; sys.modules['triton'] = None\n"


def run_without_triton(code, *args, timeout=300):
    """Runs the Python source `code` (with sys.argv[1:] = args) in a fresh interpreter, in this folder and with
    this process's environment, in which `import triton` raises ImportError as on a machine without triton.
    Returns the subprocess.CompletedProcess, output captured as text.

        result = run_without_triton("import attn_kernel; assert not attn_kernel.HAS_TRITON")
        assert result.returncode == 0, result.stderr
    """
    return subprocess.run([sys.executable, "-c", HIDE_TRITON + code, *args], cwd=os.path.dirname(__file__),
                          capture_output=True, text=True, timeout=timeout)


# Hypothesis profiles: "ci" is small and repeatable (derandomized, no example database) so a CPU
# run stays within a few minutes; "dev" explores more on a CPU; "gpu" is the long run on a GPU and
# "gpu-quick" a shorter one (.ci/gpu --quick). HYPOTHESIS_PROFILE picks one explicitly; otherwise a GPU
# machine gets "gpu" and anything else "ci".
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=30, derandomize=True, database=None, **_common)
settings.register_profile("dev", max_examples=150, **_common)
settings.register_profile("gpu", max_examples=200, derandomize=True, database=None, **_common)
settings.register_profile("gpu-quick", max_examples=50, derandomize=True, database=None, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if HAS_GPU else "ci"))


# Worst relative error norm ||x - x_64|| / ||x_64|| that the kernel tests saw, per (backend,
# dtype, tensor), against the float64 reference; printed at the end of the run, so that a run of the
# "gpu" profile reports it.
WORST_RELATIVE_ERROR = {}


def pytest_terminal_summary(terminalreporter):
    if WORST_RELATIVE_ERROR:
        terminalreporter.section("worst relative error against float64 (test_kernel.py)")
        for (backend, dtype, tensor), error in sorted(WORST_RELATIVE_ERROR.items()):
            terminalreporter.write_line(f"{backend:<7}{dtype:<9}{tensor:<4}{error:.2e}")
