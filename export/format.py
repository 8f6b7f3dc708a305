"""The exported assigner's file format: names, metadata keys, the integrity digest and the HMAC signature.

Torch-free (the standard library; ``onnx`` imported where a function needs it), so that both the exporter
(:mod:`dcss_plugin.export.onnx`, which needs torch) and the runtime
(:mod:`dcss_plugin.export.runtime`, numpy + onnxruntime only) share one definition of the format.

Outputs (:data:`OUTPUT_NAMES`): ``q`` (N, K) float32, ``label`` (N,) int64 (-1 for a row it cannot answer),
``confidence`` (N,) float32 (0 for such a row) and ``in_domain`` (N,) bool. Files written before ``in_domain``
existed have the first three only (:data:`LEGACY_OUTPUT_NAMES`) and lack :data:`IN_DOMAIN_KEYS` in their metadata;
the runtime still reads them.

Example:
    >>> from dcss_plugin.export.format import metadata_digest, OUTPUT_NAMES
    >>> metadata_digest(onnx.load("assigner.onnx")) == meta["digest"]
    True
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any, Union

__all__ = [
    "ASSIGNER_FORMAT",
    "DIGEST_KEY",
    "IN_DOMAIN_KEYS",
    "LEGACY_OUTPUT_NAMES",
    "METADATA_KEYS",
    "MIN_KEY_BYTES",
    "NO_PRESET",
    "OUTPUT_NAMES",
    "SIGNATURE_KEY",
    "SIGNATURE_SCHEME",
    "SigningKeyError",
    "metadata_digest",
    "read_signing_key",
    "sign_model_bytes",
    "signature_entry",
    "signature_of",
]

ASSIGNER_FORMAT = "dcss-plugin/onnx-assigner-v1"
OUTPUT_NAMES = ("q", "label", "confidence", "in_domain")
LEGACY_OUTPUT_NAMES = ("q", "label", "confidence")  # files exported before in_domain existed
DIGEST_KEY = "digest"
SIGNATURE_KEY = "signature"  # optional: present in signed exports only (not one of METADATA_KEYS)
SIGNATURE_SCHEME = "hmac-sha256"
MIN_KEY_BYTES = 16
_SIGNATURE_CONTEXT = b"dcss-plugin/onnx-assigner-signature-v1\0"  # HMAC input prefix: a key used elsewhere too
#                                                                      cannot be made to sign assigners by accident
NO_PRESET = "none"  # the metadata preset of a model trained outside the estimator

#: The metadata entries that describe ``in_domain``; absent from files of the three-output format.
IN_DOMAIN_KEYS = ("in_domain_threshold", "in_domain_threshold_source")

#: The ``metadata_props`` every exported assigner carries (all values are strings; JSON where structured).
METADATA_KEYS = {
    "format": f"always {ASSIGNER_FORMAT!r}",
    "export_kind": "'head' (input u) or 'full' (input x)",
    "input_name": "'u' or 'x'",
    "input_shape": "JSON list: the graph input's shape without the batch axis ([d] or the sample shape)",
    "sample_shape": "JSON list: the shape of one sample x ([] when unknown: a head export of a model whose input "
                    "shape was never given)",
    "n_clusters": "K",
    "latent_dim": "d",
    "outputs": "'q,label,confidence,in_domain' ('q,label,confidence' in files exported before in_domain existed)",
    "normalization": "JSON {kind, formula, offset, scale, offset_shape, scale_shape}: x_norm = (x - offset) / scale; "
                     "kind 'image' (one offset/scale), 'vector' (per feature) or 'identity'",
    "u_definition": "how the graph input u is obtained (head export) or that the graph computes it (full)",
    "fp16": "'true' or 'false'",
    "dcss_version": "dcss_plugin.__version__ at export",
    "preset": f"the DCSSConfig preset ({NO_PRESET!r} for a model trained outside the estimator)",
    "config": "JSON: DCSSConfig.to_dict() (all hyperparameters), or DCSSModel.config() for a model trained outside "
              "the estimator",
    "exporter": "'torchscript' or 'dynamo' (which torch.onnx exporter wrote the graph)",
    "torch_version": "torch.__version__ at export",
    "in_domain_threshold": "the squared u-space distance to the nearest center up to which a finite row is "
                           "in_domain (a float32 value as text; 'inf' when no data was at hand)",
    "in_domain_threshold_source": "where the threshold came from (the data, its row count and the rule), or why "
                                  "there is none",
    DIGEST_KEY: "sha256 over the serialized graph and every other metadata entry (but 'signature'): an integrity "
                "check against accidental corruption, not tamper protection (anyone can recompute it)",
}


# ---------------------------------------------------------------------------------------------------- integrity
def metadata_digest(model_proto: Any) -> str:
    """SHA-256 (hex) over the serialized graph and every metadata entry except the digest and the signature.

    An integrity check against accidental corruption only: it has no secret, so whoever edits the file can
    recompute it. Tamper protection is the HMAC signature (:func:`sign_model_bytes`).

    Example:
        >>> metadata_digest(onnx.load("assigner.onnx")) == dict(...)["digest"]
    """
    h = hashlib.sha256()
    h.update(model_proto.graph.SerializeToString(deterministic=True))
    meta = sorted((p.key, p.value) for p in model_proto.metadata_props if p.key not in (DIGEST_KEY, SIGNATURE_KEY))
    h.update(b"\0")
    h.update(json.dumps(meta, separators=(",", ":")).encode("utf-8"))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- signing
class SigningKeyError(ValueError):
    """A signing or verification key that cannot be used: empty or shorter than :data:`MIN_KEY_BYTES` bytes."""


def read_signing_key(key: Union[str, os.PathLike, bytes]) -> bytes:
    """The secret key: the bytes of the file ``key`` (or ``key`` itself when given as bytes).

    The file's bytes are the key exactly as stored (a trailing newline included), so the signer and the verifier
    must use the same file contents. Make one with e.g. ``head -c 32 /dev/urandom > dcss.key``.

    Raises:
        FileNotFoundError: no such file.
        SigningKeyError: an empty key or one under 16 bytes (too easy to guess).
    """
    if isinstance(key, (bytes, bytearray)):
        data, what = bytes(key), "The signing key"
    else:
        path = os.fspath(key)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Key file not found: {path!r}. Create one with e.g. `head -c 32 /dev/urandom "
                                    "> dcss.key` and keep it secret.")
        with open(path, "rb") as fh:
            data = fh.read()
        what = f"The key file {path!r}"
    if not data:
        raise SigningKeyError(f"{what} is empty; a key needs at least {MIN_KEY_BYTES} bytes (e.g. `head -c 32 "
                              "/dev/urandom > dcss.key`).")
    if len(data) < MIN_KEY_BYTES:
        raise SigningKeyError(f"{what} has {len(data)} bytes, under the {MIN_KEY_BYTES} bytes a key needs to resist "
                              "guessing (e.g. `head -c 32 /dev/urandom > dcss.key`).")
    return data


def signature_of(unsigned: bytes, key: bytes) -> str:
    """The ``signature`` metadata value of the unsigned model bytes: ``"hmac-sha256:" + hex``."""
    mac = hmac.new(key, _SIGNATURE_CONTEXT + unsigned, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_SCHEME}:{mac}"


def signature_entry(value: str) -> bytes:
    """The serialized ``metadata_props`` entry ``signature=value``, as it ends a signed file (field 14 of
    ``ModelProto``: a tag, a length and the ``StringStringEntryProto``)."""
    import onnx

    holder = onnx.ModelProto()
    holder.metadata_props.add(key=SIGNATURE_KEY, value=value)
    return holder.SerializeToString()


def sign_model_bytes(data: bytes, key: bytes) -> bytes:
    """Sign a serialized assigner with HMAC-SHA256: returns ``data + signature_entry(signature_of(data, key))``.

    What is signed: the exact bytes of the unsigned file (behind a fixed context prefix). The signature is
    appended as one more ``metadata_props`` entry after them; protobuf merges a repeated field that appears again
    at the end, so the result is the same model with one more metadata entry, and the signed bytes stay exactly
    the file minus its last ``len(signature_entry(...))`` bytes. Verification
    (:func:`~dcss_plugin.export.runtime.read_assigner` with ``verify_key``) parses the file, takes its single
    ``signature`` entry, checks that the file ends with exactly that entry's bytes, and recomputes the HMAC over
    everything before them. No re-serialization is involved, so nothing depends on protobuf serializing the same
    way on both machines, and any changed, added or removed byte is refused. A sidecar ``.sig`` file would also
    leave the model bytes alone, but it gets lost when the model is copied; this keeps the export one file.
    Tools that re-save the model (``onnx.save``) move the entry and so break the signature, as any edit should.
    The integrity digest does not cover the signature entry, so an unsigned reader still accepts a signed file.

    Raises:
        ValueError: ``data`` already carries a signature.
    """
    import onnx

    proto = onnx.ModelProto.FromString(data)
    if any(p.key == SIGNATURE_KEY for p in proto.metadata_props):
        raise ValueError("This model is signed already; sign the unsigned export.")
    return data + signature_entry(signature_of(data, key))
