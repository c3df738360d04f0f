"""``python -m qgate …``: run the installed ``qgate`` binary."""
from __future__ import annotations

import os
import subprocess
import sys

from qgate import find_qgate_bin


def main() -> int:
    exe = find_qgate_bin()
    if sys.platform == "win32":
        return subprocess.run([exe, *sys.argv[1:]]).returncode
    os.execv(exe, [exe, *sys.argv[1:]])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
