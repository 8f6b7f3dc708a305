"""The ``dcss`` command: ``fit``, ``report``, ``export``, ``assign``, ``serve``.

    dcss fit --dataset digits --clusters 10 --seed 0 --out runs/digits
    dcss fit --data X.npy [--labels y.npy] --clusters K --seed S --out DIR      # also .csv, .pt
    dcss report DIR
    dcss export DIR [--full] [--fp16] --out DIR/assigner.onnx
    dcss assign DIR/assigner.onnx --data X.npy --out labels.npy [--provider auto|cpu|cuda]
    dcss export DIR --full --triton REPO [--name NAME]       # REPO/NAME/config.pbtxt + REPO/NAME/1/model.onnx
    dcss serve DIR/assigner.onnx [--host 127.0.0.1] [--port 8000]   # GET /health, /metadata; POST /v1/assign

``dcss fit``'s flags for the DCSS settings (``--m``, ``--T2-min-steps``, ...) are made from the declarations in
:data:`dcss_plugin.config.OPTIONS`: one flag per option, with its type, allowed values and help, checked by the same
declaration as ``DCSSConfig``. Benchmarks are scripts in ``benchmarks/``.

Nothing is lost without asking: ``fit`` into a folder holding a run, and ``export``/``assign`` onto an existing file,
are refused (exit 2) unless ``--overwrite`` (``fit --resume`` continues an interrupted run); an output never replaces
one of the command's inputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

if "torch" not in sys.modules:  # before torch's OpenMP starts: idle threads sleep instead of spinning, so a fit
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # on a CPU shared with other work keeps its speed

from dcss_plugin.config import OPTIONS, Option, describe_default, get_option

log = logging.getLogger("dcss_plugin")


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


RUN_MARKERS = ("checkpoint.pt", "labels.npy", "report.json", "progress.pt", "log.jsonl")  # any one: a run is here
RUN_FILES = RUN_MARKERS + ("report.html", "samples.npz")  # everything `dcss fit` writes into --out
OVERWRITE_DIR = ".dcss-overwrite"  # inside --out: where `dcss fit --overwrite` trains before replacing the old run


def _check_out_path(out: str, flag: str = "--out") -> None:
    """Refuse an output path below a file (``somefile.txt/run``): the first existing ancestor must be a folder."""
    parent = os.path.dirname(os.path.abspath(out))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise CLIError(f"{flag} {out!r} lies below {parent!r}, which is a file, not a folder; "
                       "give a path in an existing or new folder.")


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (through symlinks, relative paths and hard links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: no input there to destroy
        return False


def _check_output_file(out: str, inputs: Dict[str, str], overwrite: bool) -> None:
    """``export`` and ``assign``: the output is never one of the inputs, and an existing file only with --overwrite."""
    _check_out_path(out)
    for flag, path in inputs.items():
        if path and _same_file(out, path):
            raise CLIError(f"--out {out!r} is the same file as {flag} {path!r}; writing it would destroy the input. "
                           "Give another --out.")
    if os.path.isdir(out):
        return  # the writer names a file to use instead
    if os.path.lexists(out) and not overwrite:
        raise CLIError(f"--out {out!r} already exists; nothing was written. Give another --out, or add --overwrite "
                       "to replace it.")


def _existing_run(out: str) -> List[str]:
    """The files of an earlier run in ``out`` (empty: no run there)."""
    return [name for name in RUN_MARKERS if os.path.lexists(os.path.join(out, name))]


def _trim_log(log_path: str, phase: str, epoch: int) -> None:
    """Keep the ``log.jsonl`` lines of epochs before ``(phase, epoch)``, the first epoch a resumed run reports, so
    resumed epochs are not logged twice."""
    from dcss_plugin.io import atomic_write_bytes
    from dcss_plugin.training.run import PHASES

    point = (PHASES.index(phase), int(epoch))
    if not os.path.exists(log_path):
        return
    kept = []
    with open(log_path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
                key = (PHASES.index(rec["phase"]), int(rec["epoch"]))
            except (ValueError, KeyError, TypeError):  # a line cut by the kill, or not ours
                continue
            if key < point:
                kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_bytes(log_path, "".join(kept).encode("utf-8"))


def _replace_run(work: str, out: str) -> None:
    """``--overwrite``: move the new run's files from ``work`` into ``out``, then drop the old run's leftovers.

    Files the old run did not write (the user's data, an exported ``.onnx``) stay; they are named on stderr.
    """
    new = set(os.listdir(work))
    for name in sorted(new):
        os.replace(os.path.join(work, name), os.path.join(out, name))
    for name in RUN_FILES:
        if name not in new and os.path.lexists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    os.rmdir(work)
    others = sorted(n for n in os.listdir(out) if n not in RUN_FILES and not n.startswith("."))
    if others:
        print(f"dcss fit: note: kept files in {out} that dcss fit did not write: {', '.join(others)}",
              file=sys.stderr)


def _kmeans_baseline(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    flat = x.reshape(len(x), -1).astype(np.float64)
    n_init = 10 if len(flat) <= 20000 else 3  # 10 restarts on 70,000 MNIST images took 90 s, a fifth of the fit
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(flat).astype(np.int64)


def _load_inputs(args: argparse.Namespace):
    from dcss_plugin.data import as_tensor, load_array, load_named_dataset, validate_labels

    if bool(args.dataset) == bool(args.data):
        raise CLIError("Give exactly one of --dataset NAME or --data FILE.")
    if args.dataset:
        if args.labels:
            raise CLIError("--labels goes with --data; named datasets bring their own labels.")
        x, y = load_named_dataset(args.dataset, args.data_root)
        return x, y.numpy(), f"dataset:{args.dataset}"
    x_np = load_array(args.data)
    x, _ = as_tensor(x_np)  # refuses complex data, float32 overflow and values the cast would merge
    y = None
    if args.labels:
        y_arr = load_array(args.labels)
        if y_arr.ndim == 2 and 1 in y_arr.shape:  # a column or a row, e.g. from a .csv
            y_arr = y_arr.reshape(-1)
        y = validate_labels(y_arr, len(x))
    return x, y, f"file:{os.path.abspath(args.data)}"


def _table(rows: List[tuple]) -> str:
    head = f"{'method':<28}{'ACC':>8}{'NMI':>8}{'ARI':>8}"
    lines = [head, "-" * len(head)]
    for name, m in rows:
        lines.append(f"{name:<28}{m['acc']:>8.4f}{m['nmi']:>8.4f}{m['ari']:>8.4f}")
    return "\n".join(lines)


def _save_samples(out: str, model, x, labels: np.ndarray, y: Optional[np.ndarray], seed: int,
                  max_rows: int = 3000) -> None:
    """``samples.npz``: a seeded subsample for pictures — index, u, q, predicted labels, x (images), y (if known)."""
    import io as _io

    from dcss_plugin.io import atomic_write_bytes

    rng = np.random.default_rng(seed)
    n = len(x)
    index = np.sort(rng.choice(n, size=min(n, max_rows), replace=False))
    xs = x[index]
    cached = (getattr(model, "history_", None) or {}).get("timm") or {}  # frozen timm: u, q kept from the fit
    u, q = (cached["u"][index], cached["q"][index]) if "u" in cached else (model.transform(xs), model.predict_proba(xs))
    arrays = {"index": index.astype(np.int64), "u": u, "q": q, "labels": labels[index].astype(np.int64)}
    if xs.dim() == 4:
        arrays["x"] = xs.numpy().astype(np.float32)
    if y is not None:
        arrays["y"] = np.asarray(y)[index].astype(np.int64)
    buf = _io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(os.path.join(out, "samples.npz"), buf.getvalue())


def _fit_rank(args: argparse.Namespace) -> None:
    """One process of ``dcss fit --devices N``: load the input and run :func:`_fit_and_write` (rank 0 writes)."""
    x, y, source = _load_inputs(args)
    _fit_and_write(args, x, y, source)


def cmd_fit(args: argparse.Namespace) -> int:
    out = args.out
    overwrite = bool(getattr(args, "overwrite", False))
    if args.resume and overwrite:
        raise CLIError("--resume continues the run in --out and --overwrite replaces it; give one of them.")
    _check_out_path(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out!r} exists and is not a directory.")
    _check_device(args.device)
    found = _existing_run(out) if os.path.isdir(out) else []
    if args.resume and "progress.pt" not in found:
        raise CLIError(f"--resume: there is no interrupted run in {out!r} (no progress.pt); run without --resume.")
    if found and not args.resume and not overwrite:
        if "progress.pt" in found:
            raise CLIError(f"--out {out!r} holds an interrupted run (progress.pt); nothing was changed. Continue it "
                           "with --resume (same arguments), or start it again with --overwrite.")
        raise CLIError(f"--out {out!r} already holds a run ({', '.join(found)}); nothing was changed. Choose another "
                       "--out, or add --overwrite to replace that run.")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"--out {out!r} cannot be created: {exc.strerror or exc}.") from None
    if not os.access(out, os.W_OK):
        raise CLIError(f"--out {out!r} is not writable.")
    x, y, source = _load_inputs(args)
    # --overwrite trains into a fresh folder inside --out and moves the new files over the old run only once it has
    # finished: input that fit() rejects, a crash or Ctrl-C mid-run leaves the old run whole (removing it first would
    # lose it to any failure), and no file of the old run survives beside the new one.
    lead = int(os.environ.get("RANK", "0") or 0) == 0  # torchrun: rank 0 alone writes the run folder
    work = os.path.join(out, OVERWRITE_DIR) if overwrite else None
    if work and lead:
        shutil.rmtree(work, ignore_errors=True)  # left by an --overwrite run that was killed
        os.makedirs(work)
    args.work_dir = work
    try:
        rc = _fit_dispatch(args, x, y, source)
        if work and lead:
            _replace_run(work, out)
            work = None
        return rc
    finally:
        if work and lead:
            shutil.rmtree(work, ignore_errors=True)


def _check_device(device: str) -> None:
    """``--device``: a device this machine has, checked before any input is read."""
    from dcss_plugin.distributed import resolve_device

    try:
        resolve_device(device)
    except ValueError as exc:
        raise CLIError(f"--device {device}: {exc}") from None
    except RuntimeError:
        raise CLIError(f"--device {device}: CUDA is not available on this machine (torch {_torch_version()}); use "
                       "--device cpu, or --device auto to take CUDA where it exists.") from None


def _torch_version() -> str:
    import torch

    return f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}"


def _fit_dispatch(args: argparse.Namespace, x: Any, y: Optional[np.ndarray], source: str) -> int:
    """Run the fit in this process, as one torchrun rank, or in ``--devices N`` processes."""
    from dcss_plugin.distributed import init_from_environment, launch

    devices = int(getattr(args, "devices", 1) or 1)
    if init_from_environment():  # started by torchrun: this process is one rank already
        if devices > 1:
            raise CLIError("--devices N starts its own processes; under torchrun leave it out (torchrun sets them).")
        return _fit_and_write(args, x, y, source)
    if devices > 1:
        if getattr(args, "backbone", None) or getattr(args, "ssl", None):
            raise CLIError("--devices N trains the default autoencoder recipe; it does not combine with --backbone "
                           "or --ssl yet (run those on one device).")
        if args.device == "cuda" or (args.device == "auto" and _cuda_count() > 0):
            if _cuda_count() < devices:
                raise CLIError(f"--devices {devices} with CUDA needs {devices} GPUs, this machine has {_cuda_count()}; "
                               "use fewer, or --device cpu (gloo processes on CPU cores).")
        from dcss_plugin.data import validate_features

        validate_features(x.unsqueeze(1) if x.dim() == 3 else x, args.clusters)  # fail here, before spawning
        launch(_fit_rank, devices, args=(args,))
        return 0
    return _fit_and_write(args, x, y, source)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _fit_and_write(args: argparse.Namespace, x: Any, y: Optional[np.ndarray], source: str) -> int:
    from dcss_plugin import __version__
    from dcss_plugin.distributed import rank, world_size
    from dcss_plugin.estimator import DCSS
    from dcss_plugin.io import atomic_save_npy, atomic_write_json
    from dcss_plugin.metrics import evaluate

    out = getattr(args, "work_dir", None) or args.out  # --overwrite: a fresh folder, moved over args.out at the end
    lead = rank() == 0
    xv = x.unsqueeze(1) if x.dim() == 3 else x
    overrides = config_overrides(args)
    backbone = getattr(args, "backbone", None)
    ssl = getattr(args, "ssl", None)
    if backbone and ssl:
        raise CLIError("--ssl trains its own encoder; it does not combine with --backbone.")
    if not backbone and not ssl:
        for flag in ("pretrained_file", "pretrained", "img_size", "train_blocks", "backbone_lr_scale", "layer_decay",
                     "feature_batch_size"):
            if getattr(args, flag, None):
                raise CLIError(f"--{flag.replace('_', '-')} goes with --backbone timm:NAME.")
        model = DCSS(n_clusters=args.clusters, preset=args.preset, device=args.device, verbose=not args.quiet,
                     threads=args.threads, seed=args.seed, **overrides)
    log_path = os.path.join(out, "log.jsonl")
    progress = os.path.join(out, "progress.pt")
    log_files: List[Any] = []  # opened at the first epoch, so input that fit() rejects leaves no file behind
    t_start = time.perf_counter()

    def on_epoch(phase: str, epoch: int, stats: Dict[str, float]) -> None:
        if not log_files:
            if args.resume:  # the resume was accepted: drop the lines of epochs that are now run again
                _trim_log(log_path, phase, epoch)
            log_files.append(open(log_path, "a" if args.resume else "w", encoding="utf-8"))
        rec = {"phase": phase, "epoch": epoch, "elapsed_s": round(time.perf_counter() - t_start, 4), **stats}
        log_files[0].write(json.dumps(rec) + "\n")
        log_files[0].flush()

    t0 = time.perf_counter()
    try:
        if backbone:
            from dcss_plugin.adapters.timm import fit_from_cli_args  # timm is imported only when asked for

            model = fit_from_cli_args(args, x, overrides, callback=on_epoch, checkpoint_path=progress,
                                      resume=args.resume)
        elif ssl:
            from dcss_plugin.adapters.lightly import fit_from_cli_args as fit_ssl  # lightly only when asked for

            model = fit_ssl(args, x, overrides, callback=on_epoch, checkpoint_path=progress, resume=args.resume)
        else:
            model.fit(x, callback=on_epoch, checkpoint_path=progress, resume=args.resume)
    except ValueError as exc:
        if log_files and ("contains NaN" in str(exc) or "contains infinity" in str(exc)):
            # scikit-learn's advice ("impute your data") after training started: the input was checked finite, so
            # the training itself diverged
            raise CLIError("training diverged: the learned embeddings became NaN or inf (the input is finite). Use a "
                           "smaller learning rate (--lr) or the preset's settings.") from None
        raise
    finally:
        for fh in log_files:
            fh.close()
    fit_s = time.perf_counter() - t0
    labels = model.labels_
    assert labels is not None
    if not lead:  # other ranks of a multi-process run: rank 0 writes the run directory
        return 0
    model.save(os.path.join(out, "checkpoint.pt"))
    atomic_save_npy(os.path.join(out, "labels.npy"), labels.astype(np.int64))
    h = model.history_
    report: Dict[str, Any] = {
        "version": __version__,
        "source": source,
        "n_samples": int(len(x)),
        "sample_shape": list(model.input_shape_ or ()),
        "seed": args.seed,
        "config": model.config_.to_dict(),
        "device": h["device"],
        "threads": h.get("threads"),
        "processes": world_size(),
        "epochs": h["epochs"],
        "timings_s": {**{k: round(v, 3) for k, v in h["time_s"].items()}, "fit_total": round(fit_s, 3)},
        "time_per_epoch_s": {k: round(v, 4) for k, v in h["time_per_epoch_s"].items()},
        "final_loss": {k: (v[-1] if v else None) for k, v in h["loss"].items()},
        "cluster_sizes": np.bincount(labels, minlength=args.clusters).tolist(),
        "python": platform.python_version(),
    }
    if y is not None:
        t0 = time.perf_counter()
        km = _kmeans_baseline(xv.numpy(), args.clusters, args.seed)
        report["timings_s"]["kmeans_baseline"] = round(time.perf_counter() - t0, 3)
        report["metrics"] = evaluate(y, labels)
        report["metrics_after_pretrain_kmeans"] = evaluate(y, h["labels_after_pretrain"])
        report["metrics_after_phase1"] = evaluate(y, h["labels_after_phase1"])
        report["kmeans_baseline"] = evaluate(y, km)
    atomic_write_json(os.path.join(out, "report.json"), report)
    _save_samples(out, model, xv, labels, y, args.seed)
    os.remove(progress)  # the run is complete: labels, report and checkpoint are written
    if not args.no_html:
        try:
            from dcss_plugin.app.report import write_report

            html = write_report(out)
            print(f"dcss fit: report page {os.path.join(args.out, os.path.basename(html))}")
        except Exception as exc:  # noqa: BLE001 - pictures are extras; the run's results are already saved
            log.warning("could not write the HTML report: %s", exc)
            print(f"dcss fit: warning: HTML report not written ({exc}); run `dcss report {args.out}` to retry",
                  file=sys.stderr)
    print(f"dcss fit: {len(x)} samples, K={args.clusters}, seed={args.seed}, {fit_s:.1f} s on {h['device']}; "
          f"wrote {args.out}/labels.npy, report.json, checkpoint.pt")
    if y is not None:
        print(_table([("DCSS (this run)", report["metrics"]),
                      ("  after pretrain + k-means", report["metrics_after_pretrain_kmeans"]),
                      ("  after phase 1", report["metrics_after_phase1"]),
                      ("k-means on the raw input", report["kmeans_baseline"])]))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dcss_plugin.app.report import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from dcss_plugin.export.onnx import export_from_cli
    except ImportError as exc:
        raise CLIError(f"ONNX export is unavailable: {exc}") from exc
    run = args.run_dir
    checkpoint = os.path.join(run, "checkpoint.pt") if os.path.isdir(run) else run
    if args.out is None and args.triton is None:
        raise CLIError("give --out FILE.onnx, --triton REPO, or both.")
    if args.out is not None:
        _check_output_file(args.out, {"RUN_DIR": run, "its checkpoint": checkpoint,
                                      "--sign-key": getattr(args, "sign_key", None)}, getattr(args, "overwrite", False))
    if args.triton is not None:
        _check_out_path(args.triton, "--triton")
    return export_from_cli(args)


def cmd_assign(args: argparse.Namespace) -> int:
    try:
        from dcss_plugin.export.runtime import assign_from_cli
    except ImportError as exc:
        raise CLIError(f"ONNX assignment is unavailable: {exc}") from exc
    _check_output_file(args.out, {"MODEL": args.model, "--data": args.data,
                                  "--verify-key": getattr(args, "verify_key", None)}, getattr(args, "overwrite", False))
    return assign_from_cli(args)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from dcss_plugin.export.serve import serve_from_cli
    except ImportError as exc:
        raise CLIError(f"dcss serve needs fastapi and uvicorn ({exc}); pip install fastapi uvicorn") from exc
    return serve_from_cli(args)


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


_ON_OFF = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def _value_from_text(option: Option, text: str) -> Any:
    """A flag's text as the Python value ``option.check`` judges (text that is no number stays text)."""
    if option.type is bool:
        value = _ON_OFF.get(text.strip().lower())
        if value is None:
            raise ValueError(f"{option.name} must be on or off, got {text!r}. {option.name} is {option.help}.")
        return value
    if option.type is tuple:
        return tuple(_number(part.strip()) for part in text.split(",")) if text.strip() else ()
    if option.type in (int, float) and text not in (option.choices or ()):
        return _number(text.strip())
    return text


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def option_parser(option: Option):
    """The ``type=`` of ``option``'s flag: text -> checked value; a bad value is a one-line usage error (exit 2).

    Example:
        >>> option_parser(get_option("m"))("1.3")
        1.3
    """

    def parse(text: str) -> Any:
        try:
            return option.check(_value_from_text(option, text))
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = option.name
    return parse


def _metavar(option: Option) -> str:
    if option.type is bool:
        return "on|off"
    if option.type is tuple:
        return "N,N,..."
    if option.type is str and option.choices:
        return "{" + ",".join(option.choices) + "}"
    number = "N" if option.type is int else "X"
    return "|".join([number, *(option.choices or ())])


def _option_help(option: Option) -> str:
    default = describe_default(option)
    text = option.help + (" [experimental]" if option.experimental else "") + (f" ({default})" if default else "")
    return text.replace("%", "%%")


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per declared option with ``cli=True`` (``--name-with-dashes`` unless the option names another),
    ``dest`` the option's name, default ``None`` (not given: the estimator's default or the preset's value)."""
    for option in OPTIONS:
        if option.cli:
            parser.add_argument(option.cli_flag, dest=option.name, type=option_parser(option), default=None,
                                metavar=_metavar(option), help=_option_help(option))


def config_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """The DCSS settings given on the command line: ``{name: value}`` of every ``cli`` option not left ``None``."""
    values = {option.name: getattr(args, option.name, None) for option in OPTIONS if option.cli}
    return {name: value for name, value in values.items() if value is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcss", description="DCSS deep clustering (arXiv 2405.03590).")
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default WARNING).")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="train DCSS and write labels.npy, report.json and checkpoint.pt into --out")
    src = fit.add_argument_group("input (exactly one of --dataset / --data)")
    src.add_argument("--dataset", help="digits (embedded) | mnist | fashion-mnist | usps | cifar10 | stl10")
    src.add_argument("--data", help="samples as .npy, .csv or .pt: (N, F) vectors or (N, [C,] H, W) images")
    src.add_argument("--labels", help="optional ground truth (.npy/.csv/.pt), used only for reported metrics")
    src.add_argument("--data-root", help="folder with the dataset's files: torchvision's layout, or for mnist / "
                     "fashion-mnist the four IDX files directly (nothing is downloaded)")
    fit.add_argument("--clusters", "-k", type=option_parser(get_option("n_clusters")), required=True, metavar="K",
                     help=f"{get_option('n_clusters').help}, {get_option('n_clusters').expected()}")
    fit.add_argument("--seed", type=option_parser(get_option("seed")), default=get_option("seed").default,
                     metavar="N", help=_option_help(get_option("seed")))
    fit.add_argument("--out", required=True, help="run directory")
    fit.add_argument("--preset", type=option_parser(get_option("preset")), default=get_option("preset").default,
                     metavar=_metavar(get_option("preset")), help=_option_help(get_option("preset")))
    fit.add_argument("--device", default="auto", help="auto | cpu | cuda")
    fit.add_argument("--threads", type=_positive_int, default=None,
                     help="CPU threads while training (default: one for small steps, all cores for large ones)")
    fit.add_argument("--devices", type=_positive_int, default=1,
                     help="processes for data-parallel training (DDP; gloo on CPU, NCCL with one GPU each); "
                          "under torchrun leave it out")
    fit.add_argument("--ssl", choices=["simclr"],
                     help="train the encoder with Lightly's SimCLR beside the DCSS loss (dcss_plugin.adapters.lightly)")
    fit.add_argument("--quiet", action="store_true", help="no progress bars")
    fit.add_argument("--no-html", action="store_true", help="skip the HTML report with pictures")
    fit.add_argument("--resume", action="store_true",
                     help="continue an interrupted run in --out from its last saved epoch (saved about every 10 s and "
                          "at each phase start; same arguments)")
    fit.add_argument("--overwrite", action="store_true",
                     help="replace the run already in --out as a whole (its files are replaced once the new run "
                          "has finished; a failed or stopped run leaves the old one as it was)")
    add_option_flags(fit.add_argument_group("DCSS settings (not given: from the preset; see dcss_plugin.config)"))
    bb = fit.add_argument_group("timm backbone (images only; see dcss_plugin.adapters.timm)")
    bb.add_argument("--backbone", metavar="timm:NAME",
                    help="encode images with a timm model, e.g. timm:resnet18 (names: timm.list_models())")
    bb.add_argument("--pretrained-file", metavar="W",
                    help="local backbone weights (.safetensors or torch state dict); nothing is downloaded")
    bb.add_argument("--pretrained", action="store_true",
                    help="hub weights: unavailable offline (the error explains how to use --pretrained-file)")
    bb.add_argument("--finetune", choices=["frozen", "last", "full"], default="frozen",
                    help="frozen: features once, DCSS on them (fast, default); last: train the last block group; "
                         "full: train all, backbone at a lower lr with layer-wise decay")
    bb.add_argument("--img-size", type=_positive_int, help="backbone input size (default: the model's data config)")
    bb.add_argument("--train-blocks", type=_positive_int, help="--finetune last: block groups to train (default 1)")
    bb.add_argument("--backbone-lr-scale", type=float, help="backbone lr / --lr (default: last 1.0, full 0.1)")
    bb.add_argument("--layer-decay", type=float, help="--finetune full: layer-wise lr decay (default 0.75)")
    bb.add_argument("--feature-batch-size", type=_positive_int,
                    help="--finetune frozen: images per backbone pass when extracting features (default 256)")
    fit.set_defaults(func=cmd_fit)

    rep = sub.add_parser("report", help="write RUN_DIR/report.html (config, timings, metrics, pictures)")
    rep.add_argument("run_dir")
    rep.set_defaults(func=cmd_report)

    exp = sub.add_parser("export", help="export a fitted run to a self-contained ONNX cluster assigner")
    exp.add_argument("run_dir")
    exp.add_argument("--full", action="store_true", help="encoder + head (input x) instead of head only (input u)")
    exp.add_argument("--fp16", action="store_true")
    exp.add_argument("--out", default=None, help="the .onnx file to write (may be left out with --triton)")
    exp.add_argument("--overwrite", action="store_true",
                     help="replace --out (never an input file) or the Triton model folder if it exists")
    exp.add_argument("--sign-key", metavar="KEY_FILE", default=None,
                     help="sign the model with HMAC-SHA256 using this secret key file (at least 16 bytes); "
                          "load it with `dcss assign --verify-key KEY_FILE`")
    tri = exp.add_argument_group("Triton model repository (see dcss_plugin.export.triton)")
    tri.add_argument("--triton", metavar="REPO", default=None,
                     help="also write REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx for tritonserver")
    tri.add_argument("--name", default="dcss", help="the model's name and folder in REPO (default dcss)")
    tri.add_argument("--max-batch", type=_positive_int, default=1024,
                     help="Triton max_batch_size: rows per merged batch (default 1024)")
    tri.add_argument("--kind", choices=["gpu", "cpu"], default="gpu",
                     help="instance_group kind: KIND_GPU (default) or KIND_CPU")
    exp.set_defaults(func=cmd_export)

    asg = sub.add_parser("assign", help="assign clusters with an exported ONNX model (onnxruntime)")
    asg.add_argument("model")
    asg.add_argument("--data", required=True)
    asg.add_argument("--out", required=True)
    asg.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])
    asg.add_argument("--batch-size", type=_positive_int, default=65536)
    asg.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never an input file)")
    asg.add_argument("--verify-key", metavar="KEY_FILE", default=None,
                     help="refuse the model unless it is signed with this secret key file (dcss export --sign-key)")
    asg.set_defaults(func=cmd_assign)

    srv = sub.add_parser("serve", help="serve an exported ONNX model over HTTP (FastAPI + uvicorn, no torch)")
    srv.add_argument("model")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    srv.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])
    srv.add_argument("--verify-key", metavar="KEY_FILE", default=None,
                     help="refuse the model unless it is signed with this secret key file (dcss export --sign-key)")
    srv.add_argument("--max-batch-rows", type=_positive_int, default=65536,
                     help="rows merged into one onnxruntime call at most (default 65536)")
    srv.add_argument("--max-wait-ms", type=float, default=2.0,
                     help="how long the batcher waits for more requests before running (default 2 ms)")
    srv.set_defaults(func=cmd_serve)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s")
    from dcss_plugin.errors import DataError  # = dcss_plugin.data.DataError, without importing torch (dcss serve)

    try:
        return int(args.func(args) or 0)
    except (CLIError, DataError, FileNotFoundError) as exc:
        print(f"dcss {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"dcss {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # permissions, a full disk, a path below a file: one line, not a traceback
        where = f" ({exc.filename!r})" if exc.filename else ""
        print(f"dcss {args.command}: error: {exc.strerror or exc}{where}; check the path, its permissions and the "
              "free space.", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
