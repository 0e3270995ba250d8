import json
import subprocess
import sys

import numpy as np


def test_figures_command_writes_pngs_and_json(tmp_path):
    out = tmp_path / "figs"
    proc = subprocess.run([sys.executable, "-m", "coupled_diffusion.cli", "figures", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for i in range(1, 6):
        png = out / f"figure{i}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        d = json.loads((out / f"figure{i}.json").read_text())
        assert "g" in d and "params" in d
    f1 = json.loads((out / "figure1.json").read_text())
    common = np.array(f1["common_mode"], float)
    assert abs(f1["g"][int(np.nanargmax(common))] - 0.44) < 0.03
    assert "figure5" in proc.stderr  # progress display
