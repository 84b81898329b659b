"""The layout of a data directory (local or ``s3://``), which every part of fedlinear agrees on.

    DIR/client-<i>.csv   one shard per party, numbered 0..N-1 (a SuperNode's ``data-uri``)
    DIR/test.csv         the held-out test set
    DIR/truth.json       synthetic data only: the true weights, and the heterogeneity summary if any
    DIR/split.json       a non-IID ``data split`` only: its heterogeneity summary

A heterogeneity summary (from :mod:`common.partition`) lists each shard file with its SHA-256, so a
run can tell whether the summary describes the shards it trained on.
"""

from __future__ import annotations

import json
import re

from fedlinear.common import storage
from fedlinear.common.errors import FedLinearError

CLIENT_FILE = "client-{i}.csv"
SPLIT_SUMMARY = "split.json"  # written by a non-IID `data split`; truth.json's "heterogeneity" for `data synth`
CLIENT_PATTERN = re.compile(r"client-(\d+)\.csv$")


def write_shards(out: str, shards, test, digests: list[dict] | None = None) -> list[str]:
    """Write ``client-<i>.csv`` and ``test.csv``; ``digests`` (if given) gets each shard's file and SHA-256."""
    import hashlib

    from fedlinear.common.csvio import to_csv_bytes

    written = []
    for i, shard in enumerate(shards):
        uri = storage.join(out, CLIENT_FILE.format(i=i))
        blob = to_csv_bytes(shard.x, shard.y)
        storage.write_bytes(uri, blob)
        written.append(uri)
        if digests is not None:
            digests.append({"file": CLIENT_FILE.format(i=i), "sha256": hashlib.sha256(blob).hexdigest()})
    storage.write_bytes(storage.join(out, "test.csv"), to_csv_bytes(test.x, test.y))
    return written


def write_synthetic(
    out: str,
    clients: int,
    samples_per_client: int,
    features: int,
    noise: float,
    seed: int,
    test_samples: int,
    heterogeneity=None,
    **hard,
) -> list[str]:
    """Synthetic shards, ``test.csv`` and ``truth.json`` in ``out`` (:func:`common.synth.make_synthetic`
    with the hard-data options ``hard`` and a :class:`common.synth.Heterogeneity`); returns the
    lines that say what was written, for the caller to print."""
    from fedlinear.common.synth import make_synthetic

    shards, test, truth = make_synthetic(
        clients, samples_per_client, features, noise, seed, test_samples, **hard, heterogeneity=heterogeneity
    )
    digests = [] if truth.heterogeneity is not None else None
    write_shards(out, shards, test, digests)
    if digests is not None:
        truth.heterogeneity["shards"] = digests
    storage.write_text(storage.join(out, "truth.json"), truth.to_json() + "\n")
    per_client = (
        f"x {samples_per_client} samples"
        if truth.heterogeneity is None or "quantity" not in truth.heterogeneity
        else f"({min(s.num_examples for s in shards)}-{max(s.num_examples for s in shards)} samples each)"
    )
    lines = [f"wrote {clients} shards {per_client}, d={features}, test.csv ({test_samples}) and truth.json to {out}"]
    if truth.options:
        shown = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in truth.options.items())
        lines.append(f"hard data: {shown}; realised correlation condition number {truth.condition_number:.4g}")
    if truth.heterogeneity is not None:
        lines.append(f"heterogeneous parties: {heterogeneity_line(truth.heterogeneity)} (details in truth.json)")
    return lines


def find_shards(data: str) -> list[str]:
    """Client shards in a data directory/prefix, ordered by client index."""
    found = {}
    for uri in storage.list_uris(data if data.endswith("/") or not storage.is_s3(data) else data + "/"):
        match = CLIENT_PATTERN.search(uri.rsplit("/", 1)[-1])
        if match:
            found[int(match.group(1))] = uri
    if not found:
        raise FedLinearError(f"{data}: no client-<i>.csv shards (make some with 'fedlinear data synth')")
    missing = [i for i in range(len(found)) if i not in found]
    if missing:
        raise FedLinearError(f"{data}: shards are not numbered 0..{len(found) - 1}: client-{missing[0]}.csv is missing")
    return [found[i] for i in range(len(found))]


def heterogeneity_line(summary: dict) -> str:
    """One line: how heterogeneous the shards are (from a truth.json / split.json summary)."""
    parts = [f"sizes {min(summary['sizes'])}-{max(summary['sizes'])} (CV {summary['sizes_cv']:.3g})"]
    if "quantity" in summary or summary.get("method") == "quantity":
        parts.append(f"alpha {summary.get('quantity', summary).get('alpha')}")
    if "covariate" in summary:
        c = summary["covariate"]
        parts.append(f"covariate shift {c['shift']:g} (log-scale {c['log_scale']:g}; party means spread {c['spread_of_means']:.3g})")
    if "concept" in summary:
        c = summary["concept"]
        parts.append(f"concept spread {c['spread']:g} (realised {c['realised_spread']:.3g})")
    if "noise" in summary and summary["noise"].get("skew"):
        n = summary["noise"]
        parts.append(f"noise {min(n['levels']):.3g}-{max(n['levels']):.3g} (skew {n['skew']:g})")
    if summary.get("method") == "by-column":
        parts.append(f"{len(summary['sizes'])} values of column {summary['column']}")
    return ", ".join(parts)


def data_heterogeneity(data_dir: str) -> dict | None:
    """The heterogeneity summary of a data directory: ``split.json``, else truth.json's, else None (IID)."""
    split_uri = storage.join(data_dir, SPLIT_SUMMARY)
    if storage.exists(split_uri):
        return {"source": split_uri, **json.loads(storage.read_text(split_uri))}
    truth_uri = storage.join(data_dir, "truth.json")
    if storage.exists(truth_uri):
        summary = json.loads(storage.read_text(truth_uri)).get("heterogeneity")
        if summary is not None:
            return {"source": truth_uri, **summary}
    return None


def attach_heterogeneity(store, data_dir: str) -> dict | None:
    """Copy the data directory's heterogeneity summary into the run's manifest.json ("data-heterogeneity")
    and return it (None: IID data, or no manifest).

    ``shards_match`` says whether the SHA-256 the summary recorded for each shard file equals the
    server's fingerprint of the shard it trained on (None where the manifest has no SHA-256: S3, privacy).
    """
    summary = data_heterogeneity(data_dir)
    if summary is None or not storage.exists(store.uri("manifest.json")):
        return None
    manifest = store.read_manifest()
    recorded = {entry["file"]: entry["sha256"] for entry in summary.get("shards", [])}
    seen = []
    for shard in manifest.get("shards", []):
        for fp in shard.get("fingerprints", []):
            fp = json.loads(fp) if isinstance(fp, str) else fp
            if not isinstance(fp, dict) or "sha256" not in fp:
                continue
            name = str(fp["uri"]).rsplit("/", 1)[-1] if "uri" in fp else CLIENT_FILE.format(i=shard.get("partition-id"))
            seen.append(recorded.get(name) == fp["sha256"])
    summary["shards_match"] = all(seen) if seen else None
    manifest["data-heterogeneity"] = summary
    store.write_manifest(manifest)
    return summary
