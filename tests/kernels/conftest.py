"""Run Triton kernels on CPU through Triton's interpreter.

Triton chooses interpreted or compiled mode as each function is decorated, including its own
`tl.*` helpers when `triton` is first imported, so TRITON_INTERPRET must be set before anything
imports triton. This covers `pytest tests/kernels`; a run that collects other tests first needs
it in the environment or in tests/conftest.py.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
