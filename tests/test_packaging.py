"""The built wheel, installed outside the repository, carries every subpackage under the dfjax namespace (kernels/
and convert/ install as dfjax.kernels and dfjax.convert, the mesh presets as dfjax.configs, the demo model's
files) and claims no other top-level name."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import sys
from pathlib import Path
site = Path(sys.argv[1]).resolve()
import dfjax, dfjax.kernels.attention, dfjax.convert.build, dfjax.dummy.plan
for m in (dfjax, dfjax.kernels.attention, dfjax.convert.build):
    assert site in Path(m.__file__).resolve().parents, (m.__name__, m.__file__)
from dfjax.sharding import MeshConfig
assert MeshConfig.load("mesh-8gpu-tensor") == MeshConfig(data=1, tensor=8)
from dfjax.demo import PACKAGED, demo_model_folder
assert site in PACKAGED.resolve().parents and (demo_model_folder() / "config.json").is_file()
print("ok")
"""


def test_installed_wheel_imports_from_outside_the_repository(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True,
                   capture_output=True)
    (wheel,) = wheels.glob("dfjax-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"dfjax", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, tops
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=tmp_path, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
