"""pithlint is silent on the embedded framework and its ladder harness: the three models,
the engine, the wiring in pithtrain/modules/training.py and tests/test_fsdp.py follow every
rule. A finding here is a regression in the framework, or a rule misfiring on real code."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_pithlint_is_silent_on_pithtrain_and_the_harness():
    proc = subprocess.run(
        [sys.executable, "-m", "pithlint", "--format", "json", "pithtrain/", "tests/test_fsdp.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    findings = json.loads(proc.stdout)
    assert findings == [], "\n".join(
        f"{f['path']}:{f['line']}: {f['code']} {f['message']}" for f in findings
    )
    assert proc.returncode == 0, proc.stderr
