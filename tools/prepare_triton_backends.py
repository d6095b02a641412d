"""Lay out a Triton backend directory for the tritonserver inside the nvidia-pytriton wheel.

The wheel ships `libtriton_python.so` and one Python-backend stub per Python version; Triton
expects the stub for the running Python next to the library. We copy both into a cache folder
(never modifying the installed wheel) and point `--backend-directory` there.
Usage: python tools/prepare_triton_backends.py DEST_BACKENDS_DIR
"""

import os
import shutil
import sys

import pytriton


def prepare(dest: str) -> str:
    server = os.path.join(os.path.dirname(pytriton.__file__), "tritonserver")
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = os.path.join(server, "python_backend_stubs", py, "triton_python_backend_stub")
    if not os.path.exists(stub):
        raise SystemExit(f"nvidia-pytriton has no Python-backend stub for Python {py}: {stub}")
    target = os.path.join(dest, "python")
    tmp = target + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(os.path.join(server, "backends", "python"), tmp)
    shutil.copy2(stub, os.path.join(tmp, "triton_python_backend_stub"))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


if __name__ == "__main__":
    print(prepare(sys.argv[1]))
