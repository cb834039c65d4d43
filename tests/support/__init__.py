"""What the tests share besides fixtures: import it by name (``from tests.support.bundles import tiny_bundle``).

Fixtures stay in tests/conftest.py; the gunicorn launcher is serving/launcher.py, shared with bench/.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
