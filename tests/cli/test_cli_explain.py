"""`qkv explain`: every step printed with its labels, the same numbers as the float64 walkthrough
(checked against the fast path in its last line), one run per score, the demo's trained model,
the self-contained HTML page, and one-line errors that leave no file behind."""
import html.parser
import os
import re
import subprocess

import pytest

QKV = os.environ.get("QKV_BIN", "qkv")
SCORES = ["dot", "scaled_dot", "bilinear", "additive", "cosine"]


def run(*args, cwd=None):
    return subprocess.run([QKV, "explain", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def checked_difference(stdout):
    match = re.search(r"checked: qkv's fast path \(attention_forward in float32, \w+\) gives the "
                      r"same output within ([0-9.e+-]+)", stdout)
    assert match, stdout
    return float(match.group(1))


def matrix_rows(stdout, title):
    """The labelled rows of the matrix printed under the line `title` (label, numbers)."""
    lines = stdout[stdout.index(title + "\n"):].splitlines()[2:]
    rows = []
    for line in lines:
        parts = line.split()
        if not parts or not re.fullmatch(r"-?[0-9.]+|-inf", parts[-1]):
            break
        rows.append((parts[0], [float(x) for x in parts[1:]]))
    return rows


@pytest.mark.parametrize("score", SCORES)
def test_every_step_for_every_score(score):
    result = run("--score", score, "--heads", "2", "--causal")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for label in ["The input rows X [6, 8]", "Step 1 — project", "Q (head 1) [6, 4]",
                  "K (head 2) [6, 4]", "V (head 1) [6, 4]", "Step 2 — score",
                  "scores (head 1)", "masked (head 2)", "Step 3 — softmax", "weights (head 1)",
                  "Step 4 — average V", "output (head 2) [6, 4]", "O[mat] (head 1), term by term:",
                  "in_proj_weight [24, 8]"]:
        assert label in out, label
    assert f"s_ij = {dict(dot='q·k', scaled_dot='q·k / √Dq', bilinear='qᵀ W k', additive='vᵀ tanh(Wq q + Wk k)', cosine='τ[h]·(q·k)/(|q||k|)')[score]}" in out
    assert out.count("row sums: 1.000 1.000 1.000 1.000 1.000 1.000") == 2
    assert checked_difference(out) < 1e-5
    # The masked scores: −inf above the diagonal, the scores on and below it.
    scores, masked = matrix_rows(out, "scores (head 1)"), matrix_rows(out, "masked (head 1): the causal mask hides key j from query i when j > i")
    for i, ((word, row), (_, masked_row)) in enumerate(zip(scores, masked)):
        assert masked_row[:i + 1] == row[:i + 1] and all(x == float("-inf") for x in masked_row[i + 1:])


def test_the_numbers_are_the_python_walkthroughs():
    """The printed Q, scores and output are qkv.explain's, rounded (when the module is here)."""
    path = os.environ.get("QKV_PYTHONPATH")
    if not path:
        pytest.skip("needs the Python module (QKV_PYTHONPATH)")
    import sys
    sys.path.insert(0, path)
    import numpy as np
    import qkv
    e = qkv.explain("a b c a", score="bilinear", dim=6, heads=1, seed=9)
    out = run("--sentence", "a b c a", "--score", "bilinear", "--dim", 6, "--seed", 9).stdout
    q = np.array([row for _, row in matrix_rows(out, "Q (head 1) [4, 6]")])
    np.testing.assert_allclose(q, e.q[:, 0], atol=5e-4)
    s = np.array([row for _, row in matrix_rows(out, "scores (head 1)")])
    np.testing.assert_allclose(s, e.scores[0], atol=5e-3)
    o = np.array([row for _, row in matrix_rows(out, "output (head 1) [4, 6]")])
    np.testing.assert_allclose(o, e.output[:, 0], atol=5e-4)


def test_the_sum_written_out_for_the_chosen_query():
    out = run("--query", "cat").stdout
    block = out[out.index("O[cat] (head 1), term by term:"):].splitlines()[1:8]
    terms = [re.match(r"\s+[+ ] ([0-9.]+) × V\[(\w+)\]\s+\[(.*)\]", line) for line in block[:6]]
    assert all(terms) and [t.group(2) for t in terms] == ["the", "cat", "sat", "on", "the", "mat"]
    weights = [float(t.group(1)) for t in terms]
    assert abs(sum(weights) - 1) < 4e-3
    vectors = [[float(x) for x in t.group(3).split()] for t in terms]
    total = [float(x) for x in re.search(r"=\s+\[(.*)\]", block[6]).group(1).split()]
    for d, value in enumerate(total):
        assert abs(sum(w * v[d] for w, v in zip(weights, vectors)) - value) < 5e-3


class Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.captions, self.headers, self.tags = [], [], [], set()
        self._in = None

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        for name in ("src", "href"):
            assert name not in attrs, (tag, attrs)  # nothing fetched: self-contained
        self._in = tag

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "figcaption":
            self.captions.append(data)
        elif self._in == "th":
            self.headers.append(data)


def test_the_html_page_has_every_step(tmp_path):
    page = tmp_path / "steps.html"
    result = run("--sentence", "the <b>cat</b> & dog", "--causal", "--heads", "2",
                 "--html", page)
    assert result.returncode == 0, result.stderr
    assert f"wrote {page}" in result.stdout
    text = page.read_text()
    parser = Page()
    parser.feed(text)
    parser.close()
    assert parser.sections == ["input", "step1", "step2", "step3", "step4"]
    assert "script" not in parser.tags and "table" in parser.tags
    captions = " ".join(parser.captions)
    for label in ["X [4, 8]", "Q (head 1)", "K (head 2)", "V (head 1)", "Scores (head 1)",
                  "Masked scores (head 2)", "Weights (head 1)", "Output (head 2)"]:
        assert label in captions, label
    assert {"the", "<b>cat</b>", "&", "dog"} <= set(parser.headers)  # escaped, then read back
    assert "<b>cat</b>" not in text  # escaped in the file
    assert "Checked: qkv's fast path" in text


def test_the_demo_model_explains_its_encoder(tmp_path):
    trained = subprocess.run([QKV, "demo", "--steps", "20"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    model = "qkv-demo/translator.safetensors"
    result = run("--model", model, "--sentence", "the old farmer sees a dog", "--query", "farmer",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "its encoder's self-attention" in out and "2 heads of 32 features" in out
    assert "in_proj_weight [192, 64]" in out and "(the first 8 of 64 columns)" in out
    assert "O[farmer] (head 2), term by term:" in out
    assert checked_difference(out) < 1e-5
    bad = run("--model", model, "--sentence", "the farmer sees a unicorn", "--html", "x.html",
              cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("qkv: --sentence: expected words of the demo's language, got "
                                 "'unicorn'") and bad.stderr.count("\n") == 1
    assert not (tmp_path / "x.html").exists()
    assert run("--model", model, "--dim", 4, cwd=tmp_path).returncode == 2


@pytest.mark.parametrize("args,message", [
    (["--query", "dog"], "qkv: --query: expected a word of the sentence, got 'dog'"),
    (["--sentence", "  "], "qkv: --sentence: expected 1 to 32 words, got 0"),
    (["--heads", "3"], "qkv: --heads: expected a divisor of --dim 8, got 3"),
    (["--dim", "0"], "qkv: --dim: expected 1 to 64, got 0"),
    (["--score", "euclid"], "qkv: score: expected one of dot, scaled_dot, bilinear, additive, cosine, got 'euclid'"),
    (["--html", "steps.txt"], "qkv: --html: expected a file name ending in .html, got 'steps.txt'"),
    (["--query", "\x1b[31mred"], "qkv: --query: expected a word of the sentence, got '\\x1b[31mred'"),
])
def test_bad_words_and_options_get_one_line(tmp_path, args, message):
    result = run(*args, "--html", tmp_path / "out.html") if "--html" not in args else run(*args)
    assert result.returncode == 2
    assert result.stderr == message + "\n"
    assert not (tmp_path / "out.html").exists()
