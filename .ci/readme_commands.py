"""Print the set-up commands of the README's "Try it" section, one per line: its ```bash blocks, as written.

`.ci/run` runs them in a fresh virtual environment; reading them from the README keeps CI and the instructions the
same text. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def try_it_commands(readme: str) -> list[str]:
    section = re.search(r"^## Try it\n(.*?)^## ", readme, flags=re.S | re.M)
    if section is None:
        raise SystemExit("README.md has no '## Try it' section followed by another '## ' section.")
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", section.group(1), flags=re.S | re.M):
        # A line ending in a backslash continues on the next: one command.
        lines = block.replace("\\\n", " ").splitlines()
        commands += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return commands


if __name__ == "__main__":
    print("\n".join(try_it_commands(Path(sys.argv[1]).read_text(encoding="utf-8"))))
