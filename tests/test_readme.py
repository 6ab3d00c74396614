"""Every Python block of README.md runs as written, top to bottom in one session (issue 13, item 11).

The README's snippets share one namespace, in the order a reader meets them: the setup block under "Distillation"
loads the SST-2 teacher and a sample of the data from `../shared`, and later blocks build on it. They run in a
subprocess from a scratch folder beside a link to `shared/`, so the relative paths resolve as they do from a clone.
The only thing not run for real is the network: the Hub calls of `push_to_hub` are recorded instead of sent.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FENCE = re.compile(r"^(?P<indent> *)```python\n(?P<code>.*?)^(?P=indent)```$", re.S | re.M)

# Not part of the README: stands in for the Hub, which CI cannot reach.
HUB_STUB = """
from pathlib import Path
from huggingface_hub import CommitInfo, HfApi, RepoUrl

def _create_repo(self, repo_id, **kwargs):
    return RepoUrl(f"https://huggingface.co/{repo_id}")

def _upload_folder(self, **kwargs):
    files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
    print(f"[hub stub] upload_folder({kwargs['repo_id']!r}): {files}")
    url = f"https://huggingface.co/{kwargs['repo_id']}/commit/0"
    return CommitInfo(commit_url=url, commit_message="", commit_description="", oid="0")

HfApi.create_repo = _create_repo
HfApi.create_branch = lambda self, repo_id, **kwargs: None
HfApi.upload_folder = _upload_folder
"""


def python_blocks(markdown: str) -> list[tuple[int, str]]:
    """(line of the opening fence, code) of every ```python block, indented ones inside lists included."""
    return [
        (markdown[: match.start()].count("\n") + 1, textwrap.dedent(match.group("code")))
        for match in FENCE.finditer(markdown)
    ]


def test_python_blocks_are_found_at_every_indent():
    markdown = "text\n```python\na = 1\n```\n- item\n\n   ```python\n   b = a\n   ```\n```bash\nls\n```\n"
    assert python_blocks(markdown) == [(2, "a = 1\n"), (7, "b = a\n")]


@pytest.mark.skipif(not (SHARED / "models" / "minilm-l6-sst2").is_dir(), reason="needs ../shared (CI has it)")
def test_readme_python_blocks_run_as_written(tmp_path):
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 12, f"only {len(blocks)} Python blocks found in README.md"
    script = [HUB_STUB, "namespace = {'__name__': '__main__'}"]
    for line, code in blocks:
        # Padding with newlines makes tracebacks point at README.md's own line numbers.
        source = "\n" * line + code
        script.append(f"print('--- README.md line {line}', flush=True)")
        script.append(f"exec(compile({source!r}, 'README.md', 'exec'), namespace)")
    (tmp_path / "repo").mkdir()
    (tmp_path / "shared").symlink_to(SHARED)
    (tmp_path / "readme_blocks.py").write_text("\n".join(script))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(tmp_path / "readme_blocks.py")],
        cwd=tmp_path / "repo",
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    for line, _ in blocks:
        assert f"--- README.md line {line}" in result.stdout
