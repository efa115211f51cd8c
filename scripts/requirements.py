"""Prints the requirements in pyproject.toml, one per line: the core set plus the extras named
as arguments (`python3 requirements.py cpu`). The images install these in a layer of their own,
before lorafleet's sources are copied, so a source change does not reinstall the dependencies."""

import sys
import tomllib
from pathlib import Path

pyproject = Path(sys.argv[0]).resolve().parent / "pyproject.toml"
if not pyproject.exists():  # run from the repository: scripts/ is one level down
    pyproject = pyproject.parent.parent / "pyproject.toml"
project = tomllib.loads(pyproject.read_text())["project"]
print("\n".join(project["dependencies"] + [d for extra in sys.argv[1:] for d in project["optional-dependencies"][extra]]))
