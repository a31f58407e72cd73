"""`qkv demo` (what `make demo` runs): it trains the translator to ≥ 95% held-out accuracy, writes
the alignment pictures and the model, reuses the model with --load, translates a typed sentence,
refuses unknown words with one line, and is reproducible with --seed."""
import os
import re
import subprocess
import xml.etree.ElementTree as ET

import pytest

QKV = os.environ.get("QKV_BIN", "qkv")


def run(*args, cwd):
    return subprocess.run([QKV, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=500)


def accuracy(stdout):
    match = re.search(r"held-out exact-sentence accuracy: ([0-9.]+)%", stdout)
    assert match, stdout
    return float(match.group(1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    result = run("demo", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder, result.stdout


def test_the_demo_learns_to_translate(trained):
    folder, stdout = trained
    assert accuracy(stdout) >= 95.0
    assert "training [" in stdout and "tokens/s" in stdout and "step 400/400" in stdout
    # The showcase sentence, translated with both reorderings, and its alignment.
    assert "→ le fermier vieux dit que un chien jeune le oiseau rouge aujourd'hui voit" in stdout
    assert "(the grammar's own translation: the same)" in stdout
    demo = folder / "qkv-demo"
    assert sorted(p.name for p in demo.iterdir()) == ["alignment.png", "alignment.svg",
                                                      "translator.safetensors"]
    assert (demo / "alignment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    texts = [t.text for t in ET.parse(demo / "alignment.svg").getroot().iter("{http://www.w3.org/2000/svg}text")]
    assert {"fermier", "vieux", "voit", "farmer", "old", "sees"} <= set(texts)


def test_the_alignment_shows_the_crossings(trained):
    """Rows of the terminal heatmap: 'vieux' looks at 'old' (before 'farmer' looks at 'farmer'
    ... as the order flips), and the subordinate verb 'voit' looks at 'sees' although it comes
    after the object."""
    _, stdout = trained
    table = stdout[stdout.index("cross-attention:"):]
    header = table.splitlines()[1].split()
    rows = {line.split()[0]: line for line in table.splitlines()[2:] if line.strip()}

    def looked_at(word):
        cells = re.findall(r"(\d+)\s*(?=\s|$)", rows[word][len(word):])
        values = [int(c) for c in cells]
        return header[max(range(len(values)), key=values.__getitem__)]

    assert looked_at("fermier").startswith("farm")
    assert looked_at("vieux") == "old"
    assert looked_at("voit") == "sees"
    assert looked_at("rouge") == "red"


def test_load_reuses_the_model_without_training(trained):
    folder, stdout = trained
    result = run("demo", "--load", "qkv-demo/translator.safetensors", "--output-dir", "again",
                 cwd=folder)
    assert result.returncode == 0, result.stderr
    assert "training [" not in result.stdout
    assert accuracy(result.stdout) == accuracy(stdout)


def test_translate_a_typed_sentence(trained):
    folder, _ = trained
    result = run("demo", "--translate", "a tired horse follows the small bird", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert "training [" not in result.stdout  # the saved model
    assert "→ un cheval fatigué suit le oiseau petit" in result.stdout


def test_unknown_words_get_one_clear_line(trained):
    folder, _ = trained
    result = run("demo", "--translate", "the zebra sees a cat", cwd=folder)
    assert result.returncode == 2
    assert result.stderr.startswith("qkv: --translate: expected words of the demo's language, "
                                    "got 'zebra'")
    assert result.stderr.count("\n") == 1


def test_an_output_folder_that_cannot_be_made_is_refused(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    result = run("demo", "--steps", "1", "--output-dir", "file/sub", cwd=tmp_path)
    assert result.returncode == 2
    assert "--output-dir: expected a folder that can be created, got 'file/sub'" in result.stderr


def test_a_bad_model_file_is_refused(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    result = run("demo", "--load", "bad.safetensors", cwd=tmp_path)
    assert result.returncode == 2
    assert "model: expected a tensor 'config'" in result.stderr


def test_the_same_seed_gives_the_same_run(tmp_path):
    outputs = [run("demo", "--steps", "20", "--seed", "3", "--output-dir", f"run{n}", cwd=tmp_path)
               for n in range(2)]
    for result in outputs:
        assert result.returncode == 0, result.stderr

    def without_speed(text):
        return re.sub(r"[0-9.]+k tokens/s|in [0-9.]+ s|run[01]|[0-9]+ words/s|\([0-9.]+×\)",
                      "", text)

    assert without_speed(outputs[0].stdout) == without_speed(outputs[1].stdout)
    # The held-out sentences decoded with KV caches translate as the recomputing decoder does.
    decoded = re.search(r"greedy decoding of those (\d+) sentences \((\d+) words\): .* "
                        r"(\d+) of (\d+) translations identical", outputs[0].stdout)
    assert decoded and decoded[3] == decoded[4] == decoded[1], outputs[0].stdout
    other = run("demo", "--steps", "20", "--seed", "4", "--output-dir", "run2", cwd=tmp_path)
    assert without_speed(other.stdout) != without_speed(outputs[0].stdout)
