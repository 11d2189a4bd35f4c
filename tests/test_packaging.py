"""The wheel a user installs: one ``zeroforge`` namespace (no generic top-level packages), the
recipes and the default DeepSpeed config inside it, and a shipped recipe found from any
directory. Built from this checkout and installed into a fresh environment outside it."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(out), str(REPO)], check=True, capture_output=True,
                   timeout=300)
    (whl,) = out.glob("zeroforge-*.whl")
    return whl


def test_wheel_installs_one_namespace_with_recipes(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"zeroforge"}
    for required in ("zeroforge/configs/gpt2-tiny-cpu.yaml", "zeroforge/configs/ds_config.json",
                     "zeroforge/launch/slurm/train.sbatch.tmpl",
                     "zeroforge/pipeline/training/loop.py", "zeroforge/model/gpt2.py",
                     "zeroforge/data_prep/store.py"):
        assert required in names, required
    # Every package of the source tree made it into the wheel.
    for init in [*REPO.glob("pipeline/**/__init__.py"), *REPO.glob("launch/**/__init__.py")]:
        rel = init.relative_to(REPO).as_posix()
        assert f"zeroforge/{rel}" in names, rel


def test_installed_wheel_prints_a_shipped_recipe_from_another_directory(wheel, tmp_path):
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True
                          ).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                    site, str(wheel)], check=True, capture_output=True, timeout=300)
    # The dependencies (torch, DeepSpeed, ...) come from this test's environment as a plain
    # path entry: its .pth files, the editable install of this checkout among them, do not run.
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = subprocess.run([str(python), "-m", "zeroforge.launch", "train", "--config",
                        "gpt2-tiny-cpu", "--print-config"], cwd=elsewhere, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "preset: gpt2-tiny" in p.stdout and '"train_batch_size": 8' in p.stdout
    where = subprocess.run([str(python), "-c", "import zeroforge.pipeline.config as c; "
                            "print(c.__file__); print(c.find_config_file('t5-tiny-cpu'))"],
                           cwd=elsewhere, capture_output=True, text=True, check=True)
    assert all(line.startswith(site) for line in where.stdout.split()), where.stdout
    assert not (Path(site) / "model").exists() and not (Path(site) / "pipeline").exists()
