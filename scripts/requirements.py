"""Prints the requirements in ./pyproject.toml, one per line: the core set plus the extras named
as arguments (`python3 requirements.py cpu`). The images install these in a layer of their own,
before lorafleet's sources are copied, so a source change does not reinstall the dependencies."""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
print("\n".join(project["dependencies"] + [d for extra in sys.argv[1:] for d in project["optional-dependencies"][extra]]))
