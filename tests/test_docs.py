"""The README's zoo table names every registered mixer: a new mixer is not in the zoo until a
user reading the README can find it."""
import re
from pathlib import Path

import memzoo

ROOT = Path(__file__).resolve().parents[1]


def test_readme_zoo_table_lists_every_registered_mixer():
    text = (ROOT / "README.md").read_text()
    zoo = text[text.index("## The zoo"):text.index("## Quickstart")]
    listed = set(re.findall(r'`"([a-z0-9_]+)"`', zoo.split("Memories that are not token mixers")[0]))
    assert listed == set(memzoo.MIXERS), (sorted(set(memzoo.MIXERS) - listed),
                                          sorted(listed - set(memzoo.MIXERS)))
