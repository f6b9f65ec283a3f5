"""MkDocs hook: the repository's measured results and benchmark notes become pages of the
site, read from where they are committed (`results/`, `bench/README.md`), so the guides link
to them and nothing is copied into `docs/`."""

import os

from mkdocs.structure.files import File, InclusionLevel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (folder or file, suffixes taken from it)
SOURCES = (('results', ('.md', '.png')), ('bench/README.md', ('.md',)))


def _repo_files(source, suffixes):
  path = os.path.join(REPO, source)
  if os.path.isfile(path):
    yield source
    return
  for root, _, names in os.walk(path):
    for name in sorted(names):
      if name.endswith(suffixes):
        yield os.path.relpath(os.path.join(root, name), REPO)


def on_files(files, config):
  """Adds each results page and figure at its repository path, outside the navigation."""
  for source, suffixes in SOURCES:
    for path in _repo_files(source, suffixes):
      files.append(
        File(
          path,
          src_dir=REPO,
          dest_dir=config['site_dir'],
          use_directory_urls=config['use_directory_urls'],
          inclusion=InclusionLevel.NOT_IN_NAV,
        )
      )
  return files
