"""bench.ood and bench.ood_select on a few images of the real data with the shipped models."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bench import ood, ood_select


def test_bench_ood_scores_a_pair_and_caches_its_nlls(tmp_path):
    out, cache = tmp_path / "ood.json", tmp_path / "cache"
    assert ood.main(["--pairs", "binary", "--limit", "16", "--json", str(out), "--cache", str(cache)]) == 0
    r = json.loads(out.read_text())["results"]["binary"]
    assert r["in"]["images"] == r["out"]["images"] == 16
    assert set(r["scores"]) == {"nll", "complexity", "llr"}
    assert all(0 <= m["auroc"] <= 1 for m in r["scores"].values())
    assert len(list(cache.glob("*.npy"))) == 4  # model and background, on each side


def test_semantic_shift_turns_and_flips_and_keeps_the_pixels():
    images = np.arange(4 * 1 * 3 * 3).reshape(4, 1, 3, 3)
    shifted = ood_select.semantic_shift(images)
    assert np.array_equal(shifted[0], np.rot90(images[0], axes=(1, 2)))
    assert np.array_equal(shifted[1], images[1, :, ::-1])
    assert np.array_equal(np.sort(shifted.ravel()), np.sort(images.ravel()))


def test_auroc_standard_error_shrinks_with_more_images_and_vanishes_at_perfect_separation():
    # Against the spread of AUROCs measured on many draws of 200 + 200 scores (binormal, AUROC about 0.8).
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(200), np.ones(200)]
    draws = [roc_auc_score(y, np.r_[rng.normal(0, 1, 200), rng.normal(1.19, 1, 200)]) for _ in range(400)]
    predicted = ood_select.auroc_standard_error(float(np.mean(draws)), 200, 200)
    assert abs(predicted / np.std(draws) - 1) < 0.15
    assert ood_select.auroc_standard_error(0.7, 4000, 4000) < ood_select.auroc_standard_error(0.7, 1000, 1000) / 1.9
    assert ood_select.auroc_standard_error(1.0, 1000, 1000) == 0.0


PAIRS_BINARY_BACKGROUND = ood.PAIRS["binary"]["background"]


def test_ood_select_scores_every_candidate_on_validation_data_only(tmp_path, capsys):
    shipped = "checkpoints/pixelcnn_binarized_mnist_background.pt"
    copy = tmp_path / "copy.pt"
    shutil.copy(shipped, copy)
    out = tmp_path / "select.json"
    assert ood_select.main([shipped, str(copy), "--pair", "binary", "--images", "12", "--json", str(out),
                            "--cache", str(tmp_path / "cache")]) == 0
    r = json.loads(out.read_text())
    assert r["data"] == "binarized-mnist/valid" and r["images"] == {"in": 12, "out": 12}
    assert set(r["candidates"]) == {shipped, str(copy)} and r["chosen"] in r["candidates"]
    # The same weights under two names score the same: only the weights decide.
    assert r["candidates"][shipped]["auroc"] == r["candidates"][str(copy)]["auroc"]
    assert r["candidates"][shipped]["sha256"] == r["candidates"][str(copy)]["sha256"]
    assert 0 < r["candidates"][shipped]["auroc_se"] < 0.5
    assert r["candidates"][shipped]["llr_std_in"] > 0 and -1 <= r["candidates"][shipped]["llr_rank_corr_empty"] <= 1
    assert "<- chosen" in capsys.readouterr().out
    assert r["shipped"]["file"] == shipped == PAIRS_BINARY_BACKGROUND
    assert r["candidates"][shipped]["recipe"]["perturb"] == 0.1 and r["candidates"][shipped]["recipe"]["layers"] == 4
    assert r["shipped"]["sha256"] == r["candidates"][shipped]["sha256"]  # the report marks it "(shipped)"
    assert "audit" not in r
    assert ood_select.main([str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt not found" in capsys.readouterr().err
    assert ood_select.main([shipped, "--pair", "binary", "--images", "6000"]) == 2
    assert "fewer than 2 x 6000" in capsys.readouterr().err


def test_ood_select_audit_measures_every_candidate_on_the_held_out_pair_after_choosing(tmp_path, capsys):
    shipped = "checkpoints/pixelcnn_binarized_mnist_background.pt"
    copy = tmp_path / "copy.pt"
    shutil.copy(shipped, copy)
    other = "checkpoints/pixelcnn_binarized_mnist.pt"  # a model of the same data, trained without noise
    out = tmp_path / "select.json"
    args = [shipped, str(copy), other, "--pair", "binary", "--images", "8", "--json", str(out), "--cache", str(tmp_path / "cache")]
    assert ood_select.main(args) == 0
    unaudited = json.loads(out.read_text())
    assert ood_select.main(args + ["--audit", "--audit-images", "10"]) == 0
    r = json.loads(out.read_text())
    assert r["chosen"] == unaudited["chosen"]  # the audit never changes the choice
    a = r["audit"]
    assert a["data"] == {"in": "binarized-mnist/valid", "out": "fashion-mnist-binary/test"} and a["images"] == 10
    assert set(a["llr_auroc"]) == set(r["candidates"])
    assert a["llr_auroc"][shipped] == a["llr_auroc"][str(copy)] != a["llr_auroc"][other]
    assert -1 <= a["rank_agreement"] <= 1
    assert "audit, after the choice" in capsys.readouterr().out


def test_ood_select_held_out_classes_compares_the_models_classes_with_the_others(tmp_path, capsys):
    from pixelrnn.runtime.datasets import load
    from pixelrnn.training.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint("checkpoints/gated_pixelcnn_fashion_mnist.pt")
    model = tmp_path / "classes01.pt"  # stands in for a model trained on classes 0 and 1 only
    save_checkpoint(model, dict(ckpt, data=dict(ckpt["data"], classes=[0, 1])))
    background = "checkpoints/gated_pixelcnn_fashion_mnist_background.pt"
    out = tmp_path / "select.json"
    cache = tmp_path / "cache"
    args = [background, "--model", str(model), "--criterion", "held-out-classes", "--images", "4", "--cache", str(cache)]
    assert ood_select.main(args + ["--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["criterion"] == "held-out-classes" and r["out"] == "classes other than 0, 1" and r["model"] == str(model)
    assert sorted(p.name.split("-valid-")[1] for p in cache.glob("classes01-*.npy")) == ["classes0-1-first4.npy", "not0-1-first4.npy"]
    valid = load("fashion-mnist", "valid")
    inside, outside, *_ = ood_select.selection_sets("fashion-mnist", 4, "held-out-classes", [0, 1])
    assert np.array_equal(inside, valid.images[np.isin(valid.labels, [0, 1])][:4])
    assert np.array_equal(outside, valid.images[~np.isin(valid.labels, [0, 1])][:4])
    capsys.readouterr()
    assert ood_select.main(args + ["--audit"]) == 2
    assert "train the chosen recipe on all of it" in capsys.readouterr().err
    assert ood_select.main([background, "--criterion", "held-out-classes", "--images", "4"]) == 2  # the pair's model saw every class
    assert "trained on some classes only" in capsys.readouterr().err


def test_bench_ood_refuses_an_unknown_pair_or_checkpoint(capsys):
    with pytest.raises(SystemExit):
        ood.main(["--pairs", "nope"])
    assert "unknown ['nope']" in capsys.readouterr().err
    assert ood.main(["--pairs", "binary", "--background", "binary=missing.pt"]) == 2
    assert "missing.pt not found" in capsys.readouterr().err


MACHINE = {"date": "2026-12-06T00:00:00+00:00", "cpu": "x", "cpu_count": 2, "load_average_1_5_15": [0, 0, 0]}


def recipe(hidden=32, layers=4, kernel=5, mu=0.15, epochs=4.0) -> dict:
    return {"arch": "gated_pixelcnn", "hidden": hidden, "layers": layers, "kernel": kernel, "perturb": mu,
            "weight_decay": 0.0, "epochs": epochs}


def candidate(auroc: float, sha: str, **trained) -> dict:
    return {"auroc": auroc, "auroc_se": 0.01, "llr_std_in": 50.0, "llr_rank_corr_empty": 0.3,
            "valid_nll_nats": 1800.0, "sha256": sha, "recipe": recipe(**trained)}


def selection(candidates: dict, chosen: str, criterion: str = "turned", **fields) -> dict:
    """A bench.ood_select result as the report reads it."""
    return {"benchmark": "ood_select", "machine": MACHINE, "model": "m.pt", "data": "fashion-mnist/valid",
            "criterion": criterion, "out": "turned" if criterion == "turned" else "classes other than 0, 1",
            "images": {"in": 1000, "out": 1000}, "reference": {"nll": {"auroc": 0.58}},
            "candidates": candidates, "chosen": chosen, "shipped": {"file": "bg.pt", "sha256": "s", "recipe": recipe()},
            **fields}


def flat(lines: list[str]) -> str:
    return " ".join(" ".join(lines).split())  # paragraphs are wrapped


def test_measurements_say_why_the_criterions_choice_does_not_ship_when_the_audit_ranks_it_backwards():
    from bench.report.ood import ood_select as section

    d = selection({"small.pt": candidate(0.69, "s", kernel=None), "mid.pt": candidate(0.70, "m"), "big.pt": candidate(0.71, "b")},
                  "big.pt", audit={"data": {"in": "fashion-mnist/test", "out": "mnist/test"}, "images": 10000,
                                   "rank_agreement": -1.0, "llr_auroc": {"small.pt": 0.94, "mid.pt": 0.90, "big.pt": 0.84}})
    text = "\n".join(section(d))
    assert "`small.pt` (shipped) | h32 x 4, mu 0.15, 4.0 epochs |" in text and "`big.pt` (chosen)" in text
    assert "its choice does not ship" in text and "-1.00" in text
    d["audit"]["rank_agreement"] = 1.0
    assert "does not ship" not in "\n".join(section(d))


def test_measurements_say_when_the_background_they_call_shipped_has_since_been_replaced(tmp_path):
    from bench.report.ood import ood_select as section, ood_select_classes
    from pixelrnn.runtime.manifest import file_sha256

    shipped = tmp_path / "bg.pt"
    shipped.write_bytes(b"measured")
    d = selection({"a.pt": candidate(0.7, file_sha256(shipped))}, "a.pt",
                  shipped={"file": str(shipped), "sha256": file_sha256(shipped), "recipe": recipe()})
    assert "`a.pt` (chosen) (shipped) |" in "\n".join(section(d))
    assert "is that recipe trained again" in flat(ood_select_classes(dict(d, criterion="held-out-classes")))
    shipped.write_bytes(b"a later model")
    assert "`a.pt` (chosen) (shipped when measured, since replaced) |" in "\n".join(section(d))
    text = flat(ood_select_classes(dict(d, criterion="held-out-classes")))
    assert "has since been replaced" in text and "is that recipe" not in text


def test_measurements_say_whether_the_shipped_background_is_the_recipe_the_held_out_classes_chose():
    from bench.report.ood import ood_select_classes as section

    d = selection({"a.pt": candidate(0.9, "a", mu=0.05, epochs=1.0), "b.pt": candidate(0.8, "b", mu=0.15, epochs=4.0)},
                  "a.pt", criterion="held-out-classes", model="classes.pt",
                  shipped={"file": "bg.pt", "sha256": "full", "recipe": recipe(mu=0.05, epochs=1.0)})
    text = flat(section(d))
    assert "## Choosing the background recipe on held-out classes" in text and "--model classes.pt" in text
    assert "The chosen recipe is h32 x 4, kernel 5, mu 0.05, 1.0 epochs. The shipped background `bg.pt` is that recipe" in text
    d["shipped"]["recipe"] = recipe(mu=0.15, epochs=4.0)
    assert "`bg.pt` (h32 x 4, kernel 5, mu 0.15, 4.0 epochs) is not that recipe" in flat(section(d))
    d["shipped"]["recipe"] = recipe(mu=0.05, epochs=1.0, kernel=3)  # a smaller context is another recipe
    assert "`bg.pt` (h32 x 4, kernel 3, mu 0.05, 1.0 epochs) is not that recipe" in flat(section(d))


def held_out_split(model: str, scores: dict[str, float], chosen: str) -> dict:
    """A held-out-classes result whose candidates (named by recipe) scored `scores`."""
    sizes = {"small": dict(hidden=16, layers=2), "mid": dict(hidden=32, layers=2), "big": dict(hidden=64, layers=2)}
    return selection({f"{model}/{name}.pt": candidate(a, name, mu=0.0, epochs=1.0, kernel=3, **sizes[name])
                      for name, a in scores.items()}, f"{model}/{chosen}.pt", criterion="held-out-classes", model=model,
                     shipped={"file": "bg.pt", "sha256": "mid", "recipe": recipe(hidden=32, layers=2, kernel=3, mu=0.0, epochs=1.0)})


def test_ood_select_mean_ranks_the_recipes_by_their_mean_over_the_splits(tmp_path, capsys):
    from bench import ood_select_mean
    from bench.report.ood import ood_select_mean as section

    files = {"c04.json": held_out_split("c04", {"small": 0.80, "mid": 0.82, "big": 0.81}, "mid"),
             "c59.json": held_out_split("c59", {"mid": 0.70, "big": 0.75}, "big")}  # small was not trained on c59
    for name, d in files.items():
        (tmp_path / name).write_text(json.dumps(d))
    paths = [str(tmp_path / n) for n in files]
    out = tmp_path / "mean.json"
    assert ood_select_mean.main(paths + ["--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [(x["recipe"]["hidden"], x["auroc"]) for x in r["recipes"]] == [(64, [0.81, 0.75]), (32, [0.82, 0.70])]
    assert r["chosen"]["hidden"] == 64 and r["unmatched_candidates"] == 1
    assert r["recipes"][0]["mean_auroc"] == pytest.approx(0.78) and r["recipes"][0]["mean_auroc_se"] == pytest.approx(0.01 / 2 ** 0.5)
    text = flat(section(r))
    assert "| h64 x 2, kernel 3, mu 0, 1.0 epochs (chosen) | 0.810 | 0.750 | 0.780 ± 0.007 |" in text
    assert "AUROC, held out: classes other than 0, 1 |" in text and "misranks" not in text
    r["recipes"][0]["auroc"][1] = r["recipes"][1]["auroc"][1] = 0.4  # a split where every recipe ranks below chance
    assert "The shipped background `bg.pt` (h32 x 2, kernel 3, mu 0, 1.0 epochs) is not that recipe" in text
    assert "Under `c59` every recipe ranks the classes other than 0, 1 as *more* familiar" in flat(section(r))


def test_ood_select_mean_records_the_background_shipped_now_not_when_the_splits_ran(tmp_path):
    from bench import ood_select_mean
    from pixelrnn.runtime.manifest import file_sha256

    shipped = "checkpoints/gated_pixelcnn_fashion_mnist_background.pt"
    paths = []
    for model in ("c04", "c59"):
        d = held_out_split(model, {"mid": 0.8}, "mid")
        d["shipped"] = {"file": shipped, "sha256": "an older file", "recipe": recipe()}
        paths.append(tmp_path / f"{model}.json")
        paths[-1].write_text(json.dumps(d))
    out = tmp_path / "mean.json"
    assert ood_select_mean.main([str(p) for p in paths] + ["--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["shipped"]["sha256"] == file_sha256(shipped) and r["shipped"]["recipe"] == ood_select.recipe(shipped)


def test_ood_select_mean_refuses_what_is_not_a_set_of_in_distribution_splits(tmp_path, capsys):
    from bench import ood_select_mean

    def write(name, d):
        (tmp_path / name).write_text(json.dumps(d))
        return str(tmp_path / name)

    split = held_out_split("c04", {"mid": 0.8}, "mid")
    a, b = write("a.json", split), write("b.json", held_out_split("c59", {"big": 0.8}, "big"))
    cases = [([a, write("same.json", split)], "measure the same split"),
             ([a, write("audit.json", dict(split, model="x", audit={}))], "holds an audit"),
             ([a, write("turned.json", dict(split, model="x", criterion="turned"))], "not held-out-classes"),
             ([a, write("other.json", {"benchmark": "ood"})], "is not a bench.ood_select result"),
             ([a, str(tmp_path / "missing.json")], "missing.json not found"),
             ([a, b], "no recipe was measured in every split")]
    for args, message in cases:
        assert ood_select_mean.main(args) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ood_select_mean.main([a])
    assert "at least two" in capsys.readouterr().err
