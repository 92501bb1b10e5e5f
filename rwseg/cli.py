"""The ``rwseg`` command line: ``rwseg train|evaluate|compare|plan|check-kernels [flags]``.

One flag library for every subcommand: absl flags, with ml_collections' config flags for
``--config``. ``rwseg --help`` lists the subcommands, ``rwseg <command> --help`` its
flags. ``python -m rwseg COMMAND`` (:mod:`rwseg.__main__`) is the same. This is the only
module of rwseg that parses command-line arguments; the benchmarks are scripts of
``experiments/benchmarks/`` with flags of their own.

Logging is quiet by default: library, orbax and absl logs are shown from WARNING up
(what a run prints is its progress bar and the final metrics table); ``--verbosity 0``
(``-v 0``) shows INFO logs, ``--verbosity 1`` and up debug logs.

Flags are defined only for the subcommand being run (:func:`run_command`), so importing
rwseg (or this module) never adds flags to ``absl.flags.FLAGS``.
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import os
import sys
from typing import Callable

__all__ = ["COMMANDS", "main", "run_command"]


@dataclasses.dataclass(frozen=True)
class Command:
    summary: str
    usage: str
    define: Callable[[], None]
    run: Callable[[list, str], int | None]


# --------------------------------------------------------------------------- shared


def _quiet_logs() -> None:
    """Library/orbax/absl logs at WARNING unless ``--verbosity``/``-v`` was given."""
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        logging.get_absl_handler().addFilter(_drop_known_noise)


_NOISE = (
    "Using custom data configuration",  # tfds, on every load of the built-in dataset's generated config
    "OpenCV is not installed",          # tfds image decoding falls back to PIL (correct, only slower)
    "Given directory is read only",     # orbax, on every read-only CheckpointManager (rwseg evaluate)
)


def _drop_known_noise(record: std_logging.LogRecord) -> bool:
    """Drop harmless tfds/orbax warnings that every run would print (shown with ``--verbosity``)."""
    return record.levelno >= std_logging.ERROR or not str(record.msg).startswith(_NOISE)


def _fail(prog: str, message) -> None:
    sys.exit(f"{prog}: error: {message}")


# --------------------------------------------------------------------------- train


def _define_train() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config: a shipped method name (baseline, spn, rwn, gcrf, dilated, rawks) or the path "
        "of a config file, with an optional ':smoke' (few-second run); --config.key=value overrides a field.",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, panels); resumes if it has checkpoints.")
    flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS", ""),
                        "host:port of process 0 for multi-host runs (default: $JAX_COORDINATOR_ADDRESS).")
    flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                         "Number of processes (default: $JAX_NUM_PROCESSES or 1).", lower_bound=1)
    flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", "0")),
                         "This process's index (default: $JAX_PROCESS_ID or 0).", lower_bound=0)
    flags.DEFINE_integer("heartbeat_timeout_seconds", 60,
                         "Multi-process: a process silent this long is declared dead and every other one stops "
                         "(exit status 76 at its next collective if the dead one's connections closed, else "
                         "after this timeout, also with status 76).", lower_bound=1)
    flags.mark_flags_as_required(["config", "workdir"])


def _run_train(argv, prog) -> int:
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        _fail(prog, f"unexpected arguments: {argv[1:]}")
    import jax

    from rwseg.train.parallel import initialize
    from rwseg.train.preemption import exit_lost_process_on_abort

    initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
               heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)
    if FLAGS.num_processes == 1:
        return _train(FLAGS, prog)
    # a lost process: status 76, also where the coordination service aborts (preemption.py)
    with exit_lost_process_on_abort(FLAGS.workdir, prog):
        status = _train(FLAGS, prog)
        jax.distributed.shutdown()  # its barrier here, not at exit: a process lost meanwhile is status 76 too
    return status


def _train(FLAGS, prog) -> int:
    """``rwseg train`` after ``jax.distributed.initialize``: the run, its messages and exit status."""
    import jax

    from rwseg.train.checkpoint import CheckpointMismatchError, NoIntactCheckpointError
    from rwseg.train.config_check import ConfigError, check_config
    from rwseg.train.evaluate import markdown_table
    from rwseg.train.preemption import PREEMPTED_EXIT_STATUS, Preempted, exit_lost_process
    from rwseg.train.trainer import train_and_evaluate

    try:  # user errors: one clear message, no traceback, exit status 1
        check_config(FLAGS.config, workdir=FLAGS.workdir)
        result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ConfigError, NoIntactCheckpointError, CheckpointMismatchError) as e:
        _fail(prog, e)
    except Preempted as e:  # SIGTERM / SIGINT: checkpointed; the same command resumes
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT_STATUS
    except jax.errors.JaxRuntimeError as e:  # multi-process: a collective failed, another process is gone
        if FLAGS.num_processes > 1:
            exit_lost_process(e, FLAGS.workdir, prog)  # status 76, without the shutdown barrier
        raise
    if result:
        print(markdown_table([(FLAGS.config.method, result)], FLAGS.config.trimap_widths))
        print(f"results and panels: {os.path.join(FLAGS.workdir, 'eval')}")
    return 0


# --------------------------------------------------------------------------- evaluate


def _define_evaluate() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Run directory written by `rwseg train`.")
    flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to evaluate.")
    flags.DEFINE_string("baseline_workdir", "", "Add this run's predictions as the panels' baseline column.")
    flags.DEFINE_integer("eval_batches", None, "Evaluate the first N * eval_batch_size images (0 = the whole "
                         "split; default: the run's config).", lower_bound=0)
    flags.mark_flag_as_required("workdir")


def _run_evaluate(argv, prog) -> int:
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        _fail(prog, f"unexpected arguments: {argv[1:]}")
    from rwseg.train.evaluate import evaluate_run

    try:
        _, out = evaluate_run(FLAGS.workdir, checkpoint=FLAGS.checkpoint, baseline_workdir=FLAGS.baseline_workdir,
                              eval_batches=FLAGS.eval_batches)
    except FileNotFoundError as e:
        _fail(prog, e)
    print((out / "metrics.md").read_text())
    print(f"results: {out / 'metrics.json'}; panels: {out / 'panels.png'}")
    return 0


# --------------------------------------------------------------------------- compare


def _define_compare() -> None:
    from absl import flags

    from rwseg.compare import DEFAULT_METHODS

    flags.DEFINE_list("methods", list(DEFAULT_METHODS),
                      "Comma-separated methods among spn, rwn, gcrf, dilated, rawks (the baseline always runs).")
    flags.DEFINE_string("workdir", "runs/main", "Output directory (one run directory per method, the table, panels).")
    flags.DEFINE_integer("steps", None, "Training steps per method (default: each config's).", lower_bound=1)
    flags.DEFINE_boolean("smoke", False, "Few-second configs (tiny model, 32x32 images, 5 steps).")
    flags.DEFINE_string("config_dir", "", "Directory of <method>.py config files (default: the shipped "
                        "rwseg.configs).")
    flags.DEFINE_boolean("no_progress", False, "No progress bars.")


def _run_compare(argv, prog) -> int:
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        _fail(prog, f"unexpected arguments: {argv[1:]}")
    from rwseg import compare

    methods = [m.strip() for m in FLAGS.methods if m.strip()]
    try:
        compare.check_methods(methods, FLAGS.config_dir or None)
    except (ValueError, FileNotFoundError) as e:
        _fail(prog, e)
    compare.run(methods, workdir=FLAGS.workdir, steps=FLAGS.steps, smoke=FLAGS.smoke,
                config_dir=FLAGS.config_dir or None, progress=not FLAGS.no_progress)
    return 0


# --------------------------------------------------------------------------- plan


def _define_plan() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config: a shipped method name or a config file path, with an optional ':smoke'; "
        "--config.key=value overrides a field (e.g. --config.compute_dtype=bfloat16, --config.remat=True, "
        "--config.microbatches=4).", lock_config=True)
    flags.DEFINE_string("topology", None, "TPU topology to compile for, e.g. v5e:16x16, v4:4x4x8, v5p:4x4x8, v6e:16x16.")
    flags.DEFINE_integer("batch_per_chip", None, "Examples per chip (global batch = this x chips; default: the "
                         "config's batch_size, which must split over the chips).", lower_bound=1)
    flags.DEFINE_integer("crop", None, "Crop size (default: config.data.crop_size).", lower_bound=8)
    flags.DEFINE_list("steps", ["train", "eval"], "Which steps to compile: train, eval.")
    flags.DEFINE_float("hbm_gib", None, "HBM per chip to plan against (default: the TPU generation's).")
    flags.DEFINE_integer("max_tries", 6, "When a step does not fit: how many settings (remat, bfloat16, "
                         "microbatches, smaller batch) to compile in search of one that fits (0 = none).",
                         lower_bound=0)
    flags.DEFINE_boolean("levers", False, "Also compile the train step with each lever alone (remat, bfloat16, "
                         "microbatches=2) and show what each saves (one more compile per lever).")
    flags.mark_flags_as_required(["config", "topology"])


def _run_plan(argv, prog) -> int:
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        _fail(prog, f"unexpected arguments: {argv[1:]}")
    from rwseg.train import plan

    try:
        mesh = plan.topology_mesh(FLAGS.topology)
        result = plan.plan_config(FLAGS.config, FLAGS.topology, batch_per_chip=FLAGS.batch_per_chip,
                                  crop=FLAGS.crop, hbm_gib=FLAGS.hbm_gib, steps=tuple(FLAGS.steps), mesh=mesh)
    except plan.PlanError as e:
        _fail(prog, e)
    print(plan.format_plan(result), flush=True)
    loops = [f"{s.name}: {c}" for s in result.steps for c in s.collectives_in_loops]
    if loops:
        print("\ncollectives inside loops (every device waits on the others once per iteration):\n  "
              + "\n  ".join(loops))
    if FLAGS.levers and "train" in FLAGS.steps:
        rows = plan.compare_levers(FLAGS.config, FLAGS.topology, batch_per_chip=result.batch_size // result.num_chips,
                                   crop=FLAGS.crop, hbm_gib=FLAGS.hbm_gib, mesh=mesh, base=result)
        print("\nwhat each lever saves (train step, each alone):\n\n" + plan.format_levers(rows), flush=True)
    if result.fits:
        return 0
    failed = ", ".join(s.name for s in result.steps if not s.fits)
    print(f"\n{prog}: the {failed} step does not fit {result.hbm_bytes / plan.GIB:.2f} GiB per chip",
          flush=True)
    if FLAGS.max_tries:
        print("searching for a setting that fits (each try is one more compile) ...", flush=True)
        flags_, fitting, tried = plan.suggest_fit(
            FLAGS.config, FLAGS.topology, batch_per_chip=result.batch_size // result.num_chips, crop=FLAGS.crop,
            hbm_gib=FLAGS.hbm_gib, max_tries=FLAGS.max_tries, mesh=mesh,
            step_names=tuple(s.name for s in result.steps if not s.fits))
        if fitting is not None:
            peak = max(s.peak_bytes for s in fitting.steps)
            print(f"fits with: {flags_} (peak {peak / plan.GIB:.2f} GiB per chip)")
        else:
            print("no tried setting fits; tried: " + "; ".join(tried))
    else:
        print("settings that may fit: --config.remat=True, --config.compute_dtype=bfloat16, "
              "--config.microbatches=N, a smaller --batch_per_chip (--max_tries N compiles them)")
    return 1


# --------------------------------------------------------------------------- check-kernels


def _define_check_kernels() -> None:
    from absl import flags

    flags.DEFINE_enum("kernel", "auto", ["auto", "pallas", "pallas_gpu"],
                      "The kernel to check: auto = the kernel of this backend (the TPU kernel on CPU).")
    flags.DEFINE_bool("interpret", None, "Run the kernel in Pallas interpret mode (default: on CPU only).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "float64"], "Precision of the check.")


def _run_check_kernels(argv, prog) -> int:
    from absl import flags

    if len(argv) > 1:
        _fail(prog, f"unexpected arguments {argv[1:]}")
    if flags.FLAGS.dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    from rwseg import spn_verify

    kernel = None if flags.FLAGS.kernel == "auto" else flags.FLAGS.kernel
    return spn_verify.report(kernel, interpret=flags.FLAGS.interpret, dtype=flags.FLAGS.dtype)


COMMANDS = {
    "train": Command("train one method (and evaluate it)",
                     "--config NAME|PATH[:smoke] --workdir DIR [--config.key=value ...]", _define_train, _run_train),
    "evaluate": Command("evaluate a saved run: metrics table and panels",
                        "--workdir DIR [--checkpoint best|latest] [--baseline_workdir DIR] [--eval_batches N]",
                        _define_evaluate, _run_evaluate),
    "compare": Command("the main job: train + evaluate the baseline and methods, print the table",
                       "[--methods spn,rwn] [--workdir runs/main] [--steps N] [--smoke]", _define_compare,
                       _run_compare),
    "plan": Command("compile the train and eval steps for a TPU topology ahead of time: memory, FLOPs, "
                    "collectives per chip (needs rwseg[tpu])",
                    "--config NAME|PATH[:smoke] --topology v5e:16x16 [--batch_per_chip N] [--crop S] "
                    "[--config.key=value ...]", _define_plan, _run_plan),
    "check-kernels": Command("the device check: compare the SPN Pallas kernel with the scan on this chip, "
                             "print 'verified' or the difference (rwseg.spn_verify)",
                             "[--kernel auto|pallas|pallas_gpu] [--interpret] [--dtype float32|float64]",
                             _define_check_kernels, _run_check_kernels),
}

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "-?")


def _command_help(prog: str, command: Command) -> str:
    from absl import flags

    listing = "\n".join(l for l in flags.FLAGS.module_help(__name__).splitlines()
                         if l.strip() and l.strip() != f"{__name__}:")  # drop absl's module heading
    return (f"usage: {prog} {command.usage}\n\n{command.summary}.\n\nflags:\n{listing}\n"
            "  --verbosity, -v: logging level: -1 (warnings, the default of rwseg), 0 (info), 1+ (debug)\n"
            "    (--helpfull lists every flag, absl's and jax's included)\n")


def _resolve_config_argv(argv: list, prog: str) -> list:
    """``--config NAME[:arg]`` / ``--config=...`` -> the file it names (:func:`rwseg.train.config_files.resolve`),
    since ml_collections' config flag only takes paths."""
    from rwseg.train.config_files import resolve

    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out += argv[i:]
            break
        if arg in ("--config", "-config") and i + 1 < len(argv):
            value, head, i = argv[i + 1], [arg], i + 2
        elif arg.startswith(("--config=", "-config=")):
            head, value, i = [], arg.split("=", 1)[1], i + 1
            arg = arg.split("=", 1)[0]
        else:
            out.append(arg)
            i += 1
            continue
        try:
            value = resolve(value)
        except FileNotFoundError as e:
            _fail(prog, f"--config: {e}")
        out += head + [value] if head else [f"{arg}={value}"]
    return out


def run_command(name: str, argv: list | None = None, *, prog: str | None = None) -> int:
    """Run subcommand ``name`` with ``argv`` (default ``sys.argv[1:]``) under ``absl.app``;
    exits the process with the command's status (as ``absl.app.run`` does)."""
    from absl import app

    command = COMMANDS[name]
    prog = prog or f"rwseg {name}"
    argv = list(sys.argv[1:] if argv is None else argv)
    command.define()
    head = argv[: argv.index("--")] if "--" in argv else argv
    if any(a in HELP_FLAGS for a in head):
        print(_command_help(prog, command))
        sys.exit(0)
    if name in ("train", "plan"):
        argv = _resolve_config_argv(argv, prog)
    if name == "plan":
        # it compiles for compile-only TPU devices: the local backend only traces, so it stays the CPU (libtpu
        # does not try to claim a TPU of this machine), and several planners may load libtpu at once
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    def main(args):
        _quiet_logs()
        return command.run(args, prog)

    app.run(main, argv=[prog] + argv)
    return 0  # not reached: app.run exits


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {n:{width}s}  {c.summary}" for n, c in COMMANDS.items()]
    return ("usage: rwseg COMMAND [flags]   (rwseg COMMAND --help: the command's flags)\n\n"
            "rwseg: affinity-based segmentation operators in JAX; training, evaluation, comparison.\n\n"
            "commands:\n" + "\n".join(lines) + "\n\n"
            "examples:\n"
            "  rwseg compare --smoke                             # seconds: baseline vs spn, tiny configs\n"
            "  rwseg train --config spn --workdir runs/spn --config.num_steps=1000\n"
            "  rwseg evaluate --workdir runs/spn --baseline_workdir runs/baseline\n"
            "  rwseg plan --config spn --topology v5e:16x16 --batch_per_chip 2 --crop 512   # needs rwseg[tpu]\n"
            "  rwseg check-kernels                               # on a GPU/TPU: is the SPN kernel right here?\n")


def main(argv: list | None = None) -> int:
    """``rwseg COMMAND [flags]`` (the console script)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in HELP_FLAGS:
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"rwseg: error: unknown command {argv[0]!r} (expected one of {', '.join(COMMANDS)})\n\n{_usage()}",
              file=sys.stderr)
        return 2
    return run_command(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
