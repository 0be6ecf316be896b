"""The example of the Python API (examples/train_my_images.py) runs as a user runs it: it writes a small
image folder, trains its own model on it with 2 local workers, and prints what they learned."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_python_api_example_trains_on_its_image_folder(reaper: object, tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "examples" / "train_my_images.py")]
    images = tmp_path / "images"
    program = (
        f"import sys; sys.path.insert(0, {str(REPO / 'examples')!r}); from pathlib import Path; "
        f"from train_my_images import sample_folder; sample_folder(Path({str(images)!r}))"
    )
    subprocess.run([sys.executable, "-c", program], check=True, cwd=REPO, timeout=60)  # its own sample folder
    proc = reaper.spawn(  # type: ignore[attr-defined]
        [*cmd, str(images), str(tmp_path / "run")],
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=170)
    assert proc.returncode == 0, (out + err).decode()[-3000:]
    line = out.decode().strip().splitlines()[-1]
    assert line.startswith("trained 40 steps on 66 images of 3 classes (blue, green, red)"), line
    assert (tmp_path / "run" / "summary.json").is_file() and (
        tmp_path / "run" / "model.safetensors"
    ).is_file()
