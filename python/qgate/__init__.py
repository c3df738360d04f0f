"""qgate, as installed by ``pip install qgate``: the ``qgate`` command-line binary (in the environment's
scripts folder) and the Mac-side capture tool ``qgate-capture`` (``qgate.coreai_capture``)."""
from __future__ import annotations

import os
import sys
import sysconfig


def find_qgate_bin() -> str:
    """Path of the ``qgate`` binary this package installed."""
    exe = "qgate" + (sysconfig.get_config_var("EXE") or "")
    candidates = [sysconfig.get_path("scripts")]
    user_scheme = {"nt": "nt_user", "posix": "posix_user"}.get(os.name)
    if sys.platform == "darwin" and sys._framework:  # type: ignore[attr-defined]
        user_scheme = "osx_framework_user"
    if user_scheme:
        try:
            candidates.append(sysconfig.get_path("scripts", scheme=user_scheme))
        except KeyError:
            pass
    # pip install --target DIR: the scripts sit in DIR/bin beside DIR/qgate
    candidates.append(os.path.join(os.path.dirname(os.path.dirname(__file__)), "bin"))
    for d in candidates:
        p = os.path.join(d, exe)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"the qgate binary is not in {', '.join(candidates)}")
