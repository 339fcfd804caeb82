"""The README's quick start, run exactly as written, on the shipped toy model: learn a word for a held-out concept,
generate with it, evaluate it. The commands are read from the README so the two cannot drift apart. It takes 3.5 to
8 minutes on a 2-core CPU, so it is marked slow (CI runs the slow tests too)."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

README = os.path.join(REPO, "README.md")
SHARED = ("main.py", "configs", "models", "examples", "scripts")


def quick_start_commands() -> list[str]:
    """The commands of the first bash block under "## Quick start", continuation lines joined."""
    with open(README, encoding="utf-8") as handle:
        section = handle.read().split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1).replace("\\\n", " ")
    return [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.slow
def test_readme_quick_start_runs_as_written(tmp_path):
    for name in SHARED:
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    # `python` in the commands is the interpreter running the tests, as in an activated virtual environment
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    commands = quick_start_commands()
    assert len(commands) == 3 and commands[0].startswith("python main.py")
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, check=False,
                                env=env)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"

    (run,) = glob.glob(str(tmp_path / "logs" / "heart*_heart"))
    assert os.path.isfile(os.path.join(run, "checkpoints", "embeddings.pt"))
    assert glob.glob(os.path.join(run, "images", "train", "samples_scaled_gs-*.jpg"))
    assert glob.glob(str(tmp_path / "outputs" / "heart" / "*.png"))
    with open(tmp_path / "outputs" / "heart.json", encoding="utf-8") as handle:
        report = json.load(handle)
    assert report["settings"]["n_samples"] == 8 and report["settings"]["init_word"] == "circle"
    assert set(report["results"]) == {"ours", "init_word", "random"}
    assert os.path.isfile(tmp_path / "outputs" / "heart.png")
