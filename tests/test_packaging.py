"""The built wheel carries dcss_plugin, dcss_plugin.adapters and dcss_plugin.export, and an installed copy imports."""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_wheel_contains_mapped_packages_and_installed_copy_imports(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), ROOT],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = [f for f in os.listdir(tmp_path / "dist") if f.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / "dist" / wheel).namelist()
    for required in ("dcss_plugin/__init__.py", "dcss_plugin/functional.py", "dcss_plugin/adapters/__init__.py",
                     "dcss_plugin/export/__init__.py"):
        assert required in names, f"{required} missing from {wheel}"
    assert not any(n.startswith(("adapters/", "export/", "tests/")) for n in names)
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "dcss = dcss_plugin.app.cli:main" in zipfile.ZipFile(tmp_path / "dist" / wheel).read(entry[0]).decode()

    site = tmp_path / "site"
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
         str(tmp_path / "dist" / wheel)], capture_output=True, text=True, timeout=600,
    )
    assert inst.returncode == 0, inst.stderr[-2000:]
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "[sys.meta_path.remove(f) for f in list(sys.meta_path) if 'editable' in type(f).__module__.lower()]; "
        "import dcss_plugin, dcss_plugin.adapters, dcss_plugin.export, os; "
        "assert dcss_plugin.__file__.startswith(sys.argv[1]), dcss_plugin.__file__; "
        "assert dcss_plugin.export.__file__.startswith(sys.argv[1]); print('ok', dcss_plugin.__version__)"
    )
    run = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("ok")


def test_import_is_light():
    code = ("import sys, dcss_plugin; heavy = [m for m in ('timm', 'lightly', 'onnxruntime', 'onnx') "
            "if m in sys.modules]; print(heavy)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
