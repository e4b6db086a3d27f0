"""A Flask app shaped like the GTE-large model service, with a stand-in model.

The real service loads the GTE-large Chinese sentence-embedding model
(``iic/nlp_gte_sentence-embedding_chinese-large``) from ``MODEL_DIR`` when the
module is imported and answers ``POST /predict``. Model weights cannot be
downloaded here, so this example ships a **deterministic stand-in model**
instead. It is *not* a language model; it keeps the service's shape so that
gte-supervisor can be exercised with it end to end:

* it is built once, at import time, like the real model (so ``preload = true``
  loads it once in the master's template process and the workers share it);
* ``embedding``: a fixed-size (1024, like GTE-large) L2-normalised float vector
  made by hashing the character 1-, 2- and 3-grams of the text (signed feature
  hashing with BLAKE2b). The same text always gives the same vector, in every
  process, and texts sharing many n-grams get a high cosine similarity;
* ``ner``: regular expressions for dates/years (``2022年``, ``3月15日``,
  ``2022-02-04``) typed ``TIME``, plus a small gazetteer of place names
  (``北京`` ...) typed ``LOC`` and organisations typed ``ORG``;
* ``similarity``: cosine similarity of ``input_text`` against each string of
  ``sentences``, using the stand-in embeddings.

API
---
``POST /predict`` with a JSON object ``{"task_type": ..., "input_text": ...}``:

* ``{"task_type": "ner", "input_text": "2022年北京冬奥会在北京举行"}`` ->
  ``{"result": {"entities": [{"text": "2022年", "type": "TIME", "start": 0,
  "end": 4}, {"text": "北京", "type": "LOC", "start": 5, "end": 6}, ...]}}``.
  ``start`` is the index of the first character and ``end`` the index of the
  *last* character (inclusive), as in the real service's answers (so the span
  is ``input_text[start:end + 1]``).
* ``{"task_type": "embedding", "input_text": "..."}`` ->
  ``{"result": {"embedding": [1024 floats], "dim": 1024}}``.
* ``{"task_type": "similarity", "input_text": "...", "sentences": ["...", ...]}``
  -> ``{"result": {"scores": [float, ...]}}``.

Bad input (a body that is not a JSON object, a missing or non-string field,
an unknown ``task_type``) is answered ``400`` with ``{"error": "..."}``;
every other HTTP error (404, 405, ...) is JSON too, never an HTML page.

``GET /health`` -> ``{"status": "ok"}``.

Environment:

* ``MODEL_DIR`` — where the real model would be loaded from (default
  ``iic/nlp_gte_sentence-embedding_chinese-large``, relative to the working
  directory). The stand-in only reports whether it exists.
* ``STANDIN_LOAD_SECONDS`` — sleep this long while "loading" (default 0), to
  imitate the real model's slow start, e.g. when trying readiness handling.
"""

import hashlib
import logging
import math
import os
import re
import sys
import time
import unicodedata

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("gte-example")
if not log.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(name)s[%(process)d]: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)

DEFAULT_MODEL_DIR = "iic/nlp_gte_sentence-embedding_chinese-large"
# Longest input_text accepted, in characters (the real model truncates at 512
# tokens; this just keeps a stray multi-megabyte body from pinning a worker).
MAX_INPUT_CHARS = 100_000
# Most entries in "sentences" for the similarity task.
MAX_SENTENCES = 256


class StandInModel:
    """Deterministic stand-in for the GTE-large pipeline. See the module doc."""

    DIM = 1024  # GTE-large's embedding size
    NGRAM_WEIGHTS = {1: 0.5, 2: 1.0, 3: 1.0}

    # Dates and years. Order matters only among matches at the same position:
    # the longest forms come first.
    TIME_PATTERNS = [
        r"\d{4}-\d{1,2}-\d{1,2}",  # 2022-02-04
        r"\d{4}年\d{1,2}月\d{1,2}[日号]",  # 2022年2月4日
        r"\d{4}年\d{1,2}月",  # 2022年2月
        r"\d{4}年",  # 2022年
        r"\d{1,2}月\d{1,2}[日号]",  # 2月4日
    ]
    PLACES = [
        "中国", "美国", "日本", "韩国", "英国", "法国", "德国", "俄罗斯", "意大利",
        "加拿大", "澳大利亚", "新加坡", "北京", "上海", "天津", "重庆", "广州",
        "深圳", "杭州", "南京", "苏州", "成都", "武汉", "西安", "长沙", "郑州",
        "青岛", "厦门", "哈尔滨", "沈阳", "张家口", "延庆", "崇礼", "香港", "澳门",
        "台北", "东京", "纽约", "伦敦", "巴黎", "柏林",
    ]
    ORGANISATIONS = [
        "国际奥委会", "北京大学", "清华大学", "浙江大学", "复旦大学", "阿里巴巴",
        "腾讯", "百度", "华为", "小米", "中国科学院",
    ]

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.model_dir_exists = os.path.isdir(model_dir)
        # The hashing key plays the role of the weights: fixed, so every
        # process (and every run) computes the same vectors.
        self._key = hashlib.blake2b(b"gte-supervisor stand-in model v1").digest()[:32]
        terms = [(name, "ORG") for name in self.ORGANISATIONS]
        terms += [(name, "LOC") for name in self.PLACES]
        # Longest names first, so 北京大学 wins over 北京 at the same position.
        terms.sort(key=lambda term: len(term[0]), reverse=True)
        self._types = {name: kind for name, kind in terms}
        alternatives = ["(?P<TIME>" + "|".join(self.TIME_PATTERNS) + ")"]
        alternatives.append("(?P<NAME>" + "|".join(re.escape(n) for n, _ in terms) + ")")
        self._entity_re = re.compile("|".join(alternatives))

    @classmethod
    def load(cls, model_dir):
        """Build the stand-in, as the real service loads its pipeline at import."""
        started = time.monotonic()
        delay = float(os.environ.get("STANDIN_LOAD_SECONDS", "0") or 0)
        if delay > 0:
            time.sleep(delay)
        model = cls(model_dir)
        log.info(
            "stand-in model ready in %.3fs (MODEL_DIR=%s, %s; no weights are loaded)",
            time.monotonic() - started,
            model_dir,
            "present" if model.model_dir_exists else "absent",
        )
        return model

    # -- embedding -----------------------------------------------------------
    def embed(self, text):
        """A DIM-long, L2-normalised vector from hashed character n-grams."""
        text = " ".join(unicodedata.normalize("NFKC", text).lower().split())
        vec = [0.0] * self.DIM
        for n, weight in self.NGRAM_WEIGHTS.items():
            for i in range(len(text) - n + 1):
                gram = text[i : i + n]
                digest = hashlib.blake2b(
                    gram.encode("utf-8"), digest_size=8, key=self._key
                ).digest()
                index = int.from_bytes(digest[:4], "big") % self.DIM
                sign = 1.0 if digest[4] & 1 else -1.0
                vec[index] += sign * weight
        norm = math.sqrt(sum(v * v for v in vec))
        if norm == 0.0:  # cannot happen for non-empty text; keep it total anyway
            return vec
        return [round(v / norm, 6) for v in vec]

    def similarity(self, text, sentences):
        """Cosine similarity of `text` with each sentence (vectors are unit length)."""
        base = self.embed(text)
        return [
            round(sum(a * b for a, b in zip(base, self.embed(other))), 6)
            for other in sentences
        ]

    # -- ner -----------------------------------------------------------------
    def entities(self, text):
        """Entity spans; `end` is the index of the last character (inclusive)."""
        found = []
        for match in self._entity_re.finditer(text):
            span = match.group(0)
            kind = "TIME" if match.lastgroup == "TIME" else self._types[span]
            found.append(
                {"text": span, "type": kind, "start": match.start(), "end": match.end() - 1}
            )
        return found


MODEL_DIR = os.environ.get("MODEL_DIR", DEFAULT_MODEL_DIR)
# Loaded at import time, like the real model: with `preload = true` this runs
# once in the template process and the workers are forked from it.
MODEL = StandInModel.load(MODEL_DIR)

app = Flask(__name__)
app.config["JSON_AS_ASCII"] = False  # Flask < 2.3
if hasattr(app, "json") and hasattr(app.json, "ensure_ascii"):
    app.json.ensure_ascii = False  # Flask >= 2.3: answer Chinese text as UTF-8


class BadInput(ValueError):
    """A client error in the /predict body; becomes a 400 JSON answer."""


def _text_field(data, name):
    value = data.get(name)
    if value is None:
        raise BadInput(f"missing field: {name}")
    if not isinstance(value, str):
        raise BadInput(f"{name} must be a string")
    if not value.strip():
        raise BadInput(f"{name} must not be empty")
    if len(value) > MAX_INPUT_CHARS:
        raise BadInput(f"{name} is longer than {MAX_INPUT_CHARS} characters")
    return value


def _run_ner(data):
    return {"entities": MODEL.entities(_text_field(data, "input_text"))}


def _run_embedding(data):
    vector = MODEL.embed(_text_field(data, "input_text"))
    return {"embedding": vector, "dim": len(vector)}


def _run_similarity(data):
    text = _text_field(data, "input_text")
    sentences = data.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise BadInput("sentences must be a non-empty list of strings")
    if len(sentences) > MAX_SENTENCES:
        raise BadInput(f"sentences has more than {MAX_SENTENCES} entries")
    if not all(isinstance(s, str) and s.strip() for s in sentences):
        raise BadInput("sentences must be a non-empty list of strings")
    return {"scores": MODEL.similarity(text, sentences)}


TASKS = {"ner": _run_ner, "embedding": _run_embedding, "similarity": _run_similarity}


@app.errorhandler(BadInput)
def bad_input(error):
    return jsonify({"error": str(error)}), 400


@app.errorhandler(HTTPException)
def http_error(error):
    # JSON for 404/405/413/..., never Werkzeug's HTML page.
    response = jsonify({"error": error.description or error.name})
    response.status_code = error.code or 500
    return response


@app.route("/health", methods=["GET"])
def health():
    return jsonify({"status": "ok"})


@app.route("/predict", methods=["POST"])
def predict():
    # force=True: clients often post JSON without a JSON Content-Type.
    data = request.get_json(force=True, silent=True)
    if not isinstance(data, dict):
        raise BadInput("request body must be a JSON object")
    task_type = data.get("task_type")
    if task_type is None:
        raise BadInput("missing field: task_type")
    task = TASKS.get(task_type) if isinstance(task_type, str) else None
    if task is None:
        raise BadInput(
            f"unknown task_type {task_type!r}; expected one of: {', '.join(sorted(TASKS))}"
        )
    return jsonify({"result": task(data)})


if __name__ == "__main__":
    # Development only (no debugger, loopback only): `venv/bin/python3 app.py`.
    app.run(host="127.0.0.1", port=8000, debug=False)
