"""Wall time of each pipeline stage and the peak memory of a whole `dvc repro`.

Runs `dvc repro` (extra arguments are passed on, e.g. `--force` or a stage name), stamps every output
line with the wall clock into a log, samples the resident memory of the whole process tree every
`--interval` seconds, and writes per-stage seconds (from DVC's "Running stage" lines) to JSON.
`--from-log LOG` re-reads a log written earlier (lines "HH:MM:SS text") instead of running.

    python benchmarks/pipeline_times.py --log /tmp/repro.log            # the default profile
    python benchmarks/pipeline_times.py --from-log /tmp/repro.log --rss-log /tmp/rss.log
"""

from __future__ import annotations

import argparse
import re
import subprocess
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import psutil

from btd.atomic import write_json

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "pipeline_times.json"
STAGE = re.compile(r"Running stage '([^']+)'")
SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")


def tree_rss_mb(proc: psutil.Process) -> float:
    """Resident memory of a process and all its children (MB)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def run_repro(extra: list[str], log: Path, rss_log: Path, interval: float) -> None:
    """`dvc repro` with time-stamped output and a process-tree RSS sampler."""
    proc = subprocess.Popen(["dvc", "repro", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip
    parent = psutil.Process(proc.pid)
    done = threading.Event()

    def sample() -> None:
        with open(rss_log, "w") as fh:
            while not done.is_set():
                fh.write(f"{time.strftime('%H:%M:%S')} {tree_rss_mb(parent):.0f}\n")
                fh.flush()
                done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with open(log, "w") as fh:
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(f"{time.strftime('%H:%M:%S')} {line}")
    proc.wait()
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"dvc repro failed (exit {proc.returncode}); see {log}")


def _clock(stamp: str, day: datetime) -> datetime:
    t = datetime.strptime(stamp, "%H:%M:%S").time()
    return datetime.combine(day.date(), t)


def stage_seconds(log: Path) -> tuple[dict[str, float], list[str], float]:
    """Per-stage seconds (start of a stage to the start of the next / the last line), skipped
    stages, and the whole run's seconds, from a time-stamped log (midnight roll-over handled)."""
    events: list[tuple[datetime, str | None]] = []
    skipped: list[str] = []
    day, last = datetime(2000, 1, 1), None
    for raw in log.read_text(errors="replace").splitlines():
        if len(raw) < 9 or raw[2] != ":" or raw[5] != ":":
            continue
        t = _clock(raw[:8], day)
        if last is not None and t < last:  # past midnight
            day += timedelta(days=1)
            t += timedelta(days=1)
        last = t
        if m := STAGE.search(raw):
            events.append((t, m.group(1)))
        elif m := SKIPPED.search(raw):
            skipped.append(m.group(1))
    if last is None:
        raise SystemExit(f"{log}: no time-stamped lines")
    events.append((last, None))
    first = events[0][0]
    out = {name: (events[i + 1][0] - t).total_seconds()
           for i, (t, name) in enumerate(events[:-1])}  # fmt: skip
    return out, skipped, (last - first).total_seconds()


def peak_rss(rss_log: Path) -> float | None:
    """The largest sampled value (MB) of an RSS log ("HH:MM:SS MB" lines)."""
    if not rss_log.is_file():
        return None
    values = [float(line.split()[1]) for line in rss_log.read_text().splitlines() if line.strip()]
    return max(values) if values else None


def resumed_training(stages: dict[str, float], runs: Path = Path("runs")) -> dict[str, float]:
    """Training seconds of train_ddpm stages that ran shorter than their checkpoint's training
    (i.e. resumed a finished checkpoint), from runs/train_ddpm_<m>.json (btd.runinfo)."""
    import json

    out = {}
    for name, sec in stages.items():
        if not name.startswith("train_ddpm@"):
            continue
        path = runs / f"train_ddpm_{name.split('@', 1)[1]}.json"
        info = json.loads(path.read_text()) if path.is_file() else {}
        train_s = info.get("timings", {}).get("train_seconds")
        if train_s and sec < train_s:
            out[name] = float(train_s)
    return out


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run (or re-read) and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", type=Path, default=Path("repro.log"), help="where the run's log goes")
    p.add_argument("--rss-log", type=Path, help="RSS samples (default: beside --log)")
    p.add_argument(
        "--from-log",
        type=Path,
        nargs="+",
        help="parse these logs instead of running dvc repro (a later log's stage "
        "times replace an earlier one's: stages re-run after a change)",
    )
    p.add_argument("--interval", type=float, default=5.0, help="RSS sampling period (s)")
    p.add_argument("--note", help="free text stored with the report (how the logs were made)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args, extra = p.parse_known_args(argv)
    logs = args.from_log or [args.log]
    rss_log = args.rss_log or logs[0].with_suffix(".rss.log")
    if args.from_log is None:
        run_repro(extra, logs[0], rss_log, args.interval)
    stages: dict[str, float] = {}
    skipped: list[str] = []
    for log in logs:
        s, k, _ = stage_seconds(log)
        stages.update(s)
        skipped += k
    resumed = resumed_training(stages)
    total = sum(stages.values())
    from btd.runinfo import cpu_model

    report = {"cpu": cpu_model(), "stage_seconds": stages, "stage_order": list(stages), "skipped": skipped,
              "total_seconds": total,
              "resumed_training_seconds": resumed,
              # stages DVC skipped have no time here: no estimate rather than a short one
              "from_scratch_estimate_seconds": None if skipped else total + sum(resumed.values()),
              "peak_rss_mb": peak_rss(rss_log), "logs": [str(p) for p in logs],
              "dvc_repro_args": extra}  # fmt: skip
    if resumed:
        report["note"] = (
            "train_ddpm resumed its persisted checkpoint in this run (`persist: true`), so its "
            "stage time excludes training; the from-scratch estimate adds the checkpoint's own "
            "training time (runs/train_ddpm_*.json train_seconds): "
            + ", ".join(f"{k} {v:.0f} s" for k, v in resumed.items())
            + "."
        )
    if args.note:
        report["note"] = " ".join(filter(None, [args.note, report.get("note")]))
    write_json(args.out, report)
    for name, sec in stages.items():
        print(f"{name:>16}: {sec / 60:6.1f} min")
    est = report["from_scratch_estimate_seconds"]
    scratch = (
        f"from scratch about {est / 60:.1f} min"
        if est is not None
        else "skipped: " + ", ".join(skipped)
    )
    print(f"{'total':>16}: {total / 60:6.1f} min; {scratch}; peak RSS {report['peak_rss_mb']} MB")
    return report


if __name__ == "__main__":
    main()
