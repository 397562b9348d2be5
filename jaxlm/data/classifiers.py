"""The recipe's quality classifiers during ``data/prepare``: sample the HQ and pool documents,
train (``data/quality``), keep the model with the dataset (``<out>/classifiers/<name>/``) and
reuse it while its inputs are unchanged.

A trained classifier is staged (``<out>/classifiers/.staging/<name>``) and replaces the kept
one only when the whole prepare run commits, like the shards. Its fingerprint (the classifier
recipe, the inputs of its HQ documents and pool sources, the versions) is part of the
fingerprint of every source that filters with it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxlm.config import to_dict
from jaxlm.data import DataError
from jaxlm.data.inputs import SourceInputs, digest, input_fingerprints, read_documents, resolve_source
from jaxlm.data.recipe import ClassifierRecipe, Recipe
from jaxlm.data.sources import ReadStats

log = logging.getLogger(__name__)

CLASSIFIERS_DIR = "classifiers"
STAGING = ".staging"
TRAINING_FILE = "training.json"  # fingerprint, sample counts and the training report


@dataclasses.dataclass(frozen=True)
class PreparedClassifier:
    """A classifier ready for this prepare run."""

    name: str
    fingerprint: str  # what its scores depend on
    load_path: str  # where the workers load it from in this run
    positive_label: str
    info: dict[str, Any]  # the manifest's record of it
    staged: Path | None = None  # trained in this run: moved to ``final`` at commit
    final: Path | None = None


def prepare_classifiers(
    recipe: Recipe,
    out: Path,
    resolved: dict[str, SourceInputs],
    data_root: Callable[[], Path],
    versions: dict[str, Any],
    progress: bool,
) -> dict[str, PreparedClassifier]:
    """Every classifier the recipe's chains use: loaded (``path``), reused, or trained and staged."""
    prepared = {}
    for name in recipe.classifier_names():
        spec = recipe.classifiers[name]
        if spec.path is not None:
            prepared[name] = _given(name, spec)
        else:
            prepared[name] = _trained(name, spec, recipe, out, resolved, data_root, versions, progress)
    return prepared


def commit(classifiers: dict[str, PreparedClassifier]) -> None:
    for classifier in classifiers.values():
        if classifier.staged is not None:
            if classifier.final.exists():
                shutil.rmtree(classifier.final)
            os.replace(classifier.staged, classifier.final)
    for classifier in classifiers.values():
        if classifier.staged is not None and classifier.staged.parent.is_dir() and not any(classifier.staged.parent.iterdir()):
            classifier.staged.parent.rmdir()


def abort(classifiers: dict[str, PreparedClassifier]) -> None:
    for classifier in classifiers.values():
        if classifier.staged is not None and classifier.staged.exists():
            shutil.rmtree(classifier.staged)


def _given(name: str, spec: ClassifierRecipe) -> PreparedClassifier:
    from jaxlm.data.quality import load_classifier

    path = os.path.expanduser(spec.path)
    try:
        model = load_classifier(path, positive_label=spec.positive_label)
    except DataError as err:
        raise DataError(f"classifiers.{name}.path: {err}") from None
    fingerprint = model.fingerprint()
    info = {"origin": path, "fingerprint": fingerprint, "positive_label": spec.positive_label}
    return PreparedClassifier(name, fingerprint, path, spec.positive_label, info)


def _trained(
    name: str,
    spec: ClassifierRecipe,
    recipe: Recipe,
    out: Path,
    resolved: dict[str, SourceInputs],
    data_root: Callable[[], Path],
    versions: dict[str, Any],
    progress: bool,
) -> PreparedClassifier:
    positive = resolve_source(f"classifiers.{name}.positive", spec.positive, data_root)
    pool = spec.negative_sources or tuple(recipe.sources)
    fingerprint = digest(
        {
            "classifier": to_dict(spec),
            "positive": input_fingerprints(positive, recipe.fingerprint),
            "read": to_dict(spec.positive.read or recipe.read),
            "pool": {
                source: {
                    "reading": to_dict(dataclasses.replace(recipe.sources[source], filters=(), transforms=())),
                    "read": to_dict(recipe.sources[source].read or recipe.read),
                    "inputs": input_fingerprints(resolved[source], recipe.fingerprint),
                }
                for source in pool
            },
            "versions": versions,
        }
    )
    final = out / CLASSIFIERS_DIR / name
    recorded = _read_training(final)
    if recorded is not None and recorded.get("fingerprint") == fingerprint and _loads(final):
        log.info("%s: reusing classifier %s", out, name)
        return PreparedClassifier(name, fingerprint, os.fspath(final), spec.positive_label, recorded, None, final)
    staged = out / CLASSIFIERS_DIR / STAGING / name
    if staged.exists():
        shutil.rmtree(staged)  # left by a killed run
    info = _train(name, spec, recipe, positive, [resolved[s] for s in pool], staged, progress)
    info = {"origin": "trained", "fingerprint": fingerprint, **info}
    (staged / TRAINING_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return PreparedClassifier(name, fingerprint, os.fspath(staged), spec.positive_label, info, staged, final)


def _read_training(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / TRAINING_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _loads(directory: Path) -> bool:
    from jaxlm.data.quality import load_classifier

    try:
        load_classifier(os.fspath(directory))
    except DataError as err:
        log.info("%s: cannot reuse the classifier (%s): training again", directory, err)
        return False
    return True


def _train(
    name: str,
    spec: ClassifierRecipe,
    recipe: Recipe,
    positive: SourceInputs,
    pool: list[SourceInputs],
    staged: Path,
    progress: bool,
) -> dict[str, Any]:
    """Sample, train and save one classifier into ``staged``; returns what the manifest records."""
    from tqdm import tqdm

    from jaxlm.data.quality import length_matched_negatives, train_classifier

    positives = [
        d.text for d in read_documents(positive, spec.positive.read or recipe.read, ReadStats()) if d.text.strip()
    ]
    if len(positives) < 2:
        raise DataError(f"classifiers.{name}.positive: expected at least 2 documents, read {len(positives)}")
    size = spec.negative_documents * (spec.candidate_factor if spec.length_matched else 1)
    rng = np.random.default_rng([spec.settings.seed, 7])
    reservoir: list[tuple[str, str]] = []
    seen = 0
    for inputs in pool:
        documents = read_documents(inputs, inputs.recipe.read or recipe.read, ReadStats())
        for document in tqdm(documents, desc=f"sample {inputs.name} for {name}", unit="doc", disable=not progress, leave=False):
            if seen < size:
                reservoir.append((document.text, inputs.name))
            else:
                slot = int(rng.integers(0, seen + 1))
                if slot < size:
                    reservoir[slot] = (document.text, inputs.name)
            seen += 1
    if len(reservoir) < 2:
        raise DataError(f"classifiers.{name}: the pool sources hold {len(reservoir)} documents, expected at least 2")
    if spec.length_matched:
        lengths = np.asarray([len(text) for text, _ in reservoir])
        chosen = length_matched_negatives(
            lengths, np.asarray([len(t) for t in positives]), min(spec.negative_documents, len(reservoir)), spec.settings.seed
        )
        negatives = [reservoir[i] for i in chosen]
    else:
        negatives = reservoir[: spec.negative_documents]
    log.info("training classifier %s on %d HQ and %d pool documents", name, len(positives), len(negatives))
    model, report = train_classifier(positives, [text for text, _ in negatives], spec.settings)
    staged.mkdir(parents=True)
    model.save(staged)
    shares: dict[str, int] = {}
    for _, source in negatives:
        shares[source] = shares.get(source, 0) + 1
    return {
        "positive_documents": len(positives),
        "negative_documents": len(negatives),
        "negatives_per_source": dict(sorted(shares.items())),
        "pool_documents_seen": seen,
        "length_matched": spec.length_matched,
        "model_sha256": model.fingerprint(),
        "report": report,
    }
