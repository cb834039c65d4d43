"""training.predict on files and folders: real photos through the real default model, rows in CSV or JSON lines,
bad files as error rows, an interrupted run leaving no half file, and the Kaggle "predict test1/ into a CSV" case."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model.images import decode_image
from model.torch_predictor import TorchPredictor
from tests.support import ROOT
from tests.support.photos import CAT_LABELS
from training import predict, recipes, train


def run_predict(*argv: str) -> list[dict]:
    return predict.main(predict.get_args_parser().parse_args(["--quiet", *argv]))


@pytest.fixture(scope="module")
def photo_folder(photos: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test1/ with real photos, a nested folder, a corrupt JPEG, a truncated one, notes and a hidden folder."""
    root = tmp_path_factory.mktemp("photos") / "test1"
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / ".thumbnails").mkdir()
    shutil.copy(photos["chelsea"], root / "chelsea.png")
    shutil.copy(photos["coffee"], root / "nested" / "coffee.png")
    shutil.copy(photos["china"], root / "nested" / "deeper" / "china.JPG")  # suffixes in any case
    shutil.copy(photos["flower"], root / "flower.jpg")
    (root / "broken.jpg").write_bytes(b"this is not a JPEG")
    (root / "nested" / "truncated.jpg").write_bytes(photos["flower"].read_bytes()[:4000])
    (root / "notes.txt").write_text("not an image: never read")
    shutil.copy(photos["chelsea"], root / ".thumbnails" / "chelsea.png")
    return root


EXPECTED = ["broken.jpg", "chelsea.png", "flower.jpg", "nested/coffee.png", "nested/deeper/china.JPG",
            "nested/truncated.jpg"]  # fmt: skip


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_a_folder_to_csv(default_bundle: Path, photo_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "predictions.csv"
    with pytest.raises(SystemExit) as exit_:  # written in full, then status 1: two files could not be read
        run_predict("--bundle", str(default_bundle), str(photo_folder), "--out", str(out), "--batch-size", "3")
    assert exit_.value.code == 1
    header = out.read_text().splitlines()[0]
    assert header == "path,label,score,label2,score2,label3,score3,error"
    rows = read_csv(out)
    assert [Path(r["path"]).relative_to(photo_folder).as_posix() for r in rows] == EXPECTED
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["chelsea.png"]["label"] in CAT_LABELS
    assert by_name["coffee.png"]["label"] == "espresso" and float(by_name["coffee.png"]["score"]) > 0.5
    for name in ("broken.jpg", "truncated.jpg"):
        assert by_name[name]["error"] and by_name[name]["label"] == by_name[name]["score"] == "", by_name[name]
    for name in ("chelsea.png", "coffee.png", "china.JPG", "flower.jpg"):
        row = by_name[name]
        scores = [float(row[k]) for k in ("score", "score2", "score3")]
        assert row["error"] == "" and scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1, row


def test_rows_are_what_the_predictor_says_of_each_image_alone(default_bundle: Path, photo_folder: Path,
                                                              tmp_path: Path) -> None:  # fmt: skip
    """Batching (photos of different sizes together, errors between them) changes no score."""
    out = tmp_path / "rows.jsonl"
    with pytest.raises(SystemExit):
        run_predict("--bundle", str(default_bundle), str(photo_folder), "--out", str(out), "--top-k", "5")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    predictor = TorchPredictor.from_file(default_bundle, warmup=False)
    good = [r for r in rows if "error" not in r]
    assert len(good) == 4 and len(rows) == 6
    for row in good:
        alone = predictor.predict([decode_image(Path(row["path"]), draft_size=predictor.preprocessing.resize)], 5)[0]
        assert [p["label"] for p in row["predictions"]] == [p["label"] for p in alone]
        assert [p["score"] for p in row["predictions"]] == pytest.approx([p["score"] for p in alone], abs=1e-5)
    errors = {Path(r["path"]).name: r["error"] for r in rows if "error" in r}
    assert set(errors) == {"broken.jpg", "truncated.jpg"} and "not an image" in errors["broken.jpg"]


def test_files_and_folders_together_and_csv_on_stdout(default_bundle: Path, photo_folder: Path, photos) -> None:
    argv = ["--bundle", str(default_bundle), "--top-k", "1", str(photos["coffee"]), str(photo_folder / "nested")]
    command = [sys.executable, "-m", "training.predict", *argv]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # truncated.jpg
    lines = proc.stdout.splitlines()
    assert lines[0] == "path,label,score,error"
    assert [line.split(",")[0] for line in lines[1:]] == [
        str(photos["coffee"]), *(str(photo_folder / "nested" / n) for n in ("coffee.png", "deeper/china.JPG",
                                                                           "truncated.jpg"))]  # fmt: skip
    assert lines[1].split(",")[1] == "espresso" and "1 of 4 files could not be classified" in proc.stderr


def test_a_preprocessing_failure_is_one_error_row(default_bundle: Path, photos) -> None:
    """An image that decodes but cannot be converted (rare: Pillow converts every mode it decodes, so the
    failure is injected) costs its own row, not the batch's."""
    predictor = TorchPredictor.from_file(default_bundle, warmup=False)
    real = predictor.preprocess
    coffee_size = decode_image(photos["coffee"]).size

    def refuse_coffee(images):
        if any(img.size == coffee_size for img in images):
            raise ValueError("conversion from XYZ to RGB not supported")
        return real(images)

    predictor.preprocess = refuse_coffee
    paths = [str(photos[n]) for n in ("chelsea", "coffee", "china")]
    rows = list(predict.predict_paths(predictor, paths, top_k=1, batch_size=3))
    assert [r["path"] for r in rows] == paths
    assert rows[0]["predictions"][0]["label"] in CAT_LABELS and rows[2]["predictions"][0]["label"] == "palace"
    assert "predictions" not in rows[1] and "cannot be converted" in rows[1]["error"]


def test_an_interrupted_run_leaves_the_old_file(default_bundle: Path, photo_folder: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    out = tmp_path / "predictions.csv"
    out.write_text("the previous complete run\n")
    real_infer = TorchPredictor.infer
    calls = []

    def interrupted(self, batch):  # Ctrl-C during the second batch
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_infer(self, batch)

    monkeypatch.setattr(TorchPredictor, "infer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_predict("--bundle", str(default_bundle), str(photo_folder), "--out", str(out), "--batch-size", "2")
    assert out.read_text() == "the previous complete run\n"
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.csv"], "a temporary file was left behind"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "x.txt"], "name it .csv or .jsonl"),
        (["--format", "csv", "--json"], "--format jsonl"),
        (["--top-k", "0"], "--top-k"),
        (["--batch-size", "0"], "--batch-size"),
    ],
    ids=["unknown-suffix", "json-and-format", "top-k", "batch-size"],
)
def test_flags_that_cannot_work_stop_at_once(photo_folder: Path, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        run_predict("--bundle", "no-such.pth", str(photo_folder), *argv)


def test_a_folder_without_images_stops(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no image here")
    with pytest.raises(SystemExit, match="no image files"):
        run_predict("--bundle", "no-such.pth", str(tmp_path))


def test_kaggle_style_unlabelled_test_folder_to_a_csv(two_class_images, tmp_path: Path) -> None:
    """Train on train/cat.N.png + dog.N.png, predict the unlabelled test1/N.png, write a CSV (real images)."""
    train_dir, test_dir = tmp_path / "kaggle" / "train", tmp_path / "kaggle" / "test1"
    train_dir.mkdir(parents=True)
    test_dir.mkdir()
    truth = {}
    for name, label in (("Trouser", "cat"), ("Bag", "dog")):
        files = two_class_images[name]
        for i, f in enumerate(files[:30]):
            shutil.copy(f, train_dir / f"{label}.{i}.png")
        for f in files[30:]:
            number = len(truth) + 1
            shutil.copy(f, test_dir / f"{number}.png")
            truth[str(number)] = label
    run = tmp_path / "run"
    train.main(recipes.parse_args(train.get_args_parser(), [
        "--data", str(train_dir), "--out", str(run), "--epochs", "4", "--batch-size", "8", "--opt", "adamw",
        "--lr", "0.003", "--quiet", "--workers", "0", "--seed", "1", "--test-split", "0"]))  # fmt: skip
    out = tmp_path / "submission" / "predictions.csv"
    rows = run_predict("--bundle", str(run / "best.pth"), str(test_dir), "--out", str(out), "--top-k", "1")
    written = read_csv(out)
    assert [r["path"] for r in written] == [r["path"] for r in rows] == sorted(str(p) for p in test_dir.iterdir())
    assert list(written[0]) == ["path", "label", "score", "error"]
    predicted = {Path(r["path"]).stem: r["label"] for r in written}
    assert set(predicted) == set(truth) and set(predicted.values()) <= {"cat", "dog"}
    correct = sum(predicted[n] == truth[n] for n in truth)
    assert correct >= 0.8 * len(truth), f"{correct}/{len(truth)}: trousers vs bags should be easy"
