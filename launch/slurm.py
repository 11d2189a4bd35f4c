"""`zeroforge launch slurm` / `launch slurm-prep`: render sbatch scripts from launch/slurm/*.tmpl
and submit them with `sbatch --parsable`.

Training runs one Slurm task per GPU (per rank on CPU-only nodes), started by `srun`; each rank
finds its rank, world size and local rank in SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
(pipeline/dist.py), so there is no DeepSpeed launcher, pdsh or ssh inside the job, and Slurm
sees, signals and accounts for every rank. The batch script picks the rendezvous (the first host
of the allocation, a port derived from the job id) and owns the requeue decision: the ranks
exit with EXIT_PREEMPTED (75) after a checkpoint on SIGUSR1/SIGTERM, and the script then runs
`scontrol requeue` unless the job has already been requeued `--max-requeues` times.

Data prep is a job array, one task per part (`zeroforge prep --num-parts K --part I`), plus a
finalize job that starts only after every part succeeded (`--dependency=afterok:<array job>`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from zeroforge.data_prep.locations import location_problem
from zeroforge.data_prep.sources import expand_inputs
from zeroforge.data_prep.storage import url_scheme
from zeroforge.launch.commands import prep as prep_command
from zeroforge.pipeline.dist import SLURM_PORT_BASE, SLURM_PORT_SPAN
from zeroforge.pipeline.errors import (
    EXIT_CONFIG,
    EXIT_PREEMPTED,
    ConfigError,
    RunError,
    reported_as,
)

log = logging.getLogger("zeroforge.launch")

TEMPLATE_DIR = "slurm"  # launch/slurm/, shipped as package data (*.tmpl)
DEFAULT_SIGNAL_GRACE_S = 300
DEFAULT_MAX_REQUEUES = 10
# Once one rank has exited, the others get this long to follow before srun ends them: enough for
# rank 0 to close the MLflow run after a preemption checkpoint, short enough that a crashed
# rank does not leave the rest waiting in a collective until the gloo/NCCL timeout.
SRUN_WAIT_S = 60
# Environment variables copied into the training script when set at submit time, so the job
# reaches the same tracking server even where sites set SBATCH_EXPORT=NONE.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI",)
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")


class LaunchError(ConfigError):
    """Bad launch options; the message names the option."""


class SubmitError(RunError):
    """sbatch is missing or refused the job; the message has the command and its error."""


# ----------------------------------------------------------------------------- node lists


def hostfile(hosts: Sequence[str], slots: int) -> str:
    """A DeepSpeed hostfile (``host slots=N`` per line), e.g. for `launch deepspeed` inside an
    salloc: ``hostfile(expand_nodelist(os.environ["SLURM_JOB_NODELIST"]), 8)``."""
    if slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")
    return "".join(f"{h} slots={slots}\n" for h in hosts)


# ----------------------------------------------------------------------------- templates


def load_template(name: str) -> str:
    """Text of launch/slurm/<name> (installed as package data next to this module)."""
    return resources.files("zeroforge.launch").joinpath(TEMPLATE_DIR, name).read_text()


def render(template: str, values: Mapping[str, str]) -> str:
    """Replace every ``{{ name }}``; a placeholder without a value, or a value without a
    placeholder, is a bug in the caller, so both fail."""
    used = set(_PLACEHOLDER.findall(template))
    missing, unused = used - set(values), set(values) - used
    assert not missing and not unused, f"template placeholders: missing {missing}, unused {unused}"
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _q(text: str | os.PathLike) -> str:
    return shlex.quote(str(text))


def _join(args: Sequence[str | os.PathLike]) -> str:
    return " ".join(_q(a) for a in args)


# ----------------------------------------------------------------------------- options


@dataclass
class SbatchOptions:
    """Directives shared by every job this module writes (see `sbatch --help`)."""

    job_name: str
    output: str  # --output pattern (%j job id, %x job name, %A/%a array job/task)
    chdir: str
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    mem: str | None = None
    cpus_per_task: int | None = None
    extra: list[str] = field(default_factory=list)  # raw `--opt=value` directives

    def problems(self) -> list[str]:
        p = []
        if not self.job_name or re.search(r"\s", self.job_name):
            p.append(f"--job-name must be a non-empty word without spaces, got {self.job_name!r}")
        if self.time is not None:
            try:
                time_limit_seconds(self.time)
            except ValueError as e:
                p.append(str(e))
        if self.mem is not None and not _MEM_RE.fullmatch(self.mem):
            p.append(f"--mem {self.mem!r}: expected a size such as 200G, 64000M or 512000 "
                     "(megabytes), as sbatch reads it")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            p.append(f"--cpus-per-task must be at least 1, got {self.cpus_per_task}")
        for e in self.extra:
            if not e.startswith("-"):
                p.append(f"--sbatch {e!r}: expected an sbatch option such as --constraint=a100")
        return p

    def directives(self) -> list[str]:
        d = [f"--job-name={self.job_name}", f"--output={self.output}", f"--chdir={self.chdir}"]
        for name in ("partition", "account", "qos", "time", "mem"):
            value = getattr(self, name)
            if value:
                d.append(f"--{name}={value}")
        if self.cpus_per_task:
            d.append(f"--cpus-per-task={self.cpus_per_task}")
        return d + list(self.extra)


_TIME_RE = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
_MEM_RE = re.compile(r"\d+(?:[KMGTkmgt][Bb]?)?")
_NO_LIMIT = ("UNLIMITED", "INFINITE")
_TIME_UNIT = {"hours": 3600, "minutes": 60, "seconds": 1}
_TIME_RANGE = {"hours": 24, "minutes": 60, "seconds": 60}
_TIME_FORMATS = ("MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS, "
                 "DAYS-HOURS:MINUTES or DAYS-HOURS:MINUTES:SECONDS")


def time_limit_seconds(text: str) -> int | None:
    """A ``--time`` value in seconds, as sbatch reads it; None for no limit (0, UNLIMITED).

    Raises ValueError for what sbatch refuses (``banana``), and also for a field out of its
    range (``25:99:99``), which sbatch would quietly read as 26:40:39: almost surely a typo.
    """
    if text.upper() in _NO_LIMIT:
        return None
    m = _TIME_RE.fullmatch(text)
    if not m:
        raise ValueError(f"--time {text!r}: not a Slurm time limit ({_TIME_FORMATS})")
    days, *rest = m.groups()
    fields = [int(f) for f in rest if f is not None]
    if days is None:  # MINUTES | MINUTES:SECONDS | HOURS:MINUTES:SECONDS
        names = {1: ("minutes",), 2: ("minutes", "seconds"),
                 3: ("hours", "minutes", "seconds")}[len(fields)]
    else:  # DAYS-HOURS[:MINUTES[:SECONDS]]
        names = ("hours", "minutes", "seconds")[: len(fields)]
    for i, (name, value) in enumerate(zip(names, fields, strict=True)):
        leading = i == 0 and days is None  # the largest unit given may exceed its range
        if not leading and value >= _TIME_RANGE[name]:
            raise ValueError(f"--time {text!r}: {name} must be below {_TIME_RANGE[name]} here "
                             f"({_TIME_FORMATS})")
    seconds = int(days or 0) * 86400 + sum(_TIME_UNIT[n] * v for n, v in zip(names, fields,
                                                                            strict=True))
    return seconds or None  # 0: no limit, for sbatch too


def _directive(option: str) -> str:
    """One ``#SBATCH`` line; sbatch reads double quotes there, so a value with spaces works."""
    name, sep, value = option.partition("=")
    if any(c in option for c in '"\n'):
        raise LaunchError(f"sbatch option {option!r}: double quotes and newlines are not allowed")
    if sep and re.search(r"\s", value):
        value = f'"{value}"'
    return f"#SBATCH {name}{sep}{value}"


def _directive_lines(directives: Sequence[str]) -> str:
    return "\n".join(_directive(d) for d in directives)


def python_env() -> dict[str, str]:
    """Placeholders that make a job run this very Python environment."""
    bin_dir = Path(sys.executable).parent
    venv = sys.prefix if sys.prefix != sys.base_prefix else ""  # the running venv, if any
    return {
        "python": _q(sys.executable),
        "bin_dir": _q(bin_dir),
        "venv_export": f"export VIRTUAL_ENV={_q(venv)}" if venv else "# (not a virtualenv)",
    }


def default_torch_extensions_dir() -> str:
    """$TORCH_EXTENSIONS_DIR if set, else one directory per Python environment under
    ~/.cache/torch_extensions: DeepSpeed's JIT-built ops (30-60 s to build) are then reused by
    every job of this environment and never mixed with another environment's builds."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]
    name = f"zeroforge-py{sys.version_info.major}{sys.version_info.minor}-{tag}"
    return str(Path.home() / ".cache" / "torch_extensions" / name)


def _add_sbatch_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sbatch")
    g.add_argument("--partition", help="Slurm partition (sbatch --partition)")
    g.add_argument("--time", help="time limit, e.g. 2-00:00:00 (sbatch --time)")
    g.add_argument("--account", help="account to charge (sbatch --account)")
    g.add_argument("--qos", help="quality of service (sbatch --qos)")
    g.add_argument("--job-name", help="job name (default: derived from the config / store)")
    g.add_argument("--output", help="log file pattern (default: see the command's help)")
    g.add_argument("--mem", help="memory per node, e.g. 200G (sbatch --mem)")
    g.add_argument("--cpus-per-task", type=int, help="CPUs per task (sbatch --cpus-per-task)")
    g.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="any other sbatch option, repeatable: --sbatch=--constraint=a100 "
                        "--sbatch=--exclusive")
    g.add_argument("--dry-run", action="store_true",
                   help="print the rendered script(s) and sbatch command(s), submit nothing")


def _sbatch_options(args: argparse.Namespace, job_name: str, output: str,
                    cpus_per_task: int | None = None) -> SbatchOptions:
    return SbatchOptions(job_name=args.job_name or job_name, output=args.output or output,
                         chdir=os.getcwd(), partition=args.partition, account=args.account,
                         qos=args.qos, time=args.time, mem=args.mem,
                         cpus_per_task=args.cpus_per_task or cpus_per_task, extra=args.sbatch)


# ----------------------------------------------------------------------------- submission


def sbatch(script: Path, extra: Sequence[str] = ()) -> int:
    """Submit ``script`` with `sbatch --parsable [extra]`; returns the job id."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise SubmitError("sbatch not found on PATH: run this on a Slurm login node, or use "
                          "--dry-run to see the script")
    cmd = [exe, "--parsable", *extra, str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SubmitError(f"{_join(cmd)} failed (exit {proc.returncode}): "
                          f"{proc.stderr.strip() or proc.stdout.strip()}")
    out = proc.stdout.strip().splitlines()
    # --parsable prints "jobid" or "jobid;cluster" (after any warnings on stderr).
    match = re.match(r"(\d+)", out[-1]) if out else None
    if not match:
        raise SubmitError(f"{_join(cmd)}: cannot read a job id from {proc.stdout!r}")
    return int(match.group(1))


def _command_line() -> str:
    return "zeroforge " + _join(sys.argv[1:])


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- training


@dataclass
class TrainJob:
    config: str  # absolute path of the recipe
    overrides: list[str]
    nodes: int
    ranks_per_node: int
    gpus: bool  # request ranks_per_node GPUs per node (False: CPU-only nodes)
    sbatch: SbatchOptions
    torch_extensions_dir: str
    signal_grace_s: int = DEFAULT_SIGNAL_GRACE_S
    max_requeues: int = DEFAULT_MAX_REQUEUES
    env: dict[str, str] = field(default_factory=dict)

    def problems(self) -> list[str]:
        p = self.sbatch.problems()
        if self.nodes < 1:
            p.append(f"--nodes must be at least 1, got {self.nodes}")
        if self.ranks_per_node < 1:
            p.append(f"--gpus-per-node must be at least 1, got {self.ranks_per_node}")
        if not 0 <= self.signal_grace_s <= 65535:
            p.append(f"--signal-grace must be in [0, 65535] seconds, got {self.signal_grace_s}")
        if self.max_requeues < 0:
            p.append(f"--max-requeues must be >= 0, got {self.max_requeues}")
        for name in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                p.append(f"--env {name!r}: not a valid environment variable name")
        return p

    def warnings(self) -> list[str]:
        """Settings Slurm accepts that would defeat the preemption checkpoint."""
        try:
            limit = time_limit_seconds(self.sbatch.time) if self.sbatch.time else None
        except ValueError:
            return []  # reported by problems()
        if limit is not None and self.signal_grace_s >= limit:
            return [f"--signal-grace {self.signal_grace_s} s is not shorter than --time "
                    f"{self.sbatch.time} ({limit} s): SIGUSR1 would come as the job starts, so "
                    "the run would checkpoint and requeue at once; lower --signal-grace (Slurm "
                    "may also send it up to 60 s early)"]
        return []


def render_train(job: TrainJob, command_line: str) -> str:
    """The sbatch script of a training job (launch/slurm/train.sbatch.tmpl)."""
    problems = job.problems()
    if problems:
        raise LaunchError("; ".join(problems))
    directives = [
        f"--nodes={job.nodes}",
        f"--ntasks-per-node={job.ranks_per_node}",
        *([f"--gpus-per-node={job.ranks_per_node}"] if job.gpus else []),
        *job.sbatch.directives(),
        # A requeued job appends to its log instead of truncating the earlier attempts.
        "--open-mode=append",
        "--requeue",
        # No "B:": Slurm signals the tasks of every job step (each rank) but not this shell.
        f"--signal=USR1@{job.signal_grace_s}",
    ]
    srun = ["--nodes", str(job.nodes), "--ntasks-per-node", str(job.ranks_per_node),
            f"--wait={SRUN_WAIT_S}", "--kill-on-bad-exit=0"]
    if job.sbatch.cpus_per_task:
        # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch.
        srun += ["--cpus-per-task", str(job.sbatch.cpus_per_task)]
    env_lines = [f"export {k}={_q(v)}" for k, v in sorted(job.env.items())]
    values = {
        **python_env(),
        "command_line": command_line,
        "directives": _directive_lines(directives),
        "torch_extensions_dir": _q(job.torch_extensions_dir),
        "env_exports": "\n".join(env_lines) if env_lines else "# (no --env variables)",
        "port_base": str(SLURM_PORT_BASE),
        "port_span": str(SLURM_PORT_SPAN),
        "srun_args": _join(srun),
        "train_args": _join(["--config", job.config, *job.overrides]),
        "exit_preempted": str(EXIT_PREEMPTED),
        "max_requeues": str(job.max_requeues),
    }
    return render(load_template("train.sbatch.tmpl"), values)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Render an sbatch script for a training run (one srun task per rank) and "
                     "submit it; prints the job id. Logs go to RUN_DIR/slurm/%x-%j.out "
                     "unless --output is given; the script is saved next to them.")
    p.add_argument("--config", required=True, help="run recipe: YAML path or name in configs/")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=1,
                   help="GPUs per node = ranks per node; with --cpu-only just ranks per node")
    p.add_argument("--cpu-only", action="store_true",
                   help="request no GPUs (CPU ranks over gloo)")
    p.add_argument("--signal-grace", type=int, default=DEFAULT_SIGNAL_GRACE_S, metavar="S",
                   help="send SIGUSR1 to every rank S seconds before the time limit (Slurm may "
                        "send it up to 60 s earlier); ranks checkpoint, the job requeues "
                        f"(default {DEFAULT_SIGNAL_GRACE_S})")
    p.add_argument("--max-requeues", type=int, default=DEFAULT_MAX_REQUEUES,
                   help=f"stop requeueing after this many restarts (default "
                        f"{DEFAULT_MAX_REQUEUES}); the job then fails with exit 75")
    p.add_argument("--torch-extensions-dir", default=None,
                   help="TORCH_EXTENSIONS_DIR of the job (default: $TORCH_EXTENSIONS_DIR, else "
                        "~/.cache/torch_extensions/zeroforge-<python env>)")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="export into the job (NAME alone: its value here); repeatable. "
                        f"{', '.join(FORWARDED_ENV)} is forwarded when set. Values end up in "
                        "the script file: do not pass secrets")
    _add_sbatch_arguments(p)


def _env_args(items: Sequence[str]) -> dict[str, str]:
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in os.environ:
                raise LaunchError(f"--env {name}: not set here; use --env {name}=VALUE")
            value = os.environ[name]
        env[name] = value
    return env


def run_train(args: argparse.Namespace) -> int:
    # Here, not at the top: the run config imports torch (~1.8 s), which --help need not pay.
    from zeroforge.pipeline.config import find_config_file, load_run_config

    with reported_as(EXIT_CONFIG, ValueError, OSError):
        cfg = load_run_config(args.config, args.overrides)  # fail here, not after the queue
        config_path = find_config_file(args.config).resolve()
        run_dir = Path(cfg.run_dir)
        name = args.job_name or f"zf-{config_path.stem}"
        job = TrainJob(
            config=str(config_path), overrides=list(args.overrides), nodes=args.nodes,
            ranks_per_node=args.gpus_per_node, gpus=not args.cpu_only,
            sbatch=_sbatch_options(args, name, str((run_dir / "slurm" / "%x-%j.out").resolve())),
            torch_extensions_dir=args.torch_extensions_dir or default_torch_extensions_dir(),
            signal_grace_s=args.signal_grace, max_requeues=args.max_requeues,
            env=_env_args(args.env))
        script = render_train(job, _command_line())
        for warning in job.warnings():
            log.warning("%s", warning)
        if args.dry_run:
            print(script, end="")
            print(f"# submit with: sbatch --parsable "
                  f"{_q((run_dir / 'slurm' / (job.sbatch.job_name + '.sbatch')).resolve())}")
            return 0
        path = _write((run_dir / "slurm" / f"{job.sbatch.job_name}.sbatch").resolve(), script)
        Path(job.sbatch.output).parent.mkdir(parents=True, exist_ok=True)
        job_id = sbatch(path)
    log.info("submitted job %d: %d node(s) x %d rank(s), script %s, log %s", job_id, job.nodes,
             job.ranks_per_node, path, job.sbatch.output.replace("%j", str(job_id))
             .replace("%x", job.sbatch.job_name))
    print(job_id)
    return 0


# ----------------------------------------------------------------------------- data prep


# `zeroforge prep` options that slurm-prep sets itself (from --parts and the array task id).
_PREP_OWN = ("num_parts", "part", "finalize")


def _prep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    prep_command.add_arguments(parser)
    return parser


def prep_passthrough(args: argparse.Namespace) -> list[str]:
    """The `zeroforge prep` options in ``args`` that differ from prep's defaults, as argv
    (inputs, --out and the part options excepted: the scripts set those)."""
    out: list[str] = []
    for action in _prep_parser()._actions:
        if not action.option_strings or action.dest in (*_PREP_OWN, "out"):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        out += [flag] if action.nargs == 0 else [flag, str(value)]
    return out


@dataclass
class PrepJob:
    inputs: list[str]
    store: str
    parts: int
    prep_args: list[str]
    sbatch: SbatchOptions
    finalize_output: str
    max_concurrent: int | None = None

    def problems(self) -> list[str]:
        p = self.sbatch.problems()
        if self.parts < 1:
            p.append(f"--parts must be at least 1, got {self.parts}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            p.append(f"--max-concurrent must be at least 1, got {self.max_concurrent}")
        if not self.inputs:
            p.append("no INPUT given")
        return p


def render_prep(job: PrepJob, command_line: str) -> tuple[str, str]:
    """(array script, finalize script) of a multi-part prep (launch/slurm/prep-*.sbatch.tmpl)."""
    problems = job.problems()
    if problems:
        raise LaunchError("; ".join(problems))
    array = f"0-{job.parts - 1}" + (f"%{job.max_concurrent}" if job.max_concurrent else "")
    env = python_env()
    parts = render(load_template("prep-parts.sbatch.tmpl"), {
        **env,
        "command_line": command_line,
        "directives": _directive_lines([*job.sbatch.directives(), "--ntasks=1",
                                        f"--array={array}"]),
        "prep_args": _join([*job.inputs, "--out", job.store, "--num-parts", str(job.parts),
                            *job.prep_args]),
    })
    finalize_opts = dataclasses.replace(job.sbatch, job_name=f"{job.sbatch.job_name}-finalize",
                                        output=job.finalize_output, cpus_per_task=None)
    finalize = render(load_template("prep-finalize.sbatch.tmpl"), {
        **env,
        "command_line": command_line,
        "directives": _directive_lines([*finalize_opts.directives(), "--ntasks=1"]),
        "store": _q(job.store),
    })
    return parts, finalize


def add_prep_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Build a token store as a Slurm job array (one task per part) plus a "
                     "finalize job that stitches the parts once all succeeded; prints both job "
                     "ids. Takes every `zeroforge prep` option except --num-parts/--part/"
                     "--finalize. Scripts and logs go to --log-dir.")
    p.add_argument("--parts", type=int, required=True, help="number of parts = array tasks")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="run at most this many parts at once (--array=0-K%%N)")
    p.add_argument("--log-dir", default="slurm-logs",
                   help="scripts and logs (default ./slurm-logs)")
    _add_sbatch_arguments(p)
    prep_command.add_arguments(p.add_argument_group("zeroforge prep"))
    for action in p._actions:
        if action.dest in _PREP_OWN:
            action.help = argparse.SUPPRESS  # rejected in run_prep: --parts sets them
    p.epilog = prep_command.EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def run_prep(args: argparse.Namespace) -> int:
    with reported_as(EXIT_CONFIG, ValueError, OSError):
        problems = [f"--{k.replace('_', '-')} is set by slurm-prep (use --parts)"
                    for k in _PREP_OWN if getattr(args, k) is not None]
        if not args.out:
            problems.append("--out is required")
        elif location_problem(args.out, "--out"):
            problems.append(location_problem(args.out, "--out"))
        if problems:
            raise LaunchError("; ".join(problems))
        units = expand_inputs(args.inputs)  # a missing input fails now, not in every task
        if args.parts > len(units):
            log.warning("--parts %d > %d input units: %d part(s) will be empty (parts split "
                        "the input by files/units, never inside one)", args.parts, len(units),
                        args.parts - len(units))
        # A URL (s3://) is the same on every node; a path is made absolute for the job.
        store = args.out.rstrip("/") if url_scheme(args.out) else os.path.abspath(args.out)
        name = args.job_name or f"zf-prep-{store.rstrip('/').rsplit('/', 1)[-1]}"
        log_dir = Path(args.log_dir).resolve()
        job = PrepJob(
            inputs=list(args.inputs), store=store, parts=args.parts,
            prep_args=prep_passthrough(args),
            sbatch=_sbatch_options(args, name, str(log_dir / "%x-%A_%a.out"),
                                   cpus_per_task=args.workers if args.workers > 1 else None),
            finalize_output=str(log_dir / "%x-%j.out"), max_concurrent=args.max_concurrent)
        parts_script, finalize_script = render_prep(job, _command_line())
        parts_path = log_dir / f"{job.sbatch.job_name}-parts.sbatch"
        finalize_path = log_dir / f"{job.sbatch.job_name}-finalize.sbatch"
        if args.dry_run:
            print(parts_script, end="")
            print(f"# submit with: sbatch --parsable {_q(parts_path)}\n")
            print(finalize_script, end="")
            print("# submit with: sbatch --parsable --dependency=afterok:ARRAY_JOB_ID "
                  f"--kill-on-invalid-dep=yes {_q(finalize_path)}")
            return 0
        _write(parts_path, parts_script)
        _write(finalize_path, finalize_script)
        array_id = sbatch(parts_path)
        # afterok on an array job: every task must succeed; if one fails, Slurm cancels the
        # finalize job instead of leaving it pending forever.
        dependency = [f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes"]
        try:
            finalize_id = sbatch(finalize_path, dependency)
        except SubmitError as e:
            raise SubmitError(f"array job {array_id} is submitted but its finalize job is not "
                              f"({e}); once fixed: sbatch {_join(dependency)} "
                              f"{_q(finalize_path)}") from None
    log.info("submitted prep array job %d (%d parts) and finalize job %d (after all parts "
             "succeed); logs in %s", array_id, job.parts, finalize_id, log_dir)
    print(array_id, finalize_id)
    return 0
