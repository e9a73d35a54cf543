"""The installed package: everything lives under ``metatrain.*``, so a user's own ``models``/``tasks``/``pipeline``
packages are never shadowed by ours, and both entry points work from any folder."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    # -I: isolated mode (no cwd or script folder on sys.path, no PYTHON* variables): only what is installed counts.
    return subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_metatrain_imports_from_outside_the_repo_and_claims_no_top_level_names(tmp_path):
    r = _run("import importlib.util, metatrain.pipeline, metatrain.tasks, metatrain.models\n"
             "print(metatrain.pipeline.__file__)\n"
             "print([n for n in ('models', 'tasks', 'pipeline') if importlib.util.find_spec(n)])", tmp_path)
    assert r.returncode == 0, r.stderr
    path, found = r.stdout.splitlines()
    assert Path(path).resolve() == REPO / "pipeline" / "__init__.py"
    assert found == "[]"


def test_a_users_own_models_package_wins_over_nothing_of_ours(tmp_path):
    (tmp_path / "models.py").write_text("WHO = 'the user'\n")
    r = subprocess.run([sys.executable, "-c", "import models, metatrain.models as ours\n"
                        "print(models.WHO, hasattr(ours, 'Conv4'))"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["the", "user", "True"]


def test_every_subpackage_is_installed(tmp_path):
    subpackages = sorted("metatrain." + ".".join(init.parent.relative_to(REPO).parts)
                         for top in ("tasks", "models", "pipeline") for init in (REPO / top).rglob("__init__.py"))
    assert "metatrain.pipeline.distributed" in subpackages and "metatrain.pipeline.jobs" in subpackages
    r = _run("import importlib\n" + "".join(f"importlib.import_module({s!r})\n" for s in subpackages), tmp_path)
    assert r.returncode == 0, r.stderr


def test_python_dash_m_and_the_console_script_from_another_folder(tmp_path):
    r = subprocess.run([sys.executable, "-I", "-m", "metatrain.pipeline", "--help"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "usage: metatrain" in r.stdout, r.stderr
    script = Path(sys.executable).with_name("metatrain")
    r = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "--ray-address" in r.stdout, r.stderr
