"""Every builder over damaged copies of its files as distributed: each damage ends in a build
whose skips are counted or in a one-line error naming the file (exit 2) — never a traceback, and
never a text silently changed (a byte-order mark or CRLF line ends change nothing; a line
separator or a quoted newline inside a text adds no record).

The copies are the small real-layout copies of the builder tests; the damage is applied to the
copy's largest annotation file (the JSON / CSV / text file that lists the records)."""
import json
import os

import pytest

from mpma_jax.cli import data as cli
from tests import test_finetune_real_layouts as real
from tests.data.builders import test_medicat, test_mimic_cxr, test_roco

LAYOUTS = {
    **real.LAYOUTS,
    "rocov2": test_roco._rocov2,  # pylint: disable=protected-access
    "medicat": test_medicat._write,  # pylint: disable=protected-access
    "mimic_cxr": test_mimic_cxr._write,  # pylint: disable=protected-access
}
ANNOTATIONS = (".json", ".jsonl", ".csv", ".txt")
# The file that lists the records, where it is not the largest annotation file (MIMIC-CXR's
# metadata and label tables are looked up by the split file's rows).
RECORDS = {"mimic_cxr": "mimic-cxr-2.0.0-split.csv"}
# Datasets whose record spans several rows (RSNA: one row per box): a repeated row repeats a box,
# not a record.
MULTI_ROW = ("rsna_pneumonia",)
IMAGE_KEYS = ("image_name", "img_name", "image", "figure_file")


def _annotations(root) -> list[str]:
  """The copy's annotation files, largest first (images and reports excluded)."""
  found = []
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      if name.endswith(ANNOTATIONS) and "/files/" not in path:  # MIMIC's reports are not lists
        found.append(path)
  return sorted(found, key=os.path.getsize, reverse=True)


def _edit(path, fn):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(fn(data))


def _json_records(path):
  if not path.endswith(".json"):
    return None
  with open(path, "rb") as f:
    records = json.loads(f.read())
  return records if isinstance(records, list) and records and isinstance(records[0], dict) else None


def _inside_text(data: bytes, fraction: float) -> int:
  """An offset inside a word (between two letters) at or after `fraction` of the file."""
  i = int(len(data) * fraction)
  while i + 1 < len(data) and not (chr(data[i]).isalpha() and chr(data[i + 1]).isalpha()):
    i += 1
  return i + 1


def _separator(data: bytes) -> bytes:  # a Unicode line separator for a space between two words
  i = int(len(data) * 0.5)
  while i + 2 < len(data) and not (chr(data[i]).isalpha() and data[i + 1:i + 2] == b" " and
                                   chr(data[i + 2]).isalpha()):
    i += 1
  return data[:i + 1] + "\u2028".encode() + data[i + 2:] if i + 2 < len(data) else data


def _duplicate(path):
  records = _json_records(path)
  if records is not None:
    with open(path, "w") as f:
      json.dump(records + [records[0]], f)
    return
  # Line formats: the first record line again (after a CSV's header), on a line of its own
  def again(d):
    line = d.splitlines()[1 if path.endswith(".csv") else 0]
    return (d if d.endswith(b"\n") else d + b"\n") + line + b"\n"

  _edit(path, again)


def _json_edit(fn):
  def damage(path):
    records = _json_records(path)
    if records is None:
      return False
    with open(path, "w") as f:
      json.dump(fn(records), f)
    return True

  return damage


def _empty_image_name(records):
  key = next(k for k in IMAGE_KEYS if k in records[0])
  records[0][key] = ""
  return records


def _missing_key(records):
  records[0].pop(next(k for k in IMAGE_KEYS if k in records[0]))
  records[1].pop("qid", None)
  return records


def _empty_first_field(path):  # CSV: the first data row's first field (an image or id) emptied
  if not path.endswith(".csv"):
    return False
  _edit(
      path, lambda d: b"".join((l if i != 1 else b"," + l.split(b",", 1)[1])
                               for i, l in enumerate(d.splitlines(keepends=True))))
  return True


def _quoted_newline(path):  # CSV: a newline inside the first quoted field
  if not path.endswith(".csv"):
    return False
  with open(path, "rb") as f:
    data = f.read()
  start = data.find(b'"')
  space = data.find(b" ", start)
  if start < 0 or space < 0 or data.find(b'"', start + 1) < space:
    return False
  with open(path, "wb") as f:
    f.write(data[:space] + b"\n" + data[space + 1:])
  return True


# damage -> fn(path of the largest annotation file) -> False when it does not apply to that format
DAMAGES = {
    "byte-order mark": lambda p: _edit(p, lambda d: b"\xef\xbb\xbf" + d),
    "CRLF": lambda p: _edit(p, lambda d: d.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")),
    "non-UTF-8 early": lambda p: _edit(
        p, lambda d: d[:_inside_text(d, 0.1)] + b"\xff\xfe" + d[_inside_text(d, 0.1):]),
    "non-UTF-8 late": lambda p: _edit(
        p, lambda d: d[:_inside_text(d, 0.8)] + b"\xe9" + d[_inside_text(d, 0.8):]),
    "line separator": lambda p: _edit(p, _separator),
    "truncated": lambda p: _edit(p, lambda d: d[:int(len(d) * 0.6)]),
    "empty file": lambda p: _edit(p, lambda d: b""),
    "duplicated record": _duplicate,
    "JSON not a list": _json_edit(lambda records: {"data": records}),
    "missing key": _json_edit(_missing_key),
    "empty image name": _json_edit(_empty_image_name),
    "empty first CSV field": _empty_first_field,
    "quoted newline": _quoted_newline,
}


def _build(capsys, name, manual, data_dir):
  code = cli.main(["build", name, "--manual_dir", str(manual), "--data_dir", str(data_dir)])
  out, err = capsys.readouterr()
  errors = [l for l in err.splitlines() if l.startswith("mpma-data build: error:")]
  return code, (json.loads(out) if code == 0 else None), errors, err


@pytest.fixture(scope="module")
def clean_builds(tmp_path_factory):
  """Per dataset: the undamaged copy's build (the reference for written counts)."""
  out = {}
  for name, layout in LAYOUTS.items():
    root = tmp_path_factory.mktemp(name)
    layout(root / "m")
    code = cli.main(
        ["build", name, "--manual_dir",
         str(root / "m"), "--data_dir",
         str(root / "out")])
    assert code == 0, name
    report = next(
        os.path.join(d, "build_report.json") for d, _, files in os.walk(root / "out")
        if "build_report.json" in files)
    with open(report) as f:
      out[name] = json.load(f)["splits"]
  return out


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_damaged_copy_counts_or_refuses_in_one_line(name, damage, tmp_path, capsys, clean_builds):
  LAYOUTS[name](tmp_path / "m")
  target = _annotations(tmp_path / "m")[0]
  if name in RECORDS:
    target = next(p for p in _annotations(tmp_path / "m") if p.endswith(RECORDS[name]))
  if DAMAGES[damage](target) is False:
    pytest.skip(f"{damage} does not apply to {os.path.basename(target)}")
  code, result, errors, err = _build(capsys, name, tmp_path / "m", tmp_path / "out")
  assert "Traceback" not in err
  clean = clean_builds[name]
  if code == 2:
    assert len(errors) == 1, err
    assert str(tmp_path / "m") in errors[0], errors[0]  # names the file (or manual_dir)
    assert damage not in ("byte-order mark", "CRLF"), errors[0]  # these change nothing
    return
  assert code == 0, err
  written = {s: v["written"] for s, v in result["splits"].items()}
  clean_written = {s: v["written"] for s, v in clean.items()}
  if damage in ("byte-order mark", "CRLF"):
    assert result["splits"] == clean
  elif damage == "duplicated record":
    # kept once; the repeat counted (as 'duplicate', or as what made the first one unusable)
    assert written == clean_written
    skipped = lambda splits: sum(sum(v["skipped"].values()) for v in splits.values())
    assert skipped(result["splits"]) == skipped(clean) + (name not in MULTI_ROW)
  else:  # a record may be lost (and counted), none may appear
    assert sum(written.values()) <= sum(clean_written.values())
    lost = sum(clean_written.values()) - sum(written.values())
    skipped = sum(sum(v["skipped"].values()) for v in result["splits"].values())
    clean_skipped = sum(sum(v["skipped"].values()) for v in clean.values())
    if damage in ("line separator", "quoted newline"):
      assert lost == 0 and skipped == clean_skipped, result
    elif damage != "truncated":  # (the records after the cut are not in the file any more)
      assert skipped - clean_skipped >= lost, (result, clean)  # every lost record is counted


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "missing parent is a file"])
def test_data_dir_that_cannot_hold_data_is_one_line(tmp_path, capsys, kind):
  LAYOUTS["melinda"](tmp_path / "m")
  (tmp_path / "blocker").write_text("a file")
  data_dir = tmp_path / "blocker" if kind == "file" else tmp_path / "blocker" / "out"
  code, _, errors, err = _build(capsys, "melinda", tmp_path / "m", data_dir)
  assert code == 2 and len(errors) == 1 and "Traceback" not in err
  assert str(data_dir) in errors[0]
