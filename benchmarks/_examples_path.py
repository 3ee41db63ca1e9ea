"""Put ``examples/`` on ``sys.path`` so that a benchmark can import the example modules.

The example scripts import their siblings by name (``from models import build_model``), as a
script's own folder is on the path when it runs. Code outside ``examples/`` gets the same view in
one way: benchmarks ``import _examples_path`` first, the tests get it from ``tests/conftest.py``,
and your own code can use ``PYTHONPATH=examples`` (docs/examples.md).
"""

import os
import sys

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)
