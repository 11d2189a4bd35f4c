"""``zeroforge launch deepspeed``: multi-node training without Slurm, through DeepSpeed's runner.

    zeroforge launch deepspeed --hostfile hosts --config gpt2-124m train.max_steps=5000
    zeroforge launch deepspeed --hostfile hosts --config X --dry-run   # print, start nothing

DeepSpeed's runner (``python -m deepspeed.launcher.runner``) reads the MPI-style hostfile
(``host slots=N``), logs into every host with pdsh over ssh and starts
``deepspeed.launcher.launch`` there, which starts one ``python -m zeroforge.launch train`` per slot.
The remote shells are non-interactive ssh sessions, so they do not inherit the launching shell's
environment: the runner forwards only variables whose names start with PYTHON, MLFLOW, MV2 or UCX,
plus the ``KEY=VALUE`` lines of an environment file, ``$DS_ENV_FILE`` (default
``.deepspeed_env``) looked up in ``~`` and in the current directory (runner.py,
DEEPSPEED_ENVIRONMENT_NAME/PATHS). This module writes that file, so the ranks get:

- ``PATH`` with this virtualenv's ``bin`` first (``$PATH`` is expanded by the remote shell), so
  tools the ranks spawn (ninja for DeepSpeed's JIT ops) come from the same environment;
- ``PYTHONPATH`` with the launch directory first, as the runner itself does; ``VIRTUAL_ENV``;
- every ``NCCL_*``, ``GLOO_*``, ``TORCH_*`` (``TORCH_EXTENSIONS_DIR``, ``TORCH_NCCL_*``),
  ``MLFLOW_*``, ``HF_*``, ``TIKTOKEN_*``, ``ZEROFORGE_*`` variable, ``OMP_NUM_THREADS`` and
  ``DEEPSPEED_TIMEOUT`` (collective timeout in minutes) set here;
- then the lines of the user's own ``~/.deepspeed_env`` / ``./.deepspeed_env`` (which DeepSpeed
  would no longer read once ``DS_ENV_FILE`` points at ours), then ``--env KEY=VALUE``; later
  sources win.

The runner pastes ``export KEY=VALUE;`` into the remote command line, double-quoting values
with unusual characters but not escaping them, so values containing ``"``, `````, ``\\`` or
``$`` (which the remote shell would interpret) are refused with the variable named. The same goes
for the training arguments (``--config``, overrides), which pdsh also passes through a shell.

Before starting anything the launcher validates the run config locally (a bad key fails here,
not on every node), checks that every host accepts a non-interactive ssh login (DeepSpeed only
checks the first), and resolves the master address from the first host (``hostname -I`` over ssh)
unless ``--master-addr`` is given. Every host must see the same paths: this Python, the launch
directory, the config and the token store (a shared file system, or identical installs).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from zeroforge.pipeline.errors import EXIT_CONFIG, reported_as

log = logging.getLogger("zeroforge.launch")

RANK_MODULE = "zeroforge.launch"  # every rank runs `python -m zeroforge.launch train ...`
DEFAULT_MASTER_PORT = 29500
DS_ENV_FILE = "DS_ENV_FILE"  # the runner's variable naming its environment file
DS_ENV_DEFAULT_NAME = ".deepspeed_env"
# Forwarded from the launching environment (see the module doc for why each matters).
FORWARD_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "MLFLOW_", "HF_", "TIKTOKEN_", "ZEROFORGE_")
FORWARD_NAMES = ("VIRTUAL_ENV", "OMP_NUM_THREADS", "DEEPSPEED_TIMEOUT",
                 # Where an s3:// store is and which profile reads it; never the keys themselves,
                 # which would land on the remote command line.
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_REGION",
                 "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
SSH_CHECK_TIMEOUT_S = 30
LOCAL_HOSTS = ("localhost", "127.0.0.1")  # a one-host hostfile naming these runs here, no ssh

_HOST_LINE = re.compile(r"^(?P<host>[^\s#]+)\s+slots=(?P<slots>\d+)\s*(?:#.*)?$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
# Inside the double quotes the runner (or pdsh, for arguments with spaces) puts around a value,
# these still mean something to the remote shell.
_ACTIVE_IN_QUOTES = set('"`$\\\n\r\t')
# Outside quotes (a value or argument without spaces is pasted bare), these do too.
_ACTIVE_BARE = set("'\"`$\\;&|<>(){}*?[]!#~\n\r\t")
# The runner pastes the launch directory and this Python's path into the remote command unquoted.
_PLAIN_PATH = re.compile(r"^[\w@%+=:,./-]+$")


# ----------------------------------------------------------------------------- hostfile


@dataclass(frozen=True)
class HostSlots:
    host: str
    slots: int


def parse_hostfile(text: str, where: str = "hostfile") -> list[HostSlots]:
    """Parse an MPI-style hostfile (``host slots=N`` per line, ``#`` comments, blank lines).

    Raises one ValueError listing every bad line as ``<where>:<line>: <problem>``.
    """
    hosts: list[HostSlots] = []
    seen: dict[str, int] = {}
    problems = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _HOST_LINE.match(line)
        if m is None:
            problems.append(f"{where}:{n}: expected 'HOST slots=N', got {line!r}")
            continue
        host, slots = m.group("host"), int(m.group("slots"))
        if slots < 1:
            problems.append(f"{where}:{n}: {host} has slots={slots}; it must be at least 1")
        if host in seen:
            problems.append(f"{where}:{n}: {host} is listed again (first on line {seen[host]})")
            continue
        seen[host] = n
        hosts.append(HostSlots(host, slots))
    if not hosts and not problems:
        problems.append(f"{where}: no hosts (expected lines like 'node1 slots=8')")
    if problems:
        raise ValueError("\n".join(problems))
    return hosts


def read_hostfile(path: str | Path) -> list[HostSlots]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--hostfile: {p} is not a file")
    return parse_hostfile(p.read_text(), str(p))


# ----------------------------------------------------------------------------- environment


def _unsafe_value(value: str, allow_dollar: bool = False) -> str | None:
    """Why ``value`` would not reach a remote shell intact, or None when it would."""
    active = _ACTIVE_IN_QUOTES - ({"$"} if allow_dollar else set())
    bad = sorted({c for c in value if c in active})
    if bad:
        return "contains " + " ".join(repr(c) for c in bad)
    if value != value.strip():
        return "has leading or trailing whitespace (the runner strips it)"
    return None


def _unsafe_arg(arg: str) -> str | None:
    # pdsh wraps an argument containing a space in double quotes; one without is pasted bare.
    active = _ACTIVE_IN_QUOTES if " " in arg else _ACTIVE_BARE
    bad = sorted({c for c in arg if c in active})
    return ("contains " + " ".join(repr(c) for c in bad)) if bad else None


def forwarded_from(environ: Mapping[str, str], cwd: str, python: str) -> dict[str, str]:
    """The variables derived from the launching environment (before user files and --env)."""
    out: dict[str, str] = {}
    bin_dir = str(Path(python).parent)
    # `$PATH` is left for the remote shell to expand: the venv first, then the node's own PATH.
    out["PATH"] = f"{bin_dir}:$PATH"
    # The runner exports PYTHONPATH with the launch directory first; the file must agree, since
    # its lines replace the runner's own exports of the same name.
    py_path = environ.get("PYTHONPATH")
    out["PYTHONPATH"] = f"{cwd}:{py_path}" if py_path else cwd
    if sys.prefix != sys.base_prefix and "VIRTUAL_ENV" not in environ:
        out["VIRTUAL_ENV"] = sys.prefix
    for key in sorted(environ):
        if key.startswith(FORWARD_PREFIXES) or key in FORWARD_NAMES:
            out[key] = environ[key]
    return out


def parse_env_lines(text: str, where: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (blank lines and ``#`` comments allowed); errors name file:line."""
    out: dict[str, str] = {}
    problems = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _ENV_KEY.match(key):
            problems.append(f"{where}:{n}: expected KEY=VALUE, got {line!r}")
            continue
        out[key] = value.strip()
    if problems:
        raise ValueError("\n".join(problems))
    return out


def user_env_files(environ: Mapping[str, str], cwd: str, home: str) -> list[Path]:
    """The environment files DeepSpeed would read on its own, in its order (home, then cwd)."""
    name = environ.get(DS_ENV_FILE, DS_ENV_DEFAULT_NAME)
    found: list[Path] = []
    for base in (home, cwd):
        p = Path(base, name)  # an absolute name stays itself, as with os.path.join
        if p.is_file() and p.resolve() not in {f.resolve() for f in found}:
            found.append(p)
    return found


def resolve_environment(environ: Mapping[str, str], cwd: str, python: str, home: str,
                        extra: Sequence[str] = ()) -> dict[str, str]:
    """Everything the ranks get through the environment file: derived < user files < --env.

    Raises one ValueError naming every variable whose value a remote shell would mangle.
    """
    env = forwarded_from(environ, cwd, python)
    for path in user_env_files(environ, cwd, home):
        env.update(parse_env_lines(path.read_text(), str(path)))
    problems = []
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY.match(key):
            problems.append(f"--env {item!r}: expected KEY=VALUE")
            continue
        env[key] = value
    for key, value in env.items():
        why = _unsafe_value(value, allow_dollar=key == "PATH")
        if why:
            problems.append(f"environment variable {key} {why}; the remote shell would change it "
                            "(unset it, or pass a plain value with --env)")
    if problems:
        raise ValueError("\n".join(problems))
    return env


def render_env_file(env: Mapping[str, str]) -> str:
    """The runner's file format: one ``KEY=VALUE`` per line, nothing else (it splits every line
    on the first ``=``, so a blank or comment line would crash it)."""
    return "".join(f"{k}={v}\n" for k, v in env.items())


# ----------------------------------------------------------------------------- ssh


def ssh_base(ssh_config: str | None, ssh_port: int | None) -> list[str]:
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    if ssh_config:
        cmd += ["-F", ssh_config]
    if ssh_port is not None:
        cmd += ["-p", str(ssh_port)]
    return cmd


def pdsh_ssh_args(environ: Mapping[str, str], ssh_config: str | None) -> str | None:
    """PDSH_SSH_ARGS_APPEND with ``-F ssh_config`` added (None: leave the variable alone).
    The port goes through the runner's own --ssh_port."""
    if not ssh_config:
        return None
    return " ".join(x for x in (environ.get("PDSH_SSH_ARGS_APPEND", ""), f"-F {ssh_config}") if x)


def check_ssh(hosts: Sequence[str], base: list[str]) -> None:
    """Every host must accept a non-interactive login; one error lists those that do not."""

    def probe(host: str) -> tuple[str, subprocess.CompletedProcess | None]:
        try:
            return host, subprocess.run([*base, host, "true"], capture_output=True, text=True,
                                        timeout=SSH_CHECK_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return host, None

    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        results = list(pool.map(probe, hosts))
    failed = [f"{h}: " + ("timed out" if r is None else
                          (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1])
              for h, r in results if r is None or r.returncode != 0]
    if failed:
        raise ValueError("passwordless ssh failed for " + "; ".join(failed) +
                         " (fix ssh keys/config, or pass --ssh-config FILE)")


def master_addr_of(host: str, base: list[str]) -> str:
    """The first address ``hostname -I`` reports on ``host`` (what DeepSpeed would pick)."""
    if _IPV4.match(host):
        return host
    res = subprocess.run([*base, host, "hostname", "-I"], capture_output=True, text=True,
                         timeout=SSH_CHECK_TIMEOUT_S, stdin=subprocess.DEVNULL)
    words = res.stdout.split()
    if res.returncode != 0 or not words:
        raise ValueError(f"could not read {host}'s address with `ssh {host} hostname -I` "
                         f"({res.stderr.strip() or 'no output'}); pass --master-addr")
    return words[0]


# ----------------------------------------------------------------------------- command


def train_arguments(config: str, overrides: Sequence[str]) -> list[str]:
    """``--config X k=v ...``; refuses what a remote shell would reinterpret."""
    args = ["--config", config, *overrides]
    problems = [f"argument {a!r} {why}; the remote shell would change it (put the value in the "
                "YAML config instead)" for a in args if (why := _unsafe_arg(a))]
    if problems:
        raise ValueError("\n".join(problems))
    return args


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hostfile", required=True,
                        help="MPI-style hostfile: one 'HOST slots=N' line per node")
    parser.add_argument("--config", required=True,
                        help="run recipe: a YAML path or a name in configs/")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. train.max_steps=50")
    parser.add_argument("--master-addr", default=None,
                        help="address of the first host that the ranks rendezvous at "
                             "(default: the first address `ssh HOST hostname -I` reports)")
    parser.add_argument("--master-port", type=int, default=DEFAULT_MASTER_PORT,
                        help="rendezvous port on the master (default %(default)s)")
    parser.add_argument("--ssh-config", default=None,
                        help="ssh config file used for every login (pdsh and the checks)")
    parser.add_argument("--ssh-port", type=int, default=None, help="ssh port of every host")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra variable for the ranks (repeatable; wins over the rest)")
    parser.add_argument("--no-ssh-check", action="store_true",
                        help="skip the ssh login check of every host")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the command and the ranks' environment, start nothing")



@dataclass
class LaunchPlan:
    hosts: list[HostSlots]
    train_args: list[str]
    rank_env: dict[str, str]  # written to the environment file
    runner_env: dict[str, str]  # set for the runner process on top of os.environ
    hostfile: str
    master_port: int
    ssh_port: int | None
    module: str = RANK_MODULE  # what each rank runs (`python -m MODULE train <train args>`)

    @property
    def local(self) -> bool:
        """One host named localhost: the runner starts the ranks itself, without pdsh/ssh."""
        return len(self.hosts) == 1 and self.hosts[0].host in LOCAL_HOSTS

    def command(self, master_addr: str | None) -> list[str]:
        """``python -m deepspeed.launcher.runner ... --module <module> <train args>``.

        ``--no_ssh_check``: ``run`` checks every host itself with the right ssh options
        (DeepSpeed's check runs plain ``ssh``, ignoring ``--ssh-config``). ``--force_multi``:
        the runner would otherwise start a one-host job on this machine, whatever the host.
        """
        cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner",
               "--hostfile", self.hostfile, "--master_port", str(self.master_port),
               "--no_ssh_check"]
        if self.local:
            master_addr = "127.0.0.1"
        elif len(self.hosts) == 1:
            cmd.append("--force_multi")
        if master_addr:
            cmd += ["--master_addr", master_addr]
        if self.ssh_port is not None:
            cmd += ["--ssh_port", str(self.ssh_port)]
        return [*cmd, "--module", self.module, "train", *self.train_args]


def plan(args: argparse.Namespace, environ: Mapping[str, str] | None = None,
         cwd: str | None = None, home: str | None = None) -> LaunchPlan:
    """Everything ``run`` will do, without touching the network; one ValueError on bad input."""
    environ = dict(os.environ if environ is None else environ)
    cwd = cwd or os.getcwd()
    home = home or os.path.expanduser("~")
    problems: list[str] = []
    hosts: list[HostSlots] = []
    rank_env: dict[str, str] = {}
    train_args: list[str] = []
    try:
        hosts = read_hostfile(args.hostfile)
    except ValueError as e:
        problems.append(str(e))
    try:
        rank_env = resolve_environment(environ, cwd, sys.executable, home, args.env)
    except ValueError as e:
        problems.append(str(e))
    try:
        train_args = train_arguments(args.config, args.overrides)
    except ValueError as e:
        problems.append(str(e))
    for what, path in (("the launch directory", cwd), ("the Python executable", sys.executable)):
        if not _PLAIN_PATH.match(path):
            problems.append(f"{what} {path!r} has spaces or shell characters; DeepSpeed's runner "
                            "pastes it unquoted into the remote command (use a plain path)")
    if args.ssh_config and not Path(args.ssh_config).is_file():
        problems.append(f"--ssh-config: {args.ssh_config} is not a file")
    if not 0 < args.master_port < 65536:
        problems.append(f"--master-port: {args.master_port} is not a TCP port")
    if problems:
        raise ValueError("\n".join(problems))
    runner_env = {"PDSH_RCMD_TYPE": "ssh"}
    ssh_config = str(Path(args.ssh_config).resolve()) if args.ssh_config else None
    ssh_args = pdsh_ssh_args(environ, ssh_config)
    if ssh_args is not None:
        runner_env["PDSH_SSH_ARGS_APPEND"] = ssh_args
    return LaunchPlan(hosts, train_args, rank_env, runner_env,
                      str(Path(args.hostfile).resolve()), args.master_port, args.ssh_port)


def _validate_run_config(config: str, overrides: Sequence[str]) -> None:
    """Load the run config here so a bad key fails once, before any node is contacted."""
    # Here, not at the top: the run config imports torch (~1.8 s), which --help need not pay.
    from zeroforge.pipeline.config import load_run_config

    load_run_config(config, list(overrides))


def print_plan(p: LaunchPlan, master_addr: str | None, env_file: str) -> None:
    print("# hosts: " + ", ".join(f"{h.host} (slots={h.slots})" for h in p.hosts))
    print("# runner environment (added to this one)")
    for k, v in {**p.runner_env, DS_ENV_FILE: env_file}.items():
        print(f"{k}={shlex.quote(v)}")
    print(f"# {env_file}: exported on every host before the ranks start")
    print(render_env_file(p.rank_env), end="")
    print("# command")
    print(shlex.join(p.command(master_addr or "<first address of "
                               f"{p.hosts[0].host}>")))


def prepare(p: LaunchPlan, args: argparse.Namespace) -> str | None:
    """Check pdsh and ssh to every host, resolve the master address; ValueError if not ready."""
    if p.local:
        return None
    if shutil.which("pdsh") is None:
        raise ValueError("pdsh is not installed (e.g. apt-get install pdsh); the DeepSpeed "
                         "runner starts the remote ranks with it")
    base = ssh_base(args.ssh_config, args.ssh_port)
    names = [h.host for h in p.hosts]
    if not args.no_ssh_check:
        check_ssh(names, base)
    if args.master_addr:
        return args.master_addr
    addr = master_addr_of(names[0], base)
    log.info("master address %s (first address of %s)", addr, names[0])
    return addr


def run(args: argparse.Namespace) -> int:
    with reported_as(EXIT_CONFIG, ValueError, subprocess.TimeoutExpired):
        p = plan(args)
        _validate_run_config(args.config, args.overrides)
        if args.dry_run:
            print_plan(p, args.master_addr, "<temporary file>")
            return 0
        master_addr = prepare(p, args)
    return launch(p, p.command(master_addr))


def launch(p: LaunchPlan, command: list[str]) -> int:
    """Run the DeepSpeed runner with the environment file; returns its exit code (the largest
    exit code of any rank: 0 done, 1 failed, 2 bad config, 75 preempted; see pipeline/errors.py)."""
    with tempfile.TemporaryDirectory(prefix="zeroforge-launch-") as tmp:
        env_file = Path(tmp) / "deepspeed_env"
        env_file.write_text(render_env_file(p.rank_env))
        env = {**os.environ, **p.runner_env, DS_ENV_FILE: str(env_file)}
        if p.local:
            # The runner's local path reads no file; hand the values over directly. PATH stays
            # this process's own (no remote shell would expand `$PATH`).
            env.update({k: v for k, v in p.rank_env.items() if k != "PATH"})
        log.info("launching on %s: %s", ", ".join(h.host for h in p.hosts), shlex.join(command))
        proc = subprocess.Popen(command, env=env)

        def forward(signum: int, frame: object) -> None:
            # The runner answers SIGTERM by stopping the ranks on every host.
            proc.send_signal(signum)

        previous = signal.signal(signal.SIGTERM, forward)
        try:
            while True:
                try:
                    return proc.wait()
                except KeyboardInterrupt:
                    # The terminal sent SIGINT to the runner as well; wait for its cleanup.
                    continue
        finally:
            signal.signal(signal.SIGTERM, previous)
