"""A small, strict stand-in for ``kubectl kustomize``, for the fields deploy/kubernetes uses.

No kustomize binary can be installed here, so the tests render overlays with this. It
implements: ``resources`` (files and kustomization folders), ``configMapGenerator`` (``files``,
with ``generatorOptions.disableNameSuffixHash: true``), ``patches`` (strategic merge, targeted
by the patch's own kind/name/namespace), ``replicas``, ``images`` (newName/newTag/digest)
and ``labels`` (``includeSelectors: false``). Any other field, or a patch that matches
nothing, is an error, so a manifest using more than this cannot silently render differently.

Strategic merge as Kubernetes defines it for the fields used: maps merge recursively, ``null``
deletes a key, lists of containers/env/volumes/ports/volumeMounts merge by their key
(name, name, name, containerPort, mountPath), other lists are replaced.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "configMapGenerator", "generatorOptions", "patches", "replicas",
             "images", "labels"}
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "ports": "containerPort", "volumeMounts": "mountPath"}
_POD_SPEC_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class KustomizeError(Exception):
    pass


def render(folder: Path) -> list[dict]:
    folder = Path(folder)
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(k) - SUPPORTED
    if unsupported:
        raise KustomizeError(f"{folder}/kustomization.yaml: fields this renderer does not implement: {sorted(unsupported)}")
    docs: list[dict] = []
    for res in k.get("resources", []):
        path = (folder / res).resolve()
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    docs += _generate(folder, k)
    for p in k.get("patches", []):
        if set(p) != {"path"}:
            raise KustomizeError(f"{folder}: only patches[].path is implemented, got {sorted(p)}")
        for patch in yaml.safe_load_all((folder / p["path"]).read_text()):
            target = _find(docs, patch["kind"], patch["metadata"]["name"], patch["metadata"].get("namespace"))
            docs[docs.index(target)] = merge(target, patch)
    for r in k.get("replicas", []):
        matches = [d for d in docs if d["kind"] in _POD_SPEC_KINDS and d["metadata"]["name"] == r["name"]]
        if not matches:
            raise KustomizeError(f"{folder}: replicas: no workload named {r['name']!r}")
        for d in matches:
            d["spec"]["replicas"] = r["count"]
    for img in k.get("images", []):
        _set_image(docs, img, folder)
    for lab in k.get("labels", []):
        if lab.get("includeSelectors", False):
            raise KustomizeError(f"{folder}: labels with includeSelectors: true are not implemented")
        for d in docs:
            d["metadata"].setdefault("labels", {}).update(lab["pairs"])
            if lab.get("includeTemplates") and d["kind"] in _POD_SPEC_KINDS:
                d["spec"]["template"]["metadata"].setdefault("labels", {}).update(lab["pairs"])
    return docs


def _generate(folder: Path, k: dict) -> list[dict]:
    gens = k.get("configMapGenerator", [])
    if gens and not k.get("generatorOptions", {}).get("disableNameSuffixHash"):
        raise KustomizeError(f"{folder}: name suffix hashes (and the reference rewriting they need) are not implemented")
    out = []
    for g in gens:
        if set(g) - {"name", "namespace", "files"}:
            raise KustomizeError(f"{folder}: configMapGenerator fields not implemented: {sorted(set(g) - {'name', 'namespace', 'files'})}")
        data = {}
        for f in g["files"]:
            key, _, rel = f.partition("=") if "=" in f else (Path(f).name, "", f)
            data[key] = (folder / rel).read_text()
        meta = {"name": g["name"], **({"namespace": g["namespace"]} if "namespace" in g else {})}
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return out


def _find(docs: list[dict], kind: str, name: str, namespace: str | None) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name
            and (namespace is None or d["metadata"].get("namespace") == namespace)]
    if len(hits) != 1:
        raise KustomizeError(f"patch target {kind}/{name} matches {len(hits)} resources")
    return hits[0]


def merge(base, patch):
    """Strategic merge of ``patch`` into a copy of ``base``."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out and key in MERGE_KEYS and isinstance(value, list):
                out[key] = _merge_list(out[key], value, MERGE_KEYS[key])
            elif key in out:
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
        return out
    return copy.deepcopy(patch)


def _merge_list(base: list, patch: list, key: str) -> list:
    out = copy.deepcopy(base)
    for item in patch:
        for i, existing in enumerate(out):
            if existing.get(key) == item.get(key):
                out[i] = merge(existing, item)
                break
        else:
            out.append(copy.deepcopy(item))
    return out


def containers(doc: dict) -> list[dict]:
    spec = doc["spec"]["template"]["spec"] if doc["kind"] in _POD_SPEC_KINDS else {}
    return spec.get("initContainers", []) + spec.get("containers", [])


def _set_image(docs: list[dict], img: dict, folder: Path) -> None:
    hit = False
    for d in docs:
        for c in containers(d):
            name, sep, tag = c["image"].rpartition(":")
            if not sep or "/" in tag:
                name, tag = c["image"], ""
            name = name.split("@")[0]
            if name != img["name"]:
                continue
            hit = True
            new_name = img.get("newName", name)
            if "digest" in img:
                c["image"] = f"{new_name}@{img['digest']}"
            else:
                c["image"] = f"{new_name}:{img.get('newTag', tag)}"
    if not hit:
        raise KustomizeError(f"{folder}: images: no container uses {img['name']!r}")
