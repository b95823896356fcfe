"""The `btd` command, every subcommand in this one module: it parses options and calls the library.

profile, readme and clean-report serve the pipeline; prepare, train, score, calibrate and scan take a
user's own scans to verdicts (`btd.data.prepare`, `btd.diffusion.train`, `btd.detect.*`). Heavy imports
(torch) happen inside the handlers so `btd --help` stays fast. Every failure the user can fix is a
BTDError, printed as one line `btd <cmd>: error: <what>: <problem>` with exit code 2; option errors
are one line too (exit 2), Ctrl-C is one line with exit code 130 and any other exception one line
with exit code 1 (BTD_DEBUG=1 shows its traceback). No failure prints a traceback.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from btd.errors import BTDConfigError, BTDError, BTDInputError
from btd.scenarios import ATTACKS

DEFAULT_WINDOW = 16  # params.yaml detect.ct_window: the paper's 32 px at 0.7 mm, at 1.4 mm pixels
MIN_SCANNER_COUNT = 20  # params.yaml detect.min_scanner_count = btd.detect.plus.MIN_COUNT
RAW = argparse.RawDescriptionHelpFormatter
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_INTERNAL = 1
DEBUG_ENV = "BTD_DEBUG"  # set to 1 to get the traceback of an unexpected error


def _profile(args: argparse.Namespace) -> int:
    from btd import profiles

    if args.apply:
        profiles.apply(args.name, args.params)
        print(f"applied profile '{args.name}' to {args.params}")
    else:
        print(" ".join(profiles.set_args(args.name)))
    return 0


def _readme(args: argparse.Namespace) -> int:
    from pathlib import Path

    from btd import paths
    from btd.report.readme import update

    readme = Path(args.readme) if args.readme else paths.ROOT / "README.md"
    if args.check:
        if update(readme, paths.ROOT, check=True):
            print(f"{readme}: results section is up to date")
            return 0
        print(f"{readme}: results section is out of date; run `btd readme`", file=sys.stderr)
        return 1
    update(readme, paths.ROOT)
    print(f"{readme}: results section regenerated from results/tables")
    return 0


def _clean_report(args: argparse.Namespace) -> int:
    from btd import paths
    from btd.report.notebook import clean_report

    for path in args.notebooks:
        clean_report(path, paths.ROOT)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="btd",
        description="Back-in-Time Diffusion: unsupervised detection of medical deepfakes.",
    )
    from btd import __version__

    parser.add_argument("--version", action="version", version=f"btd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "profile",
        help="switch parameter profile (paper, tiny, long)",
        description="Print `dvc exp run` -S arguments for a profile, or --apply it to params.yaml. "
        "Example: dvc exp run $(btd profile paper)",
    )
    p.add_argument("name", help="profile name: paper | tiny | long")
    p.add_argument("--apply", action="store_true", help="rewrite params.yaml with the profile")
    p.add_argument(
        "--params", default="params.yaml", help="params file to rewrite (default params.yaml)"
    )
    p.set_defaults(func=_profile)
    p = sub.add_parser(
        "readme",
        help="regenerate the README's results tables from results/tables",
        description="Rewrite the block between the results markers of README.md from "
        "results/tables/table1.csv and table3.csv (and the paper's numbers). --check only tests it.",
    )
    p.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    p.add_argument("--readme", help="README to update (default: the project's README.md)")
    p.set_defaults(func=_readme)
    p = sub.add_parser(
        "clean-report",
        help="make an executed notebook fit to commit (the pipeline runs it after papermill)",
        description="Merge progress-bar chunks into their final line, write paths relative to the "
        "repository root, and drop papermill's timestamps, in place.",
    )
    p.add_argument("notebooks", nargs="+", help="executed notebooks (reports/*.ipynb)")
    p.set_defaults(func=_clean_report)
    _register_detector_commands(sub)
    return parser


def one_line_failures(name: str, handler):
    """Wrap a subcommand so no failure prints a traceback: Ctrl-C and unexpected errors become one
    `btd <cmd>: error: <what>: <problem>` line (BTDErrors are printed by `btd.cli.main`)."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except BTDError:
            raise
        except KeyboardInterrupt:
            print(
                f"btd {name}: error: interrupted (Ctrl-C): stopped; finished outputs are left as "
                "they were",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if os.environ.get(DEBUG_ENV):
                raise
            detail = " ".join(str(exc).split()) or "no message"
            print(
                f"btd {name}: error: unexpected {exc.__class__.__name__}: {detail[:300]} "
                f"(set {DEBUG_ENV}=1 for the traceback)",
                file=sys.stderr,
            )
            return EXIT_INTERNAL

    return run


def one_line_usage_errors(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Option errors as the single line `btd <cmd>: error: <what>: <problem>`, no usage block."""

    def error(message: str):
        p.exit(2, f"{p.prog}: error: {message} (see {p.prog} --help)\n")

    p.error = error  # type: ignore[method-assign]
    return p


def _wrap(text: str) -> str:
    """Wrap a description by hand: the raw formatter keeps the epilog examples' layout."""
    return textwrap.fill(text, width=88)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def _threshold(text: str) -> float:
    """--threshold: a finite number >= 0 (scores are mean squares; a negative one flags all)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers like 1,2,4, got {text!r}")
    return values


def _add_device(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument(
        "--device",
        default=default,
        help=f"cpu | cuda | cuda:N | auto (cuda when available; default {default})",
    )


# ----------------------------------------------------------------------------- prepare


def _split_fractions(text: str) -> dict[str, float]:
    """--split 0.6,0.2,0.2: train, val, holdout fractions (checked to sum to 1 by the library)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not three numbers like 0.6,0.2,0.2: {text!r}") from None
    if len(values) != 3 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"need three fractions >= 0 like 0.6,0.2,0.2: {text!r}")
    return dict(zip(("train", "val", "holdout"), values, strict=True))


def _prepare(args: argparse.Namespace) -> int:
    from btd.data.prepare import prepare_dataset

    result = prepare_dataset(
        args.inputs,
        args.out,
        pixel_mm=args.pixel_mm,
        patch_size=args.patch_size,
        modality=args.modality,
        labels=args.labels,
        sites=args.sites,
        healthy_per_slice=args.healthy_per_slice,
        fractions=args.split,
        seed=args.seed,
        margin_mm=args.margin_mm,
    )
    for warning in result.warnings:
        print(f"btd prepare: warning: {warning}", file=sys.stderr)
    m = result.manifest
    counts = ", ".join(f"{k} {v}" for k, v in m.groupby(["split", "label"]).size().items())
    print(
        f"wrote {len(m)} patches of {args.patch_size}x{args.patch_size} px at {args.pixel_mm:g} mm "
        f"from {len(args.inputs)} volume(s), split by {result.split_by} ({counts}) -> {args.out}"
    )
    print(f"next: btd train --patches {args.out} --out <model folder>")
    return 0


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="turn your own volumes (+ tumour labels) into a patch folder for `btd train`",
        formatter_class=RAW,
        description=_wrap(
            "Read DICOM series folders / NIfTI / NRRD volumes, resample their slices to "
            "--pixel-mm, normalise them like the pipeline (CT: -700..2000 HU -> [0,1]; MRI: "
            "per-patient standardisation) and cut tumour (TM) patches at each labelled blob and "
            "healthy (TB) patches away from any lesion. Patients are split into train / val / "
            "holdout (a single patient is split by slice, with a warning). Writes patches.npy, "
            "manifest.csv and dataset.json (modality, pixel size, patch size) to --out."
        ),
        epilog="examples:\n"
        "  btd prepare scan1.nrrd scan2.nrrd --labels lab1.nrrd lab2.nrrd --modality ct \\\n"
        "      --out data/mine/ct\n"
        "  btd prepare /data/series_0001 --sites sites.csv --pixel-mm 1.4 --out data/mine/ct\n"
        "sites CSV: header slice,y,x,diameter_mm; 0-based voxel indices of the volume as read.",
    )
    p.add_argument("inputs", nargs="+", help="DICOM series folders, .nii(.gz) or .nrrd volumes")
    p.add_argument("--out", required=True, help="patch folder to write (new, or a dataset folder)")
    p.add_argument("--labels", nargs="+", help="one label volume per input (lesion = label > 0)")
    p.add_argument("--sites", nargs="+", help="one CSV per input: slice,y,x,diameter_mm")
    p.add_argument(
        "--modality", choices=("ct", "mri"), help="required unless the DICOM header says it"
    )
    p.add_argument("--pixel-mm", type=float, default=1.4, help="pixel size to resample to (1.4)")
    p.add_argument("--patch-size", type=_positive_int, default=48, help="patch side in px (48)")
    p.add_argument(
        "--healthy-per-slice", type=_positive_int, default=2, help="TB patches per slice (2)"
    )
    p.add_argument(
        "--margin-mm", type=float, help="TB centres this far from tumours (default half a patch)"
    )
    p.add_argument(
        "--split", type=_split_fractions, help="train,val,holdout fractions (0.6,0.2,0.2)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of healthy sites and splits (0)")
    p.set_defaults(func=_prepare)


# ----------------------------------------------------------------------------- train


def _train(args: argparse.Namespace) -> int:
    from btd.data.dataset import load_patch_dataset, training_data_info
    from btd.detect.train_options import TRAIN_OVERRIDES, run_config
    from btd.diffusion.train import CHECKPOINT_NAME, train

    train_x, _ = load_patch_dataset(args.patches, "train")
    if len(train_x) == 0:
        raise BTDInputError(Path(args.patches) / "manifest.csv", "no rows with split 'train'")
    val_x, _ = load_patch_dataset(args.patches, "val")
    data = training_data_info(args.patches)
    out = Path(args.out)
    overrides = {k: getattr(args, k) for k in TRAIN_OVERRIDES}
    config = run_config(overrides, int(train_x.shape[-1]), out / CHECKPOINT_NAME, args.fresh)
    accelerator = None
    if args.accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=config.device == "cpu")
        say = accelerator.print
        say(
            f"accelerate: {accelerator.num_processes} process(es) on {accelerator.device}, "
            f"global batch {accelerator.num_processes} x per-process --batch-size"
        )
    else:
        say = print
    say(
        f"training on {len(train_x)} train / {len(val_x)} val patches of "
        f"{config.image_size}x{config.image_size}, dim {config.dim} x {list(config.dim_mults)}, "
        f"{config.steps} steps, batch {config.batch_size}, device {config.device}"
    )
    result = train(
        train_x,
        config,
        out,
        val_patches=val_x if len(val_x) else None,
        resume=not args.fresh,
        progress=not args.quiet,
        accelerator=accelerator,
        data=data,
    )
    last = result.loss_log[-1] if result.loss_log else {}
    done = result.end_step - result.start_step
    say(
        f"steps {result.start_step}->{result.end_step} in {result.seconds:.1f} s "
        f"({result.steps_per_second:.2f} steps/s); train loss {last.get('train_loss', float('nan')):.4f}, "
        f"val loss {last.get('val_loss', float('nan')):.4f}"
        + ("" if done else " (nothing to do: already trained that far)")
    )
    say(f"checkpoint: {result.checkpoint}")
    if data["modality"] is None or data["pixel_mm"] is None:  # last: a failure stays one line
        print(
            "btd train: warning: the patch folder has no dataset.json (modality, pixel size): "
            "`btd scan` cannot check or match its input; make patch folders with `btd prepare`",
            file=sys.stderr,
        )
    say(f"next: btd calibrate --checkpoint {result.checkpoint} --patches {args.patches}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train (or resume) the BTD diffusion model on authentic patches",
        formatter_class=RAW,
        description=_wrap(
            "Train the DDPM on the 'train' split of a patch folder (patches.npy + "
            "manifest.csv from the preprocess stage); the 'val' split gives the validation loss. A "
            "checkpoint already in --out is resumed with its own settings (options you give must "
            "agree, except --steps/--val-every/--ckpt-every/--device); --fresh starts over."
        ),
        epilog="examples:\n"
        "  btd train --patches data/processed/ct --out models/ddpm/ct --steps 5000\n"
        "  btd train --patches data/processed/ct --out models/ddpm/ct --steps 20000   # resume\n"
        "  btd train --patches data/processed/mri --out models/ddpm/mri --dim 32 \\\n"
        "      --dim-mults 1,2,4,8 --batch-size 64 --timestep-sampler uniform --device cuda\n"
        "  accelerate launch --multi_gpu --num_processes 4 -m btd.cli train --accelerate \\\n"
        "      --patches data/processed/ct --out models/ddpm/ct --device cuda --batch-size 16"
        "   # 4 GPUs x 16 = global batch 64",
    )
    p.add_argument("--patches", required=True, help="patch folder (patches.npy + manifest.csv)")
    p.add_argument("--out", required=True, help="model folder: checkpoint.pt + loss_log.csv")
    p.add_argument("--steps", type=_positive_int, help="total training steps (default 1000)")
    p.add_argument("--batch-size", type=_positive_int, help="patches per step (default 16)")
    p.add_argument("--dim", type=_positive_int, help="U-Net base width, multiple of 4 (default 16)")
    p.add_argument("--dim-mults", type=_int_list, help="U-Net width multipliers (default 1,2,4)")
    p.add_argument("--lr", type=_fraction, help="Adam learning rate (default 1e-4)")
    p.add_argument(
        "--timestep-sampler",
        choices=("uniform", "low_t"),
        help="uniform = the paper; low_t = half the draws near t=0 (default uniform)",
    )
    p.add_argument("--attn-heads", type=_positive_int, help="attention heads (default 4)")
    p.add_argument("--attn-dim-head", type=_positive_int, help="attention head width (default 32)")
    p.add_argument("--val-every", type=_positive_int, help="steps between validations (100)")
    p.add_argument("--ckpt-every", type=_positive_int, help="steps between checkpoints (500)")
    p.add_argument("--device", help="cpu | cuda | cuda:N | auto (default auto)")
    p.add_argument("--seed", type=int, help="seed of weights, batches and noise (default 0)")
    p.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --out, start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--accelerate",
        action="store_true",
        help="train through Hugging Face accelerate (run under `accelerate launch` for several "
        "GPUs or nodes; --batch-size is then per process)",
    )
    p.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default="no",
        help="accelerate's mixed precision (with --accelerate; default no)",
    )
    p.set_defaults(func=_train)


# ----------------------------------------------------------------------------- score


def _score(args: argparse.Namespace) -> int:
    from btd.atomic import atomic_path
    from btd.detect.calibrate import plus_statistic
    from btd.detect.patchfiles import load_patches, plus_scores, read_centres, score_table
    from btd.detect.scan import resolve_threshold
    from btd.diffusion.checkpoint import load_detector
    from btd.diffusion.train import resolve_device

    if Path(args.out).is_dir():
        raise BTDInputError(args.out, "output path is a folder; pass the CSV file to write")
    plus = args.score != "btd"
    if plus and args.task is None:
        raise BTDConfigError(
            "--score", f"{args.score} reads a task's benign reference: add --task inject|remove"
        )
    diffusion, _ = load_detector(args.checkpoint, resolve_device(args.device))
    window = args.window
    if window is None and (args.task == "inject" or args.score == "self-ref"):
        window = DEFAULT_WINDOW
    thr = None
    if args.task is not None or args.threshold is not None:
        thr = resolve_threshold(args.checkpoint, args.task or "remove", args.threshold, args.score)
    x, table = load_patches(args.patches, args.split)
    centres = None
    if window is not None:
        if args.centres is not None:
            centres = read_centres(args.centres, len(x))
        elif {"py", "px"} <= set(table.columns):
            centres = table[["py", "px"]].to_numpy(np.float64)
    used: dict[str, str] = {}

    def to_plus(scores: np.ndarray, maps: np.ndarray) -> np.ndarray:
        stat = plus_statistic(maps, args.score, args.task, window or DEFAULT_WINDOW, centres)
        scanners = table["scanner"].to_numpy() if "scanner" in table.columns else None
        out, refs = plus_scores(thr.calibration, stat, scanners)
        used.update(refs)
        return out

    btd_window = window if (args.task == "inject" or not plus) else None
    table, seconds = score_table(
        diffusion, x, table, btd_window, centres if btd_window else None,
        None if thr is None else thr.value, args.batch_size, to_plus if plus else None,
    )  # fmt: skip
    with atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.8g")
    where = "over the patch" if btd_window is None else f"in a {btd_window}x{btd_window} window"
    what = "BTD" if not plus else f"BTD+ {args.score} (-log10 two-sided tail p)"
    print(f"scored {len(table)} patches ({what}) {where} in {seconds:.2f} s -> {args.out}")
    if used:
        print("benign reference: " + ", ".join(f"{k} {v}" for k, v in sorted(used.items())))
    if thr is not None:
        print(f"flagged {int(table['flagged'].sum())} at threshold {thr.value:.6g} ({thr.source})")
    return 0


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="BTD scores of prepared [0,1] patches",
        formatter_class=RAW,
        description=_wrap(
            "Score (N,1,P,P) patches in [0,1] (a .npy file, or a patch folder with "
            "manifest.csv, optionally one --split) with one backward diffusion step. The CSV has "
            "one row per patch: its index (plus the manifest columns for a folder) and the score "
            "(higher = more likely fake). With --window the score is taken in a window at "
            "--centres (or the manifest's py,px, or the patch centre); --task adds a flagged column "
            "at the calibrated threshold."
        ),
        epilog="examples:\n"
        "  btd score --checkpoint models/ddpm/ct/checkpoint.pt \\\n"
        "      --patches data/deepfakes/CTGAN-CT-Remove/images.npy --out scores.csv\n"
        "  btd score --checkpoint models/ddpm/ct/checkpoint.pt --patches suspects.npy \\\n"
        "      --window 16 --centres centres.csv --task inject --out scores.csv",
    )
    p.add_argument("--checkpoint", required=True, help="trained model (checkpoint.pt)")
    p.add_argument("--patches", required=True, help="FILE.npy or a patch folder with manifest")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--split", choices=("train", "val", "holdout"), help="folder: only this split")
    p.add_argument(
        "--window",
        type=_positive_int,
        help=f"score only a window x window square (injection; {DEFAULT_WINDOW} with --task inject)",
    )
    p.add_argument("--centres", help="CSV with columns py,px: window centre inside each patch")
    p.add_argument("--task", choices=ATTACKS, help="add 'flagged' (calibration)")
    p.add_argument(
        "--threshold", type=_threshold, help="flag above this score instead of calibration"
    )
    p.add_argument("--batch-size", type=_positive_int, default=64, help="patches per model call")
    _add_score_option(p)
    _add_device(p)
    p.set_defaults(func=_score)


# ----------------------------------------------------------------------------- calibrate


def _calibrate(args: argparse.Namespace) -> int:
    from btd.data.dataset import load_patch_dataset
    from btd.detect.calibrate import calibrate_task, calibrate_task_plus, score_calibration_path
    from btd.diffusion.checkpoint import load_detector
    from btd.diffusion.train import resolve_device
    from btd.scenarios import BENIGN_LABEL

    diffusion, _ = load_detector(args.checkpoint, resolve_device(args.device))
    x, manifest = load_patch_dataset(args.patches, args.split)
    if len(x) == 0:
        raise BTDInputError(
            Path(args.patches) / "manifest.csv", f"no rows with split {args.split!r}"
        )
    missing = {"label", "py", "px"} - set(manifest.columns)
    if missing:
        raise BTDInputError(
            Path(args.patches) / "manifest.csv", f"missing columns {sorted(missing)}"
        )
    tasks = ATTACKS if args.task == "both" else (args.task,)
    for task in tasks:
        if args.score == "btd":
            cal = calibrate_task(
                diffusion,
                x,
                manifest,
                task,
                args.window,
                args.target_fpr,
                family=args.family,
                batch_size=args.batch_size,
            )
        else:
            cal = calibrate_task_plus(
                diffusion,
                x,
                manifest,
                task,
                args.window,
                args.target_fpr,
                args.score,
                batch_size=args.batch_size,
                min_count=args.min_count,
            )
        path = score_calibration_path(args.checkpoint, task, args.score)
        path = cal.save(path, checkpoint=args.checkpoint)
        what = f"family {cal.family}" if args.score == "btd" else f"score {args.score}"
        per = f", {len(cal.scanner_references)} scanner reference(s)" if args.score != "btd" else ""
        print(
            f"{task}: {what}, threshold {cal.threshold:.6g} at target FPR "
            f"{cal.target_fpr:g} (n={cal.n} {BENIGN_LABEL[task]} {args.split} patches{per}) "
            f"-> {path}"
        )
        if cal.note:
            print(f"  note: {cal.note}")
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit the decision threshold on benign validation patches",
        formatter_class=RAW,
        description=_wrap(
            "Score the authentic validation patches the model was not trained on, fit "
            "their distribution and set the threshold at the target false-positive rate (paper "
            "section 3.4; no fake is needed). inject is calibrated on real tumours (TM) scored in "
            "the window, remove on healthy tissue (TB) scored over the patch. Writes "
            "calibration_<task>.json beside the checkpoint, which `btd scan` reads. --score "
            "two-sided / self-ref (BTD+) write calibration_<task>.<score>.json instead, with the "
            "sorted benign statistic (pooled, and per manifest scanner with enough samples), and "
            "flag a two-sided tail probability below the target FPR; --family is for btd only."
        ),
        epilog="examples:\n"
        "  btd calibrate --checkpoint models/ddpm/ct/checkpoint.pt \\\n"
        "      --patches data/processed/ct --task remove --target-fpr 0.1\n"
        "  btd calibrate --checkpoint models/ddpm/ct/checkpoint.pt \\\n"
        "      --patches data/processed/ct --task both --target-fpr 0.05 --family gamma",
    )
    p.add_argument("--checkpoint", required=True, help="trained model (checkpoint.pt)")
    p.add_argument("--patches", required=True, help="patch folder (patches.npy + manifest.csv)")
    p.add_argument(
        "--task", choices=("inject", "remove", "both"), default="both", help="(default both)"
    )
    p.add_argument(
        "--target-fpr", type=_fraction, default=0.1, help="benign flag rate (default 0.1)"
    )
    p.add_argument(
        "--family",
        choices=("auto", "lognormal", "gamma", "weibull", "kde", "empirical"),
        default="auto",
        help="fitted distribution (auto: lowest AIC, empirical if KS rejects it)",
    )
    p.add_argument(
        "--window", type=_positive_int, default=DEFAULT_WINDOW, help="inject window px (16)"
    )
    p.add_argument(
        "--split", default="val", choices=("train", "val", "holdout"), help="(default val)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=64, help="patches per model call")
    p.add_argument(
        "--min-count",
        type=_positive_int,
        default=MIN_SCANNER_COUNT,
        help="BTD+: benign patches a scanner needs for its own reference, else pooled (20)",
    )
    _add_score_option(p)
    _add_device(p)
    p.set_defaults(func=_calibrate)


#: btd.detect.calibrate.SCORES, spelt out so that building the parser does not import scipy.
SCORES = ("btd", "two-sided", "self-ref")


def _add_score_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--score",
        choices=SCORES,
        default="btd",
        help="btd = the paper's one-sided residual (default); two-sided = BTD+ two-sided tail "
        "of the residual under the benign distribution; self-ref = BTD+ window-vs-context "
        "ratio, two-sided (both scanner-aware where the calibration has the scanner)",
    )


# ----------------------------------------------------------------------------- scan


def _scan(args: argparse.Namespace) -> int:
    from btd.detect.scan import run_scan

    out = args.out or "btd-scan"
    accelerator = None
    if args.accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=args.device == "cpu")
    report = run_scan(
        args.path,
        args.checkpoint,
        out,
        modality=args.modality,
        coords=args.coords,
        task=args.task,
        threshold=args.threshold,
        window=args.window,
        stride=args.stride,
        min_foreground=args.min_foreground,
        batch_size=args.batch_size,
        max_figures=args.max_figures,
        pixel_mm=args.pixel_mm,
        prenormalized=args.prenormalized,
        device=args.device,
        fast=_fast_options(args),
        accelerator=accelerator,
        resample=not args.no_resample,
        score=args.score,
    )
    if report is None:  # a non-main accelerate process: the main one reports
        return 0
    flagged = int(report.table["flagged"].sum())
    print(
        f"scored {len(report.table)} patches in {report.seconds:.1f} s on {report.device}; "
        f"{flagged} flagged at threshold {report.threshold.value:.6g} ({report.threshold.source})"
    )
    print(f"wrote {report.scores_csv}, {report.summary} and {len(report.figures)} heat map(s)")
    return 0


def _fast_options(args: argparse.Namespace):
    """FastOptions from --precision/--no-channels-last/--compile; None = the reference path."""
    if args.reference_path:
        return None
    from btd.detect.fast import FastOptions

    return FastOptions(
        precision=args.precision,
        channels_last=not args.no_channels_last,
        compile=args.compile,
        batch_size=args.batch_size,
    )


def _add_fast(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speed (see benchmarks/fast_scoring.py for measured effects)")
    g.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="U-Net precision: fp32 (exact), bf16 (CPU/GPU), fp16 (GPU); reduced precision keeps "
        "the score ranking (Spearman >= 0.999 measured) but not the calibrated threshold exactly",
    )
    g.add_argument("--no-channels-last", action="store_true", help="keep NCHW activations")
    g.add_argument("--compile", action="store_true", help="torch.compile the U-Net (warm-up cost)")
    g.add_argument(
        "--accelerate",
        action="store_true",
        help="split the sites over the processes of `accelerate launch` (several GPUs)",
    )
    g.add_argument(
        "--reference-path",
        action="store_true",
        help="score through the library's p_sample (btd.detect.btd.score), as the pipeline does",
    )


def _add_scan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scan",
        help="scan a DICOM series / NIfTI / NRRD / .npy volume for tampering",
        formatter_class=RAW,
        description=_wrap(
            "Normalise a scan like the training data (CT: -700..2000 HU -> [0,1]; MRI: "
            "per-patient standardisation), resample its slices from the header's spacing to the "
            "checkpoint's pixel size (--no-resample keeps them; a volume of another modality than "
            "the checkpoint's is refused), cut patches of the model's size at --coords or tile "
            "every slice (skipping background tiles), score them in batches and flag those above "
            "the calibrated threshold (calibration_<task>.json beside the checkpoint, from `btd "
            "calibrate`; or --threshold). --score two-sided / self-ref read BTD+ scores against "
            "calibration_<task>.<score>.json's benign reference, the scanner's own when the DICOM "
            "Manufacturer + ManufacturerModelName has one, else the pooled one. Writes "
            "scores.csv (slice,y,x,score,flagged), flag_*.png heat maps and summary.md to --out. "
            "Outputs never name the patient or the input file; the input is called 'input "
            "volume' with a hash of its voxels."
        ),
        epilog="examples:\n"
        "  btd scan /data/series_0001 --checkpoint models/ddpm/ct/checkpoint.pt --out report/\n"
        "  btd scan scan.nii.gz --checkpoint models/ddpm/ct/checkpoint.pt --modality ct \\\n"
        "      --coords suspects.csv --task inject --out report/\n"
        "  btd scan volume.npy --checkpoint models/ddpm/mri/checkpoint.pt --modality mri \\\n"
        "      --stride 16 --threshold 0.02 --device cuda --batch-size 256\n"
        "coords CSV: header slice,y,x; 0-based voxel indices of the volume as read.\n"
        "task: inject = is the tumour at each site real? (window score; default with --coords)\n"
        "      remove = was a tumour erased here? (whole-patch score; default without)",
    )
    p.add_argument("path", help="DICOM series folder, .dcm, .nii(.gz), .nrrd or .npy volume")
    p.add_argument("--checkpoint", required=True, help="trained model (checkpoint.pt)")
    p.add_argument("--out", help="output folder (default ./btd-scan)")
    p.add_argument(
        "--modality", choices=("ct", "mri"), help="default: DICOM header, else HU-like -> ct"
    )
    p.add_argument("--coords", help="CSV with columns slice,y,x: score only these sites")
    p.add_argument("--task", choices=ATTACKS, help="which calibration / score")
    p.add_argument(
        "--threshold",
        type=_threshold,
        help="flag above this score (skips calibration; BTD+ --score still reads its reference)",
    )
    p.add_argument(
        "--window", type=_positive_int, default=DEFAULT_WINDOW, help="inject score window (px)"
    )
    p.add_argument("--stride", type=_positive_int, help="tile step in px (default patch/2)")
    p.add_argument(
        "--min-foreground",
        type=float,
        default=0.1,
        help="skip tiles with less tissue than this fraction (default 0.1 = >90%% air)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=64, help="patches per model call")
    p.add_argument("--max-figures", type=int, default=20, help="heat maps of the top flags (20)")
    p.add_argument(
        "--pixel-mm",
        type=float,
        help="resample slices to this pixel size (default: the checkpoint's training spacing)",
    )
    p.add_argument(
        "--no-resample",
        action="store_true",
        help="scan at the volume's own pixels, not resampled to the checkpoint's spacing",
    )
    p.add_argument(
        "--prenormalized", action="store_true", help="input is already in [0,1]; do not normalise"
    )
    _add_score_option(p)
    _add_device(p)
    _add_fast(p)
    p.set_defaults(func=_scan)


def _register_detector_commands(sub: argparse._SubParsersAction) -> None:
    """prepare, train, score, calibrate and scan, each with one-line failures."""
    for add in (_add_prepare, _add_train, _add_score, _add_calibrate, _add_scan):
        add(sub)
    for name in ("prepare", "train", "score", "calibrate", "scan"):
        p = one_line_usage_errors(sub.choices[name])
        p.set_defaults(func=one_line_failures(name, p.get_default("func")))


class _WarningLines(logging.Handler):
    """Warnings the library logs (`btd.*` loggers) as one stderr line `btd <cmd>: warning: ...`."""

    def __init__(self, command: str):
        super().__init__(logging.WARNING)
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = " ".join(record.getMessage().split())
            print(f"btd {self.command}: warning: {message}", file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


@contextmanager
def _library_warnings(command: str) -> Iterator[None]:
    """Show the library's logged warnings like the CLI's own for the duration of one command."""
    logger = logging.getLogger("btd")
    handler = _WarningLines(command)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _library_warnings(args.command):
            return int(args.func(args) or 0)
    except BTDError as exc:
        print(f"btd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
