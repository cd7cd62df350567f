"""The README's example runs as written and its first lines hold the two commands of a new user."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_examples_run():
    """The blocks run in order in one namespace, as a reader would paste them."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)


def test_readme_starts_with_setup_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    lines = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert lines[0].startswith("./install.sh && ")
    ci = (README.parent / ".ci" / "run").read_text()
    assert "./install.sh" in ci and lines[1] in ci


@pytest.mark.slow
def test_readme_prune_your_own_model_runs():
    """The "Prune your own model" section (linen and NNX examples) runs on its own."""
    text = README.read_text()
    section = text[text.index("## Prune your own model") :]
    section = section[: section.index("\n## ", 5)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2 and "nnx" in blocks[1]
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
