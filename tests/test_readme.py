"""The README's Python examples run as written."""

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def test_readme_python_examples_run():
  blocks = re.findall(r'```python\n(.*?)```', open(README, encoding='utf-8').read(), re.S)
  assert len(blocks) >= 3
  for block in blocks:
    namespace = {}
    exec(compile(block, README, 'exec'), namespace)  # pylint: disable=exec-used
