"""The script Orthanc loads through "PythonScript".

Orthanc embeds the system Python, so the plugin's dependencies come from the
virtual environment that `make install` builds beside this folder (or from the
path in ORTHANC_KHEOPS_SITE_PACKAGES, for images that install them elsewhere).
"""

import os
import sys
from pathlib import Path

if sys.version_info < (3, 11):  # noqa: UP036 -- Orthanc may embed an older Python than ours
    # Said before the package is imported, which an older Python may not even parse.
    import orthanc

    orthanc.LogError(f"KHEOPS: cannot load: needs Python 3.11 or later; this is {sys.version}")
    raise RuntimeError("orthanc-kheops needs Python 3.11 or later")


def _dependency_paths() -> list[str]:
    explicit = os.environ.get("ORTHANC_KHEOPS_SITE_PACKAGES")
    if explicit:
        return [explicit]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    venv_site = Path(__file__).resolve().parent.parent / ".venv" / "lib" / version / "site-packages"
    return [str(venv_site)] if venv_site.is_dir() else []


for _path in _dependency_paths():
    if _path not in sys.path:
        sys.path.insert(1, _path)

from orthanc_kheops import shell

shell.install()
