"""The Colab notebooks in notebooks/: each one runs top to bottom without an error, and each one
is committed without outputs, with its Colab badge and a Colab-only install cell.

Every `notebooks/*.ipynb` is picked up (a new notebook needs no change here). Each runs in a fresh
IPython kernel of this interpreter (nbclient, kernel "python3": jupyter_client starts the
`ipykernel` installed next to this Python), with matplotlib's Agg backend and the CPU platform.

They run as Colab runs them: from a working directory outside the repository, with no path of
the checkout on `PYTHONPATH`, so a notebook sees only what `pip install` put into the
environment (`deepseek_jax`, installed or editable-installed; not experiments/ or tests/).
`test_kernel_sees_only_the_installed_package` checks that this isolation holds. The 8 fake
devices that tests/conftest.py asks for are *not* passed on: a notebook that needs fake devices
sets `XLA_FLAGS` itself, as a reader's would.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import nbclient
import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600   # one cell; the notebooks aim for well under a minute in all on two cores


def _ids(paths):
    return [p.name for p in paths]


def _inside_checkout(path: str) -> bool:
    resolved = pathlib.Path(path or ".").resolve()
    return resolved == ROOT or ROOT in resolved.parents


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    env["MPLBACKEND"] = "Agg"
    env["JAX_PLATFORMS"] = "cpu"
    # Nothing of the checkout on the path: the notebook imports what is installed, as on Colab.
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
             if p and not _inside_checkout(p)]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        env.pop("PYTHONPATH", None)
    return env


@pytest.fixture
def outside_dir(tmp_path):
    """A working directory outside the repository (pytest's tmp_path must not be inside it)."""
    assert not _inside_checkout(str(tmp_path)), f"{tmp_path} is inside the checkout {ROOT}"
    return tmp_path


def test_kernel_sees_only_the_installed_package(outside_dir):
    """In the notebooks' environment and working directory, `deepseek_jax` imports from its
    installed location and the checkout's other top-level folders do not import at all."""
    probe = ("import importlib.util, deepseek_jax\n"
             "print(deepseek_jax.__file__)\n"
             "print([m for m in ('experiments', 'tests') if importlib.util.find_spec(m)])\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=outside_dir, env=_kernel_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (
        "deepseek_jax is not importable outside the checkout: install it into this environment "
        f"(pip install -e \".[notebooks]\"):\n{out.stderr[-2000:]}")
    where, visible = out.stdout.splitlines()[-2:]
    assert visible == "[]", f"the notebooks would see the checkout's {visible} on sys.path"
    assert pathlib.Path(where).resolve().parent.name == "deepseek_jax", where


def test_notebooks_exist():
    assert NOTEBOOKS, "no notebooks found under notebooks/"


def test_python3_kernel_is_this_interpreter():
    """nbclient resolves kernel "python3" through jupyter_client; it must start this Python (the
    one with deepseek_jax's dependencies), not another one found on the machine."""
    from jupyter_client.kernelspec import KernelSpecManager

    argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    # jupyter_client replaces a bare "python" with sys.executable when it starts the kernel.
    assert argv0 in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}") \
        or os.path.realpath(argv0) == os.path.realpath(sys.executable), (
            f"kernel 'python3' starts {argv0!r}, not {sys.executable!r}: remove the stray "
            "kernelspec (jupyter kernelspec list) or install ipykernel into this environment")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} hold outputs or execution counts; strip them "
                       "(e.g. jupyter nbconvert --clear-output --inplace) before committing")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_colab_badge_and_install_cell(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "colab-badge.svg" in first.source
    assert f"/deepseek_jax/blob/main/notebooks/{path.name})" in first.source, (
        f"{path.name}: the Colab badge must open notebooks/{path.name}")
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    installs = [s for s in code if "pip" in s and "install" in s]
    assert len(installs) == 1, f"{path.name}: expected one install cell, found {len(installs)}"
    assert 'if "google.colab" in sys.modules:' in installs[0], (
        f"{path.name}: the install cell must run only in Colab")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_imports_come_from_packages_that_install(path):
    """A plain `pip install` (Colab's, not editable) ships the packages setup.cfg finds; every
    module of the checkout that a notebook imports must be among them."""
    import ast
    import configparser
    import fnmatch

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    include = cfg["options.packages.find"]["include"].split()
    # What setuptools' find_packages gives: folders with an __init__.py, matched by name.
    shipped = {".".join(d.relative_to(ROOT).parts) for d in
               (f.parent for f in ROOT.glob("*/**/__init__.py") if ".venv" not in f.parts)}
    shipped = {m for m in shipped if any(fnmatch.fnmatchcase(m, pat) for pat in include)}
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code"
                     and not c.source.lstrip().startswith(("!", "%")))
    imported = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module)
            imported.update(f"{node.module}.{a.name}" for a in node.names)

    def package_of(name):
        """The checkout's package that holds module `name` (None: not from the checkout)."""
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            path = ROOT.joinpath(*parts[:n])
            if path.is_dir():
                return ".".join(parts[:n])
            if path.with_suffix(".py").is_file():
                return ".".join(parts[:n - 1]) or parts[0]
        return None

    local = {m: package_of(m) for m in imported if package_of(m)}
    missing = sorted(m for m, package in local.items() if package not in shipped)
    assert local and not missing, (
        f"{path.name} imports {missing}, which an installed deepseek_jax does not ship "
        "(move it into the package)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_runs_top_to_bottom(path, outside_dir):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, allow_errors=False,
        resources={"metadata": {"path": str(outside_dir)}})
    start = time.perf_counter()
    try:
        client.execute(env=_kernel_env())
    except CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
