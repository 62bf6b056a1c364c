"""One streaming reader per public format; each returns a `common.Source`.

Every reader has the signature
    read(input, *, item_text=None, datamaps=None, bad=None) -> Source
where `input` is the interaction file, `item_text` the optional item-metadata file,
`datamaps` the optional P5 id map (s3rec only) and `bad` the bad-line policy.
"""

from recjax.data.formats import amazon, lcrec, recbole, regen, s3rec, steam
from recjax.data.formats.common import (BadLines, FormatError, Interaction, Item, Source,
                                        UserInfo, category_levels)

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
  return READERS[format](input, **kwargs)
