"""VQA-Med-2019 (ImageCLEF 2019), categories C1 modality, C2 plane, C3 organ (C4 abnormality is
not used, as in prior work); every answer is scored as open."""
import codecs
import collections
import os

from mpma_jax.data import text as texts
from mpma_jax.data.builders import base

CATEGORIES = {"C1_Modality": "modality", "C2_Plane": "plane", "C3_Organ": "organ"}


class VqaMed2019(base.Builder):
  """VQA-Med-2019 C1-C3 (train / validation / test)."""
  name = "vqa_med_2019"  # TFDS would derive 'vqa_med2019' from the class name
  TASK = "vqa"
  # The release's top-level folder names; change them here if your copy differs.
  TRAIN_DIR = "ImageClef-2019-VQA-Med-Training"
  VAL_DIR = "ImageClef-2019-VQA-Med-Validation"
  TEST_DIR = "VQAMed2019Test"
  LAYOUT = f"""\
  {TRAIN_DIR}/QAPairsByCategory/C1_Modality_train.txt (C2_Plane_, C3_Organ_)  image_id|question|answer
  {TRAIN_DIR}/Train_images/{{image_id}}.jpg
  {VAL_DIR}/QAPairsByCategory/C1_Modality_val.txt (C2_Plane_, C3_Organ_)
  {VAL_DIR}/Val_images/{{image_id}}.jpg
  {TEST_DIR}/VQAMed2019_Test_Questions_w_Ref_Answers.txt   image_id|category|question|answer
  {TEST_DIR}/VQAMed2019_Test_Images/{{image_id}}.jpg         ('#' separates accepted answers)"""

  def _split_paths(self, manual_dir):
    out = {}
    for split, root, suffix, images in (("train", self.TRAIN_DIR, "train", "Train_images"),
                                        ("validation", self.VAL_DIR, "val", "Val_images")):
      files = self.require(manual_dir,
                           *(f"{root}/QAPairsByCategory/{c}_{suffix}.txt" for c in CATEGORIES))
      (image_dir,) = self.require(manual_dir, f"{root}/{images}")
      out[split] = {"files": list(zip(CATEGORIES.values(), files)), "image_dir": image_dir}
    test, image_dir = self.require(manual_dir,
                                   f"{self.TEST_DIR}/VQAMed2019_Test_Questions_w_Ref_Answers.txt",
                                   f"{self.TEST_DIR}/VQAMed2019_Test_Images")
    out["test"] = {"files": [(None, test)], "image_dir": image_dir}
    return out

  def _examples(self, split, files, image_dir):
    cache, seen = {}, collections.Counter()
    for category, path in files:
      with open(path, "rb") as f:
        lines = f.read().removeprefix(codecs.BOM_UTF8).splitlines()  # bytes: split at CR / LF only
      for raw in lines:
        if not raw.strip():
          continue
        try:
          fields = [x.strip() for x in texts.to_str(raw).split("|")]
        except texts.TextError as e:
          self.skip(split, e.reason)
          continue
        if category is None:  # test: image_id|category|question|answer
          if len(fields) != 4:
            self.skip(split, "malformed line")
            continue
          image_id, cat, question, answer = fields
          cat = cat.lower()
          if cat not in CATEGORIES.values():
            self.skip(split, "category not used")
            continue
        else:
          if len(fields) != 3:
            self.skip(split, "malformed line")
            continue
          (image_id, question, answer), cat = fields, category
        image = self.read_image(split, os.path.join(image_dir, f"{image_id}.jpg"), cache)
        question = image and self.clean_text(split, question, min_words=1)
        if not question:
          continue
        if not answer:
          self.skip(split, "empty answer")
          continue
        # Another question of the same image and category gets its own key; the same line again
        # keeps the first key (base.Builder counts it as a duplicate).
        key = f"{split}-{cat}-{image_id}"
        if (key, question, answer) not in seen:
          seen[key] += 1
          seen[key, question, answer] = seen[key]
        if seen[key, question, answer] > 1:
          key = f"{key}-{seen[key, question, answer]}"
        yield key, {
            "id": key, "image_id": image_id, "image": image, "question": question, "answer": answer,
            "answer_type": "open", "category": cat
        }
