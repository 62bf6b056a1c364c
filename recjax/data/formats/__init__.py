"""One streaming reader per public format; each returns a `common.Source`.

Every reader has the signature
    read(input, *, item_text=None, datamaps=None, bad=None) -> Source
where `input` is the interaction file, `item_text` the optional item-metadata file,
`datamaps` the optional P5 id map (s3rec only) and `bad` the bad-line policy.
"""

from recjax.data.formats import amazon, lcrec, recbole, regen, s3rec, steam
from recjax.data.formats.common import (BadLines, FormatError, Interaction, Item, Source,
                                        UserInfo, category_levels, check_interaction, check_item,
                                        check_user, checked)

READERS = {
    "s3rec": s3rec.read,
    "recbole": recbole.read,
    "lcrec": lcrec.read,
    "amazon2014": amazon.read_2014,
    "amazon2018": amazon.read_2018,
    "steam": steam.read,
    "regen": regen.read,
}


def read(format: str, input, **kwargs) -> Source:
  if format not in READERS:
    raise ValueError(f"unknown format {format!r}; choose one of {sorted(READERS)}")
  source = READERS[format](input, **kwargs)
  # One set of value checks (ids, ranges, sizes, types) for every format, so a reader
  # only has to say where each record came from.
  bad = source.bad_lines or BadLines()
  source.interactions = checked(source.interactions, check_interaction, bad)
  source.items = checked(source.items, check_item, bad)
  source.users = checked(source.users, check_user, bad)
  return source
