"""The runtime package never imports the emulators: a production install runs without `nextcrm_sandbox`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import nextcrm_pipelines

RUNTIME = Path(nextcrm_pipelines.__file__).parent


def _imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_no_runtime_module_imports_the_sandbox():
    offenders = sorted(
        f"{path.relative_to(RUNTIME.parent)} imports {name}"
        for path in RUNTIME.rglob("*.py")
        for name in _imported_modules(path)
        if name == "nextcrm_sandbox" or name.startswith("nextcrm_sandbox.")
    )
    assert offenders == []


def test_loading_the_code_location_cli_and_receiver_loads_no_sandbox_module():
    probe = (
        "import sys, nextcrm_pipelines.definitions, nextcrm_pipelines.cli, nextcrm_pipelines.webhooks.app, "
        "nextcrm_pipelines.providers\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'nextcrm_sandbox'))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"
