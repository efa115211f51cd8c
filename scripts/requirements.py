"""Prints the requirements in ./pyproject.toml, one per line: the core set plus the extras named
as arguments (`python3 requirements.py cpu`), or only the extras after `--only`
(`python3 requirements.py --only edge`: the edge image installs no core set). The images install these in a layer of their own,
before lorafleet's sources are copied, so a source change does not reinstall the dependencies."""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
only = sys.argv[1:2] == ["--only"]
extras = sys.argv[2:] if only else sys.argv[1:]
core = [] if only else project["dependencies"]
print("\n".join(core + [d for extra in extras for d in project["optional-dependencies"][extra]]))
