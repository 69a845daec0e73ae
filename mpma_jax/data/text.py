"""Text cleaning shared by every builder (the prior-work rule: collapse whitespace, strip, drop
texts of fewer than 3 words) and VQA answer normalisation (the VQA evaluation's rules)."""
import re
from typing import Union

MIN_WORDS = 3
_SPACE = re.compile(r"\s+")


class TextError(ValueError):
  """A text that cannot be used; `reason` is the short counter key."""
  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


def to_str(raw: Union[str, bytes, None]) -> str:
  """bytes (must be UTF-8) or str -> str. Raises TextError('non-UTF-8 text')."""
  if raw is None:
    return ""
  if isinstance(raw, bytes):
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise TextError("non-UTF-8 text", repr(raw[:40])) from e
  return str(raw)


def utf8(raw: str) -> str:
  """A field read with errors="surrogateescape" (or a JSON string) -> itself; raises
  TextError('non-UTF-8 text') if it holds bytes that were not UTF-8 (or a lone surrogate)."""
  try:
    raw.encode("utf-8")
  except UnicodeEncodeError as e:
    raise TextError("non-UTF-8 text", repr(raw[:40])) from e
  return raw


def clean(raw: Union[str, bytes, None], min_words: int = MIN_WORDS) -> str:
  """Collapses whitespace and strips; raises TextError for empty or too-short texts."""
  text = _SPACE.sub(" ", to_str(raw)).strip()
  if not text:
    raise TextError("empty text")
  if len(text.split(" ")) < min_words:
    raise TextError("text too short", repr(text))
  return text


# --- VQA answer normalisation (the official VQA evaluation's processing) ---------------------------
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldnt": "couldn't",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "isnt": "isn't",
    "shouldnt": "shouldn't",
    "wasnt": "wasn't",
    "werent": "weren't",
    "wont": "won't",
    "wouldnt": "wouldn't",
    "youre": "you're",
    "theyre": "they're",
    "whats": "what's",
    "thats": "that's",
    "theres": "there's",
    "lets": "let's",
    "im": "i'm",
    "ive": "i've",
    "its": "it's",
    "hes": "he's",
    "shes": "she's",
}
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
    "?", "!"
]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: Union[str, bytes, int, float, None]) -> str:
  """Lower-case, punctuation, number words -> digits, articles dropped, contractions fixed."""
  text = to_str(answer) if isinstance(answer, (str, bytes)) or answer is None else str(answer)
  text = _SPACE.sub(" ", text.replace("\n", " ").replace("\t", " ")).strip().lower()
  for p in _PUNCT:
    if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
      text = text.replace(p, "")
    else:
      text = text.replace(p, " ")
  text = _PERIOD_STRIP.sub("", text)
  words = []
  for word in text.split():
    word = _NUMBERS.get(word, word)
    if word not in _ARTICLES:
      words.append(_CONTRACTIONS.get(word, word))
  return " ".join(words)


def record_str(value) -> str:
  """A string field of a built record (bytes from TFDS) -> str; undecodable bytes replaced (the
  builders admitted only valid UTF-8, so this only guards against hand-made records)."""
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def accepted_answers(raw) -> list[str]:
  """The normalised accepted answers of a record ('#' separates alternatives, VQA-Med-2019)."""
  return [normalize_answer(a) for a in record_str(raw).split("#") if a.strip()]


def answer_vocab(answers) -> list[str]:
  """Sorted distinct normalised answers (the prior protocol's classifier vocabulary)."""
  return sorted({normalize_answer(a) for a in answers})
