"""Who launched this process, and as which rank of how many: read once, before any process
group, from the environment each launcher sets.

    torchrun, accelerate launch (standard)  RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK
    deepspeed                               RANK WORLD_SIZE LOCAL_RANK LOCAL_SIZE CROSS_RANK CROSS_SIZE
    srun (no torchrun under it)             SLURM_PROCID SLURM_NTASKS SLURM_LOCALID SLURM_NODEID SLURM_NNODES
    mpirun (OpenMPI)                        OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE

RANK/WORLD_SIZE win when present (torchrun under srun sets them for its workers). A launch
by srun or mpirun alone gets RANK, WORLD_SIZE and LOCAL_RANK exported from its own
variables, so that torch.distributed, DeepSpeed and Accelerate (which read env://) see one
world. `declared_world` is what an `accelerate launch` above this process was told
(num_processes over num_machines): with its default multi-node launcher on machines
without pdsh, each machine starts a one-rank world of its own, which trains silently.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from alignvl_scale.config import UserError
from alignvl_scale.runtime.distributed import free_port


class LaunchError(UserError):
    """The launch's topology is not what it declares, or cannot be read."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world: int
    local_rank: int
    launcher: str  # torchrun | deepspeed | accelerate | slurm | mpi | none
    node_rank: int = 0
    nodes: int = 1

    @property
    def is_first(self) -> bool:
        """The launch's global rank 0: it alone claims the run folder and converts checkpoints."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world} ({self.launcher}, node {self.node_rank} of {self.nodes})"


def _ints(env: dict, *names: str) -> list[int] | None:
    values = [env.get(name) for name in names]
    if any(v is None for v in values):
        return None
    try:
        return [int(v) for v in values]
    except ValueError:
        raise LaunchError(f"launch environment: {', '.join(f'{n}={v!r}' for n, v in zip(names, values, strict=True))}"
                          " are not integers") from None


def _launcher(env: dict) -> str:
    if any(k.startswith("ACCELERATE_") for k in env):
        return "accelerate"
    if "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        return "deepspeed"
    return "torchrun"


def launch_env(env: dict | None = None) -> LaunchEnv:
    """This process's place in the launch (no process group needed)."""
    env = dict(os.environ if env is None else env)
    torch_style = _ints(env, "RANK", "WORLD_SIZE")
    if torch_style:
        rank, world = torch_style
        local = int(env.get("LOCAL_RANK", "0"))
        node = int(env.get("GROUP_RANK", env.get("CROSS_RANK", "0")))
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", str(world))))
        nodes = int(env.get("CROSS_SIZE", max(1, world // max(local_world, 1))))
        found = LaunchEnv(rank, world, local, _launcher(env), node, nodes)
    elif mpi := _ints(env, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
        local_world = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1"))
        found = LaunchEnv(mpi[0], mpi[1], local, "mpi", mpi[0] // max(local_world, 1),
                          max(1, mpi[1] // max(local_world, 1)))
    elif (slurm := _ints(env, "SLURM_PROCID", "SLURM_NTASKS")) and slurm[1] > 1:
        found = LaunchEnv(slurm[0], slurm[1], int(env.get("SLURM_LOCALID", "0")), "slurm",
                          int(env.get("SLURM_NODEID", "0")), int(env.get("SLURM_NNODES", "1")))
    else:
        found = LaunchEnv(0, 1, 0, "none")
    if not 0 <= found.rank < found.world:
        raise LaunchError(f"launch environment: rank {found.rank} is not in a world of {found.world}")
    return found


def export_torch_env(launch: LaunchEnv, env: dict | None = None) -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK (and a one-rank MASTER_ADDR/PORT) for env:// process
    groups, where the launcher did not set them. srun and mpirun need MASTER_ADDR and
    MASTER_PORT from the job script (the first node of the allocation)."""
    env = os.environ if env is None else env
    if launch.launcher == "none":
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    elif launch.launcher in ("slurm", "mpi"):
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in env]
        if missing:
            raise LaunchError(f"launched by {launch.launcher} without torchrun: set {' and '.join(missing)} to the "
                              "first node's address and a free port in the job script (launchers/slurm.example.sh)")
    env.setdefault("RANK", str(launch.rank))
    env.setdefault("WORLD_SIZE", str(launch.world))
    env.setdefault("LOCAL_RANK", str(launch.local_rank))


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1 and len(chain) < 16:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the command name: state, then ppid
        chain.append(pid)
    return chain


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def accelerate_declaration(pid: int | None = None) -> tuple[int, int, str] | None:
    """(num_processes, num_machines, multi-node launcher) that the `accelerate launch`
    above this process was given (command line, else its config file), or None when no
    such process is an ancestor (Linux /proc; elsewhere None)."""
    for ancestor in _ancestors(os.getpid() if pid is None else pid):
        argv = _cmdline(ancestor)
        try:
            at = next(i for i, a in enumerate(argv) if Path(a).name == "accelerate" or a.endswith("accelerate_cli.py"))
        except StopIteration:
            continue
        if argv[at + 1:at + 2] != ["launch"]:
            continue
        from accelerate.commands.config.config_args import default_config_file, load_config_from_file
        from accelerate.commands.launch import launch_command_parser

        args, _ = launch_command_parser().parse_known_args(argv[at + 2:])
        config_file = args.config_file
        if config_file and not Path(config_file).is_absolute():
            config_file = str(Path(f"/proc/{ancestor}/cwd").resolve() / config_file)
        defaults = load_config_from_file(config_file) if config_file or Path(default_config_file).exists() else None
        processes = args.num_processes or getattr(defaults, "num_processes", None) or 1
        machines = args.num_machines or getattr(defaults, "num_machines", None) or 1
        multinode = (args.deepspeed_multinode_launcher or (getattr(defaults, "deepspeed_config", None) or {})
                     .get("deepspeed_multinode_launcher") or "pdsh")
        return int(processes), int(machines), str(multinode)
    return None


def check_declared_world(launch: LaunchEnv, declared: tuple[int, int, str] | None) -> None:
    """Refuse a world that differs from what `accelerate launch` was asked for, before any
    process group: each machine would train a run of its own."""
    if declared is None:
        return
    processes, machines, multinode = declared
    if processes != launch.world:
        hint = (" Accelerate's multi-node DeepSpeed launcher is "
                f"{multinode!r}: set `deepspeed_multinode_launcher: standard` under deepspeed_config in the accelerate "
                "YAML (or pass --deepspeed_multinode_launcher standard), as launchers/accelerate/*.yaml do"
                if machines > 1 and multinode != "standard" else "")
        raise LaunchError(f"accelerate launch declared {processes} processes on {machines} machine(s), but this "
                          f"process is {launch.describe()}: the machines would train separate runs.{hint}")



def report_to_launcher(message: str) -> None:
    """Under torchrun (and `accelerate launch`, which runs it): `message` as this rank's
    root cause in the agent's ChildFailedError summary, through torchelastic's error file
    (TORCHELASTIC_ERROR_FILE, what its `@record` writes for an uncaught exception), so the
    summary's last lines name the error, not "To enable traceback see ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
    except OSError:
        pass  # the line on stderr is still there
